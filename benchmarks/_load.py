"""Load generators for the benchmarks: wrk, and a small asyncio client when wrk is absent.

:func:`run_load` uses ``wrk`` when it is on ``PATH`` and the asyncio client otherwise;
``AIOSERVE_BENCH_LOAD=asyncio`` forces the fallback, ``=wrk`` insists on wrk. Only 127.0.0.1 is
ever loaded.

The asyncio client is this module's command line. :func:`run_asyncio_load` starts it in its own
processes, so that it never shares an event loop or a GIL with the server it measures, and reads
the JSON it prints::

    python -m benchmarks._load --url http://127.0.0.1:8000/noop --connections 8 --duration 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
LOAD_TOOL_ENV = "AIOSERVE_BENCH_LOAD"
LOCAL_HOST = "127.0.0.1"

LoadTool = Literal["wrk", "asyncio"]

# A load run gets this much time on top of its duration before it is treated as hung.
_LOAD_GRACE_S = 30.0
# The asyncio client gives up on one request after this long and counts a socket error.
_REQUEST_TIMEOUT_S = 10.0


class LoadError(RuntimeError):
    """A load generator failed or printed something this module cannot read."""


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: `python -m benchmarks.x` works from any cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LoadResult:
    """One load run. ``errors`` counts non-2xx responses (wrk: non-2xx/3xx) and socket errors."""

    requests: int
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    tool: LoadTool

    @classmethod
    def failed(cls, tool: LoadTool) -> LoadResult:
        """A run that produced no figures (the load generator failed): one error, NaN figures."""
        return cls(0, 1, 0.0, math.nan, math.nan, math.nan, tool)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


# --------------------------------------------------------------------------- load tools


def default_threads(connections: int) -> int:
    # Two cores, shared with the server: more load threads would only steal its CPU.
    return max(1, min(connections, 2))


def resolve_load_tool(requested: str | None = None) -> LoadTool:
    """``requested`` or $AIOSERVE_BENCH_LOAD ("wrk", "asyncio", "auto"/empty); auto prefers wrk."""
    choice = (requested or os.environ.get(LOAD_TOOL_ENV, "") or "auto").strip().lower()
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "asyncio"
    if choice == "asyncio":
        return "asyncio"
    if choice == "wrk":
        if not shutil.which("wrk"):
            raise LoadError(
                f"{LOAD_TOOL_ENV}=wrk but wrk is not on PATH. Install it (apt-get install wrk) "
                "or use 'auto' or 'asyncio'."
            )
        return "wrk"
    raise ValueError(f"Unknown load tool {choice!r}. Use 'auto', 'wrk' or 'asyncio'.")


def describe_load_tool(tool: LoadTool) -> str:
    """E.g. ``wrk debian/4.1.0-3+b2`` or ``asyncio client (uvloop)``."""
    if tool == "wrk":
        wrk = shutil.which("wrk")
        if wrk is None:
            return "wrk"
        try:
            done = subprocess.run(
                [wrk, "-v"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return "wrk"
        match = re.match(r"wrk\s+(\S+)", done.stdout + done.stderr)
        return f"wrk {match.group(1)}" if match else "wrk"
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio loop"
    return f"asyncio client ({loop}, one process per thread)"


def run_load(
    url: str,
    *,
    connections: int,
    duration_s: float,
    threads: int | None = None,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    tool: str | None = None,
) -> LoadResult:
    """Load ``url`` with wrk when available (see :func:`resolve_load_tool`), else asyncio."""
    runner = run_wrk if resolve_load_tool(tool) == "wrk" else run_asyncio_load
    return runner(
        url,
        connections=connections,
        duration_s=duration_s,
        threads=threads,
        method=method,
        body=body,
        headers=headers,
    )


def _check_args(url: str, connections: int, duration_s: float) -> None:
    host = urlsplit(url).hostname
    if host != LOCAL_HOST:
        raise ValueError(f"Benchmarks only load {LOCAL_HOST}, got the URL {url!r}.")
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections!r}.")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be positive, got {duration_s!r}.")


def _as_bytes(body: bytes | str | None) -> bytes | None:
    return body.encode() if isinstance(body, str) else body


# --- wrk


def _lua_string(data: bytes) -> str:
    """A double-quoted Lua literal for arbitrary bytes (decimal escapes for the unsafe ones)."""
    out = []
    for byte in data:
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_WRK_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _wrk_time_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk_output(output: str) -> LoadResult:
    """Read a ``wrk --latency`` report (wrk 4.x)."""
    rps_match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total_match = re.search(r"^\s*(\d+) requests in " + _WRK_TIME, output, re.MULTILINE)
    if rps_match is None or total_match is None:
        raise LoadError(f"Could not read wrk's report; it printed:\n{output}")
    latencies: dict[str, float] = {}
    for pct in ("50", "99"):
        found = re.search(rf"^\s*{pct}(?:\.0+)?%\s+{_WRK_TIME}", output, re.MULTILINE)
        latencies[pct] = _wrk_time_ms(found.group(1), found.group(2)) if found else math.nan
    errors = 0
    socket_match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_match:
        errors += sum(int(n) for n in socket_match.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return LoadResult(
        requests=int(total_match.group(1)),
        errors=errors,
        duration_s=_wrk_time_ms(total_match.group(2), total_match.group(3)) / 1e3,
        rps=float(rps_match.group(1)),
        p50_ms=latencies["50"],
        p99_ms=latencies["99"],
        tool="wrk",
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    threads: int | None = None,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Load ``url`` with ``wrk --latency``; wrk takes whole seconds, so the duration is rounded."""
    _check_args(url, connections, duration_s)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise LoadError("wrk is not on PATH; use run_asyncio_load() or run_load().")
    threads = min(threads or default_threads(connections), connections)
    seconds = max(1, round(duration_s))
    argv = [wrk, "--latency", f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    payload = _as_bytes(body)
    with contextlib.ExitStack() as stack:
        if method.upper() != "GET" or payload is not None:
            script = stack.enter_context(
                tempfile.NamedTemporaryFile("w", prefix="aioserve-bench-", suffix=".lua")
            )
            script.write(f"wrk.method = {_lua_string(method.upper().encode())}\n")
            if payload is not None:
                script.write(f"wrk.body = {_lua_string(payload)}\n")
            script.flush()
            argv += ["-s", script.name]
        argv.append(url)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=seconds + _LOAD_GRACE_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LoadError(f"wrk did not finish within {seconds + _LOAD_GRACE_S:.0f} s.") from exc
    if done.returncode != 0:
        raise LoadError(
            f"wrk exited with code {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    return parse_wrk_output(done.stdout)


# --- asyncio fallback


class _Report(TypedDict):
    """What one asyncio client process prints."""

    requests: int
    errors: int
    duration_s: float
    latencies_ms: list[float]


def run_asyncio_load(
    url: str,
    *,
    connections: int,
    duration_s: float,
    threads: int | None = None,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Load ``url`` with the asyncio client, in ``threads`` processes sharing the connections.

    As with wrk's threads, each process drives its share of the connections on one event loop.
    """
    _check_args(url, connections, duration_s)
    processes = min(threads or default_threads(connections), connections)
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    base = [sys.executable, "-m", "benchmarks._load", "--url", url]
    base += ["--duration", repr(duration_s), "--method", method.upper()]
    for name, value in (headers or {}).items():
        base += ["--header", f"{name}: {value}"]
    payload = _as_bytes(body)
    if payload is not None:
        base += ["--body-b64", base64.b64encode(payload).decode()]
    children = [
        subprocess.Popen(
            [*base, "--connections", str(share)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=subprocess_env(),
        )
        for share in shares
    ]
    reports: list[_Report] = []
    try:
        for child in children:
            try:
                out, err = child.communicate(timeout=duration_s + _LOAD_GRACE_S)
            except subprocess.TimeoutExpired as exc:
                raise LoadError(
                    f"The asyncio load generator did not finish within "
                    f"{duration_s + _LOAD_GRACE_S:.0f} s."
                ) from exc
            if child.returncode != 0:
                raise LoadError(
                    f"The asyncio load generator exited with code {child.returncode}: "
                    f"{err.decode(errors='replace').strip()}"
                )
            reports.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return _merge_reports(reports)


def _merge_reports(reports: Sequence[_Report]) -> LoadResult:
    latencies: list[float] = []
    requests = errors = 0
    rps = duration_s = 0.0
    for report in reports:
        requests += report["requests"]
        errors += report["errors"]
        duration_s = max(duration_s, report["duration_s"])
        if report["duration_s"] > 0:
            rps += report["requests"] / report["duration_s"]
        latencies.extend(report["latencies_ms"])
    latencies.sort()
    return LoadResult(
        requests=requests,
        errors=errors,
        duration_s=duration_s,
        rps=rps,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        tool="asyncio",
    )


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; return its status and whether the server will close."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("The server closed the connection.")
    status = int(status_line.split(None, 2)[1])
    length: int | None = None
    chunked = close = False
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("The server closed the connection inside the headers.")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = value.strip().lower() == b"close"
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        close = True
    return status, close


async def _connection_loop(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    latencies_ms: list[float],
    tally: _Tally,
) -> None:
    """One concurrency slot: a keep-alive connection sending the next request on each answer."""
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while time.perf_counter() < deadline:
            if writer is None or reader is None:
                try:
                    async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                        reader, writer = await asyncio.open_connection(host, port)
                except (OSError, TimeoutError):
                    tally.errors += 1
                    # Back off so a dead server costs a bounded number of attempts.
                    await asyncio.sleep(0.01)
                    continue
            start = time.perf_counter()
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                    writer.write(request)
                    status, close = await _read_response(reader)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                tally.errors += 1
                writer.close()
                writer = reader = None
                continue
            latencies_ms.append((time.perf_counter() - start) * 1e3)
            tally.requests += 1
            if not 200 <= status < 300:
                tally.errors += 1
            if close:
                writer.close()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()


async def _load_main(
    url: str, connections: int, duration_s: float, method: str, body: bytes, headers: list[str]
) -> _Report:
    parts = urlsplit(url)
    host = parts.hostname or LOCAL_HOST
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: aioserve-bench"]
    lines += headers
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    latencies_ms: list[float] = []
    tally = _Tally()
    start = time.perf_counter()
    deadline = start + duration_s
    async with asyncio.TaskGroup() as group:
        for _ in range(connections):
            group.create_task(_connection_loop(host, port, request, deadline, latencies_ms, tally))
    elapsed_s = time.perf_counter() - start
    return {
        "requests": tally.requests,
        "errors": tally.errors,
        "duration_s": elapsed_s,
        "latencies_ms": [round(value, 4) for value in latencies_ms],
    }


def _load_command(args: argparse.Namespace) -> int:
    _check_args(args.url, args.connections, args.duration)
    body = base64.b64decode(args.body_b64) if args.body_b64 else b""
    coroutine = _load_main(
        args.url, args.connections, args.duration, args.method.upper(), body, args.header
    )
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        report = uvloop.run(coroutine)
    else:
        report = asyncio.run(coroutine)
    json.dump(report, sys.stdout)
    return 0


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the asyncio client in this process and print its report as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._load",
        description="Closed-loop HTTP/1.1 keep-alive load on one event loop; prints JSON.",
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-b64", default="", help="request body, base64")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    return _load_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
