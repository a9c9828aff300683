"""What ``aioserve run`` logs about the deployment: the startup summary, once it is ready, and the
drain line of a worker at a signal.

The summary is one log record (logger ``aioserve.cli``, INFO)::

    aioserve 0.1.0 ready on http://127.0.0.1:8000 (uvicorn, pid 4242)
      endpoint hello  GET       /hello  -> hello
      endpoint greet  GET,POST  /greet  -> greeter-fr 50%, greeter-en 50%
      backend hello       1 replica
      backend greeter-fr  2 replicas

An endpoint's line gives its methods, its route (``(handle only)`` without one) and where its
traffic goes (weights as percentages; shadows after ``+ shadow``). With ``--workers N`` every
worker builds the same deployment and the first one ready logs the summary, once, for all.
At most :data:`MAX_LISTED` endpoints and backends are listed; the rest are counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from ._types import Lifecycle
from .serve import Serve

__all__ = [
    "MAX_LISTED",
    "in_flight",
    "log_drain",
    "startup_summary",
    "summary_claimed",
    "summary_marker",
]

logger = logging.getLogger("aioserve.cli")

MAX_LISTED = 20


def _percent(weights: Mapping[str, float]) -> str:
    return ", ".join(f"{tag} {weight * 100:.3g}%" for tag, weight in weights.items())


def _traffic(info: Mapping[str, Any]) -> str:
    traffic: Mapping[str, float] = info["traffic"]
    if not traffic:
        where = "no traffic (503 until one is set)"
    elif len(traffic) == 1:
        where = next(iter(traffic))
    else:
        where = _percent(traffic)
    if info["shadows"]:
        where += f" + shadow {_percent(info['shadows'])}"
    return where


def _table(rows: list[list[str]]) -> list[str]:
    """Rows of cells, every column but the last padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  " + "".join(row[i].ljust(width + 2) for i, width in enumerate(widths)) + row[-1]
        for row in rows
    ]


def _listed(rows: list[list[str]], what: str) -> list[str]:
    if not rows:
        return [f"  no {what}s"]
    lines = _table(rows[:MAX_LISTED])
    if len(rows) > MAX_LISTED:
        lines.append(f"  ... and {len(rows) - MAX_LISTED} more {what}s")
    return lines


def startup_summary(
    serve: Serve, *, url: str, server: str, pid: int, workers: int = 1, root_path: str = ""
) -> str:
    """The summary block of a ready deployment (one log message, several lines)."""
    details = [server]
    if workers > 1:
        details.append(f"{workers} worker processes, each serving this; logged by pid {pid}")
    else:
        details.append(f"pid {pid}")
    if root_path:
        details.insert(0, f"root_path {root_path}")
    lines = [f"aioserve {__version__} ready on {url} ({', '.join(details)})"]
    endpoint_rows = [
        [
            "endpoint " + name,
            ",".join(info["methods"]) if info["route"] is not None else "-",
            info["route"] or "(handle only)",
            f"-> {_traffic(info)}",
        ]
        for name, info in serve.list_endpoints().items()
    ]
    lines += _listed(endpoint_rows, "endpoint")
    backend_rows = [
        ["backend " + tag, f"{n} replica{'s' if n != 1 else ''}"]
        for tag, info in serve.list_backends().items()
        for n in [info["num_replicas"]]
    ]
    lines += _listed(backend_rows, "backend")
    return "\n".join(lines)


def summary_marker(run_directory: str | Path) -> Path:
    """The file whose creation elects the worker that logs the summary (``--workers``): in the
    directory the parent makes for the run, and removes with it."""
    return Path(run_directory) / "summary"


def summary_claimed(marker: Path) -> bool:
    """Whether this process is the first to claim ``marker`` (it creates it)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def in_flight(serve: Serve) -> int:
    """Requests running or queued in the instance's backends."""
    total = 0
    for tag in serve.list_backends():
        stats = serve.backend_statistics(tag)
        total += stats.num_queued + sum(stats.in_flight.values())
    return total


def log_drain(serve: Serve, timeout_s: float) -> None:
    """A worker at a signal: stop admitting, and say how many requests drain for how long
    (once: a server may pass on more than one signal)."""
    if serve.state is not Lifecycle.RUNNING:
        return
    serve.begin_shutdown()
    logger.info(
        "Shutting down: %d request(s) in flight drain for up to %.1f s "
        "(--timeout-graceful-shutdown).",
        in_flight(serve),
        timeout_s,
    )
