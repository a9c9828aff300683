"""A stream that gives something back, exactly once, when it is over: :class:`HeldStream`.

The backend wraps a runner's :class:`~aioserve._types.Stream` in one so that the replica slot the
stream holds comes back when the stream ends, is closed, or is dropped unread. All of its work
runs on the loop it was made on (a caller iterating from another loop is proxied there), and
closing the inner stream runs as a task of its own, so a reader cancelled again and again cannot
cut the close short: the slot comes back only once the stream is really closed (a sync
generator's ``finally`` has run on its replica's thread).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ._concurrency import TaskOwner
from ._types import Stream
from .exceptions import ServeShutdown

__all__ = ["HeldStream"]


def _close_then(stream: Stream, release: Callable[[], None], owner: TaskOwner) -> Any:
    """On the owner's loop: close ``stream`` in a task of ``owner``, then call ``release``."""
    try:
        task = owner.spawn(stream.aclose())
    except ServeShutdown:  # the backend is gone: nothing left to close for
        release()
        return None
    task.add_done_callback(lambda _: release())
    return task


class HeldStream(Stream):
    """``stream``'s items; ``release()`` is called once it is closed, ended or dropped."""

    __slots__ = ("_loop", "_owner", "_release", "_stream")

    def __init__(
        self,
        stream: Stream,
        release: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        owner: TaskOwner,
    ) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release
        self._loop = loop
        self._owner = owner

    def __repr__(self) -> str:
        return f"<HeldStream {self._stream!r} open={self._release is not None}>"

    def _elsewhere(self) -> bool:
        try:
            return asyncio.get_running_loop() is not self._loop
        except RuntimeError:
            return True

    async def __anext__(self) -> Any:
        if self._release is None:
            raise StopAsyncIteration
        if self._elsewhere():
            future = asyncio.run_coroutine_threadsafe(self.__anext__(), self._loop)
            return await asyncio.wrap_future(future)
        try:
            return await self._stream.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._elsewhere():
            future = asyncio.run_coroutine_threadsafe(self.aclose(), self._loop)
            await asyncio.wrap_future(future)
            return
        release, self._release = self._release, None
        if release is None:
            return
        task = _close_then(self._stream, release, self._owner)
        if task is not None:
            await asyncio.shield(task)

    def __del__(self) -> None:
        # Dropped before it ended: close it (on its replica) and give the slot back.
        release, self._release = self._release, None
        if release is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to give back
                self._loop.call_soon_threadsafe(_close_then, self._stream, release, self._owner)
