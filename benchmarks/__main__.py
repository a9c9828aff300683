"""Run every benchmark: ``python -m benchmarks [--quick] [--only NAME ...]``.

Each benchmark module exposes ``main(argv: list[str] | None) -> int`` and prints a Markdown table;
this runs those present, in order, each under a heading. A module that is not there (yet) is
skipped with a note; one that fails does not stop the others, and the exit code says so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import cast

BENCHMARKS = (
    ("http_overhead", "HTTP overhead: aioserve vs bare Starlette on uvicorn"),
    ("handle_overhead", "Handle overhead: `await handle.remote()` vs a raw asyncio handoff"),
    ("router_overhead", "Router overhead: a 3-backend traffic split vs one backend"),
    ("batching", "Batching: the batch scheduler vs a simulated device's ceiling"),
    ("batching_model", "Batching a real model: POST /predict vs a bare Starlette route"),
    ("digits_model", "The worked example's model and replicas of a numpy model, at 64 connections"),
)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_one(name: str, argv: list[str]) -> int:
    """Import ``benchmarks.<name>`` and run its ``main(argv)``; its exit code, 1 if it raised."""
    module = importlib.import_module(f"benchmarks.{name}")
    main = cast(Callable[[list[str] | None], int], module.main)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors and explicit exits
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        _progress(f"benchmarks.{name} failed:\n{traceback.format_exc()}")
        return 1
    return code or 0


def main(argv: Sequence[str] | None = None) -> int:
    names = [name for name, _ in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run every benchmark present and print their Markdown tables.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: passes --quick to every benchmark"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=names,
        metavar="NAME",
        help=f"run only this benchmark, repeatable ({', '.join(names)})",
    )
    args = parser.parse_args(argv)
    selected = set(args.only or names)
    module_argv = ["--quick"] if args.quick else []
    failed: list[str] = []
    for name, title in BENCHMARKS:
        if name not in selected:
            continue
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            _progress(f"benchmarks.{name} is not there; skipped.")
            continue
        print(f"## {title}\n", flush=True)
        _progress(f"Running benchmarks.{name} {' '.join(module_argv)}".rstrip())
        start = time.monotonic()
        code = run_one(name, module_argv)
        sys.stdout.flush()
        print(flush=True)
        _progress(f"benchmarks.{name} done in {time.monotonic() - start:.0f} s (exit {code}).")
        if code != 0:
            failed.append(name)
    if failed:
        _progress(f"Failed: {', '.join(failed)}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
