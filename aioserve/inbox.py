"""The request's ``receive`` as the handler sees it: body size counted, client watched.

:class:`Inbox` wraps the server's ``receive``. The handler reads the body through it (streamed,
chunk by chunk, if it wants); past ``max_body_bytes`` it raises :class:`BodyTooLarge` (HTTP 413).
A watcher, started only when it can matter, cancels the request's task when the client
disconnects, at any point of the request, while reading ahead no more than one body message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._concurrency import TaskOwner
from ._types import Message, Receive
from .exceptions import BodyTooLarge

__all__ = ["Inbox"]


class Inbox:
    """The request's ``receive``, with a watcher that cancels the request's task when the client
    disconnects.

    The handler reads the body through :meth:`receive`. The watcher starts only when that can
    matter (the request has to wait, or has run through a sweep interval); from then on it is
    the one reader of the server's ``receive``: it hands body messages to the handler one at a
    time (it reads ahead at most one, so a large upload is never buffered here) and cancels the
    task on ``http.disconnect``, at any point of the request.
    """

    __slots__ = (
        "_body_bytes",
        "_max_body_bytes",
        "_owner",
        "_reading",
        "_ready",
        "_receive",
        "_start_after_read",
        "_stopped",
        "_taken",
        "_task",
        "_unread",
        "_watcher",
        "disconnected",
        "seen",
    )

    def __init__(
        self,
        task: asyncio.Task[Any],
        receive: Receive,
        owner: TaskOwner,
        max_body_bytes: int | None = None,
    ) -> None:
        self._task = task
        self._max_body_bytes = max_body_bytes
        self._body_bytes = 0
        self._receive = receive
        self._owner = owner
        self._watcher: asyncio.Task[None] | None = None
        self._unread: Message | None = None  # read ahead by the watcher, not yet taken
        self._ready: asyncio.Event | None = None
        self._taken: asyncio.Event | None = None
        self._reading = False  # the handler is inside the server's receive()
        self._start_after_read = False
        self._stopped = False
        self.disconnected = False
        self.seen = False

    async def receive(self) -> Message:
        """The next message for the handler; :class:`BodyTooLarge` once the body passes
        ``max_body_bytes``."""
        message = await self._next()
        if self._max_body_bytes is not None and message["type"] == "http.request":
            self._body_bytes += len(message.get("body", b""))
            if self._body_bytes > self._max_body_bytes:
                raise BodyTooLarge(self._max_body_bytes)
        return message

    async def _next(self) -> Message:
        if self._watcher is None:
            self._reading = True
            try:
                return await self._receive()
            finally:
                self._reading = False
                if self._start_after_read:
                    self._start_after_read = False
                    self.start()
        ready, taken = self._ready, self._taken
        assert ready is not None and taken is not None  # made when the watcher started
        while self._unread is None:
            if self._watcher.done():
                # The watcher has stopped (the request is over): nothing more will come.
                return {"type": "http.disconnect"}
            await ready.wait()
            ready.clear()
        message, self._unread = self._unread, None
        taken.set()
        return message

    def start(self) -> None:
        """Start watching (idempotent; never once the request is answered)."""
        if self._watcher is not None or self._stopped or self._owner.closed:
            return
        if self._reading:
            # The handler is reading: it sees a disconnect itself; watch once it stops.
            self._start_after_read = True
            return
        self._ready = asyncio.Event()
        self._taken = asyncio.Event()
        self._watcher = self._owner.spawn(self._watch())

    async def _watch(self) -> None:
        ready, taken = self._ready, self._taken
        assert ready is not None and taken is not None
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self._task.cancel()
                return
            self._unread = message
            ready.set()
            if message.get("more_body", False):
                taken.clear()
                await taken.wait()  # read ahead no more than one message

    def stop(self) -> None:
        """The request is answered (or failed): stop watching."""
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
