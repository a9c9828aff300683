"""The worked example's model over HTTP at concurrency 64, and replicas of a GIL-releasing model.

``python -m benchmarks.digits_model [--duration S] [--rounds N] [--connections 64]
[--tool wrk|asyncio] [--quick]``

Two servers from :mod:`benchmarks.model_app`, on uvicorn with the same settings, answer
``POST`` with ``{"pixels": [64 numbers]}``. Six cases, each loaded in turn for ``--rounds``
(A B C D E F, A B C D E F, ...) so that drift on a noisy machine hits them all alike:

- **digits** (the example's random forest, 50 trees): a bare Starlette route (the body read,
  then checks, scaling and one ``predict`` in its threadpool); aioserve with a sync ``def``
  handler, one ``predict`` per request (``/predict-unbatched``); aioserve with the example's
  model backend, whose ``async def __call__`` checks the body and awaits its sync
  ``@serve.batch`` method of up to 32 (``/predict``); the mean batch is read from its
  ``/-/metrics``.
- **numpy** (a 256 x 256 matrix product and a ``tanh``, which release the GIL; BLAS limited to
  one thread per call): a bare Starlette route (its threadpool runs many calls at once); aioserve
  with one sync replica and with two (each replica runs one call at a time on its own thread).

The table gives medians of req/s and p99, the mean batch, and the ratio to the bare route of the
same model; below it, two replicas over one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from benchmarks._harness import (
    LoadResult,
    RunLength,
    ServerProcess,
    add_run_options,
    alternate,
    describe_load_tool,
    describe_uvicorn,
    format_rps,
    free_port,
    markdown_table,
    median_result,
    ratio,
    resolve_load_tool,
    run_length,
    server_argv,
    uvicorn_settings,
    warm_up,
)
from benchmarks.batching_model import (
    BODY,
    HEADERS,
    counted_post_load,
    mean_batch,
    post_load,
)

MODULE = "benchmarks.model_app"
LENGTH = RunLength(duration_s=5.0, rounds=2, quick_duration_s=1.0, quick_rounds=1)
DEFAULT_CONNECTIONS = 64


@dataclass(frozen=True)
class Case:
    model: str
    name: str
    server: str  # "starlette" or "aioserve"
    path: str
    baseline: bool = False
    batched: bool = False


CASES = (
    Case("digits", "bare Starlette route (threadpool)", "starlette", "/predict", baseline=True),
    Case("digits", "aioserve, sync handler, unbatched", "aioserve", "/predict-unbatched"),
    Case("digits", "aioserve, example model, batched", "aioserve", "/predict", batched=True),
    Case("numpy", "bare Starlette route (threadpool)", "starlette", "/matmul", baseline=True),
    Case("numpy", "aioserve, 1 sync replica", "aioserve", "/matmul-1"),
    Case("numpy", "aioserve, 2 sync replicas", "aioserve", "/matmul-2"),
)


@dataclass(frozen=True)
class Options:
    duration_s: float
    rounds: int
    connections: int
    tool: str | None


@dataclass(frozen=True)
class Row:
    case: Case
    result: LoadResult
    mean_batch: float


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(options: Options) -> list[Row]:
    settings = uvicorn_settings()
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for name in ("starlette", "aioserve"):
            port = free_port()
            argv = [*server_argv(MODULE, port, settings), "--app", name]
            # Training the forests at startup takes a moment on a busy machine.
            servers[name] = stack.enter_context(ServerProcess(argv, port, startup_timeout_s=120.0))
        for case in CASES:
            warm_up(servers[case.server].port, [("POST", case.path, BODY, HEADERS)])
        batches: list[tuple[float, float]] = []
        runs: list[tuple[str, Callable[[], LoadResult]]] = []
        for case in CASES:
            load = (case.path, options.connections, options.duration_s, options.tool)
            server = servers[case.server]
            if case.batched:
                run = functools.partial(counted_post_load, server, *load, batches)
            else:
                run = functools.partial(post_load, server, *load)
            runs.append((f"{case.model}: {case.name}", run))
        _progress(
            f"{len(CASES)} cases at {options.connections} connections, {options.rounds} round(s) "
            f"of {options.duration_s:g} s each"
        )
        results = alternate(runs, options.rounds)
    return [
        Row(
            case,
            median_result(results[name]),
            mean_batch(batches) if case.batched else math.nan,
        )
        for case, (name, _) in zip(CASES, runs, strict=True)
    ]


def model_costs(repeat: int = 30) -> dict[str, float]:
    """Median ms of one call of each model on one image, alone in this process (one BLAS
    thread, as in the servers)."""
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits

    from benchmarks.model_app import MatmulModel, classifier
    from examples.digits.model import MAX_PIXEL

    threadpool_limits(limits=1)
    pixels = load_digits().data[0]
    forest, matmul = classifier(), MatmulModel()
    calls: dict[str, Callable[[], object]] = {
        "digits": lambda: forest.predict([pixels / MAX_PIXEL]),
        "numpy": lambda: matmul.label(pixels.tolist()),
    }
    costs = {}
    for model, call in calls.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
        costs[model] = sorted(times)[len(times) // 2]
    return costs


def render_report(rows: Sequence[Row], options: Options, costs: dict[str, float]) -> str:
    baselines = {row.case.model: row.result.rps for row in rows if row.case.baseline}
    columns = ["model", "case", "req/s", "p99 ms", "mean batch", "ratio to bare", "errors"]
    table = [
        {
            "model": row.case.model,
            "case": row.case.name,
            "req/s": format_rps(row.result.rps),
            "p99 ms": round(row.result.p99_ms, 2),
            "mean batch": None if math.isnan(row.mean_batch) else row.mean_batch,
            "ratio to bare": ratio(row.result.rps, baselines.get(row.case.model)),
            "errors": row.result.errors,
        }
        for row in rows
    ]
    caption = (
        f"**The worked example's model (`examples/digits`, 50 trees) and a numpy model, "
        f"`POST` at {options.connections} connections**: bare Starlette routes vs aioserve. "
        f"{describe_uvicorn(uvicorn_settings())}; load: "
        f"{describe_load_tool(resolve_load_tool(options.tool))}; {options.duration_s:g} s per "
        f"run, medians of {options.rounds} alternating rounds."
    )
    by_path = {row.case.path: row.result.rps for row in rows}
    replicas = ratio(by_path.get("/matmul-2"), by_path.get("/matmul-1"))
    lines = [caption, "", markdown_table(table, columns), ""]
    lines.append(
        "- numpy, 2 sync replicas / 1: "
        + ("n/a" if replicas is None else f"{replicas:.2f} x")
        + " (each replica runs one call at a time on its own thread; numpy releases the GIL, so "
        "two replicas can use two cores)."
    )
    lines.append(
        f"- each model alone, one image: digits forest {costs['digits']:.1f} ms, numpy "
        f"{costs['numpy']:.1f} ms per call."
    )
    lines.append(
        "- errors: non-2xx answers and socket errors (wrk's 2 s timeout included when wrk loads)."
    )
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.digits_model",
        description="The worked example's model unbatched and batched vs a bare Starlette "
        "route, and 1 vs 2 sync replicas of a numpy model, over HTTP in one run.",
    )
    add_run_options(parser, LENGTH)
    parser.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help=f"concurrent connections (default {DEFAULT_CONNECTIONS})",
    )
    args = parser.parse_args(argv)
    duration, rounds = run_length(parser, args, LENGTH)
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, got {args.connections!r}.")
    return Options(duration, rounds, args.connections, args.tool)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    _progress("Timing the models alone ...")
    costs = model_costs()
    rows = measure(options)
    print(render_report(rows, options, costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
