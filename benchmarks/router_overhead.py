"""Router overhead: a handle call through a 3-backend traffic split against a single backend.

``python -m benchmarks.router_overhead [--calls N] [--rounds R] [--quick]``

Everything runs in this process, without HTTP, on the default asyncio loop:

- **single backend**: ``await handle.remote()`` on an endpoint whose traffic is one async noop
  backend (the router's one-backend chooser: no random draw).
- **3-backend split**: the same, on an endpoint split 0.2 / 0.3 / 0.5 over three async noop
  backends (a weighted random draw per call).
- **single backend, A/A control**: a second single-backend endpoint, measured like the first. Its
  ratio to the first shows how much of a difference this machine's noise alone makes.

Calls are awaited one after the other (serial), in runs alternating the cases for R rounds after
one untimed warm-up run of each; the order rotates every round (A B C, B C A, C A B, ...) so that
drift and position favour no case. The table shows the median of the runs in microseconds per
call and the ratio to the single backend.

Split accuracy: 100,000 draws of ``chooser.choose(None)`` from the split endpoint's own chooser
(the object the router asks on every request; not handle calls), compared with the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import aioserve
from benchmarks._harness import alternate_runs, markdown_table, ratio
from benchmarks.handle_overhead import handle_serial as serial

DEFAULT_CALLS = 10_000
DEFAULT_ROUNDS = 9
QUICK_CALLS = 2_000
QUICK_ROUNDS = 2
NUM_CHOICES = 100_000
SEED = 0
WEIGHTS = {"a": 0.2, "b": 0.3, "c": 0.5}
SINGLE = "single"
SPLIT = "split"
CONTROL = "single-again"

# A run: make the calls, return how many were made.


async def noop() -> str:
    """The backend: an async function that does nothing."""
    return "ok"


@dataclass(frozen=True)
class Options:
    calls: int
    rounds: int


@dataclass(frozen=True)
class Accuracy:
    counts: dict[str, int]
    choices: int
    ns_per_choice: float

    def share(self, backend: str) -> float:
        return self.counts.get(backend, 0) / self.choices

    @property
    def max_abs_error(self) -> float:
        return max(abs(self.share(backend) - weight) for backend, weight in WEIGHTS.items())


@dataclass(frozen=True)
class Result:
    runs_us: dict[str, list[float]]
    accuracy: Accuracy

    def median_us(self, case: str) -> float:
        return statistics.median(self.runs_us[case])


# --------------------------------------------------------------------------- measurement


def split_accuracy(serve: aioserve.Serve, choices: int) -> Accuracy:
    """Draw ``choices`` backends from the split endpoint's chooser and count them."""
    chooser = serve.router.endpoints[SPLIT].chooser
    if chooser is None:
        raise RuntimeError(f"The endpoint {SPLIT!r} has no traffic.")
    choose = chooser.choose
    start = time.perf_counter_ns()
    picks = [choose(None) for _ in range(choices)]
    elapsed_ns = time.perf_counter_ns() - start
    return Accuracy(dict(Counter(picks)), choices, elapsed_ns / choices)


async def measure(options: Options) -> Result:
    async with aioserve.Serve(http_options={"location": "NoServer"}, seed=SEED) as serve:
        for backend in WEIGHTS:
            await serve.create_backend(backend, noop)
        await serve.create_backend("control", noop)
        await serve.create_endpoint(SINGLE, backend="a")
        await serve.create_endpoint(SPLIT, backend="a")
        await serve.set_traffic(SPLIT, WEIGHTS)
        await serve.create_endpoint(CONTROL, backend="control")
        handles = {name: serve.get_handle(name) for name in (SINGLE, SPLIT, CONTROL)}
        for handle in handles.values():
            if await handle.remote() != "ok":
                raise RuntimeError(f"{handle!r} did not answer 'ok'.")
        runs = await alternate_runs(
            [(name, serial(handle, options.calls)) for name, handle in handles.items()],
            options.rounds,
        )
        accuracy = split_accuracy(serve, NUM_CHOICES)
    return Result(runs, accuracy)


# --------------------------------------------------------------------------- report


def render_report(result: Result, options: Options) -> str:
    single_us = result.median_us(SINGLE)
    overhead_rows: list[dict[str, object]] = [
        {
            "case": "single backend",
            "traffic": "a: 1.0",
            "µs/call": single_us,
            "min µs/call": min(result.runs_us[SINGLE]),
            "ratio": 1.0,
        },
        {
            "case": "3-backend split",
            "traffic": " / ".join(f"{b}: {w:g}" for b, w in WEIGHTS.items()),
            "µs/call": result.median_us(SPLIT),
            "min µs/call": min(result.runs_us[SPLIT]),
            "ratio": ratio(result.median_us(SPLIT), single_us),
        },
        {
            "case": "single backend, A/A control",
            "traffic": "control: 1.0",
            "µs/call": result.median_us(CONTROL),
            "min µs/call": min(result.runs_us[CONTROL]),
            "ratio": ratio(result.median_us(CONTROL), single_us),
        },
    ]
    accuracy = result.accuracy
    accuracy_rows: list[dict[str, object]] = [
        {
            "backend": backend,
            "weight": weight,
            "observed share": f"{accuracy.share(backend):.4f}",
            "abs error": f"{abs(accuracy.share(backend) - weight):.4f}",
            # One standard deviation of a share drawn by weight (binomial): the noise to expect.
            "expected sd": f"{math.sqrt(weight * (1 - weight) / accuracy.choices):.4f}",
        }
        for backend, weight in WEIGHTS.items()
    ]
    version = importlib.metadata.version("aioserve")
    caption = (
        f"**Router overhead, in process** (aioserve {version}; asyncio default loop; Python "
        f"{platform.python_version()}). {options.calls:,} serial `await handle.remote()` calls "
        f"per run on async noop backends, {options.rounds} "
        f"{'round' if options.rounds == 1 else 'rounds'} alternating the cases in rotating order "
        "after a warm-up run, medians shown."
    )
    accuracy_caption = (
        f"**Split accuracy**: {accuracy.choices:,} draws of `chooser.choose(None)` from the split "
        f"endpoint's own chooser (the router's per-request choice, not handle calls; seed "
        f"{SEED}), {accuracy.ns_per_choice:.0f} ns per choice. Max abs error: "
        f"{accuracy.max_abs_error:.4f}."
    )
    notes = [
        "ratio = µs/call / single-backend µs/call: what a weighted traffic split adds to a call "
        "(lower is better, 1.00 = nothing). The A/A control's distance from 1.00 is this run's "
        "noise: a split ratio within it means no measurable overhead.",
        "The single-backend endpoint's chooser returns its one backend without a random draw; "
        "the split draws one random number and bisects the cumulative weights.",
    ]
    lines = [
        caption,
        "",
        markdown_table(overhead_rows, ["case", "traffic", "µs/call", "min µs/call", "ratio"]),
        "",
        accuracy_caption,
        "",
        markdown_table(
            accuracy_rows, ["backend", "weight", "observed share", "abs error", "expected sd"]
        ),
        "",
    ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.router_overhead",
        description="Time a handle call through a 3-backend traffic split against one backend, "
        "and check the split's accuracy.",
    )
    parser.add_argument(
        "--calls", type=int, help=f"serial calls per run (default {DEFAULT_CALLS:,})"
    )
    parser.add_argument("--rounds", type=int, help=f"A B rounds (default {DEFAULT_ROUNDS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_ROUNDS} rounds of {QUICK_CALLS:,} calls",
    )
    args = parser.parse_args(argv)
    calls = args.calls or (QUICK_CALLS if args.quick else DEFAULT_CALLS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if min(calls, rounds) < 1:
        parser.error(f"--calls and --rounds must be at least 1, got {calls!r} and {rounds!r}.")
    return Options(calls, rounds)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    print(
        f"router overhead: {options.rounds} rounds of single, split and control, "
        f"{options.calls:,} calls per run",
        file=sys.stderr,
        flush=True,
    )
    result = asyncio.run(measure(options))
    print(render_report(result, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
