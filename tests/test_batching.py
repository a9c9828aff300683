"""Tests for aioserve.batching: BatchQueue, @batch and @accept_batch.

Tests synchronise on events, futures and the queue's own state (``queued``, ``running``). Where a
test must show that something does NOT happen, it first waits for the state that shows the queue
got as far as it would (the items are queued, say); the few real waits on the clock say why.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from _sample_backends import wait_until

from aioserve.batching import (
    BatchQueue,
    BatchQueueStats,
    accept_batch,
    accepts_batches,
    batch,
    queue_owner,
)
from aioserve.exceptions import (
    BatchError,
    ConfigError,
    ConfigTypeError,
    DeadlineExceeded,
    Overloaded,
    ServeShutdown,
)

pytestmark = pytest.mark.usefixtures("no_loop_errors")

LONG = 3600.0  # a batch wait timeout no test may reach


class Recorder:
    """A dispatch that records the batches it receives and can be held open."""

    def __init__(self, fn: Callable[[Any], Any] = lambda x: x * 10) -> None:
        self.fn = fn
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self._arrived = asyncio.Event()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def items(self) -> list[Any]:
        return [item for batch_ in self.batches for item in batch_]

    async def wait_batches(self, count: int) -> None:
        while len(self.batches) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self._arrived.set()
        await self.gate.wait()
        return [self.fn(item) for item in items]


def spawn(queue: BatchQueue[Any, Any], *items: Any) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(queue.submit(item)) for item in items]


# -- forming batches ------------------------------------------------------------------------


async def test_full_batch_goes_out_at_once_and_the_rest_waits_for_a_partner() -> None:
    rec = Recorder()
    async with BatchQueue(
        rec, max_batch_size=2, batch_wait_timeout_s=10.0, batch_wait_policy="fixed"
    ) as queue:
        first, second, third = spawn(queue, 0, 1, 2)
        async with asyncio.timeout(5):  # a full batch must not wait for the 10 s timeout
            assert list(await asyncio.gather(first, second)) == [0, 10]
        await wait_until(lambda: queue.running == 0, "the first batch has finished")
        assert rec.batches == [[0, 1]]
        assert not third.done()
        assert queue.queued == 1
        async with asyncio.timeout(5):
            assert list(await asyncio.gather(third, queue.submit(3))) == [20, 30]
        assert rec.batches == [[0, 1], [2, 3]]


async def test_callers_wait_for_a_full_batch_with_a_long_timeout() -> None:
    rec = Recorder()
    async with BatchQueue(rec, max_batch_size=3, batch_wait_timeout_s=LONG) as queue:
        waiting = spawn(queue, 0, 1)
        await wait_until(lambda: queue.queued == 2, "both items queued")
        assert rec.batches == []
        assert not any(task.done() for task in waiting)
        async with asyncio.timeout(5):
            assert await asyncio.gather(*waiting, queue.submit(2)) == [0, 10, 20]
        assert rec.batches == [[0, 1, 2]]


async def test_batch_size_one_answers_at_once_despite_a_long_timeout() -> None:
    rec = Recorder()
    async with BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=LONG) as queue:
        async with asyncio.timeout(5):
            assert await queue.submit(7) == 70
            assert await queue.submit(8) == 80
    assert rec.batches == [[7], [8]]


async def test_timeout_zero_takes_what_is_queued_right_now() -> None:
    rec = Recorder()
    async with BatchQueue(rec, max_batch_size=10, batch_wait_timeout_s=0) as queue:
        assert await asyncio.gather(*spawn(queue, 0, 1, 2)) == [0, 10, 20]
        async with asyncio.timeout(5):
            assert await queue.submit(3) == 30
    assert rec.batches == [[0, 1, 2], [3]]


async def test_items_queued_while_capacity_is_busy_go_out_together() -> None:
    rec = Recorder()
    rec.hold()
    async with BatchQueue(rec, max_batch_size=3, batch_wait_timeout_s=0) as queue:
        tasks = spawn(queue, 0)
        await rec.wait_batches(1)
        tasks += spawn(queue, 1, 2, 3, 4, 5)
        await wait_until(lambda: queue.queued == 5, "queue.queued == 5")
        assert rec.batches == [[0]]
        rec.release()
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0], [1, 2, 3], [4, 5]]


async def test_wait_is_counted_from_the_oldest_item_not_from_when_capacity_frees() -> None:
    rec = Recorder()
    rec.hold()
    loop = asyncio.get_running_loop()
    timeout = 0.2
    async with BatchQueue(rec, max_batch_size=3, batch_wait_timeout_s=timeout) as queue:
        tasks = spawn(queue, 0, 1, 2)
        await rec.wait_batches(1)
        tasks += spawn(queue, 3, 4)
        await wait_until(lambda: queue.queued == 2, "both items queued")
        # A real wait: the clock must pass the queued items' batch timeout while capacity is held.
        await asyncio.sleep(timeout * 1.5)
        assert rec.batches == [[0, 1, 2]]
        released = loop.time()
        rec.release()
        # Without another timeout: their wait is already over.
        await wait_until(lambda: len(rec.batches) == 2, "the second batch went out")
        assert loop.time() - released < timeout
        assert rec.batches == [[0, 1, 2], [3, 4]]
        assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]


# -- deadlines --------------------------------------------------------------------------------


async def test_items_are_taken_earliest_deadline_first_ties_in_arrival_order() -> None:
    rec = Recorder()
    rec.hold()
    loop = asyncio.get_running_loop()
    async with BatchQueue(rec, max_batch_size=3, batch_wait_timeout_s=0) as queue:
        first = spawn(queue, "first")
        await rec.wait_batches(1)
        offsets = [50, 10, None, 30, 10, 20, None, 40, 30, 5]
        base = loop.time() + 1000  # far enough that no deadline timer fires during the test
        tasks = [
            asyncio.create_task(queue.submit(i, None if off is None else base + off))
            for i, off in enumerate(offsets)
        ]
        await wait_until(lambda: queue.queued == 10, "queue.queued == 10")
        rec.release()
        await asyncio.gather(*first, *tasks)
    expected = sorted(range(10), key=lambda i: (offsets[i] is None, offsets[i] or 0, i))
    assert expected == [9, 1, 4, 5, 3, 8, 7, 0, 2, 6]
    assert rec.batches[0] == ["first"]
    assert rec.items[1:] == expected
    assert [len(b) for b in rec.batches[1:]] == [3, 3, 3, 1]


async def test_an_expired_deadline_is_never_dispatched() -> None:
    rec = Recorder()
    loop = asyncio.get_running_loop()
    async with BatchQueue(rec, max_batch_size=4, batch_wait_timeout_s=0, name="m") as queue:
        with pytest.raises(DeadlineExceeded, match="'m'"):
            await queue.submit("late", deadline=loop.time() - 1)
        with pytest.raises(TimeoutError):
            await queue.submit("now", deadline=loop.time())
        assert queue.queued == 0
        assert await queue.submit("ok", deadline=loop.time() + 60) == "ok" * 10
    assert rec.batches == [["ok"]]


def _block_loop(seconds: float) -> None:
    # Stands in for CPU-bound user code that holds the event loop; not synchronisation.
    time.sleep(seconds)


async def test_a_deadline_that_passes_while_the_loop_is_blocked_is_never_dispatched() -> None:
    gate = asyncio.Event()
    batches: list[list[str]] = []

    async def dispatch(items: list[str]) -> list[str]:
        batches.append(list(items))
        if items == ["slow"]:
            await gate.wait()
            # Holds the loop past the waiting item's deadline before the queue hears that this
            # batch finished: the next batch is formed after that deadline, before its timer
            # could run.
            _block_loop(0.05)
        return items

    loop = asyncio.get_running_loop()
    async with BatchQueue(dispatch, max_batch_size=1, batch_wait_timeout_s=0) as queue:
        slow = spawn(queue, "slow")
        await wait_until(lambda: queue.running == 1, "queue.running == 1")
        late = asyncio.create_task(queue.submit("late", deadline=loop.time() + 0.02))
        await wait_until(lambda: queue.queued == 1, "queue.queued == 1")
        gate.set()
        assert await slow[0] == "slow"
        with pytest.raises(DeadlineExceeded):
            await late
    assert batches == [["slow"]]


@pytest.mark.parametrize("why", ["capacity busy", "batch not full"])
async def test_a_waiting_item_fails_at_its_deadline(why: str) -> None:
    rec = Recorder()
    loop = asyncio.get_running_loop()
    async with BatchQueue(
        rec, max_batch_size=2, batch_wait_timeout_s=LONG, batch_wait_policy="fixed"
    ) as queue:
        held: list[asyncio.Task[Any]] = []
        if why == "capacity busy":
            rec.hold()
            held = spawn(queue, "a", "b")
            await rec.wait_batches(1)
        deadline = loop.time() + 0.05
        async with asyncio.timeout(5):
            with pytest.raises(DeadlineExceeded):
                await queue.submit("late", deadline)
        assert loop.time() >= deadline - 0.001
        assert queue.queued == 0
        rec.release()
        await asyncio.gather(*held)
        await wait_until(lambda: (queue.running, queue.queued) == (0, 0), "the queue is idle")
    assert "late" not in rec.items


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda items: items[:1], "a list of length 1 for a batch of 2 requests"),
        (lambda items: [*items, 0], "a list of length 3 for a batch of 2 requests"),
        (lambda items: {i: i for i in items}, "a dict of length 2"),
        (lambda items: "ab", "a str of length 2"),
        (lambda items: None, "None (a NoneType, which has no length)"),
    ],
    ids=["short", "long", "dict", "str", "none"],
)
async def test_a_wrong_result_fails_every_caller_and_the_queue_goes_on(
    bad: Callable[[list[int]], Any], message: str
) -> None:
    calls: list[list[int]] = []

    async def dispatch(items: list[int]) -> Any:
        calls.append(list(items))
        return bad(items) if len(calls) == 1 else [i * 10 for i in items]

    async with BatchQueue(dispatch, max_batch_size=2, batch_wait_timeout_s=LONG, name="q") as q:
        results = await asyncio.gather(q.submit(1), q.submit(2), return_exceptions=True)
        assert all(isinstance(r, BatchError) for r in results)
        assert str(results[0]) == str(results[1])
        assert message in str(results[0])
        assert "'q'" in str(results[0])
        assert list(await asyncio.gather(q.submit(3), q.submit(4))) == [30, 40]


async def test_a_dispatch_exception_reaches_every_caller_and_the_queue_goes_on() -> None:
    calls = 0

    async def dispatch(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("boom")
        return items

    async with BatchQueue(dispatch, max_batch_size=2, batch_wait_timeout_s=LONG) as queue:
        results = await asyncio.gather(queue.submit(1), queue.submit(2), return_exceptions=True)
        assert isinstance(results[0], KeyError)
        assert results[0] is results[1]
        assert list(await asyncio.gather(queue.submit(3), queue.submit(4))) == [3, 4]


async def test_a_dispatch_that_cancels_itself_fails_its_callers_not_the_queue() -> None:
    calls = 0

    async def dispatch(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError
        return items

    async with BatchQueue(dispatch, max_batch_size=1, batch_wait_timeout_s=0) as queue:
        with pytest.raises(BatchError, match="cancelled before it returned"):
            await queue.submit(1)
        assert await queue.submit(2) == 2


# -- cancellation -----------------------------------------------------------------------------


async def test_cancelling_a_queued_caller_removes_its_item() -> None:
    rec = Recorder()
    rec.hold()
    async with BatchQueue(rec, max_batch_size=5, batch_wait_timeout_s=0) as queue:
        (first,) = spawn(queue, "first")
        await rec.wait_batches(1)
        gone, kept = spawn(queue, "gone", "kept")
        await wait_until(lambda: queue.queued == 2, "queue.queued == 2")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert queue.queued == 1
        rec.release()
        assert list(await asyncio.gather(first, kept)) == ["first" * 10, "kept" * 10]
    assert rec.batches == [["first"], ["kept"]]


async def test_many_cancellations_keep_the_count_exact_and_the_order() -> None:
    rec = Recorder()
    rec.hold()
    loop = asyncio.get_running_loop()
    async with BatchQueue(rec, max_batch_size=50, batch_wait_timeout_s=0) as queue:
        (first,) = spawn(queue, -1)
        await rec.wait_batches(1)
        base = loop.time() + 1000
        # Later arrivals get earlier deadlines, so order shows the heap survives compaction.
        tasks = [asyncio.create_task(queue.submit(i, base - i)) for i in range(300)]
        await wait_until(lambda: queue.queued == 300, "queue.queued == 300")
        gone = [task for i, task in enumerate(tasks) if i % 10]
        kept = [task for i, task in enumerate(tasks) if i % 10 == 0]
        for task in gone:
            task.cancel()
        outcomes = await asyncio.gather(*gone, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert queue.queued == 30
        rec.release()
        assert await asyncio.gather(first, *kept) == [-10] + [i * 10 for i in range(0, 300, 10)]
    assert rec.batches == [[-1], list(range(290, -1, -10))]


async def test_a_caller_cancelled_in_the_turn_its_batch_forms_is_not_dispatched() -> None:
    rec = Recorder()
    rec.hold()
    async with BatchQueue(rec, max_batch_size=5, batch_wait_timeout_s=0) as queue:
        (first,) = spawn(queue, "first")
        await rec.wait_batches(1)
        (gone,) = spawn(queue, "gone")
        await wait_until(lambda: queue.queued == 1, "queue.queued == 1")
        # The worker is woken first, so it forms a batch before the cancelled caller's task
        # runs its cleanup.
        queue.configure(max_concurrent_batches=2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        # Whatever the worker formed for "gone" has ended: only the first batch runs.
        await wait_until(lambda: queue.running == 1, "only the first batch running")
        assert queue.queued == 0
        assert rec.batches == [["first"]]
        rec.release()
        assert await first == "first" * 10
    assert rec.batches == [["first"]]


@pytest.mark.parametrize("outcome", ["result", "exception"])
async def test_cancelling_a_caller_after_dispatch_drops_its_result(outcome: str) -> None:
    rec = Recorder(fn=lambda x: x if outcome == "result" else 1 / 0)
    rec.hold()
    async with BatchQueue(rec, max_batch_size=2, batch_wait_timeout_s=0) as queue:
        gone, kept = spawn(queue, 1, 2)
        await rec.wait_batches(1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert queue.running == 1
        rec.release()
        if outcome == "result":
            assert await kept == 2
        else:
            with pytest.raises(ZeroDivisionError):
                await kept
        await wait_until(lambda: queue.running == 0, "queue.running == 0")
    assert rec.batches == [[1, 2]]


async def test_overload_bound_rejects_at_once_and_names_the_queue() -> None:
    rec = Recorder()
    rec.hold()
    queue = BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=0, max_queued=2, name="model")
    async with queue:
        tasks = spawn(queue, 0)
        await rec.wait_batches(1)
        tasks += spawn(queue, 1, 2)
        await wait_until(lambda: queue.queued == 2, "queue.queued == 2")
        with pytest.raises(Overloaded, match=r"'model'.*max_queued_queries=2"):
            await queue.submit(3)
        tasks[2].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks[2]
        tasks[2] = asyncio.create_task(queue.submit(4))
        await wait_until(lambda: queue.queued == 2, "queue.queued == 2")
        rec.release()
        assert await asyncio.gather(*tasks) == [0, 10, 40]
    assert rec.items == [0, 1, 4]


# -- configuration ----------------------------------------------------------------------------


async def test_configure_applies_from_the_next_batch() -> None:
    rec = Recorder()
    rec.hold()
    async with BatchQueue(rec, max_batch_size=2, batch_wait_timeout_s=0) as queue:
        tasks = spawn(queue, 0, 1)
        await rec.wait_batches(1)
        tasks += spawn(queue, 2, 3, 4)
        await wait_until(lambda: queue.queued == 3, "queue.queued == 3")
        queue.configure(max_batch_size=3)
        assert queue.statistics().max_batch_size == 3
        rec.release()
        await asyncio.gather(*tasks)
    assert rec.batches == [[0, 1], [2, 3, 4]]


async def test_configure_checks_every_value_before_changing_any() -> None:
    queue: BatchQueue[int, int] = BatchQueue(Recorder(), max_batch_size=2, batch_wait_timeout_s=1)
    with pytest.raises(ConfigError, match="max_batch_size"):
        queue.configure(batch_wait_timeout_s=5, max_batch_size=0)
    with pytest.raises(ConfigTypeError, match="max_queued"):
        queue.configure(max_concurrent_batches=3, max_queued="10")  # type: ignore[arg-type]
    stats = queue.statistics()
    assert (stats.max_batch_size, stats.batch_wait_timeout_s) == (2, 1.0)
    queue.configure(max_queued=1)
    queue.configure(max_batch_size=4)  # leaves max_queued as it was
    assert "max_queued=1" in repr(queue)
    queue.configure(max_queued=None)
    assert "max_queued=None" in repr(queue)
    await queue.aclose()


async def test_shortening_the_timeout_releases_a_waiting_batch() -> None:
    rec = Recorder()
    async with BatchQueue(
        rec, max_batch_size=5, batch_wait_timeout_s=LONG, batch_wait_policy="fixed"
    ) as queue:
        (waiting,) = spawn(queue, 1)
        await wait_until(lambda: queue.queued == 1, "the item queued")
        # A later item finds the first still waiting: it did not go out alone.
        waiting_too = spawn(queue, 2)
        await wait_until(lambda: queue.queued == 2, "both items queued")
        assert not waiting.done()
        queue.configure(batch_wait_timeout_s=0)
        async with asyncio.timeout(5):
            assert await waiting == 10
            assert await asyncio.gather(*waiting_too) == [20]
    assert rec.batches == [[1, 2]]


async def test_raising_max_concurrent_batches_starts_another_batch_at_once() -> None:
    rec = Recorder()
    rec.hold()
    async with BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=0) as queue:
        tasks = spawn(queue, 0, 1)
        await rec.wait_batches(1)
        await wait_until(lambda: queue.queued == 1, "the second item queued")
        assert (queue.running, queue.queued) == (1, 1)
        queue.configure(max_concurrent_batches=2)
        await rec.wait_batches(2)
        assert (queue.running, queue.queued) == (2, 0)
        rec.release()
        assert await asyncio.gather(*tasks) == [0, 10]


async def test_two_batches_run_at_once_with_max_concurrent_batches_two() -> None:
    rec = Recorder()
    rec.hold()
    queue = BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=2)
    async with queue:
        tasks = spawn(queue, 0, 1, 2)
        await rec.wait_batches(2)
        await wait_until(lambda: queue.queued == 1, "the third item queued")
        assert rec.batches == [[0], [1]]
        assert (queue.running, queue.queued) == (2, 1)
        rec.release()
        assert await asyncio.gather(*tasks) == [0, 10, 20]
    assert rec.batches == [[0], [1], [2]]


# -- closing ----------------------------------------------------------------------------------


async def test_aclose_drains_queued_and_running_batches() -> None:
    rec = Recorder()
    rec.hold()
    queue = BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=0, name="m")
    tasks = spawn(queue, 0, 1)
    await rec.wait_batches(1)
    closer = asyncio.create_task(queue.aclose(drain_timeout_s=30))
    await wait_until(lambda: queue.closed, "queue.closed")
    with pytest.raises(ServeShutdown, match="'m'"):
        await queue.submit(2)
    rec.release()
    async with asyncio.timeout(5):
        assert await asyncio.gather(*tasks) == [0, 10]
        await closer
    assert (queue.running, queue.queued) == (0, 0)


async def test_aclose_flushes_a_partial_batch_instead_of_waiting_for_it_to_fill() -> None:
    rec = Recorder()
    queue = BatchQueue(rec, max_batch_size=5, batch_wait_timeout_s=LONG)
    tasks = spawn(queue, 0, 1)
    await wait_until(lambda: queue.queued == 2, "queue.queued == 2")
    async with asyncio.timeout(5):
        await queue.aclose(drain_timeout_s=30)
        assert await asyncio.gather(*tasks) == [0, 10]
    assert rec.batches == [[0, 1]]


@pytest.mark.parametrize("drain_timeout_s", [0.0, 0.05])
async def test_aclose_fails_what_is_left_after_the_drain_timeout(drain_timeout_s: float) -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def dispatch(items: list[int]) -> list[int]:
        started.set()
        try:
            await asyncio.Event().wait()  # never finishes by itself
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return items

    queue = BatchQueue(dispatch, max_batch_size=1, batch_wait_timeout_s=0)
    running, queued = spawn(queue, 0, 1)
    await started.wait()
    await wait_until(lambda: queue.queued == 1, "queue.queued == 1")
    # With drain_timeout_s > 0 this waits that long for work that never finishes.
    await queue.aclose(drain_timeout_s=drain_timeout_s)
    assert cancelled.is_set()
    for task in (running, queued):
        with pytest.raises(ServeShutdown):
            await task
    assert (queue.running, queue.queued) == (0, 0)
    await queue.aclose()  # idempotent
    assert queue.closed


async def test_a_batch_cancelled_before_its_dispatch_started_still_answers_its_callers() -> None:
    rec = Recorder()
    queue = BatchQueue(rec, max_batch_size=1, batch_wait_timeout_s=0)
    closers: list[asyncio.Task[None]] = []
    # The closer task is created before the batch task, so it runs first and cancels it.
    queue.on_batch = lambda size: closers.append(asyncio.create_task(queue.aclose()))
    with pytest.raises(ServeShutdown):
        await queue.submit(1)
    await asyncio.gather(*closers)
    assert rec.batches == []
    assert queue.running == 0


async def test_an_idle_queue_owns_no_task_and_a_closed_queue_rejects() -> None:
    rec = Recorder()
    queue = BatchQueue(rec, max_batch_size=2, batch_wait_timeout_s=0, name="idle")
    assert await queue.submit(1) == 10

    def queue_tasks() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if "idle" in t.get_name()]

    await wait_until(lambda: queue_tasks() == [], "queue_tasks() == []")
    assert await queue.submit(2) == 20  # the worker starts again
    await queue.aclose()
    assert queue_tasks() == []
    with pytest.raises(ServeShutdown, match="closed"):
        await queue.submit(3)


async def test_a_queue_belongs_to_one_event_loop() -> None:
    queue = BatchQueue(Recorder(), max_batch_size=1, batch_wait_timeout_s=0)
    assert await queue.submit(1) == 10
    with pytest.raises(RuntimeError, match="another event loop"):
        await asyncio.to_thread(asyncio.run, queue.submit(2))
    await queue.aclose()


# -- metrics and validation -------------------------------------------------------------------


async def test_on_batch_and_statistics_report_dispatched_batches() -> None:
    rec = Recorder()
    sizes: list[int] = []
    async with BatchQueue(rec, max_batch_size=3, batch_wait_timeout_s=0) as queue:
        queue.on_batch = sizes.append
        await asyncio.gather(*spawn(queue, 0, 1, 2, 3))
        await queue.submit(4)
        stats = queue.statistics()
    assert sizes == [3, 1, 1]
    assert stats == BatchQueueStats(
        queued=0, running=0, num_batches=3, num_items=5, max_batch_size=3, batch_wait_timeout_s=0
    )


async def test_a_failing_on_batch_hook_is_logged_and_the_batch_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(size: int) -> None:
        raise RuntimeError("metrics down")

    async with BatchQueue(Recorder(), max_batch_size=1, batch_wait_timeout_s=0, name="h") as q:
        q.on_batch = broken
        with caplog.at_level(logging.ERROR, logger="aioserve.batching"):
            assert await q.submit(1) == 10
    assert "on_batch hook of batch queue 'h' raised" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_batch_size": 0}, ConfigError),
        ({"max_batch_size": True}, ConfigTypeError),
        ({"max_batch_size": 2.0}, ConfigTypeError),
        ({"batch_wait_timeout_s": -0.1}, ConfigError),
        ({"batch_wait_timeout_s": float("nan")}, ConfigError),
        ({"batch_wait_timeout_s": "1"}, ConfigTypeError),
        ({"max_concurrent_batches": 0}, ConfigError),
        ({"max_queued": 0}, ConfigError),
        ({"max_queued": False}, ConfigTypeError),
    ],
)
def test_bad_queue_settings_are_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    settings: dict[str, Any] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.0, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        BatchQueue(Recorder(), **settings)


# -- @batch -----------------------------------------------------------------------------------


async def test_bare_batch_on_a_function() -> None:
    seen: list[list[int]] = []

    @batch
    async def double(xs: list[int]) -> list[int]:
        """Double every input."""
        seen.append(list(xs))
        return [2 * x for x in xs]

    assert inspect.iscoroutinefunction(double)
    assert double.__name__ == "double"
    assert double.__doc__ == "Double every input."
    assert double.__serve_batch_params__ == (10, 0.0)  # type: ignore[attr-defined]
    assert await asyncio.gather(*(double(i) for i in range(3))) == [0, 2, 4]
    assert seen == [[0, 1, 2]]


class Model:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    @batch(max_batch_size=5, batch_wait_timeout_s=LONG)
    async def predict(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        return [x + 1 for x in xs]


async def test_parameterised_batch_on_a_method_gathers_one_full_batch() -> None:
    model = Model()
    assert inspect.iscoroutinefunction(Model.predict)
    assert Model.predict.__serve_batch_params__ == (5, LONG)  # type: ignore[attr-defined]
    async with asyncio.timeout(5):
        assert await asyncio.gather(*(model.predict(i) for i in range(5))) == [1, 2, 3, 4, 5]
    assert model.batches == [[0, 1, 2, 3, 4]]


async def test_each_instance_has_its_own_queue() -> None:
    class Pair:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        @batch(max_batch_size=2, batch_wait_timeout_s=LONG, batch_wait_policy="fixed")
        async def add(self, xs: list[int]) -> list[int]:
            self.batches.append(list(xs))
            return xs

    a, b = Pair(), Pair()
    queues: list[BatchQueue[Any, Any]] = []
    token = queue_owner.set(queues.append)  # the tasks below take this context with them
    try:
        first = [asyncio.create_task(a.add(1)), asyncio.create_task(b.add(2))]
    finally:
        queue_owner.reset(token)
    await wait_until(
        lambda: len(queues) == 2 and all(q.queued == 1 for q in queues), "one item in each queue"
    )
    assert not any(task.done() for task in first)  # one item each: neither batch is full
    async with asyncio.timeout(5):
        assert await asyncio.gather(*first, a.add(3), b.add(4)) == [1, 2, 3, 4]
    assert (a.batches, b.batches) == ([[1, 3]], [[2, 4]])


async def test_batch_on_a_classmethod_and_on_a_star_args_function() -> None:
    class Tokenizer:
        @classmethod
        @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
        async def encode(cls, texts: list[str]) -> list[int]:
            return [len(t) for t in texts]

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def lengths(*args: list[str]) -> list[int]:
        return [len(t) for t in args[0]]

    async with asyncio.timeout(5):
        assert list(await asyncio.gather(Tokenizer.encode("a"), Tokenizer.encode("bb"))) == [1, 2]
        assert list(await asyncio.gather(lengths("abc"), lengths(""))) == [3, 0]


async def _agen(xs: list[int]) -> Any:
    yield xs


async def _no_args() -> list[int]:
    return []


async def _three(a: int, b: int, c: int) -> list[int]:
    return []


untyped_batch: Any = batch  # the misuses below are type errors too; test the runtime checks


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: untyped_batch(_agen),
            TypeError,
            r"return a list \(async def or def\), got <function _agen",
        ),
        (lambda: untyped_batch(max_batch_size=2)(_agen), TypeError, "async def or def"),
        (lambda: untyped_batch(dict), TypeError, "only be used on functions and methods"),
        (lambda: untyped_batch(5), TypeError, "as keywords"),
        (lambda: untyped_batch(_no_args), ConfigTypeError, "takes the list of items"),
        (lambda: untyped_batch(_three), ConfigTypeError, "takes the list of items"),
        (lambda: untyped_batch(max_batch_size=0), ValueError, "max_batch_size"),
        (lambda: untyped_batch(max_batch_size=True), ConfigTypeError, "max_batch_size"),
        (lambda: untyped_batch(batch_wait_timeout_s=-1), ValueError, "batch_wait_timeout_s"),
    ],
    ids=[
        "async-gen",
        "async-gen-with-args",
        "a-class",
        "positional",
        "no-args",
        "three",
        "size-0",
        "bool-size",
        "negative-timeout",
    ],
)
def test_bad_batch_uses_are_rejected(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        make()
    assert isinstance(info.value, ConfigError | ConfigTypeError)


async def test_a_batched_callable_takes_exactly_one_item() -> None:
    @batch
    async def echo(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(ConfigTypeError, match="exactly one item"):
        await echo(1, 2)  # type: ignore[call-arg]
    with pytest.raises(ConfigTypeError, match="exactly one item"):
        await echo(x=1)  # type: ignore[call-arg]
    with pytest.raises(ConfigTypeError, match="exactly one item"):
        await Model().predict(1, 2)  # type: ignore[call-arg]


async def test_a_batched_method_needs_an_instance_dict() -> None:
    class Slotted:
        __slots__ = ()

        @batch
        async def run(self, xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(ConfigTypeError, match="__dict__"):
        await Slotted().run(1)


async def test_queue_owner_is_given_every_queue_the_decorator_creates() -> None:
    adopted: list[BatchQueue[Any, Any]] = []
    token = queue_owner.set(adopted.append)
    try:
        model = Model()
        async with asyncio.timeout(5):
            await asyncio.gather(*(model.predict(i) for i in range(5)))
            await asyncio.gather(*(model.predict(i) for i in range(5)))
        assert len(adopted) == 1
        await adopted[0].aclose()
        async with asyncio.timeout(5):  # a closed queue is replaced, and the owner told
            await asyncio.gather(*(model.predict(i) for i in range(5)))
        assert len(adopted) == 2
        await adopted[1].aclose()
    finally:
        queue_owner.reset(token)
    assert queue_owner.get() is None


async def test_a_batched_function_has_one_queue_per_owner() -> None:
    seen: list[list[int]] = []

    @batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def double(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        return [2 * x for x in xs]

    owners: dict[str, list[BatchQueue[Any, Any]]] = {"a": [], "b": []}

    async def call_as(owner: str, x: int) -> int:
        queue_owner.set(owners[owner].append)  # this task's own copy of the context
        return await double(x)

    async with asyncio.timeout(5):
        results = await asyncio.gather(
            call_as("a", 1), call_as("b", 2), call_as("a", 3), call_as("b", 4)
        )
    assert list(results) == [2, 4, 6, 8]
    assert sorted(seen) == [[1, 3], [2, 4]]
    assert [len(q) for q in owners.values()] == [1, 1]
    await owners["a"][0].aclose()  # one owner stopping leaves the other's queue serving
    async with asyncio.timeout(5):
        assert list(await asyncio.gather(call_as("b", 5), call_as("b", 6))) == [10, 12]
    assert len(owners["b"]) == 1
    await owners["b"][0].aclose()


async def test_a_batched_function_has_one_queue_per_event_loop() -> None:
    @batch
    async def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    assert await double(1) == 2
    assert await asyncio.to_thread(asyncio.run, double(2)) == 4  # another loop, another queue
    assert await double(3) == 6


# -- @accept_batch ----------------------------------------------------------------------------


def test_accept_batch_marks_functions_methods_and_classes() -> None:
    def plain(requests: list[Any]) -> list[Any]:
        return requests

    @accept_batch
    def marked(requests: list[Any]) -> list[Any]:
        return requests

    class Handler:
        @accept_batch
        def __call__(self, requests: list[Any]) -> list[Any]:
            return requests

        def other(self, request: Any) -> Any:
            return request

    @accept_batch
    class AllMethods:
        def run(self, requests: list[Any]) -> list[Any]:
            return requests

    class Sub(AllMethods):
        pass

    assert accept_batch(plain) is plain
    assert accepts_batches(plain) and accepts_batches(marked)
    handler = Handler()
    assert accepts_batches(handler.__call__)
    assert not accepts_batches(handler.other)
    assert not accepts_batches(Handler) and not accepts_batches(handler)
    assert accepts_batches(AllMethods) and accepts_batches(AllMethods())
    assert accepts_batches(AllMethods().run) and accepts_batches(Sub().run)
    assert not accepts_batches(Model().predict)

    class Later:
        def run(self, requests: list[Any]) -> list[Any]:
            return requests

    bound = Later().run
    accept_batch(bound)  # a bound method marks its function
    assert accepts_batches(Later.run)


def test_accepts_batches_does_not_trust_dynamic_attributes() -> None:
    class Anything:
        def __getattr__(self, name: str) -> Any:
            return True

    assert not accepts_batches(Anything())


def test_accept_batch_rejects_what_cannot_be_marked() -> None:
    with pytest.raises(ConfigTypeError, match="can only mark"):
        accept_batch(3)


def test_public_names() -> None:
    import aioserve.batching as module

    assert sorted(module.__all__) == sorted(
        [
            "BatchQueue",
            "BatchQueueStats",
            "accept_batch",
            "accepts_batches",
            "batch",
            "queue_owner",
            "sync_batch_runner",
        ]
    )
    assert isinstance(queue_owner, contextvars.ContextVar)
