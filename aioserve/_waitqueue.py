"""The one deadline-ordered wait queue: requests waiting for a replica slot, or for a batch.

A :class:`WaitQueue` holds :class:`Waiter` entries, each with the future its caller awaits. It
serves them earliest deadline first (no deadline: after every deadline, in arrival order), fails an
entry with the queue's deadline error when its deadline passes (a timer per entry that has one),
and forgets an entry whose caller was cancelled. The backend hands a freed replica slot to
``pop()``'s entry; a batch queue pops up to a batch of entries at once. The bound (``max_len``) is
checked by :meth:`check_room`, which raises :class:`~aioserve.exceptions.Overloaded`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .exceptions import DeadlineExceeded, Overloaded

__all__ = ["WaitQueue", "Waiter"]

T = TypeVar("T")
_INF = math.inf


class Waiter(Generic[T]):
    """One waiting request: its item (if any), its future, deadline and arrival time."""

    __slots__ = ("arrival", "deadline", "future", "item", "seq", "timer")

    def __init__(
        self, item: T, future: asyncio.Future[Any], deadline: float, seq: int, arrival: float
    ) -> None:
        self.item = item
        self.future = future
        self.deadline = deadline
        self.seq = seq
        self.arrival = arrival
        self.timer: asyncio.TimerHandle | None = None


class WaitQueue(Generic[T]):
    """Waiters in deadline order, bounded, with expiry; see the module docstring."""

    def __init__(
        self,
        *,
        max_len: int | None,
        overloaded: Callable[[int, int], str],
        expired: Callable[[], str],
    ) -> None:
        self.max_len = max_len
        self._overloaded = overloaded  # (waiting, limit) -> message
        self._expired = expired  # () -> message
        self._heap: list[tuple[float, int, Waiter[T]]] = []
        self._live: dict[int, Waiter[T]] = {}  # insertion-ordered: the oldest first
        self._seq = 0
        self.on_change: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._live)

    def __repr__(self) -> str:
        return f"<WaitQueue waiting={len(self._live)} max_len={self.max_len}>"

    @property
    def oldest_arrival(self) -> float:
        """When the longest-waiting entry arrived (``inf`` when empty)."""
        for waiter in self._live.values():
            return waiter.arrival
        return _INF

    def check_room(self) -> None:
        """Raise :class:`Overloaded` if ``max_len`` entries already wait."""
        limit = self.max_len
        if limit is not None and len(self._live) >= limit:
            raise Overloaded(self._overloaded(len(self._live), limit))

    def put(self, loop: asyncio.AbstractEventLoop, item: T, deadline: float | None) -> Waiter[T]:
        """Queue a new entry (room is the caller's to check first) and return it."""
        future: asyncio.Future[Any] = loop.create_future()
        self._seq += 1
        now = loop.time()
        waiter = Waiter(item, future, _INF if deadline is None else deadline, self._seq, now)
        # The timer first: if it cannot be made, nothing has been queued yet.
        if deadline is not None:
            waiter.timer = loop.call_at(deadline, self._expire, waiter)
        heapq.heappush(self._heap, (waiter.deadline, waiter.seq, waiter))
        self._live[waiter.seq] = waiter
        return waiter

    def withdraw(self, waiter: Waiter[T]) -> bool:
        """Forget ``waiter`` (its caller gave up); True if it was still waiting."""
        if self._live.pop(waiter.seq, None) is None:
            return False
        self._forget(waiter)
        return True

    def head(self) -> Waiter[T] | None:
        """The live entry :meth:`pop` would take next (expiry aside), without taking it."""
        live = self._live
        while self._heap:
            waiter = self._heap[0][2]
            if waiter.seq in live and not waiter.future.done():
                return waiter
            heapq.heappop(self._heap)
            if live.pop(waiter.seq, None) is not None:
                self._forget(waiter)
        return None

    def pop(self, now: float) -> Waiter[T] | None:
        """Take the live entry with the earliest deadline; entries past theirs fail on the way."""
        heap = self._heap
        live = self._live
        while heap:
            _, seq, waiter = heapq.heappop(heap)
            if live.pop(seq, None) is None:
                continue
            self._forget(waiter)
            if waiter.future.done():
                continue  # its caller was cancelled and has not withdrawn it yet
            if waiter.deadline <= now:
                waiter.future.set_exception(DeadlineExceeded(self._expired()))
                continue
            return waiter
        return None

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting entry with ``exc`` and empty the queue."""
        waiters = list(self._live.values())
        self._live.clear()
        self._heap.clear()
        for waiter in waiters:
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    def _forget(self, waiter: Waiter[T]) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        # Withdrawn entries stay in the heap until popped; rebuild before they dominate it.
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [node for node in self._heap if node[1] in self._live]
            heapq.heapify(self._heap)

    def _expire(self, waiter: Waiter[T]) -> None:
        waiter.timer = None
        if self._live.pop(waiter.seq, None) is None:
            return
        self._forget(waiter)
        if not waiter.future.done():
            waiter.future.set_exception(DeadlineExceeded(self._expired()))
        if self.on_change is not None:
            self.on_change()
