"""The request as a handler sees it: :class:`ServeRequest`, and its ``receive``, with the body's
size counted and the client watched.

:class:`Inbox` wraps the server's ``receive``. The handler reads the body through it (streamed,
chunk by chunk, if it wants); past ``max_body_bytes`` it raises :class:`BodyTooLarge` (HTTP 413).
A watcher, started only when it can matter, cancels the request's task when the client
disconnects, at any point of the request, while reading ahead no more than one body message.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ._concurrency import TaskOwner
from ._types import Message, Receive
from .exceptions import BodyTooLarge

__all__ = ["SPOOL_BYTES", "Inbox", "ServeRequest"]

SPOOL_BYTES = 1024 * 1024
"""How much of a body the disconnect watcher holds for a handler that has not read it yet."""


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

    async def body(self) -> bytes:
        """The whole body, read once and kept: Starlette's ``Request.body``, read straight from
        ``receive`` instead of through ``stream()`` (an async generator per request)."""
        cached: bytes | None = getattr(self, "_body", None)
        if cached is not None:
            return cached
        if self._stream_consumed:
            raise RuntimeError("Stream consumed")
        chunks: list[bytes] = []
        receive = self._receive
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            elif kind == "http.disconnect":
                self._is_disconnected = True
                raise ClientDisconnect()
        self._stream_consumed = True
        body = self._body = b"".join(chunks)
        return body

    async def json(self) -> Any:
        """The body parsed as JSON; a body Python cannot decode is ``json.JSONDecodeError``
        (HTTP 400), whatever the reason (see :func:`loads_json`)."""
        if not hasattr(self, "_json"):
            self._json = loads_json(await self.body())
        return self._json

    def get_json(self) -> Any:
        """The body parsed as JSON (``json.JSONDecodeError`` -> HTTP 400)."""
        return loads_json(self.data)


_fast_loads: Callable[[bytes | str], Any] | None
try:
    import orjson
except ImportError:  # pragma: no cover - the dev extras install orjson
    _fast_loads = None
else:
    _fast_loads = orjson.loads

_MAX_FAST_BRACKETS = 500
"""Bodies with this many ``[`` and ``{`` or more may nest deeper than ``json.loads`` can follow
(it raises ``RecursionError`` at a depth that depends on the caller's stack; orjson goes to
1024): ``json.loads`` decides for them."""

_DIGITS_AS_ZEROS = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_DIGITS = b"0" * 19
"""19 digits in a row (every digit read as a 0): a number orjson might not give back exactly as
``json.loads`` does (it turns an integer outside 64 bits into a float)."""


def loads_json(data: bytes | str) -> Any:
    """``json.loads``, with every way a client's body can fail to decode as
    ``json.JSONDecodeError`` (the client's error, HTTP 400): besides invalid JSON, an integer of
    more digits than Python converts (``ValueError``) and nesting deeper than the recursion limit
    (``RecursionError``). Never a 500 for something a client sent.

    With orjson installed (``aioserve[fast]``), bytes are decoded by orjson first, several times
    faster, when that gives what ``json.loads`` gives: never with 19 digits in a row (orjson
    turns an integer outside 64 bits into a float), nor with 500 brackets or more (see
    :data:`_MAX_FAST_BRACKETS`); whatever orjson refuses (``NaN``, a byte-order mark, lone
    surrogates, ...) goes to ``json.loads``, which decides. So the result, its types and the
    errors are the standard library's.
    """
    if (
        _fast_loads is not None
        and type(data) is bytes
        and data.count(b"[") + data.count(b"{") < _MAX_FAST_BRACKETS
        and _LONG_DIGITS not in data.translate(_DIGITS_AS_ZEROS)
    ):
        try:
            return _fast_loads(data)
        except ValueError:
            pass  # json.loads decides, with its own error
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise json.JSONDecodeError(f"The JSON body cannot be decoded: {reason}", "", 0) from None


class Inbox:
    """The request's ``receive``, with a watcher that cancels the request's task when the client
    disconnects.

    The handler reads the body through :meth:`receive`. The watcher starts only when that can
    matter (the request has to wait, or has run through a sweep interval); from then on it is
    the one reader of the server's ``receive`` until the request is answered: it spools body
    messages for the handler, up to :data:`SPOOL_BYTES` (or ``max_body_bytes`` if smaller), so
    that it still sees a client that goes away during an upload while the request waits, and
    cancels the task on ``http.disconnect``. With the spool full it waits for the handler to
    read. Once the request is answered (a streaming response may still read the body) the
    handler reads the server's ``receive`` directly again, spooled messages first.
    """

    __slots__ = (
        "_body_bytes",
        "_max_body_bytes",
        "_owner",
        "_reading",
        "_ready",
        "_receive",
        "_spool",
        "_spool_cap",
        "_spooled",
        "_start_after_read",
        "_stopped",
        "_taken",
        "_task",
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
        self._spool: collections.deque[Message] = collections.deque()
        self._spooled = 0
        self._spool_cap = (
            SPOOL_BYTES if max_body_bytes is None else min(SPOOL_BYTES, max_body_bytes)
        )
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
        while True:
            spool = self._spool
            if spool:
                message = spool.popleft()
                self._spooled -= len(message.get("body", b""))
                if self._taken is not None:
                    self._taken.set()
                return message
            watcher = self._watcher
            if watcher is None or self._stopped or watcher.done():
                return await self._read_directly()
            ready = self._ready
            assert ready is not None  # made when the watcher started
            await ready.wait()
            ready.clear()

    async def _read_directly(self) -> Message:
        self._reading = True
        try:
            return await self._receive()
        finally:
            self._reading = False
            if self._start_after_read:
                self._start_after_read = False
                self.start()

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
            self._spool.append(message)
            self._spooled += len(message.get("body", b""))
            ready.set()
            while message.get("more_body", False) and self._spooled >= self._spool_cap:
                taken.clear()
                await taken.wait()  # the spool is full: wait until the handler reads

    def stop(self) -> None:
        """The request is answered (or failed): stop watching; later reads go direct."""
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
        if self._ready is not None:
            self._ready.set()  # a read waiting on the watcher reads directly now
