"""Batching a real model: the digits random forest behind ``POST /predict``, over HTTP.

``python -m benchmarks.batching_model [--duration S] [--rounds N] [--connections 1,64] [--check]
[--quick]``

Two servers run at once on uvicorn with the same settings (see :mod:`benchmarks.model_app`):
aioserve serving the worked example's model backend ``examples/digits`` with one model version
(its ``async def __call__`` reads and checks the body; its sync ``@serve.batch`` method takes up
to 32 images per ``predict``, ``batch_wait_timeout_s=0.01`` as an upper bound) and a
bare Starlette route doing the same checks and scaling and calling the same model once per
request in its threadpool. One ``predict`` of the 50-tree forest costs about the same for 1
image or 32, so batching is what lets throughput grow with load.

Each concurrency is loaded A B A B ...; the table shows medians and the ratio aioserve /
Starlette. The mean batch is read from aioserve's own ``/-/metrics``
(``aioserve_batch_size{backend="digits",method="_predict"}``) before and after each aioserve run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks._harness import (
    LOCAL_HOST,
    SERVERS,
    LoadError,
    LoadResult,
    RunLength,
    ServerProcess,
    add_run_options,
    alternate,
    default_threads,
    describe_granian,
    describe_load_tool,
    describe_uvicorn,
    format_rps,
    free_port,
    markdown_table,
    median_result,
    ratio,
    resolve_load_tool,
    run_length,
    run_load,
    server_argv,
    uvicorn_settings,
    warm_up,
)

MODULE = "benchmarks.model_app"
LENGTH = RunLength(duration_s=5.0, rounds=2, quick_duration_s=1.0, quick_rounds=1)
DEFAULT_CONNECTIONS = (1, 64)
# An image of a 0 from the digits data set.
BODY = (
    b'{"pixels": [0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,'
    b"0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]}"
)
HEADERS = {"Content-Type": "application/json"}

# The targets: at 1 connection no slower than the bare route (within 10 %); at 64,
# >= 20 x the bare route with batches nearly full.
MIN_RATIO_ONE = 0.9
MIN_RATIO_MANY = 20.0
MIN_MEAN_BATCH = 30.0
MANY = 64
MAX_BATCH_SIZE = 32

_BATCH_SAMPLE = re.compile(
    r'^aioserve_batch_size_(sum|count)\{backend="digits",method="_predict"\} (\S+)$', re.MULTILINE
)


@dataclass(frozen=True)
class Options:
    duration_s: float
    rounds: int
    connections: tuple[int, ...]
    check: bool
    tool: str
    server: str = "uvicorn"


@dataclass(frozen=True)
class ModelCost:
    """What one ``predict`` of the model costs here, alone in this process (medians, ms)."""

    one_ms: float
    full_ms: float

    @property
    def ceiling(self) -> float:
        """The most batching can gain over one ``predict`` per request: 32 images for the
        price of ``full_ms`` instead of 32 x ``one_ms``."""
        return MAX_BATCH_SIZE * self.one_ms / self.full_ms


def model_cost(repeat: int = 30) -> ModelCost:
    """Time the example's model on 1 image and on a full batch, in this process."""
    from sklearn.datasets import load_digits

    from benchmarks.model_app import classifier
    from examples.digits.model import MAX_PIXEL

    model = classifier()
    images = load_digits().data[:MAX_BATCH_SIZE] / MAX_PIXEL

    def median_ms(rows: int) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            model.predict(images[:rows])
            times.append((time.perf_counter() - start) * 1000)
        return sorted(times)[len(times) // 2]

    return ModelCost(median_ms(1), median_ms(MAX_BATCH_SIZE))


@dataclass(frozen=True)
class Row:
    connections: int
    starlette: LoadResult
    aioserve: LoadResult
    mean_batch: float


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def batch_totals(port: int) -> tuple[float, float]:
    """(items, batches) the example's batch queue has dispatched so far, from ``/-/metrics``."""
    connection = http.client.HTTPConnection(LOCAL_HOST, port, timeout=10.0)
    try:
        connection.request("GET", "/-/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = {kind: float(value) for kind, value in _BATCH_SAMPLE.findall(text)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def post_load(
    server: ServerProcess, path: str, connections: int, duration_s: float, tool: str | None
) -> LoadResult:
    """``POST path`` with :data:`BODY` for ``duration_s``; a failed result if the load failed."""
    try:
        return run_load(
            server.url(path),
            connections=connections,
            duration_s=duration_s,
            threads=default_threads(connections),
            method="POST",
            body=BODY,
            headers=HEADERS,
            tool=tool,
        )
    except LoadError as exc:
        _progress(f"Load on {server!r} failed: {exc}")
        return LoadResult.failed(resolve_load_tool(tool))


def counted_post_load(
    server: ServerProcess,
    path: str,
    connections: int,
    duration_s: float,
    tool: str | None,
    batches: list[tuple[float, float]],
) -> LoadResult:
    """:func:`post_load` on aioserve; appends the (items, batches) the ``digits`` backend's
    batch queue dispatched meanwhile."""
    before = batch_totals(server.port)
    result = post_load(server, path, connections, duration_s, tool)
    after = batch_totals(server.port)
    batches.append((after[0] - before[0], after[1] - before[1]))
    return result


def mean_batch(batches: Sequence[tuple[float, float]]) -> float:
    """Items per batch over the (items, batches) of several runs; NaN without a batch."""
    count = sum(b for _, b in batches)
    return sum(n for n, _ in batches) / count if count else math.nan


def describe_server(server: str) -> str:
    settings = uvicorn_settings(server)
    return describe_granian(settings) if server == "granian" else describe_uvicorn(settings)


def measure(options: Options) -> list[Row]:
    settings = uvicorn_settings(options.server)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for name in ("starlette", "aioserve"):
            port = free_port()
            argv = [*server_argv(MODULE, port, settings), "--app", name]
            # Training the forest at startup takes a moment on a busy machine.
            server = stack.enter_context(ServerProcess(argv, port, startup_timeout_s=120.0))
            warm_up(port, [("POST", "/predict", BODY, HEADERS)])
            servers[name] = server
        candidate = servers["aioserve"]
        for connections in options.connections:
            _progress(f"POST /predict, {connections} connection(s): {options.rounds} x A B")
            batches: list[tuple[float, float]] = []
            load = ("/predict", connections, options.duration_s, options.tool)
            results = alternate(
                [
                    ("starlette", functools.partial(post_load, servers["starlette"], *load)),
                    ("aioserve", functools.partial(counted_post_load, candidate, *load, batches)),
                ],
                options.rounds,
            )
            rows.append(
                Row(
                    connections,
                    median_result(results["starlette"]),
                    median_result(results["aioserve"]),
                    mean_batch(batches),
                )
            )
    return rows


def verdicts(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The issue's targets, each with whether this run met it."""
    out: list[tuple[str, bool]] = []
    for row in rows:
        got = ratio(row.aioserve.rps, row.starlette.rps) or 0.0
        if row.connections == 1:
            out.append(
                (
                    f"1 connection: >= {MIN_RATIO_ONE:g} x the bare route (got {got:.2f} x)",
                    got >= MIN_RATIO_ONE,
                )
            )
        elif row.connections == MANY:
            out.append(
                (
                    f"{MANY} connections: >= {MIN_RATIO_MANY:g} x the bare route (got "
                    f"{got:.1f} x) with mean batch >= {MIN_MEAN_BATCH:g} (got "
                    f"{row.mean_batch:.1f})",
                    got >= MIN_RATIO_MANY and row.mean_batch >= MIN_MEAN_BATCH,
                )
            )
    return out


def render_report(rows: Sequence[Row], options: Options, cost: ModelCost) -> str:
    columns = [
        "connections",
        "Starlette req/s",
        "aioserve req/s",
        "ratio",
        "Starlette p99 ms",
        "aioserve p99 ms",
        "aioserve mean batch",
        "errors (Starlette / aioserve)",
    ]
    table = [
        {
            "connections": row.connections,
            "Starlette req/s": format_rps(row.starlette.rps),
            "aioserve req/s": format_rps(row.aioserve.rps),
            "ratio": ratio(row.aioserve.rps, row.starlette.rps),
            "Starlette p99 ms": round(row.starlette.p99_ms, 2),
            "aioserve p99 ms": round(row.aioserve.p99_ms, 2),
            "aioserve mean batch": None if math.isnan(row.mean_batch) else row.mean_batch,
            "errors (Starlette / aioserve)": f"{row.starlette.errors} / {row.aioserve.errors}",
        }
        for row in rows
    ]
    caption = (
        "**A 50-tree random forest on the digits data behind `POST /predict`**: aioserve with a "
        "sync `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)` method awaited by "
        "the example's model backend (`examples/digits`) vs a bare Starlette "
        "route calling the same model once per request in its threadpool. "
        f"{describe_server(options.server)}; load: "
        f"{describe_load_tool(resolve_load_tool(options.tool))}; {options.duration_s:g} s per "
        f"run, medians of {options.rounds} alternating rounds."
    )
    lines = [caption, "", markdown_table(table, columns), ""]
    lines.append(
        f"- the model here, alone: predict of 1 image {cost.one_ms:.1f} ms, of "
        f"{MAX_BATCH_SIZE} images {cost.full_ms:.1f} ms; so batching can gain at most "
        f"{cost.ceiling:.1f} x over one predict per request, before any HTTP cost."
    )
    lines.append(
        "- errors: non-2xx answers and socket errors, wrk's 2 s timeout included when wrk "
        "loads (an unbatched server at 64 connections can queue requests that long)."
    )
    for text, met in verdicts(rows):
        lines.append(f"- target {'met' if met else 'MISSED'}: {text}")
    return "\n".join(lines)


def _connections(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,64, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"connections must be at least 1, got {text!r}")
    return values


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching_model",
        description="A scikit-learn model behind POST /predict: aioserve with a sync "
        "@serve.batch method vs a bare Starlette route, in one run.",
    )
    add_run_options(parser, LENGTH)
    parser.add_argument(
        "--connections",
        type=_connections,
        default=DEFAULT_CONNECTIONS,
        help="concurrencies, comma-separated (default 1,64)",
    )
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="uvicorn",
        help="the HTTP server of both apps (default uvicorn)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with 1 when a target of the issue is missed"
    )
    args = parser.parse_args(argv)
    duration, rounds = run_length(parser, args, LENGTH)
    return Options(duration, rounds, args.connections, args.check, args.tool, args.server)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    _progress("Timing the model alone ...")
    cost = model_cost()
    rows = measure(options)
    print(render_report(rows, options, cost))
    if options.check and not all(met for _, met in verdicts(rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
