"""Handle overhead: ``await handle.remote()`` against a raw asyncio queue-and-future handoff.

``python -m benchmarks.handle_overhead [--rounds N] [--calls N] [--batches N] [--quick]``

Everything runs in this process, on one event loop per loop implementation (asyncio, and uvloop
when it is installed):

- **floor**: the least a hop to another task can cost. A worker task reads ``(item, future)``
  pairs from an ``asyncio.Queue`` and sets each future's result; the caller puts a pair and awaits
  the future.
- **aioserve**: ``await handle.remote()`` on an endpoint whose backend is an async noop function
  (the ``/noop`` backend of :mod:`benchmarks.aioserve_app`), in a ``Serve`` without a server.

Each is timed serially (one call awaited after the other) and as a 64-wide fan-out
(``await asyncio.gather(*[h.remote() for _ in range(64)])``; for the floor, 64 pairs put, then
their futures gathered), in runs alternating floor, aioserve, floor, aioserve ... The table shows
the median of the runs in microseconds per call (amortised over the 64 for a fan-out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aioserve
from benchmarks._harness import Run, alternate_runs, markdown_table, ratio
from benchmarks.aioserve_app import noop

DEFAULT_ROUNDS = 5
DEFAULT_CALLS = 20_000
DEFAULT_BATCHES = 500
QUICK_ROUNDS = 1
QUICK_CALLS = 2_000
QUICK_BATCHES = 50
FANOUT_WIDTH = 64

# The targets: a serial call within 1.5x the floor, a fan-out call within 3 us (read on uvloop).
MAX_SERIAL_RATIO = 1.5
MAX_FANOUT_US = 3.0

# A run: do the calls, return how many were made.


class QueueFloor:
    """The floor: a worker task that answers ``(item, future)`` pairs read from a queue."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._worker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> QueueFloor:
        self._worker = self._loop.create_task(self._work(), name="queue floor worker")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _work(self) -> None:
        queue = self._queue
        while True:
            item, future = await queue.get()
            if not future.done():
                future.set_result(item)

    def submit(self, item: Any) -> asyncio.Future[Any]:
        """Put ``item`` for the worker; the returned future gets it back."""
        future = self._loop.create_future()
        self._queue.put_nowait((item, future))
        return future

    async def call(self, item: Any) -> Any:
        """Put ``item`` and wait for the worker to answer it."""
        future = self._loop.create_future()
        self._queue.put_nowait((item, future))
        return await future


# --------------------------------------------------------------------------- runs


def floor_serial(floor: QueueFloor, calls: int) -> Run:
    async def run() -> int:
        call = floor.call
        for _ in range(calls):
            await call(None)
        return calls

    return run


def floor_fanout(floor: QueueFloor, batches: int) -> Run:
    async def run() -> int:
        submit = floor.submit
        for _ in range(batches):
            await asyncio.gather(*[submit(None) for _ in range(FANOUT_WIDTH)])
        return batches * FANOUT_WIDTH

    return run


def handle_serial(handle: aioserve.ServeHandle, calls: int) -> Run:
    async def run() -> int:
        remote = handle.remote
        for _ in range(calls):
            await remote()
        return calls

    return run


def handle_fanout(handle: aioserve.ServeHandle, batches: int) -> Run:
    async def run() -> int:
        remote = handle.remote
        for _ in range(batches):
            await asyncio.gather(*[remote() for _ in range(FANOUT_WIDTH)])
        return batches * FANOUT_WIDTH

    return run


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Options:
    rounds: int
    calls: int
    batches: int
    loops: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    case: str
    loop: str
    floor_us: float
    aioserve_us: float


async def measure_on_running_loop(options: Options, loop_name: str) -> list[Row]:
    """The serial and fan-out rows for the loop this runs on."""
    async with aioserve.Serve(http_options={"location": "NoServer"}) as serve:
        await serve.create_backend("noop", noop)
        await serve.create_endpoint("noop", backend="noop")
        handle = serve.get_handle("noop")
        if await handle.remote() != "ok":
            raise RuntimeError("The noop backend did not answer 'ok'.")
        async with QueueFloor() as floor:
            serial = await alternate_runs(
                [
                    ("floor", floor_serial(floor, options.calls)),
                    ("aioserve", handle_serial(handle, options.calls)),
                ],
                options.rounds,
            )
            fanout = await alternate_runs(
                [
                    ("floor", floor_fanout(floor, options.batches)),
                    ("aioserve", handle_fanout(handle, options.batches)),
                ],
                options.rounds,
            )
    return [
        Row(
            "`await handle.remote()`, serial",
            loop_name,
            statistics.median(serial["floor"]),
            statistics.median(serial["aioserve"]),
        ),
        Row(
            f"{FANOUT_WIDTH}-wide fan-out (`gather`), per call",
            loop_name,
            statistics.median(fanout["floor"]),
            statistics.median(fanout["aioserve"]),
        ),
    ]


def available_loops() -> tuple[str, ...]:
    if importlib.util.find_spec("uvloop") is not None:
        return ("asyncio", "uvloop")
    return ("asyncio",)


def _loop_factory(loop_name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def measure(options: Options) -> list[Row]:
    rows: list[Row] = []
    for loop_name in options.loops:
        print(
            f"handle overhead on {loop_name}: {options.rounds} x floor aioserve",
            file=sys.stderr,
            flush=True,
        )
        with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
            rows += runner.run(measure_on_running_loop(options, loop_name))
    return rows


# --------------------------------------------------------------------------- report


def _meets(row: Row) -> tuple[str, str]:
    """The row's target and whether this run met it."""
    if "serial" in row.case:
        value = ratio(row.aioserve_us, row.floor_us)
        met = value is not None and value <= MAX_SERIAL_RATIO
        return f"ratio <= {MAX_SERIAL_RATIO:g}", "yes" if met else "no"
    met = row.aioserve_us <= MAX_FANOUT_US
    return f"<= {MAX_FANOUT_US:g} µs/call", "yes" if met else "no"


def _describe_loop(loop_name: str) -> str:
    if loop_name == "uvloop":
        try:
            return f"uvloop {importlib.metadata.version('uvloop')}"
        except importlib.metadata.PackageNotFoundError:
            return "uvloop"
    return "asyncio (default loop)"


def render_report(rows: Sequence[Row], options: Options) -> str:
    columns = ["case", "loop", "floor µs/call", "aioserve µs/call", "ratio", "target", "met"]
    table_rows: list[dict[str, object]] = []
    for row in rows:
        target, met = _meets(row)
        table_rows.append(
            {
                "case": row.case,
                "loop": row.loop,
                "floor µs/call": row.floor_us,
                "aioserve µs/call": row.aioserve_us,
                "ratio": ratio(row.aioserve_us, row.floor_us),
                "target": target,
                "met": met,
            }
        )
    loops = ", ".join(_describe_loop(name) for name in options.loops)
    caption = (
        f"**Handle overhead, in process** (aioserve {importlib.metadata.version('aioserve')}). "
        f"Loops: {loops}; Python {platform.python_version()}; {options.calls:,} serial calls "
        f"and {options.batches:,} fan-outs of {FANOUT_WIDTH} per run, {options.rounds} "
        f"{'round' if options.rounds == 1 else 'rounds'} alternating floor / aioserve, "
        "medians shown."
    )
    notes = [
        "floor = a worker task answering (item, future) pairs from an asyncio.Queue: the caller "
        "puts one and awaits the future (fan-out: puts 64, gathers their futures).",
        "aioserve = `await handle.remote()` on an async noop function backend (fan-out: "
        f"`await asyncio.gather(*[h.remote() for _ in range({FANOUT_WIDTH})])`).",
        "ratio = aioserve µs/call / floor µs/call (lower is better, 1.00 = no overhead beyond "
        "the handoff itself).",
    ]
    lines = [caption, "", markdown_table(table_rows, columns), ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.handle_overhead",
        description="Compare `await handle.remote()` with a raw asyncio queue-and-future handoff.",
    )
    parser.add_argument("--rounds", type=int, help=f"A B rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--calls", type=int, help=f"serial calls per run (default {DEFAULT_CALLS:,})"
    )
    parser.add_argument(
        "--batches",
        type=int,
        help=f"fan-outs of {FANOUT_WIDTH} per run (default {DEFAULT_BATCHES:,})",
    )
    parser.add_argument(
        "--loop",
        action="append",
        choices=["asyncio", "uvloop"],
        help="event loop to measure on, repeatable (default: asyncio, and uvloop if installed)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_ROUNDS} round of {QUICK_CALLS:,} calls and "
        f"{QUICK_BATCHES} fan-outs",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    calls = args.calls or (QUICK_CALLS if args.quick else DEFAULT_CALLS)
    batches = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    if min(rounds, calls, batches) < 1:
        parser.error(
            f"--rounds, --calls and --batches must be at least 1, got {rounds!r}, {calls!r} "
            f"and {batches!r}."
        )
    loops = tuple(dict.fromkeys(args.loop)) if args.loop else available_loops()
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        parser.error("--loop uvloop was given but uvloop is not installed (pip install uvloop).")
    return Options(rounds, calls, batches, loops)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    print(render_report(measure(options), options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
