"""HTTP overhead: the same handlers as bare Starlette routes and through aioserve, on uvicorn and
on granian.

``python -m benchmarks.http_overhead [--duration S] [--rounds N] [--connections 1,64]
[--servers uvicorn,granian] [--quick]``

Every server runs at once (the idle ones cost nothing): bare Starlette and aioserve on uvicorn
with the same uvicorn settings, and, when granian is installed, both again on granian. Every case
is loaded A B C D A B C D ... so drift on a shared machine hits them all alike, and the table
shows medians and the ratios aioserve / Starlette on the same server, and aioserve on granian /
Starlette on uvicorn.

A second table compares aioserve with itself: the async noop at concurrency 64 with the benchmark
endpoints alone, and with 1,000 more static endpoints (``--extra-endpoints``), loaded A B A B the
same way. Route matching that does not grow with the number of endpoints keeps its ratio at 1.00.

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
    SERVERS,
    LoadError,
    LoadResult,
    LoadTool,
    ServerProcess,
    ServerStartError,
    alternate,
    default_threads,
    describe_granian,
    describe_load_tool,
    describe_uvicorn,
    format_rps,
    free_port,
    granian_installed,
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
DEFAULT_EXTRA_ENDPOINTS = 1000
ROUTE_TABLE_CONNECTIONS = 64


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
    Case("JSON 1,000 floats", "GET", "/floats"),
)


AIOSERVE_MODULE = "benchmarks.aioserve_app"


def _argv_with(
    module: str, settings: Mapping[str, str], extra_args: Sequence[str], port: int
) -> list[str]:
    return [*server_argv(module, port, settings), *extra_args]


def module_server(
    name: str, module: str, settings: Mapping[str, str], extra_args: Sequence[str] = ()
) -> ServerSpec:
    """A server run as ``python -m <module> --port P --loop L --http H [extra_args...]``."""
    source = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    return ServerSpec(
        name=name,
        argv_builder=functools.partial(_argv_with, module, settings, tuple(extra_args)),
        source=source if module.startswith("benchmarks.") else None,
    )


def default_servers(
    settings: Mapping[str, str], candidate_module: str = AIOSERVE_MODULE
) -> tuple[ServerSpec, ServerSpec]:
    """The baseline and the candidate, both started with the same ``settings`` (whose ``server``
    names the HTTP server, and the columns: ``starlette/uvicorn``, ``aioserve/uvicorn``).

    Passing ``benchmarks.bare_starlette`` as the candidate gives an A/A run: its ratios show how
    much of a difference the machine's noise alone makes.
    """
    server = settings.get("server", "uvicorn")
    baseline = module_server(f"starlette/{server}", "benchmarks.bare_starlette", settings)
    name = "aioserve" if candidate_module == AIOSERVE_MODULE else candidate_module.split(".")[-1]
    return baseline, module_server(f"{name}/{server}", candidate_module, settings)


def route_table_server(settings: Mapping[str, str], extra_endpoints: int) -> ServerSpec:
    """aioserve with ``extra_endpoints`` more static endpoints, for the route-table rows."""
    return module_server(
        f"aioserve +{extra_endpoints:,} endpoints",
        AIOSERVE_MODULE,
        settings,
        ("--extra-endpoints", str(extra_endpoints)),
    )


@dataclass(frozen=True)
class Options:
    duration_s: float
    rounds: int
    connections: tuple[int, ...]
    tool: LoadTool
    candidate_module: str = AIOSERVE_MODULE
    extra_endpoints: int = DEFAULT_EXTRA_ENDPOINTS
    servers: tuple[str, ...] = ("uvicorn",)


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
    *,
    cases: Sequence[Case] = CASES,
    connections_list: Sequence[int] | None = None,
) -> dict[tuple[str, int], dict[str, LoadResult]]:
    """For every case and concurrency, the median result of each server, loaded alternately.

    ``connections_list`` defaults to ``options.connections``. A load run that fails counts as one
    error with no figures, and its reason joins ``footnotes``.
    """
    failures: dict[str, None] = {}  # an ordered set of reasons
    medians: dict[tuple[str, int], dict[str, LoadResult]] = {}
    for case in cases:
        for connections in connections_list or options.connections:
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
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]],
    baseline: str,
    candidate: str,
    *,
    case_suffix: str = "",
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
                "case": case_name + case_suffix,
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


@dataclass(frozen=True)
class RouteTableResult:
    """The route-table rows: aioserve as is (``small``) against aioserve with more endpoints."""

    small: str
    large: str
    extra_endpoints: int
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]]


def render_route_table(result: RouteTableResult, options: Options) -> str:
    rows, columns = build_rows(
        result.medians,
        result.small,
        result.large,
        case_suffix=f", {result.extra_endpoints:,} endpoints",
    )
    caption = (
        f"**Route table size, {result.large} vs {result.small}** (same server, same run, "
        f"alternating A B A B, {options.rounds} "
        f"{'round' if options.rounds == 1 else 'rounds'} of {options.duration_s:g} s)."
    )
    notes = [
        f"{result.small} serves the {len(CASES)} benchmark endpoints; {result.large} serves "
        f"{result.extra_endpoints:,} more static ones (`/e0`.. on the noop backend). "
        "ratio = req/s with them / req/s without (target >= 0.91, i.e. per-request cost <= 1.1x).",
        *_error_notes(result.medians),
    ]
    lines = [caption, "", markdown_table(rows, columns), ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


@dataclass(frozen=True)
class Pair:
    """One HTTP server's two columns: bare Starlette and the candidate, both on ``server``."""

    server: str
    baseline: str
    candidate: str


def _ratios(pairs: Sequence[Pair]) -> list[tuple[str, str, str]]:
    """(column, numerator, denominator): the candidate against Starlette on each server, and the
    candidate on every other server against Starlette on the first (uvicorn)."""
    ratios = [(f"ratio {p.server}", p.candidate, p.baseline) for p in pairs]
    first = pairs[0]
    for pair in pairs[1:]:
        ratios.append((f"{pair.candidate} / {first.baseline}", pair.candidate, first.baseline))
    return ratios


def build_matrix_rows(
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]], pairs: Sequence[Pair]
) -> tuple[list[dict[str, object]], list[str], list[dict[str, object]], list[str]]:
    """The req/s table (with the ratios) and the latency table, one row per case and concurrency."""
    names = [name for pair in pairs for name in (pair.baseline, pair.candidate)]
    ratios = _ratios(pairs)
    columns = ["case", "concurrency", *(f"{n} req/s" for n in names), *(r[0] for r in ratios)]
    latency_columns = ["case", "concurrency", *(f"{n} p50/p99 ms" for n in names)]
    rows: list[dict[str, object]] = []
    latency_rows: list[dict[str, object]] = []
    for (case_name, connections), by_server in medians.items():
        row: dict[str, object] = {"case": case_name, "concurrency": connections}
        latency: dict[str, object] = {"case": case_name, "concurrency": connections}
        for name in names:
            result = by_server.get(name)
            row[f"{name} req/s"] = format_rps(result.rps) if result else None
            latency[f"{name} p50/p99 ms"] = _p50_p99(result)
        for column, numerator, denominator in ratios:
            num, den = by_server.get(numerator), by_server.get(denominator)
            row[column] = ratio(num.rps, den.rps) if num and den else None
        rows.append(row)
        latency_rows.append(latency)
    return rows, columns, latency_rows, latency_columns


def render_report(
    medians: Mapping[tuple[str, int], Mapping[str, LoadResult]],
    options: Options,
    settings: Mapping[str, str],
    pairs: Sequence[Pair],
    footnotes: Sequence[str],
    route_table: RouteTableResult | None = None,
) -> str:
    rows, columns, latency_rows, latency_columns = build_matrix_rows(medians, pairs)
    cpus = os.cpu_count()
    described = [describe_uvicorn(settings)]
    if any(pair.server == "granian" for pair in pairs):
        described.append(describe_granian(settings))
    caption = (
        f"**HTTP overhead, {' and '.join(p.candidate for p in pairs)} vs bare Starlette on the "
        f"same server** (same handlers). {'; '.join(described)}; load: "
        f"{describe_load_tool(options.tool)}, threads = min(concurrency, 2), "
        f"{options.duration_s:g} s per run, {options.rounds} "
        f"{'round' if options.rounds == 1 else 'rounds'} alternating over every server, "
        f"medians shown; os.cpu_count() = {cpus}; Python {platform.python_version()}."
    )
    notes = [
        "ratio SERVER = candidate req/s / Starlette req/s on that server (higher is better, "
        "1.00 = no overhead); the last ratio compares across servers.",
        f"The load generator runs on this machine and shares its {cpus} cores with the servers: "
        "compare ratios, not absolute figures.",
        *_error_notes(medians),
        *footnotes,
    ]
    lines = [caption, "", markdown_table(rows, columns), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "**Latency** (same runs).", "", markdown_table(latency_rows, latency_columns)]
    if route_table is not None:
        lines += ["", render_route_table(route_table, options)]
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


def _servers(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [value for value in values if value not in SERVERS]
    if not values or unknown or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(
            f"--servers takes {','.join(SERVERS)} or one of them, got {text!r}."
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
        "--extra-endpoints",
        type=int,
        default=DEFAULT_EXTRA_ENDPOINTS,
        metavar="N",
        help=f"route-table rows: aioserve with N more endpoints vs without, at concurrency "
        f"{ROUTE_TABLE_CONNECTIONS} (default {DEFAULT_EXTRA_ENDPOINTS}; 0 skips them)",
    )
    parser.add_argument(
        "--servers",
        type=_servers,
        default=None,
        help="comma-separated HTTP servers (default uvicorn,granian; granian only if installed)",
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
    if args.extra_endpoints < 0:
        parser.error(f"--extra-endpoints must be at least 0, got {args.extra_endpoints!r}.")
    servers = args.servers or (SERVERS if granian_installed() else ("uvicorn",))
    if "granian" in servers and not granian_installed():
        parser.error("--servers granian needs granian: pip install -e '.[granian]'.")
    return Options(
        duration_s,
        rounds,
        args.connections,
        resolve_load_tool(args.load),
        args.candidate,
        args.extra_endpoints,
        servers,
    )


def measure_route_table(
    candidate: tuple[str, ServerProcess],
    options: Options,
    settings: Mapping[str, str],
    stack: contextlib.ExitStack,
    footnotes: list[str],
) -> RouteTableResult | None:
    """Start aioserve with ``options.extra_endpoints`` more endpoints and load it against
    ``candidate`` (the same server without them); None if it does not start."""
    spec = route_table_server(settings, options.extra_endpoints)
    large = _start_candidate(spec, stack, footnotes)
    if large is None:
        return None
    servers = [candidate, (spec.name, large)]
    medians = measure(
        servers,
        options,
        footnotes,
        cases=CASES[:1],
        connections_list=(ROUTE_TABLE_CONNECTIONS,),
    )
    # The large server's work is done: stop it now rather than at the end of the run.
    large.close()
    return RouteTableResult(candidate[0], spec.name, options.extra_endpoints, medians)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    settings = uvicorn_settings()
    footnotes: list[str] = []
    pairs: list[Pair] = []
    with contextlib.ExitStack() as stack:
        servers: list[tuple[str, ServerProcess]] = []
        candidates: dict[str, ServerProcess] = {}
        for kind in options.servers:
            baseline, candidate = default_servers(uvicorn_settings(kind), options.candidate_module)
            try:
                servers.append((baseline.name, _start(baseline, stack)))
            except ServerStartError as exc:
                _progress(f"The baseline server {baseline.name} failed to start:\n{exc}")
                return 1
            candidate_server = _start_candidate(candidate, stack, footnotes)
            if candidate_server is not None:
                servers.append((candidate.name, candidate_server))
                candidates[kind] = candidate_server
            pairs.append(Pair(kind, baseline.name, candidate.name))
        medians = measure(servers, options, footnotes)
        route_table = None
        first = pairs[0]
        if (
            first.server in candidates
            and options.candidate_module == AIOSERVE_MODULE
            and options.extra_endpoints > 0
        ):
            route_table = measure_route_table(
                (first.candidate, candidates[first.server]),
                options,
                uvicorn_settings(first.server),
                stack,
                footnotes,
            )
        for name, server in servers:
            if server.returncode is not None:
                _progress(f"{name} exited during the run. Server output:\n{server.log_tail()}")
                footnotes.append(
                    f"{name}: the server exited with code {server.returncode} during the run; "
                    "its output is on stderr."
                )
    print(render_report(medians, options, settings, pairs, footnotes, route_table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
