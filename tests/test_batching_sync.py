"""Sync ``@serve.batch`` functions and the batch queues' wait policy (aioserve.batching,
aioserve.batchqueue), alone and in a replica.

Decisions about waiting are checked with an injected clock that only moves when a test moves it:
a queue that waited when it should not would wait for a timeout of an hour, and the hang guard
would fail the test; no test sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from _sample_backends import HANG_GUARD_S, wait_until

import aioserve
from aioserve import Serve
from aioserve.batching import batch, sync_batch_runner
from aioserve.batchqueue import BatchQueue, dispatch_at
from aioserve.exceptions import BatchError, ConfigError, ConfigTypeError

pytestmark = pytest.mark.usefixtures("no_loop_errors")

LONG = 3600.0  # a batch wait timeout no test may reach


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Held:
    """An async dispatch that records its batches and holds each until released."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        await self.gate.wait()
        return [x * 10 for x in items]


# -- the rule, as a pure function -----------------------------------------------------------------


def _at(**overrides: Any) -> float:
    values: dict[str, Any] = dict(
        now=100.0,
        queued=2,
        running=0,
        max_batch_size=8,
        batch_wait_timeout_s=1.0,
        oldest_arrival=99.9,
        last_arrival=100.0,
        mean_gap_s=0.01,
        policy="adaptive",
    )
    values.update(overrides)
    return dispatch_at(**values)


def test_a_lone_item_with_nothing_running_goes_at_once_unless_the_wait_is_fixed() -> None:
    assert _at(queued=1, running=0) == 100.0
    assert _at(queued=1, running=0, policy="fixed") == pytest.approx(100.9)


def test_a_lone_item_waits_while_a_batch_of_its_queue_runs_and_arrivals_are_frequent() -> None:
    assert _at(queued=1, running=1) == pytest.approx(100.9)


def test_items_wait_for_more_when_the_arrival_rate_says_more_will_come_in_time() -> None:
    assert _at(queued=3, mean_gap_s=0.01) == pytest.approx(100.9)


def test_items_go_at_once_when_the_next_arrival_is_not_expected_before_the_timeout() -> None:
    # The last item came at 100.0; at one item per 2 s the next is due after 100.9.
    assert _at(queued=3, mean_gap_s=2.0) == 100.0
    assert _at(queued=3, mean_gap_s=2.0, policy="fixed") == pytest.approx(100.9)


def test_a_full_batch_and_a_zero_timeout_go_at_once_under_either_policy() -> None:
    for policy in ("adaptive", "fixed"):
        assert _at(queued=8, policy=policy) == 100.0
        assert _at(batch_wait_timeout_s=0.0, policy=policy) == 100.0


# -- the rule in a queue ------------------------------------------------------------------------


async def test_a_lone_request_is_dispatched_without_waiting_for_the_timeout() -> None:
    clock = Clock()
    held = Held()
    held.gate.set()
    async with BatchQueue(held, max_batch_size=8, batch_wait_timeout_s=LONG, clock=clock) as q:
        assert await asyncio.wait_for(q.submit(1), HANG_GUARD_S) == 10
        assert await asyncio.wait_for(q.submit(2), HANG_GUARD_S) == 20
    assert held.batches == [[1], [2]]
    assert clock.now == 1000.0  # no time passed: nothing waited for the timeout


async def test_with_a_fixed_wait_a_lone_request_waits_for_a_partner() -> None:
    clock = Clock()
    held = Held()
    held.gate.set()
    async with BatchQueue(
        held, max_batch_size=2, batch_wait_timeout_s=LONG, batch_wait_policy="fixed", clock=clock
    ) as q:
        first = asyncio.create_task(q.submit(1))
        await wait_until(lambda: q.queued == 1, "the first item queued")
        assert await asyncio.wait_for(q.submit(2), HANG_GUARD_S) == 20
        assert await first == 10
    assert held.batches == [[1, 2]]


async def test_items_that_queue_while_a_batch_runs_go_out_together_up_to_the_max() -> None:
    clock = Clock()
    held = Held()
    async with BatchQueue(held, max_batch_size=4, batch_wait_timeout_s=LONG, clock=clock) as q:
        first = asyncio.create_task(q.submit(0))
        await wait_until(lambda: held.batches == [[0]], "the lone first item dispatched")
        rest = [asyncio.create_task(q.submit(i)) for i in range(1, 10)]
        await wait_until(lambda: q.queued == 9, "nine items queued behind the running batch")
        held.gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *rest), HANG_GUARD_S) == [
            i * 10 for i in range(10)
        ]
    # Full batches while items wait; the last one alone, at once, with nothing left to join it.
    assert held.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


async def test_a_partial_batch_waits_when_arrivals_are_frequent_and_fills_when_they_come() -> None:
    clock = Clock()
    held = Held()
    async with BatchQueue(held, max_batch_size=4, batch_wait_timeout_s=LONG, clock=clock) as q:
        tasks = [asyncio.create_task(q.submit(0))]
        await wait_until(lambda: held.batches == [[0]], "the lone first item dispatched")
        for i in (1, 2):
            clock.now += 0.001
            tasks.append(asyncio.create_task(q.submit(i)))
            await wait_until(lambda i=i: q.queued == i, f"item {i} queued at {clock.now}")
        held.gate.set()
        await wait_until(lambda: q.running == 0, "the first batch finished")
        for i in (3, 4):
            clock.now += 0.001
            tasks.append(asyncio.create_task(q.submit(i)))
            if i == 3:
                await wait_until(lambda: q.queued == 3, "item 3 queued")
        assert await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S) == [
            0,
            10,
            20,
            30,
            40,
        ]
    assert held.batches == [[0], [1, 2, 3, 4]]


async def test_a_partial_batch_goes_at_once_when_the_next_arrival_is_not_due_in_time() -> None:
    clock = Clock()
    held = Held()
    async with BatchQueue(held, max_batch_size=8, batch_wait_timeout_s=100.0, clock=clock) as q:
        tasks = [asyncio.create_task(q.submit(0))]
        await wait_until(lambda: held.batches == [[0]], "the lone first item dispatched")
        for i in (1, 2):
            clock.now += 60.0  # one arrival a minute: none is due before the 100 s timeout
            tasks.append(asyncio.create_task(q.submit(i)))
            await wait_until(lambda i=i: q.queued == i, f"item {i} queued at {clock.now}")
        held.gate.set()
        assert await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S) == [0, 10, 20]
    assert held.batches == [[0], [1, 2]]


async def test_the_policy_is_validated_reported_and_configurable() -> None:
    with pytest.raises(ConfigError, match="batch_wait_policy must be one of 'adaptive', 'fixed'"):
        BatchQueue(Held(), max_batch_size=2, batch_wait_timeout_s=1.0, batch_wait_policy="eager")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_wait_policy"):
        batch(batch_wait_policy="sometimes")  # type: ignore[call-overload]
    queue: BatchQueue[Any, Any] = BatchQueue(Held(), max_batch_size=2, batch_wait_timeout_s=1.0)
    assert queue.statistics().batch_wait_policy == "adaptive"
    queue.configure(batch_wait_policy="fixed")
    assert queue.statistics().batch_wait_policy == "fixed"
    assert "batch_wait_policy='fixed'" in repr(queue)
    with pytest.raises(ConfigError):
        queue.configure(batch_wait_policy="never")  # type: ignore[arg-type]
    assert queue.statistics().batch_wait_policy == "fixed"


# -- sync batch functions -----------------------------------------------------------------------


async def test_a_sync_batch_function_runs_off_the_loop_and_fails_its_whole_batch() -> None:
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    @batch(max_batch_size=4)
    def double(items: list[int]) -> list[int]:
        threads.append(threading.current_thread())
        if 13 in items:
            raise ValueError("unlucky")
        return [2 * x for x in items]

    assert await double(21) == 42
    with pytest.raises(ValueError, match="unlucky"):
        await double(13)
    assert threads and loop_thread not in threads


async def test_a_sync_batch_function_runs_where_sync_batch_runner_says() -> None:
    ran: list[str] = []

    async def runner(fn: Callable[[], Any]) -> Any:
        ran.append("runner")
        return await asyncio.to_thread(fn)

    @batch
    def wrong_length(items: list[int]) -> list[int]:
        return []

    token = sync_batch_runner.set(runner)
    try:
        with pytest.raises(BatchError, match="returned a list of length 0 for a batch of 1"):
            await wrong_length(1)
    finally:
        sync_batch_runner.reset(token)
    assert ran == ["runner"]


def test_generators_and_non_functions_are_refused() -> None:
    def gen(items: list[int]) -> Any:
        yield items

    with pytest.raises(ConfigTypeError, match="async def or def"):
        batch(gen)
    with pytest.raises(ConfigTypeError, match="Pass the settings as keywords"):
        batch(4)  # type: ignore[call-overload]


# -- in a replica ---------------------------------------------------------------------------------


class SyncModel:
    """A class backend with a sync batch method; the test holds its records and its gate."""

    def __init__(
        self, gate: threading.Event, entered: list[int], threads: list[str], sizes: list[int]
    ) -> None:
        self.gate = gate
        self.entered = entered
        self.threads = threads
        self.sizes = sizes

    @aioserve.batch(max_batch_size=4, batch_wait_timeout_s=LONG)
    def predict(self, items: list[int]) -> list[int]:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(items))
        self.gate.wait(HANG_GUARD_S)
        return [x + 1 for x in items]

    async def __call__(self, x: int) -> int:
        # Nothing suspends between here and the item being queued in predict's batch queue.
        self.entered.append(x)
        return await self.predict(x)


async def test_a_sync_batch_method_runs_on_its_replica_thread_and_batches_fill(
    serve: Serve,
) -> None:
    gate = threading.Event()
    gate.set()
    entered: list[int] = []
    threads: list[str] = []
    sizes: list[int] = []
    await serve.create_backend("model", SyncModel, gate, entered, threads, sizes)
    await serve.create_endpoint("model", backend="model")
    handle = serve.get_handle("model")
    assert await handle.remote(1) == 2  # alone: dispatched at once despite the hour-long timeout
    gate.clear()
    first = asyncio.ensure_future(handle.remote(0))
    await wait_until(lambda: sizes == [1, 1], "the second lone batch running on the thread")
    rest = [asyncio.ensure_future(handle.remote(i)) for i in range(1, 9)]
    await wait_until(lambda: len(entered) == 10, "eight calls queued behind the running batch")
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *rest), HANG_GUARD_S)
    assert results == [i + 1 for i in range(9)]
    assert sizes == [1, 1, 4, 4]
    assert all(name.startswith("aioserve-model#") for name in threads), threads
    assert threading.current_thread().name not in threads


async def test_the_next_batch_starts_before_the_callers_of_the_last_one_are_answered() -> None:
    # So that a batch run on a thread works while the loop answers the last batch's callers.
    seen: list[bool] = []
    gate = asyncio.Event()
    first: asyncio.Task[Any] | None = None

    async def dispatch(items: list[int]) -> list[int]:
        if items == [0]:
            await gate.wait()
        else:
            assert first is not None
            seen.append(first.done())
        return items

    async with BatchQueue(dispatch, max_batch_size=2, batch_wait_timeout_s=LONG) as q:
        first = asyncio.create_task(q.submit(0))
        await wait_until(lambda: q.running == 1, "the first item dispatched alone")
        rest = [asyncio.create_task(q.submit(i)) for i in (1, 2)]
        await wait_until(lambda: q.queued == 2, "a full batch queued behind it")
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, *rest), HANG_GUARD_S) == [0, 1, 2]
    assert seen == [False]
