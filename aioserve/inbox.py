"""The request as a handler sees it: :class:`ServeRequest`, and its ``receive``, with the body's
size counted and the client watched.

:class:`Inbox` wraps the server's ``receive``. The handler reads the body through it (streamed,
chunk by chunk, if it wants); past ``max_body_bytes`` it raises :class:`BodyTooLarge` (HTTP 413).
A watcher, started only when it can matter, cancels the request's task when the client
disconnects, at any point of the request, while reading ahead no more than one body message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from ._concurrency import TaskOwner
from ._types import Message, Receive
from .exceptions import BodyTooLarge

__all__ = ["Inbox", "ServeRequest"]


class ServeRequest(Request):
    """The Starlette ``Request`` a handler gets over HTTP, plus Flask's synchronous readers.

    Async handlers ``await request.body()`` / ``await request.json()`` or stream
    ``request.stream()``. A sync handler cannot await: its body is read before it runs (up to
    ``max_body_bytes``), and it reads it the way the legacy documents' Flask requests did:
    ``request.data`` / ``request.get_data()`` (bytes, or text with ``as_text=True``),
    ``request.get_json()`` (parsed; invalid JSON is the client's error, HTTP 400), and
    ``request.args`` (the query parameters).
    """

    def __repr__(self) -> str:
        return f"<ServeRequest {self.method} {self.url.path!r}>"

    @property
    def args(self) -> Any:
        """The query parameters (Flask's name for ``query_params``)."""
        return self.query_params

    @property
    def data(self) -> bytes:
        """The whole body. In a sync handler it is always there; in an async one, only after
        ``await request.body()`` (else ``RuntimeError``)."""
        body: bytes | None = getattr(self, "_body", None)
        if body is None:
            raise RuntimeError(
                "The request body has not been read: in an async handler, use "
                "'await request.body()' or 'await request.json()'; request.data and "
                "request.get_json() are for sync handlers, whose body is read before they run."
            )
        return body

    def get_data(self, as_text: bool = False) -> bytes | str:
        """The whole body as bytes, or decoded as UTF-8 text with ``as_text=True``."""
        return self.data.decode("utf-8") if as_text else self.data

    def get_json(self) -> Any:
        """The body parsed as JSON (``json.JSONDecodeError`` -> HTTP 400)."""
        return json.loads(self.data)


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
