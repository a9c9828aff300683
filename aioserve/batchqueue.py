"""Batch queues: gather single requests into batches for a handler that takes lists.

A :class:`BatchQueue` is given an async ``dispatch(items)`` that returns one result per item, in
order. Callers ``await queue.submit(item)`` and get their own result back. The queue forms a batch
whenever it has capacity: with ``batch_wait_timeout_s == 0`` it takes what is queued right now;
otherwise it may wait for more items, until the batch is full or until the timeout, counted from
the arrival of the oldest queued item, has passed. Items wait in the one deadline queue
(:class:`~aioserve._waitqueue.WaitQueue`): earliest deadline first, and an item whose deadline
passes while it waits fails with :class:`~aioserve.exceptions.DeadlineExceeded` and never reaches
the handler. This module knows nothing of replicas or backends.
How long a batch waits for more items: :mod:`aioserve.batchpolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import reprlib
import time
from collections.abc import Awaitable, Callable, Sequence, Sized
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, Generic, TypeVar, cast

from ._waitqueue import Waiter, WaitQueue
from .batchpolicy import GAP_WEIGHT, dispatch_at
from .config import WaitPolicy, check_int, check_seconds, check_wait_policy
from .exceptions import BatchError, ConfigTypeError, DeadlineExceeded, ServeShutdown

__all__ = ["BatchQueue", "BatchQueueStats", "WaitPolicy", "dispatch_at"]


logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def _check_size(name: str, value: object) -> int:
    size: int = check_int(name, value)
    return size


def _check_bound(name: str, value: object) -> int | None:
    bound: int | None = check_int(name, value, optional=True)
    return bound


_check_seconds = check_seconds


def _describe(value: object) -> str:
    kind = type(value).__name__
    if isinstance(value, Sized):
        return f"a {kind} of length {len(value)}"
    return f"{reprlib.repr(value)} (a {kind}, which has no length)"


@dataclass(frozen=True, slots=True)
class BatchQueueStats:
    """A snapshot of a :class:`BatchQueue`, for metrics.

    ``queued`` and ``running`` are current; ``num_batches`` and ``num_items`` count every batch
    dispatched so far and the items in them.
    """

    queued: int
    running: int
    num_batches: int
    num_items: int
    max_batch_size: int
    batch_wait_timeout_s: float
    batch_wait_policy: WaitPolicy = "adaptive"


class BatchQueue(Generic[T, R]):
    """Collects items submitted one at a time into batches for an async ``dispatch(items)``.

    ``dispatch`` receives a list of items and must return a list (or tuple) with one result per
    item, in order. A result of another type or length fails every caller of that batch with
    :class:`BatchError`; an exception raised by ``dispatch`` is raised to every caller of that
    batch. The queue goes on serving either way.

    Capacity: by default at most ``max_concurrent_batches`` batches run at once. With ``acquire``,
    the owner decides instead: before forming a batch the queue calls ``acquire()``, which returns
    a token (a free slot, say) or None when there is no capacity now; the token is passed on as
    ``dispatch(items, token)``, and the owner calls :meth:`wake` when capacity may have returned.
    A token the queue ends up not using (every item expired meanwhile) goes to ``give_back``.

    ``clock`` (default: the running loop's ``time``) times arrivals for ``batch_wait_policy``;
    deadlines passed to :meth:`submit` are always on the loop's clock.

    The queue owns one worker task (started on the first :meth:`submit`, and again after it went
    idle) and one task per running batch; :meth:`aclose` ends them all.
    """

    on_batch: Callable[[int], None] | None
    """Called with each batch's size when the batch is dispatched (a metrics hook)."""

    on_wait: Callable[[float], None] | None
    """Called with each item's wait, in seconds, when its batch is dispatched (a metrics hook)."""

    def __init__(
        self,
        dispatch: Callable[..., Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        batch_wait_policy: WaitPolicy = "adaptive",
        max_concurrent_batches: int = 1,
        max_queued: int | None = None,
        name: str = "",
        acquire: Callable[[], object | None] | None = None,
        give_back: Callable[[Any], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._max_batch_size = _check_size("max_batch_size", max_batch_size)
        self._batch_wait_timeout_s = _check_seconds("batch_wait_timeout_s", batch_wait_timeout_s)
        self._policy = check_wait_policy("batch_wait_policy", batch_wait_policy)
        self._max_concurrent_batches = _check_size("max_concurrent_batches", max_concurrent_batches)
        self._dispatch = dispatch
        if (acquire is None) != (give_back is None):
            raise ConfigTypeError("acquire and give_back go together: pass both or neither.")
        self._acquire = acquire
        self._give_back = give_back
        self.name = name
        self.on_batch = None
        self.on_wait = None
        self._clock = clock
        self._now: Callable[[], float] = time.monotonic if clock is None else clock
        self._last_arrival = -math.inf
        self._mean_gap_s = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[None], list[Waiter[T]]] = {}
        self._waiting: WaitQueue[T] = WaitQueue(
            max_len=_check_bound("max_queued", max_queued),
            overloaded=self._overloaded_message,
            expired=self._expired_message,
        )
        self._waiting.on_change = self._notify
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._closing = False
        self._num_batches = 0
        self._num_items = 0

    def __repr__(self) -> str:
        return (
            f"BatchQueue(name={self.name!r}, queued={self.queued}, running={self.running}, "
            f"max_batch_size={self._max_batch_size}, "
            f"batch_wait_timeout_s={self._batch_wait_timeout_s}, "
            f"batch_wait_policy={self._policy!r}, "
            f"max_concurrent_batches={self._max_concurrent_batches}, "
            f"max_queued={self._waiting.max_len}, closed={self._closing})"
        )

    def _overloaded_message(self, waiting: int, limit: int) -> str:
        return (
            f"Backend {self.name!r} is overloaded: {waiting} request(s) already wait "
            f"for a batch (max_queued_queries={limit}). Retry later."
        )

    def _expired_message(self) -> str:
        return (
            f"The request's deadline passed while it waited in batch queue {self.name!r}; "
            "it was not run."
        )

    @property
    def queued(self) -> int:
        """Items waiting to be put in a batch (cancelled and expired items not counted)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Batches being dispatched now."""
        return len(self._running)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called; :meth:`submit` then raises."""
        return self._closing

    def statistics(self) -> BatchQueueStats:
        """Return a snapshot of the queue's state and totals."""
        return BatchQueueStats(
            queued=len(self._waiting),
            running=len(self._running),
            num_batches=self._num_batches,
            num_items=self._num_items,
            max_batch_size=self._max_batch_size,
            batch_wait_timeout_s=self._batch_wait_timeout_s,
            batch_wait_policy=self._policy,
        )

    def configure(
        self,
        *,
        max_batch_size: int | None = None,
        batch_wait_timeout_s: float | None = None,
        batch_wait_policy: WaitPolicy | None = None,
        max_concurrent_batches: int | None = None,
        max_queued: int | EllipsisType | None = ...,
    ) -> None:
        """Change settings; they apply from the next batch formed.

        Arguments left out (``None``; ``...`` for ``max_queued``, where ``None`` means unbounded)
        keep their value. Every value is checked before any is changed.
        """
        size = None if max_batch_size is None else _check_size("max_batch_size", max_batch_size)
        timeout = (
            None
            if batch_wait_timeout_s is None
            else _check_seconds("batch_wait_timeout_s", batch_wait_timeout_s)
        )
        policy = (
            None
            if batch_wait_policy is None
            else check_wait_policy("batch_wait_policy", batch_wait_policy)
        )
        concurrency = (
            None
            if max_concurrent_batches is None
            else _check_size("max_concurrent_batches", max_concurrent_batches)
        )
        bound = (
            self._waiting.max_len
            if isinstance(max_queued, EllipsisType)
            else _check_bound("max_queued", max_queued)
        )
        if size is not None:
            self._max_batch_size = size
        if timeout is not None:
            self._batch_wait_timeout_s = timeout
        if policy is not None:
            self._policy = policy
        if concurrency is not None:
            self._max_concurrent_batches = concurrency
        self._waiting.max_len = bound
        self._notify()

    def head_key(self) -> tuple[float, float] | None:
        """``(deadline, arrival)`` of the item the next batch starts with, or None if empty."""
        head = self._waiting.head()
        return None if head is None else (head.deadline, head.arrival)

    def wake(self) -> None:
        """Capacity may have returned (see ``acquire``): look again."""
        if len(self._waiting):
            self._wakeup.set()

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` and return its result once its batch has been dispatched.

        ``deadline`` is an absolute time on the running loop's clock (``loop.time()``); the item
        fails with :class:`DeadlineExceeded` if it has not been put in a batch by then.

        Raises :class:`Overloaded` at once when ``max_queued`` items already wait, and
        :class:`ServeShutdown` once the queue is closed. Cancelling the caller while the item
        waits removes it from the queue.
        """
        if self._closing:
            raise ServeShutdown(f"Batch queue {self.name!r} is closed; it accepts no new requests.")
        self._waiting.check_room()
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError(
                    f"Batch queue {self.name!r} belongs to another event loop; "
                    "create one queue per loop."
                )
            self._loop = loop
            if self._clock is None:
                self._now = loop.time
        now = loop.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(
                f"The request's deadline passed {now - deadline:.3f} s before it reached "
                f"batch queue {self.name!r}; it was not run."
            )
        waiter = self._waiting.put(loop, item, deadline)
        arrival = waiter.arrival = self._now()
        if self._last_arrival != -math.inf:
            gap = arrival - self._last_arrival
            mean = self._mean_gap_s
            self._mean_gap_s = gap if mean == math.inf else mean + GAP_WEIGHT * (gap - mean)
        self._last_arrival = arrival
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(), name=f"aioserve-batch-worker:{self.name}")
        self._notify()
        try:
            result: R = await waiter.future
            return result
        finally:
            if self._waiting.withdraw(waiter):
                # The caller was cancelled while the item waited: it must never be dispatched.
                self._notify()

    async def aclose(self, drain_timeout_s: float = 0.0) -> None:
        """Stop admitting, let queued and running batches finish for up to ``drain_timeout_s``,
        then cancel what is left; every caller still waiting gets :class:`ServeShutdown`.

        Idempotent: a second call only finishes cancelling what the first left running.
        """
        drain_timeout_s = _check_seconds("drain_timeout_s", drain_timeout_s)
        first = not self._closing
        self._closing = True
        try:
            if first:
                # Wakes the worker so it flushes partial batches instead of waiting for more.
                self._notify()
                if drain_timeout_s > 0 and not self._drained.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(drain_timeout_s):
                            await self._drained.wait()
        finally:
            tasks = self._abort()
        if tasks:
            await asyncio.wait(tasks)

    async def __aenter__(self) -> BatchQueue[T, R]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- internals ---------------------------------------------------------------------------

    def _notify(self) -> None:
        self._wakeup.set()
        if self._closing and not len(self._waiting) and not self._running:
            self._drained.set()

    def _flush_at(self, now: float) -> float:
        """When the batch being gathered must go out: ``now`` (at once) or later."""
        if self._closing:
            return now
        return dispatch_at(
            now=now,
            queued=len(self._waiting),
            running=len(self._running),
            max_batch_size=self._max_batch_size,
            batch_wait_timeout_s=self._batch_wait_timeout_s,
            oldest_arrival=self._waiting.oldest_arrival,
            last_arrival=self._last_arrival,
            mean_gap_s=self._mean_gap_s,
            policy=self._policy,
        )

    def _has_capacity(self) -> bool:
        return self._acquire is not None or len(self._running) < self._max_concurrent_batches

    async def _work(self) -> None:
        # Exits when nothing is queued, so an idle queue owns no task; submit() restarts it.
        loop = asyncio.get_running_loop()
        while len(self._waiting):
            self._wakeup.clear()
            delay: float | None = None
            if self._has_capacity():
                now = self._now()
                delay = self._flush_at(now) - now
                if delay <= 0:
                    if self._start_batch(loop):
                        continue
                    delay = None  # no capacity after all: wait for wake()
            timer = None
            if delay is not None and delay != math.inf:
                timer = loop.call_later(delay, self._wakeup.set)
            try:
                await self._wakeup.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _start_batch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Form a batch and start it; False if ``acquire`` found no capacity."""
        token = None
        if self._acquire is not None:
            token = self._acquire()
            if token is None:
                return False
        now = loop.time()
        entries: list[Waiter[T]] = []
        while len(entries) < self._max_batch_size:
            waiter = self._waiting.pop(now)
            if waiter is None:
                break
            entries.append(waiter)
        if not entries:
            if self._give_back is not None:
                self._give_back(token)  # every item expired or left meanwhile
            self._notify()
            return True
        self._num_batches += 1
        self._num_items += len(entries)
        if self.on_wait is not None:
            dispatched = self._now()
            try:
                for entry in entries:
                    self.on_wait(dispatched - entry.arrival)
            except Exception:
                logger.exception("The on_wait hook of batch queue %r raised", self.name)
        if self.on_batch is not None:
            try:
                self.on_batch(len(entries))
            except Exception:
                logger.exception("The on_batch hook of batch queue %r raised", self.name)
        task = loop.create_task(
            self._run_batch(entries, token), name=f"aioserve-batch:{self.name}:{self._num_batches}"
        )
        self._running[task] = entries
        task.add_done_callback(self._batch_done)
        return True

    async def _run_batch(self, entries: list[Waiter[T]], token: object | None) -> None:
        try:
            await self._dispatch_batch(entries, token)
        finally:
            self._batch_done(cast("asyncio.Task[None]", asyncio.current_task()))

    async def _dispatch_batch(self, entries: list[Waiter[T]], token: object | None) -> None:
        expected = len(entries)
        items = [entry.item for entry in entries]
        try:
            if self._acquire is None:
                results = await self._dispatch(items)
            else:
                results = await self._dispatch(items, token)
        except asyncio.CancelledError as exc:
            if cast("asyncio.Task[None]", asyncio.current_task()).cancelling():
                raise  # aclose() cancelled us; _batch_done answers the callers
            error = BatchError(
                f"The batch handler of queue {self.name!r} was cancelled before it returned."
            )
            error.__cause__ = exc
            self._fail(entries, error)
            return
        except Exception as exc:
            self._fail(entries, exc)
            return
        if not isinstance(results, list | tuple) or len(results) != expected:
            self._fail(
                entries,
                BatchError(
                    f"The batch handler of queue {self.name!r} returned {_describe(results)} "
                    f"for a batch of {expected} requests; it must return a list of {expected} "
                    "results, one per request, in order."
                ),
            )
            return
        self._start_next_batch()
        for entry, result in zip(entries, results, strict=True):
            if not entry.future.done():
                entry.future.set_result(result)

    def _start_next_batch(self) -> None:
        """Hand this batch's capacity to the next batch before answering this one's callers.

        The next batch's task is then scheduled ahead of the callers' wake-ups, so a batch run
        on a thread works while the loop sends this batch's responses, instead of after.
        """
        task = cast("asyncio.Task[None]", asyncio.current_task())
        entries = self._running.pop(task, None)
        if entries is None or not len(self._waiting) or not self._has_capacity():
            if entries is not None:
                self._running[task] = entries
            return
        now = self._now()
        if self._flush_at(now) > now or not self._start_batch(asyncio.get_running_loop()):
            self._running[task] = entries  # the worker decides, as usual
            return
        # Every entry of the finished batch is answered just below; the worker is woken.
        self._notify()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """Forget a finished batch and fail callers it left unanswered (cancelled by aclose()).

        Called as the batch task ends and again as its done callback, which alone runs for a
        task cancelled before it started.
        """
        entries = self._running.pop(task, None)
        if entries is None:
            return
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(self._shutdown_error())
        self._notify()

    def _fail(self, entries: list[Waiter[T]], error: BaseException) -> None:
        for entry in entries:
            if not entry.future.done():
                entry.future.set_exception(error)

    def _shutdown_error(self) -> ServeShutdown:
        return ServeShutdown(f"Batch queue {self.name!r} was closed before the request finished.")

    def _abort(self) -> list[asyncio.Task[None]]:
        """Cancel the worker and running batches, fail queued callers; return tasks to await."""
        current = asyncio.current_task()
        tasks = list(self._running)
        if self._worker is not None:
            tasks.append(self._worker)
        tasks = [task for task in tasks if task is not current and not task.done()]
        for task in tasks:
            task.cancel()
        self._waiting.fail_all(self._shutdown_error())
        return tasks
