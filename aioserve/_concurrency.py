"""The one place that spawns tasks and offloads work to threads.

* :class:`TaskOwner` keeps a strong reference to every background task it spawns and cancels and
  awaits them on :meth:`TaskOwner.aclose`; nothing in aioserve calls ``create_task`` bare.
* :class:`ReplicaThread` is a one-thread executor: a sync replica runs its constructor and every
  call on it, one at a time, like an actor, and never on the event loop.
* :func:`spawn_threadsafe` starts a coroutine on another thread's loop, owned there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from .exceptions import ServeShutdown

__all__ = ["ReplicaThread", "TaskOwner", "current_task", "new_event_loop", "spawn_threadsafe"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


if sys.version_info >= (3, 12):
    current_task = asyncio.current_task  # implemented in C from 3.12 on
else:
    # The table asyncio.current_task() reads on 3.11: running loop -> the task it is stepping.
    _current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] = (
        asyncio.tasks._current_tasks  # type: ignore[attr-defined]
    )

    def current_task(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[Any] | None:
        """The task running on ``loop`` (default: the running loop), as ``asyncio.current_task``.

        On 3.11 that function is written in Python and calls ``get_running_loop()``, which makes
        a ``getpid()`` system call each time (150 ns on a virtual machine). Given the loop, this
        is one dict lookup; the request path knows its loop and asks once or twice per call.
        """
        return _current_tasks.get(loop or asyncio.get_running_loop())


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (``aioserve[fast]``), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class TaskOwner:
    """Owns background tasks: strong references while they run, cancel and await on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._prune_at = 64

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        self_removing: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Task[T]:
        """Start ``coro`` as a task owned here, on ``loop``: the running loop, which a caller that
        knows it may pass. Raises :class:`ServeShutdown` once closed.

        With ``self_removing`` the coroutine calls :meth:`discard` on its own task when it ends
        (cheaper than a done callback, which costs a loop callback per task); the few that never
        get to (cancelled before they ran) are pruned whenever the set has doubled.
        """
        if self._closed:
            coro.close()
            raise ServeShutdown(f"{self.name} is closed; no new work is accepted.")
        task = (loop or asyncio.get_running_loop()).create_task(coro, name=name)
        tasks = self._tasks
        tasks.add(task)
        if not self_removing:
            task.add_done_callback(tasks.discard)
        elif len(tasks) > self._prune_at:
            self._tasks = tasks = {t for t in tasks if not t.done()}
            self._prune_at = max(64, 2 * len(tasks))
        return task

    def discard(self, task: asyncio.Task[Any] | None) -> None:
        """Forget a finished task (see ``self_removing``)."""
        if task is not None:
            self._tasks.discard(task)

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has been called."""
        return self._closed

    def __repr__(self) -> str:
        return f"<TaskOwner {self.name!r} tasks={len(self._tasks)} closed={self._closed}>"

    async def join(self) -> None:
        """Wait for the tasks running now (and any they start) to finish, cancelling none."""
        while self._tasks:
            tasks = list(self._tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)

    async def aclose(self) -> None:
        """Refuse new tasks, cancel the running ones and wait until they have ended. Idempotent."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Self-removing tasks that never ran are still listed: they are done now.
            self._tasks.difference_update(tasks)


class ReplicaThread:
    """A dedicated worker thread: calls run one at a time, in order, with the caller's context."""

    def __init__(self, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )

    def submit(
        self, ctx: contextvars.Context, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)`` to run in ``ctx`` on the thread."""
        return self._executor.submit(functools.partial(ctx.run, fn, *args, **kwargs))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the thread with the current contextvars and wait for its result."""
        future = self.submit(contextvars.copy_context(), fn, *args, **kwargs)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Drop queued calls; a running call finishes on its own (threads cannot be killed)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def spawn_threadsafe(
    owner: TaskOwner, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]
) -> concurrent.futures.Future[T]:
    """Start ``coro`` on ``loop`` (running in another thread) as a task of ``owner``.

    The returned future is resolved with the task's outcome; cancelling it cancels the task.
    """
    result: concurrent.futures.Future[T] = concurrent.futures.Future()

    def start() -> None:
        # The future stays pending (not running) so that the caller can cancel it at any time.
        if result.cancelled():
            coro.close()
            return
        try:
            task = owner.spawn(coro)
        except ServeShutdown as exc:
            result.set_exception(exc)
            return

        def copy_outcome(done: asyncio.Task[T]) -> None:
            if result.done():
                return
            if done.cancelled():
                result.cancel()
            elif (exc := done.exception()) is not None:
                result.set_exception(exc)
            else:
                result.set_result(done.result())

        task.add_done_callback(copy_outcome)

        def propagate_cancel(fut: concurrent.futures.Future[T]) -> None:
            if fut.cancelled() and not task.done():
                loop.call_soon_threadsafe(task.cancel)

        result.add_done_callback(propagate_cancel)

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError as exc:  # the loop is closed
        coro.close()
        raise ServeShutdown("The aioserve instance has been shut down.") from exc
    return result
