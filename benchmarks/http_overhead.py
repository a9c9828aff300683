"""HTTP overhead: the same handlers as bare Starlette routes and through aioserve, on uvicorn.

``python -m benchmarks.http_overhead [--duration S] [--rounds N] [--connections 1,64] [--quick]``

Both servers run at once (the idle one costs nothing) with the same uvicorn settings; every case
is loaded A B A B ... so drift on a shared machine hits both alike, and the table shows medians
and the ratio aioserve / Starlette.

The servers are plug-ins (:class:`ServerSpec`). The aioserve one is ``benchmarks/aioserve_app.py``,
started as ``python -m benchmarks.aioserve_app --port P --loop L --http H`` and serving the routes
of :mod:`benchmarks.bare_starlette`. While that module is missing, or when it fails to start, the
table holds the Starlette figures alone and a footnote says why.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._harness import (
    LOAD_TOOL_ENV,
    REPO_ROOT,
    LoadError,
    LoadResult,
    LoadTool,
    ServerProcess,
    ServerStartError,
    alternate,
    default_threads,
    describe_load_tool,
    describe_uvicorn,
    format_rps,
    free_port,
    markdown_table,
    median_result,
    ratio,
    resolve_load_tool,
    run_load,
    server_argv,
    uvicorn_settings,
    warm_up,
)

DEFAULT_DURATION_S = 5.0
DEFAULT_ROUNDS = 2
QUICK_DURATION_S = 1.0
QUICK_ROUNDS = 1
DEFAULT_CONNECTIONS = (1, 64)


@dataclass(frozen=True)
class ServerSpec:
    """A server to compare: a name for the columns and how to start it on a port.

    ``source`` is the file the server needs; when it does not exist the server is skipped with a
    footnote instead of failing to start.
    """

    name: str
    argv_builder: Callable[[int], list[str]]
    ready_path: str = "/-/healthz"
    source: Path | None = None


@dataclass(frozen=True)
class Case:
    """One row family: a request every server must answer with a 2xx."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


CASES = (
    Case("async noop", "GET", "/noop"),
    Case("sync noop (thread executor)", "GET", "/sync-noop"),
    Case(
        "JSON POST",
        "POST",
        "/json",
        body=b'{"text": "hello world", "values": [1, 2, 3], "flag": true}',
        headers={"Content-Type": "application/json"},
    ),
)


AIOSERVE_MODULE = "benchmarks.aioserve_app"


def module_server(name: str, module: str, settings: Mapping[str, str]) -> ServerSpec:
    """A server run as ``python -m <module> --port P --loop L --http H``."""
    source = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return ServerSpec(
        name=name,
        argv_builder=functools.partial(server_argv, module, settings=settings),
        source=source if module.startswith("benchmarks.") else None,
    )


def default_servers(
    settings: Mapping[str, str], candidate_module: str = AIOSERVE_MODULE
) -> tuple[ServerSpec, ServerSpec]:
    """The baseline and the candidate, both started with the same uvicorn ``settings``.

    Passing ``benchmarks.bare_starlette`` as the candidate gives an A/A run: its ratios show how
    much of a difference the machine's noise alone makes.
    """
    baseline = module_server("starlette", "benchmarks.bare_starlette", settings)
    name = "aioserve" if candidate_module == AIOSERVE_MODULE else candidate_module.split(".")[-1]
    return baseline, module_server(name, candidate_module, settings)


@dataclass(frozen=True)
class Options:
    duration_s: float
    rounds: int
    connections: tuple[int, ...]
    tool: LoadTool
    candidate_module: str = AIOSERVE_MODULE


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _start(spec: ServerSpec, stack: contextlib.ExitStack) -> ServerProcess:
    port = free_port()
    server = stack.enter_context(
        ServerProcess(spec.argv_builder(port), port, ready_path=spec.ready_path)
    )
    try:
        warm_up(server.port, [(case.method, case.path, case.body, case.headers) for case in CASES])
    except ServerStartError as exc:
        tail = server.log_tail()
        server.close()
        raise ServerStartError(f"{exc}\nServer output:\n{tail}") from exc
    return server


def _start_candidate(
    spec: ServerSpec, stack: contextlib.ExitStack, footnotes: list[str]
) -> ServerProcess | None:
    if spec.source is not None and not spec.source.exists():
        footnotes.append(
            f"{spec.name}: `{spec.source.relative_to(REPO_ROOT)}` does not exist yet, so only "
            "the baseline was measured."
        )
        return None
    try:
        return _start(spec, stack)
    except ServerStartError as exc:
        _progress(f"{spec.name} failed to start:\n{exc}")
        first_line = str(exc).splitlines()[0]
        footnotes.append(
            f"{spec.name}: the server failed to start ({first_line}), so only the baseline was "
            "measured; its output is on stderr."
        )
        return None


def _load(
    server: ServerProcess,
    case: Case,
    connections: int,
    options: Options,
    failures: dict[str, None],
) -> LoadResult:
    try:
        return run_load(
            server.url(case.path),
            connections=connections,
            duration_s=options.duration_s,
            threads=default_threads(connections),
            method=case.method,
            body=case.body,
            headers=case.headers,
            tool=options.tool,
        )
    except LoadError as exc:
        # A server that dies mid-run costs its rows, not the table.
        _progress(f"Load on {server!r} failed: {exc}")
        failures[str(exc).splitlines()[0]] = None
        return LoadResult.failed(options.tool)


def measure(
    servers: Sequence[tuple[str, ServerProcess]],
    options: Options,
    footnotes: list[str],
) -> dict[tuple[str, int], dict[str, LoadResult]]:
    """For every case and concurrency, the median result of each server, loaded alternately.

    A load run that fails counts as one error with no figures, and its reason joins
    ``footnotes``.
    """
    failures: dict[str, None] = {}  # an ordered set of reasons
    medians: dict[tuple[str, int], dict[str, LoadResult]] = {}
    for case in CASES:
        for connections in options.connections:
            _progress(
                f"{case.name}, concurrency {connections}: "
                f"{options.rounds} x {' '.join(name for name, _ in servers)}"
            )
            runs = [
                (name, functools.partial(_load, server, case, connections, options, failures))
                for name, server in servers
            ]
            results = alternate(runs, options.rounds)
            medians[case.name, connections] = {
                name: median_result(per_server) for name, per_server in results.items()
            }
    footnotes += [f"A load run failed: {reason}" for reason in failures]
    return medians


def _p50_p99(result: LoadResult | None) -> str | None:
    if result is None or math.isnan(result.p50_ms) or math.isnan(result.p99_ms):
        return None
    return f"{result.p50_ms:.2f} / {result.p99_ms:.2f}"


def build_rows(
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]], baseline: str, candidate: str
) -> tuple[list[dict[str, object]], list[str]]:
    columns = [
        "case",
        "concurrency",
        f"{baseline} req/s",
        f"{candidate} req/s",
        "ratio",
        f"{baseline} p50/p99 ms",
        f"{candidate} p50/p99 ms",
        "ratio p99",
    ]
    rows: list[dict[str, object]] = []
    for (case_name, connections), by_server in medians.items():
        base = by_server[baseline]
        cand = by_server.get(candidate)
        rows.append(
            {
                "case": case_name,
                "concurrency": connections,
                f"{baseline} req/s": format_rps(base.rps),
                f"{candidate} req/s": format_rps(cand.rps) if cand else None,
                "ratio": ratio(cand.rps, base.rps) if cand else None,
                f"{baseline} p50/p99 ms": _p50_p99(base),
                f"{candidate} p50/p99 ms": _p50_p99(cand),
                "ratio p99": ratio(cand.p99_ms, base.p99_ms) if cand else None,
            }
        )
    return rows, columns


def _error_notes(medians: Mapping[tuple[str, int], Mapping[str, LoadResult]]) -> list[str]:
    notes = []
    for (case_name, connections), by_server in medians.items():
        for name, result in by_server.items():
            if result.errors:
                notes.append(
                    f"{name}, {case_name}, concurrency {connections}: errors (non-2xx or "
                    f"socket) {result.errors}, requests {result.requests}, all rounds together."
                )
    return notes


def render_report(
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]],
    options: Options,
    settings: Mapping[str, str],
    baseline: str,
    candidate: str,
    footnotes: Sequence[str],
) -> str:
    rows, columns = build_rows(medians, baseline, candidate)
    cpus = os.cpu_count()
    caption = (
        f"**HTTP overhead, {candidate} vs bare {baseline}** (same handlers). "
        f"{describe_uvicorn(settings)}; load: {describe_load_tool(options.tool)}, "
        f"threads = min(concurrency, 2), {options.duration_s:g} s per run, "
        f"{options.rounds} {'round' if options.rounds == 1 else 'rounds'} alternating "
        "A B A B, medians shown; "
        f"os.cpu_count() = {cpus}; Python {platform.python_version()}."
    )
    notes = [
        f"ratio = {candidate} req/s / {baseline} req/s (higher is better, 1.00 = no overhead); "
        f"ratio p99 = {candidate} p99 / {baseline} p99 (lower is better).",
        f"The load generator runs on this machine and shares its {cpus} cores with the server: "
        "compare ratios, not absolute figures.",
        *_error_notes(medians),
        *footnotes,
    ]
    lines = [caption, "", markdown_table(rows, columns), ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def _connections(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--connections takes comma-separated integers like '1,64', got {text!r}."
        ) from exc
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(
            f"--connections needs at least one concurrency, each at least 1, got {text!r}."
        )
    return values


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.http_overhead",
        description="Compare bare Starlette and aioserve serving the same handlers on uvicorn.",
    )
    parser.add_argument(
        "--duration", type=float, help=f"seconds per run (default {DEFAULT_DURATION_S:g})"
    )
    parser.add_argument("--rounds", type=int, help=f"A B rounds per row (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--connections",
        type=_connections,
        default=DEFAULT_CONNECTIONS,
        help="comma-separated concurrencies (default 1,64)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_DURATION_S:g} s per run, {QUICK_ROUNDS} round",
    )
    parser.add_argument(
        "--load",
        choices=["auto", "wrk", "asyncio"],
        help=f"load generator (default: ${LOAD_TOOL_ENV}, else auto = wrk if installed)",
    )
    parser.add_argument(
        "--candidate",
        default=AIOSERVE_MODULE,
        metavar="MODULE",
        help=f"server module compared with the baseline (default {AIOSERVE_MODULE}; "
        "benchmarks.bare_starlette gives an A/A noise check)",
    )
    args = parser.parse_args(argv)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if duration_s <= 0 or rounds < 1:
        parser.error(
            f"--duration must be positive and --rounds at least 1, got "
            f"{duration_s!r} and {rounds!r}."
        )
    return Options(
        duration_s, rounds, args.connections, resolve_load_tool(args.load), args.candidate
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    settings = uvicorn_settings()
    baseline, candidate = default_servers(settings, options.candidate_module)
    footnotes: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            servers = [(baseline.name, _start(baseline, stack))]
        except ServerStartError as exc:
            _progress(f"The baseline server failed to start:\n{exc}")
            return 1
        candidate_server = _start_candidate(candidate, stack, footnotes)
        if candidate_server is not None:
            servers.append((candidate.name, candidate_server))
        medians = measure(servers, options, footnotes)
        for name, server in servers:
            if server.returncode is not None:
                _progress(f"{name} exited during the run. Server output:\n{server.log_tail()}")
                footnotes.append(
                    f"{name}: the server exited with code {server.returncode} during the run; "
                    "its output is on stderr."
                )
    print(render_report(medians, options, settings, baseline.name, candidate.name, footnotes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
