"""Shared machinery for the benchmarks: servers in subprocesses, A B rounds, Markdown tables.

Nothing here imports aioserve: a benchmark names the servers it compares by the argv that starts
them (see :func:`server_argv`). Load generation lives in :mod:`benchmarks._load`; its public names
are re-exported here so that a benchmark imports from one place.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import importlib.metadata
import importlib.util
import math
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from benchmarks._load import (
    LOAD_TOOL_ENV,
    LOCAL_HOST,
    REPO_ROOT,
    LoadError,
    LoadResult,
    LoadTool,
    default_threads,
    describe_load_tool,
    free_port,
    parse_wrk_output,
    percentile,
    resolve_load_tool,
    run_asyncio_load,
    run_load,
    run_wrk,
    subprocess_env,
)

__all__ = [
    "FLOATS",
    "LOAD_TOOL_ENV",
    "LOCAL_HOST",
    "REPO_ROOT",
    "SERVERS",
    "LoadError",
    "LoadResult",
    "LoadTool",
    "Run",
    "ServerProcess",
    "ServerStartError",
    "alternate",
    "alternate_runs",
    "default_threads",
    "describe_granian",
    "describe_load_tool",
    "describe_uvicorn",
    "format_rps",
    "free_port",
    "granian_installed",
    "markdown_table",
    "median_result",
    "parse_wrk_output",
    "percentile",
    "ratio",
    "resolve_load_tool",
    "run_asyncio_load",
    "run_load",
    "run_wrk",
    "server_argparser",
    "server_argv",
    "time_run",
    "uvicorn_settings",
    "warm_up",
]


class ServerStartError(RuntimeError):
    """A benchmark server exited or did not answer its readiness path in time."""


# The body of the JSON row: 1,000 floats with full 17-digit precision, as model outputs
# (embeddings, probabilities) are; the same list in every server.
_RNG = random.Random(1000)
FLOATS: list[float] = [_RNG.random() for _ in range(1000)]


# --------------------------------------------------------------------------- servers


class ServerProcess:
    """A server in a subprocess, ready once ``GET ready_path`` on its port answers 200.

    Use as a context manager: entering starts the process and waits for readiness, leaving sends
    SIGTERM and, after ``stop_timeout_s``, SIGKILL. The server's stdout and stderr go to a temp
    file whose tail is included in the error when the server fails to start.
    """

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        *,
        ready_path: str = "/-/healthz",
        startup_timeout_s: float = 20.0,
        max_attempts: int = 400,
        poll_interval_s: float = 0.05,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.ready_path = ready_path
        self.startup_timeout_s = startup_timeout_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._process is None else f"pid={self._process.pid}"
        return f"ServerProcess({shlex.join(self.argv)!r}, port={self.port}, {state})"

    def url(self, path: str) -> str:
        return f"http://{LOCAL_HOST}:{self.port}{path}"

    @property
    def returncode(self) -> int | None:
        """The exit code if the server has exited (e.g. crashed mid-run), else None."""
        return None if self._process is None else self._process.poll()

    @property
    def log_path(self) -> str | None:
        return None if self._log is None else self._log.name

    def log_tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters the server wrote to stdout/stderr."""
        if self._log is None:
            return ""
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace")
        return text[-max_chars:]

    def __enter__(self) -> ServerProcess:
        self._log = tempfile.NamedTemporaryFile(prefix="aioserve-bench-", suffix=".log")
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=subprocess_env(),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_ready(self) -> None:
        # The one place a short poll is fine: a foreign process gives no readiness event.
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "no attempt made"
        for _ in range(self.max_attempts):
            returncode = self._process.poll()
            if returncode is not None:
                raise ServerStartError(
                    f"Server {shlex.join(self.argv)!r} exited with code {returncode} before "
                    f"answering GET {self.ready_path!r}.\nServer output:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                break
            try:
                status = _http_get_status(self.port, self.ready_path, timeout_s=1.0)
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return
                last_error = f"HTTP {status}"
            time.sleep(self.poll_interval_s)
        raise ServerStartError(
            f"Server {shlex.join(self.argv)!r} did not answer GET {self.ready_path!r} on port "
            f"{self.port} with 200 within {self.startup_timeout_s:.0f} s or {self.max_attempts} "
            f"attempts (last: {last_error}).\nServer output:\n{self.log_tail()}"
        )

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and delete its log. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=self.stop_timeout_s)
        log, self._log = self._log, None
        if log is not None:
            log.close()


def _http_get_status(port: int, path: str, *, timeout_s: float) -> int:
    return _http_request(port, "GET", path, timeout_s=timeout_s)


def _http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    timeout_s: float,
) -> int:
    connection = http.client.HTTPConnection(LOCAL_HOST, port, timeout=timeout_s)
    try:
        connection.request(method, path, body=body, headers=dict(headers or {}))
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def warm_up(
    port: int,
    requests: Sequence[tuple[str, str, bytes | None, Mapping[str, str]]],
    *,
    repeat: int = 50,
) -> None:
    """Send each ``(method, path, body, headers)`` ``repeat`` times, sequentially.

    First-request costs (imports, caches, thread pool start-up) are then not measured, and a
    route the server does not serve fails here, with a clear error, rather than as a table of
    non-2xx responses.
    """
    for method, path, body, headers in requests:
        for _ in range(repeat):
            try:
                status = _http_request(port, method, path, body, headers, timeout_s=10.0)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerStartError(
                    f"{method} {path} on port {port} failed during warm-up: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not 200 <= status < 300:
                raise ServerStartError(
                    f"{method} {path} on port {port} answered HTTP {status} during warm-up; "
                    "the server must serve every benchmark route with a 2xx."
                )


# --------------------------------------------------------------------------- uvicorn settings


SERVERS = ("uvicorn", "granian")


def granian_installed() -> bool:
    """Whether granian (the ``aioserve[granian]`` extra) is importable here."""
    return importlib.util.find_spec("granian") is not None


def uvicorn_settings(server: str = "uvicorn") -> dict[str, str]:
    """The fastest loop and uvicorn HTTP implementation importable here, used by every server;
    ``server`` is the HTTP server (``uvicorn`` or ``granian``, which ignores ``http``)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    http_impl = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return {"loop": loop, "http": http_impl, "server": server}


def server_argparser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every benchmark server accepts:
    ``--port P [--loop L] [--http H] [--server uvicorn|granian]``."""
    defaults = uvicorn_settings()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--port", type=int, required=True, help=f"port on {LOCAL_HOST}")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default=defaults["loop"], help="event loop"
    )
    parser.add_argument(
        "--http", choices=["httptools", "h11"], default=defaults["http"], help="uvicorn http"
    )
    parser.add_argument(
        "--server", choices=SERVERS, default="uvicorn", help="HTTP server (default uvicorn)"
    )
    return parser


@dataclass(frozen=True)
class RunLength:
    """How long a load benchmark runs: the defaults, and the shorter ``--quick`` smoke test."""

    duration_s: float = 5.0
    rounds: int = 2
    quick_duration_s: float = 1.0
    quick_rounds: int = 1


def add_run_options(parser: argparse.ArgumentParser, length: RunLength) -> None:
    """``--duration``, ``--rounds``, ``--tool`` and ``--quick``, shared by the load benchmarks."""
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds per run (default {length.duration_s:g}, "
        f"{length.quick_duration_s:g} with --quick)",
    )
    parser.add_argument("--rounds", type=int, help=f"alternating rounds (default {length.rounds})")
    parser.add_argument("--tool", choices=["wrk", "asyncio"], help="load generator")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {length.quick_duration_s:g} s, {length.quick_rounds} round(s)",
    )


def run_length(
    parser: argparse.ArgumentParser, args: argparse.Namespace, length: RunLength
) -> tuple[float, int]:
    """(seconds per run, rounds) from the options of :func:`add_run_options`, checked."""
    duration = args.duration or (length.quick_duration_s if args.quick else length.duration_s)
    rounds = args.rounds or (length.quick_rounds if args.quick else length.rounds)
    if not math.isfinite(duration) or duration <= 0:
        parser.error(f"--duration must be a positive number of seconds, got {duration!r}.")
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds!r}.")
    return duration, rounds


def server_argv(module: str, port: int, settings: Mapping[str, str]) -> list[str]:
    """The argv that starts ``python -m <module>`` with the shared server command line."""
    return [
        sys.executable,
        "-m",
        module,
        "--port",
        str(port),
        "--loop",
        settings["loop"],
        "--http",
        settings["http"],
        "--server",
        settings.get("server", "uvicorn"),
    ]


def describe_uvicorn(settings: Mapping[str, str]) -> str:
    """E.g. ``uvicorn 0.30.6 (loop=uvloop, http=httptools, 1 worker, access log off)``."""
    return (
        f"uvicorn {_version('uvicorn')} (loop={settings['loop']}, http={settings['http']}, "
        "1 worker, access log off)"
    )


def describe_granian(settings: Mapping[str, str]) -> str:
    """E.g. ``granian 2.8.9 (loop=uvloop, HTTP/1.1, 1 worker, 1 runtime thread, ...)``."""
    return (
        f"granian {_version('granian')} (loop={settings['loop']}, HTTP/1.1, 1 worker, "
        "1 runtime thread, access log off)"
    )


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- A B rounds


def median_result(results: Sequence[LoadResult]) -> LoadResult:
    """Summarise repeated runs: medians of rps, p50 and p99; totals of requests, errors, time.

    NaN figures (a run that failed, see :meth:`LoadResult.failed`) are left out of the medians;
    the median is NaN only when every run failed.
    """
    if not results:
        raise ValueError("median_result() needs at least one LoadResult, got none.")

    def median(values: Iterable[float]) -> float:
        kept = [value for value in values if not math.isnan(value)]
        return statistics.median(kept) if kept else math.nan

    return LoadResult(
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
        duration_s=sum(r.duration_s for r in results),
        rps=median(r.rps for r in results),
        p50_ms=median(r.p50_ms for r in results),
        p99_ms=median(r.p99_ms for r in results),
        tool=results[0].tool,
    )


def alternate(
    cases: Sequence[tuple[str, Callable[[], LoadResult]]], rounds: int
) -> dict[str, list[LoadResult]]:
    """Run the cases interleaved, A B A B ..., so drift on a noisy machine hits all of them."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}.")
    names = [name for name, _ in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"Case names must be unique, got {names!r}.")
    results: dict[str, list[LoadResult]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, run in cases:
            results[name].append(run())
    return results


# --------------------------------------------------------------------------- tables


# One in-process run: does its work and returns how many calls it made.
Run = Callable[[], Awaitable[int]]


async def time_run(run: Run) -> float:
    """Microseconds per call of one run (garbage from earlier runs collected first)."""
    gc.collect()
    start = time.perf_counter_ns()
    calls = await run()
    return (time.perf_counter_ns() - start) / 1e3 / calls


async def alternate_runs(cases: Sequence[tuple[str, Run]], rounds: int) -> dict[str, list[float]]:
    """Time in-process cases interleaved, after one untimed warm-up run of each.

    Round r starts at case r (A B C, B C A, C A B, ...): no case always runs first or last.
    """
    for _, run in cases:
        await run()
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(rounds):
        start = r % len(cases)
        for name, run in [*cases[start:], *cases[:start]]:
            results[name].append(await time_run(run))
    return results


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing, NaN or the divisor is 0."""
    if numerator is None or denominator is None:
        return None
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return None
    return numerator / denominator


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def _is_numeric_column(values: Sequence[object]) -> bool:
    def is_number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    # All-missing columns stay left-aligned: there is nothing to line up.
    return all(v is None or is_number(v) for v in values) and any(map(is_number, values))


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table; numeric columns are right-aligned.

    Cells are formatted by type: ``int`` as is (so pass req/s rounded to an int), ``float`` with
    two decimals (milliseconds, ratios), None and NaN as ``n/a``.
    """
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [_is_numeric_column([row.get(column) for row in rows]) for column in columns]
    widths = [
        max([len(column), 3, *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)
    ]

    def render(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if is_num else value.ljust(width)
            for value, width, is_num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (width - 1) + ":" if is_num else "-" * width
        for width, is_num in zip(widths, numeric, strict=True)
    ]
    return "\n".join([render(columns), render(rule), *(render(line) for line in cells)])


def format_rps(value: float | None) -> int | None:
    """Req/s for :func:`markdown_table`: no decimals."""
    if value is None or math.isnan(value):
        return None
    return round(value)
