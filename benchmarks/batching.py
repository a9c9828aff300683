"""Batching: a batching backend in front of a simulated exclusive device, at several loads.

``python -m benchmarks.batching [--duration S] [--rates 100,300,...] [--check] [--quick]``

Everything runs in this process, through handles (no HTTP), one fresh ``Serve`` per row. The
backend is a legacy ``@serve.accept_batch`` async function with ``max_batch_size=32`` and
``batch_wait_timeout=0.010`` on one replica. It simulates a device only one batch can use at a
time: it holds an ``asyncio.Lock`` while it sleeps ``20 ms + 0.5 ms per item``. A full batch
therefore takes 36 ms, and no scheduler can beat 32 items / 36 ms = 888.9 items/s: the ceiling.

Rows:

- **open loop** at each offered rate: Poisson arrivals (seeded), each request sent when it is
  due whatever happened to the earlier ones; latency counts from when the request was due.
- **saturation**: closed loop, 128 callers each sending its next request as soon as the last one
  is answered, so the queue never runs dry.
- **sparse load**: 100 req/s in front of a slow device (200 ms per batch, whatever its size):
  batches must grow to what queued while the device was busy (about 100 x 0.2 = 20), not stay
  at 1-2 items.

The first ``warm-up`` part of each run is left out of the figures. ``max_queued_queries`` is
unbounded so that overload rows show the scheduler, not the admission bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import platform
import random
import sys
from collections.abc import Sequence
from typing import Any

import aioserve
from benchmarks._harness import markdown_table, percentile

MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.010
DEVICE_FIXED_S = 0.020
DEVICE_PER_ITEM_S = 0.0005
SPARSE_RATE = 100.0
SPARSE_DEVICE_S = 0.200
SATURATION_CALLERS = 128
DEFAULT_RATES = (100.0, 300.0, 600.0, 900.0, 1200.0)
DEFAULT_DURATION_S = 5.0
QUICK_DURATION_S = 0.5
SPARSE_MIN_DURATION_S = 1.0  # at least a few 200 ms batches after the warm-up
DRAIN_TIMEOUT_S = 60.0
SEED = 20_260_101

# The targets of the issue.
MIN_SATURATION_SHARE = 0.90
MIN_SATURATION_BATCH = 28.0
MIN_SPARSE_BATCH = 10.0  # "must grow as requests queue, not stay at 1-2"; about 20 expected


@dataclasses.dataclass(frozen=True)
class Device:
    """The simulated device: ``fixed_s + per_item_s * len(batch)`` per batch, one at a time."""

    fixed_s: float
    per_item_s: float

    def batch_s(self, size: int) -> float:
        return self.fixed_s + self.per_item_s * size

    @property
    def ceiling(self) -> float:
        """Items per second with every batch full: the most any scheduler can get through."""
        return MAX_BATCH_SIZE / self.batch_s(MAX_BATCH_SIZE)

    def describe(self) -> str:
        if self.per_item_s:
            return f"{self.fixed_s * 1000:g} ms + {self.per_item_s * 1000:g} ms/item"
        return f"{self.fixed_s * 1000:g} ms/batch"


FAST_DEVICE = Device(DEVICE_FIXED_S, DEVICE_PER_ITEM_S)
SLOW_DEVICE = Device(SPARSE_DEVICE_S, 0.0)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One row: an open-loop rate (req/s) or, with ``rate=None``, a closed loop of callers."""

    name: str
    device: Device
    rate: float | None
    duration_s: float
    callers: int = SATURATION_CALLERS


@dataclasses.dataclass(frozen=True)
class Row:
    scenario: Scenario
    achieved: float  # items/s answered in the measured window
    mean_batch: float
    num_batches: int
    busy: float  # share of the measured span the device spent running batches
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def share(self) -> float:
        return self.achieved / self.scenario.device.ceiling


class _Tally:
    """What one run observed: batches as the device saw them, and each request's outcome."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, float, int]] = []  # (start, end, size) on the device
        self.done: list[tuple[float, float]] = []  # (due time, answer time)
        self.errors = 0
        self.first_error: BaseException | None = None

    def finish(
        self, loop: asyncio.AbstractEventLoop, due: float, future: asyncio.Future[Any]
    ) -> None:
        if future.cancelled():
            self.errors += 1
            return
        error = future.exception()  # retrieved, so it is never reported as unhandled
        if error is not None:
            self.errors += 1
            self.first_error = self.first_error or error
            return
        self.done.append((due, loop.time()))


def _device_backend(device: Device, tally: _Tally) -> Any:
    lock = asyncio.Lock()

    @aioserve.accept_batch
    async def run(items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        async with lock:
            started = loop.time()
            await asyncio.sleep(device.batch_s(len(items)))
            tally.batches.append((started, loop.time(), len(items)))
        return items

    return run


async def _open_loop(
    handle: aioserve.ServeHandle, rate: float, start: float, end: float, tally: _Tally
) -> set[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    rng = random.Random(SEED)
    pending: set[asyncio.Future[Any]] = set()
    due = start
    while True:
        due += rng.expovariate(rate)
        if due >= end:
            return pending
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        future = handle.remote(0)
        pending.add(future)
        future.add_done_callback(pending.discard)
        future.add_done_callback(functools.partial(tally.finish, loop, due))


async def _closed_loop_caller(handle: aioserve.ServeHandle, end: float, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < end:
        sent = loop.time()
        future = handle.remote(0)
        future.add_done_callback(functools.partial(tally.finish, loop, sent))
        with contextlib.suppress(Exception):  # the tally has counted it already
            await future


async def run_scenario(scenario: Scenario) -> Row:
    """Serve the device, load it as the scenario says, and summarise the measured window."""
    tally = _Tally()
    config = {
        "max_batch_size": MAX_BATCH_SIZE,
        "batch_wait_timeout": BATCH_WAIT_TIMEOUT_S,
        "max_queued_queries": None,
    }
    async with aioserve.Serve(http_options={"location": "NoServer"}) as instance:
        await instance.create_backend(
            "device", _device_backend(scenario.device, tally), config=config
        )
        await instance.create_endpoint("device", backend="device")
        handle = instance.get_handle("device")
        await asyncio.gather(*(handle.remote(0) for _ in range(MAX_BATCH_SIZE)))  # warm up
        tally.batches.clear()
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + scenario.duration_s
        if scenario.rate is None:
            await asyncio.gather(
                *(_closed_loop_caller(handle, end, tally) for _ in range(scenario.callers))
            )
        else:
            pending = await _open_loop(handle, scenario.rate, start, end, tally)
            if pending:  # the backlog of an overloaded row: let it finish, for its latencies
                await asyncio.wait(pending, timeout=DRAIN_TIMEOUT_S)
    return _summarise(scenario, tally, start, end)


def _summarise(scenario: Scenario, tally: _Tally, start: float, end: float) -> Row:
    measured_from = start + min(0.5, 0.2 * scenario.duration_s)
    batches = [b for b in tally.batches if measured_from <= b[0] and b[1] <= end]
    # Items the device finished between the end of the first measured batch and the end of the
    # last one: whole batches over the time they took, so a short run is not skewed by where
    # its window happens to cut a batch.
    if len(batches) >= 2:
        span = batches[-1][1] - batches[0][1]
        achieved = sum(size for _, _, size in batches[1:]) / span
        busy = sum(stop - begin for begin, stop, _ in batches[1:]) / span
    else:
        achieved = busy = math.nan
    latencies = sorted((at - due) * 1000 for due, at in tally.done if measured_from <= due <= end)
    sizes = [size for _, _, size in batches]
    return Row(
        scenario=scenario,
        achieved=achieved,
        mean_batch=sum(sizes) / len(sizes) if sizes else math.nan,
        num_batches=len(sizes),
        busy=busy,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        errors=tally.errors,
    )


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class Options:
    duration_s: float
    rates: tuple[float, ...]
    check: bool

    def scenarios(self) -> list[Scenario]:
        rows = [
            Scenario(f"open loop, {rate:g} req/s", FAST_DEVICE, rate, self.duration_s)
            for rate in self.rates
        ]
        rows.append(
            Scenario(
                f"saturation, {SATURATION_CALLERS} callers", FAST_DEVICE, None, self.duration_s
            )
        )
        rows.append(
            Scenario(
                f"sparse, {SPARSE_RATE:g} req/s",
                SLOW_DEVICE,
                SPARSE_RATE,
                max(self.duration_s, SPARSE_MIN_DURATION_S),
            )
        )
        return rows


def verdicts(rows: Sequence[Row]) -> list[tuple[str, bool]]:
    """The issue's targets, each with whether this run met it."""
    out: list[tuple[str, bool]] = []
    for row in rows:
        if row.scenario.rate is None:
            out.append(
                (
                    f"saturation: >= {MIN_SATURATION_SHARE:.0%} of the ceiling "
                    f"(got {row.share:.1%}) with mean batch >= {MIN_SATURATION_BATCH:g} "
                    f"(got {row.mean_batch:.1f})",
                    row.share >= MIN_SATURATION_SHARE and row.mean_batch >= MIN_SATURATION_BATCH,
                )
            )
        elif row.scenario.device is SLOW_DEVICE:
            out.append(
                (
                    f"sparse load: mean batch >= {MIN_SPARSE_BATCH:g}, about "
                    f"{SPARSE_RATE * SPARSE_DEVICE_S:g} expected (got {row.mean_batch:.1f})",
                    row.mean_batch >= MIN_SPARSE_BATCH,
                )
            )
    return out


def render_report(rows: Sequence[Row], options: Options) -> str:
    columns = [
        "load",
        "device",
        "offered req/s",
        "achieved items/s",
        "ceiling items/s",
        "% of ceiling",
        "mean batch",
        "batches",
        "device busy %",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    table = [
        {
            "load": row.scenario.name,
            "device": row.scenario.device.describe(),
            "offered req/s": None if row.scenario.rate is None else round(row.scenario.rate),
            "achieved items/s": None if math.isnan(row.achieved) else round(row.achieved),
            "ceiling items/s": round(row.scenario.device.ceiling, 1),
            "% of ceiling": round(100 * row.share, 1),
            "mean batch": row.mean_batch,
            "batches": row.num_batches,
            "device busy %": None if math.isnan(row.busy) else round(100 * row.busy, 1),
            "p50 ms": row.p50_ms,
            "p99 ms": row.p99_ms,
            "errors": row.errors,
        }
        for row in rows
    ]
    caption = (
        f"**Batching, in process through handles** (aioserve "
        f"{importlib.metadata.version('aioserve')}, Python {platform.python_version()}, "
        f"asyncio loop). Legacy `@accept_batch` async backend, 1 replica, max_batch_size="
        f"{MAX_BATCH_SIZE}, batch_wait_timeout={BATCH_WAIT_TIMEOUT_S * 1000:g} ms; the device "
        f"holds a lock while it sleeps. {options.duration_s:g} s per row (the sparse row at "
        f"least {SPARSE_MIN_DURATION_S:g} s), the first part left out as warm-up."
    )
    notes = [
        "ceiling = max_batch_size / time of a full batch: 32 / 36 ms = 888.9 items/s for the "
        "20 ms + 0.5 ms/item device; 32 / 200 ms = 160 items/s for the sparse row's device.",
        "open loop = Poisson arrivals sent when due; latency from when a request was due, so "
        "queueing behind an overloaded device counts. saturation = closed loop.",
        "device busy % = time the device spent in batches (its sleep included, which the "
        "event loop's timer overshoots by up to a millisecond or so) over the measured span: "
        "what is left is time between batches.",
        "Above the ceiling an open-loop queue grows for the whole run: its latencies measure "
        "the backlog, not the scheduler.",
    ]
    lines = [caption, "", markdown_table(table, columns), ""]
    lines += [f"- {note}" for note in notes]
    lines.append("")
    for text, met in verdicts(rows):
        lines.append(f"- target {'met' if met else 'MISSED'}: {text}")
    return "\n".join(lines)


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,300, got {text!r}") from None
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {text!r}")
    return rates


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batching",
        description="Throughput and latency of a batching backend in front of a simulated "
        "exclusive device, at several offered loads.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds per row (default {DEFAULT_DURATION_S:g}, {QUICK_DURATION_S:g} with --quick)",
    )
    parser.add_argument(
        "--rates",
        type=_rates,
        default=DEFAULT_RATES,
        help="open-loop offered rates in req/s, comma-separated (default "
        f"{','.join(f'{r:g}' for r in DEFAULT_RATES)})",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit with 1 when a target of the issue is missed"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_DURATION_S:g} s per row"
    )
    args = parser.parse_args(argv)
    duration = args.duration or (QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S)
    if not math.isfinite(duration) or duration <= 0:
        parser.error(f"--duration must be a positive number of seconds, got {duration!r}.")
    return Options(duration, args.rates, args.check)


async def measure(options: Options) -> list[Row]:
    rows = []
    for scenario in options.scenarios():
        print(f"batching: {scenario.name} ...", file=sys.stderr, flush=True)
        rows.append(await run_scenario(scenario))
    return rows


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    rows = asyncio.run(measure(options))
    print(render_report(rows, options))
    if options.check and not all(met for _, met in verdicts(rows)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
