"""The shapes everything else shares: the lifecycle, the per-call object, the runner seam.

* :class:`Lifecycle` is the one lifecycle of an instance, a backend and a replica:
  ``STARTING -> RUNNING -> DRAINING -> STOPPED``.
* :class:`Call` is one request on its way: what to run (method, arguments), how to route it
  (endpoint, shard key), until when (deadline), and who it is (request id, HTTP or not). It is also
  what ``serve.context`` and log records read while the request runs.
* :class:`Runner` is what a backend drives for each of its replicas. Today's runner runs the
  user's object in this process (:mod:`aioserve.runners`); a runner for a worker process or a Ray
  actor implements the same Protocol and nothing above the backend changes.

This module imports nothing of the package.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

__all__ = [
    "ASGI_METHOD",
    "Call",
    "Lifecycle",
    "Message",
    "Receive",
    "Runner",
    "Scope",
    "Send",
    "Stream",
    "new_request_id",
]

# ASGI, as the servers speak it (the same aliases as starlette.types, without importing it).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The method of a call that hands an ASGI connection to an ingress backend's app: its arguments
# are ``(scope, receive, send)`` and the app answers through ``send``. A dunder name, so no
# caller can reach it by name (callable.bind_method refuses those).
ASGI_METHOD = "__asgi__"


class Lifecycle(enum.Enum):
    """The lifecycle of an instance, a backend and a replica."""

    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def _new_id_prefix() -> None:
    # A forked worker (granian's --workers) must not number its requests as its siblings do.
    global _ID_PREFIX, _ids
    _ID_PREFIX = secrets.token_hex(4)
    _ids = itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    """A request id unique in this process and unlikely to repeat across processes."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


_NO_KWARGS: dict[str, Any] = {}  # never mutated: only ever unpacked with **


class Call:
    """One request: made by an entry point (HTTP or a handle), read by everything below it.

    ``on_wait``, when set, is called once if the request has to wait (for a replica slot or a
    batch): the HTTP edge uses it to start watching for a client that goes away. ``lingering`` is
    set by a runner whose caller was cancelled while work it cannot interrupt goes on (a sync
    handler on its thread): the replica's slot stays taken until that future is done.
    ``prefetch``, when set (HTTP), reads the request body into the request: a runner awaits it
    before it hands the request to sync code, which cannot await the body itself. ``replica`` is
    the replica serving the request (a ``ReplicaContext``), set when a replica takes it.
    ``parent`` is the call being served when this one was made (a nested handle call), so the
    request id carries over. ``http`` is ``(method, headers)`` given by a handle's
    ``options(http_method=, http_headers=)``, for the Python-side request of a legacy handler.
    """

    __slots__ = (
        "_request_id",
        "args",
        "deadline",
        "endpoint",
        "http",
        "kwargs",
        "lingering",
        "method",
        "on_wait",
        "parent",
        "prefetch",
        "replica",
        "shard_key",
        "web",
    )

    def __init__(
        self,
        endpoint: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        method: str | None = None,
        shard_key: str | None = None,
        deadline: float | None = None,
        request_id: str | None = None,
        web: bool = False,
        parent: Call | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.args = args
        self.kwargs = kwargs if kwargs else _NO_KWARGS
        self.method = method
        self.shard_key = shard_key
        self.deadline = deadline
        self._request_id = request_id
        self.web = web
        self.parent = parent
        self.on_wait: Callable[[], None] | None = None
        self.prefetch: Callable[[], Awaitable[Any]] | None = None
        self.replica: Any = None
        self.lingering: asyncio.Future[Any] | None = None
        self.http: tuple[str | None, Mapping[str, str] | None] | None = None

    @property
    def request_id(self) -> str:
        """The request's id: given, inherited from the calling request, or made on first use."""
        request_id = self._request_id
        if request_id is None:
            parent = self.parent
            request_id = parent.request_id if parent is not None else new_request_id()
            self._request_id = request_id
        return request_id

    def copy(self) -> Call:
        """A call with the same request and arguments (a shadow copy), served on its own."""
        kwargs = dict(self.kwargs) if self.kwargs else None
        copy = Call(
            self.endpoint,
            self.args,
            kwargs,
            method=self.method,
            shard_key=self.shard_key,
            request_id=self.request_id,
            web=self.web,
        )
        copy.http = self.http
        return copy

    def __repr__(self) -> str:
        method = f" method={self.method!r}" if self.method else ""
        return f"<Call {self.request_id} endpoint={self.endpoint!r}{method} web={self.web}>"


class Stream:
    """What a runner returns for a streaming handler (a generator): an async iterator of items
    produced inside the replica. The backend keeps the replica's slot until the stream ends or is
    closed. Subclasses implement ``__anext__`` and ``aclose``."""

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop producing items and release what the stream holds. Idempotent."""


class Runner(Protocol):
    """One replica of a backend, as the backend drives it.

    A new kind of runner (a worker process, a Ray actor) provides:

    * ``replica_tag``: ``"{backend_tag}#{suffix}"``, unique, stable for the runner's life.
    * ``await start(user_config)``: build the user's object (constructor with its init args) and,
      if ``user_config`` is not None, apply it; raise ``BackendError`` (original as ``__cause__``)
      if either raises. Must not block the event loop.
    * ``await reconfigure(user_config)``: call the object's ``reconfigure``; ``BackendError`` on
      failure.
    * ``await call(call)``: run ``call.method`` (None: the default entry point) with ``call.args``
      and ``call.kwargs``; return its result, or a :class:`Stream` for a generator handler, whose
      items are produced inside the replica. Raise the user's exception unchanged;
      ``MethodNotFound`` for a method that cannot be reached by name; ``ReplicaStopped`` when
      :meth:`kill` cut it short. The runner never counts slots: the backend takes one before
      ``call`` and gives it back when ``call`` returns (or when the stream ends). If the caller
      is cancelled while work the runner cannot interrupt goes on, the runner sets
      ``call.lingering`` to a future done when that work is, and the slot is kept until then.
    * A backend of a class decorated with ``@serve.ingress`` also gets calls whose method is
      :data:`ASGI_METHOD`, with ``(scope, receive, send)`` as arguments: the runner runs the
      class's ASGI app on them inside the replica (the app answers through ``send``; the call
      returns None).
    * ``kill()``: stop what runs now, at once; the callers get ``ReplicaStopped``.
    * ``await aclose()``: release what the runner holds (threads, processes, queues). Idempotent.
    """

    replica_tag: str

    async def start(self, user_config: Any) -> None: ...

    async def reconfigure(self, user_config: Any) -> None: ...

    async def call(self, call: Call) -> Any: ...

    def kill(self) -> None: ...

    async def aclose(self) -> None: ...
