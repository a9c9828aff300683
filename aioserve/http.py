"""The HTTP front door: an ASGI app that routes to endpoints and turns results into responses.

It is a thin adapter onto the one request path handles use too (:meth:`Router.enter`): a request
becomes a :class:`~aioserve._types.Call`, its result a response; one table maps errors to HTTP
statuses; watching for a client that disconnects wraps ``receive`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import inspect
import json
import logging
import math
import pathlib
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ._concurrency import TaskOwner, current_task
from ._types import Call, Lifecycle, Message, Receive, Scope, Send, Stream, new_request_id
from .config import check_slo, deadline_from
from .context import call_var
from .exceptions import (
    ConfigError,
    DeadlineExceeded,
    EndpointNotFound,
    MethodNotFound,
    NoTraffic,
    Overloaded,
    ReplicaStopped,
    ServeShutdown,
)

if TYPE_CHECKING:
    from .router import Endpoint, Router

__all__ = ["HTTPApp", "json_dumps", "to_response"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("aioserve.access")

# A request still running after a full sweep interval (50-100 ms) starts watching for its client
# going away (a queued one starts at once); quick requests pay for no task and no timer.
WATCH_RUNNING_AFTER_S = 0.05

# The one status table of the HTTP edge; the first matching class wins.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (DeadlineExceeded, 504),
    (Overloaded, 503),
    (NoTraffic, 503),
    (ServeShutdown, 503),
    (ReplicaStopped, 503),
    (EndpointNotFound, 404),
    (MethodNotFound, 404),
)


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    model_dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(model_dump):
        return model_dump(mode="json")
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, URL | uuid.UUID | decimal.Decimal | pathlib.PurePath):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _stdlib_json_dumps(obj: Any) -> bytes:
    return json.dumps(
        obj, default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


_orjson_dumps: Callable[..., bytes] | None
try:  # the aioserve[fast] extra: the same JSON, encoded several times faster
    import orjson
except ImportError:  # pragma: no cover - the dev extras install it
    _orjson_dumps = None
    _OrjsonError: type[Exception] = TypeError
    _ORJSON_OPTIONS = 0
else:
    _orjson_dumps = orjson.dumps
    _OrjsonError = orjson.JSONEncodeError
    _ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS  # int, float, bool and None keys, as json takes


def json_dumps(obj: Any) -> bytes:
    """Encode a handler's result as compact UTF-8 JSON (numpy, dataclasses, pydantic included).

    With orjson when it is installed (``aioserve[fast]``), else with the standard library: the
    same JSON values either way, and the same errors (NaN and infinities are refused).
    """
    if _orjson_dumps is None:  # pragma: no cover - the dev extras install orjson
        return _stdlib_json_dumps(obj)
    try:
        data = _orjson_dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
    except _OrjsonError:
        # What orjson does not take (ints past 64 bits, nesting past 254 levels, lone
        # surrogates, circular references): the standard library encodes it, or raises.
        return _stdlib_json_dumps(obj)
    if b"null" in data:
        # orjson writes NaN and infinities as null where json refuses them (a 500, as
        # Starlette's JSONResponse gives): only the standard library tells them from None.
        return _stdlib_json_dumps(obj)
    return data


def _chunk(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return json_dumps(item) + b"\n"


async def _encode_async(items: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            yield _chunk(item)
    finally:
        # A client that went away stops the stream: the replica's slot comes back now.
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def to_response(result: Any) -> Response:
    """Turn a handler's result into a response (see API.md §4 for the rules)."""
    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, bytes | bytearray | memoryview):
        return Response(bytes(result), media_type="application/octet-stream")
    if result is None:
        return Response(b"")
    if isinstance(result, Stream) or inspect.isasyncgen(result):
        return StreamingResponse(_encode_async(result), media_type="application/octet-stream")
    return Response(json_dumps(result), media_type="application/json")


def route_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (``root_path`` removed)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _plain(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    return PlainTextResponse(text, status_code=status, headers=headers)


SystemRoute = Callable[[Request], Awaitable[Response]]
_RUNNING = Lifecycle.RUNNING


class HTTPApp:
    """The ASGI app of one aioserve instance (``Serve.asgi_app`` wraps it in the middlewares).

    For a request: match its path against the router's route index, build a :class:`Call` whose
    only argument is the Starlette ``Request``, ``await router.enter(call)``, and turn the result
    (or the error) into a response. The request body is not read here: the handler reads it
    (streamed, chunk by chunk, if it wants), through a ``receive`` that also watches for the
    client going away.
    """

    def __init__(self, router: Router, *, debug: bool = False, access_log: bool = False) -> None:
        self._router = router
        self.debug = debug
        self.access_log = access_log
        self.loop: asyncio.AbstractEventLoop | None = None  # the instance's, once it runs
        self._watchers = TaskOwner("HTTP disconnect watchers")
        self._in_flight: set[_Inbox] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.system_routes: dict[str, SystemRoute] = {
            "/-/routes": self._routes_json,
            "/-/healthz": self._healthz,
        }

    def __repr__(self) -> str:
        return f"<HTTPApp endpoints={len(self._router.endpoints)}>"

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            # The instance's lifecycle is driven by ``async with Serve``; acknowledge only.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path.startswith("/-/"):
            system = self.system_routes.get(path)
            response = (
                await system(Request(scope, receive))
                if system is not None
                else _plain(404, f"No system route {path!r}. See GET /-/routes.")
            )
            await response(scope, receive, send)
            return
        method_name = shard_key = request_id = None
        for key, value in scope["headers"]:
            if key.startswith(b"x-"):
                if key == b"x-serve-call-method":
                    method_name = value.decode("latin-1")
                elif key == b"x-serve-shard-key":
                    shard_key = value.decode("latin-1")
                elif key == b"x-request-id":
                    request_id = value.decode("latin-1")
        if request_id is None:
            request_id = new_request_id()
        router = self._router
        running = router.state is _RUNNING
        endpoint, params = router.match(path) if running else (None, None)
        call = Call(
            endpoint.name if endpoint is not None else "-",
            method=method_name,
            shard_key=shard_key,
            request_id=request_id,
            web=True,
        )
        # Reset when the request ends: a host may run the app in a task that goes on after it
        # (ASGITransport does), and that task is not inside this request any more.
        token = call_var.set(call)
        try:
            users_own = False
            if endpoint is None:
                response = (
                    _plain(404, f"No endpoint is served at {path!r}. See GET /-/routes.")
                    if running
                    else _plain(503, "This aioserve instance is not running.")
                )
            elif scope["method"] not in endpoint.http_methods:
                allow = ", ".join(sorted(endpoint.http_methods))
                response = _plain(
                    405,
                    f"Method {scope['method']} is not allowed at {path!r} (endpoint "
                    f"{endpoint.name!r} takes {allow}). See GET /-/routes.",
                    {"Allow": allow},
                )
            else:
                if params is not None:
                    scope["path_params"] = params
                answer = await self._call(scope, receive, send, endpoint, call)
                if answer is None:
                    return  # the client went away: nobody is left to answer
                response, users_own = answer
            header = (b"x-request-id", request_id.encode("latin-1"))
            if users_own:
                # The handler's own Response object may be shared: never change it.
                send = _send_with_header(send, header)
            else:
                response.raw_headers.append(header)
            await response(scope, receive, send)
            if self.access_log:
                access_logger.info(
                    '%s "%s %s" %d', request_id, scope["method"], path, response.status_code
                )
        finally:
            call_var.reset(token)

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, call: Call
    ) -> tuple[Response, bool] | None:
        """Run the request through the router: its response, and whether that is the handler's
        own Response object; None if the client disconnected meanwhile."""
        task = current_task(self.loop)
        assert task is not None  # an ASGI app always runs in a task
        inbox = _Inbox(task, receive, self._watchers)
        request = Request(scope, inbox.receive, send)
        call.args = (request,)
        try:
            query = scope.get("query_string", b"")
            if query and b"slo_ms" in query:
                call.deadline = _deadline_from_query(query)
            if endpoint.shadows:
                # Each copy reads the body: take it into the request's cache first.
                await request.body()
        except HTTPException as exc:
            return self.error_response(exc), False
        except ClientDisconnect:
            return None  # gone during the upload: nobody is left to answer
        call.on_wait = inbox.start
        in_flight = self._in_flight
        in_flight.add(inbox)
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                WATCH_RUNNING_AFTER_S, self._sweep
            )
        try:
            result = await self._router.enter(call)
            return to_response(result), isinstance(result, Response)
        except asyncio.CancelledError:
            if inbox.disconnected and task.uncancel() == 0:
                return None
            raise
        except ClientDisconnect:
            return None
        except Exception as exc:
            return self.error_response(exc), False
        finally:
            call.on_wait = None
            in_flight.discard(inbox)
            inbox.stop()

    def _sweep(self) -> None:
        """Start watching requests that have run for a sweep interval; one timer per app."""
        self._sweep_timer = None
        for inbox in self._in_flight:
            if inbox.seen:
                inbox.start()
            else:
                inbox.seen = True
        if self._in_flight:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                WATCH_RUNNING_AFTER_S, self._sweep
            )

    def error_response(self, exc: Exception) -> Response:
        """The response for an error raised while serving a request (the one status table)."""
        if isinstance(exc, HTTPException):
            return _plain(exc.status_code, str(exc.detail), exc.headers)
        for cls, status in _STATUS:
            if isinstance(exc, cls):
                logger.debug("Request failed with %d: %r", status, exc)
                headers = None
                if isinstance(exc, Overloaded):
                    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
                if isinstance(exc, MethodNotFound):
                    # The handle caller's message lists the class's methods; a client's does not.
                    text = f"No method {exc.method_name!r} is served by this endpoint."
                    return _plain(status, f"MethodNotFound: {text}")
                return _plain(status, f"{type(exc).__name__}: {exc}", headers)
        logger.error("Request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        text = f"{type(exc).__name__}: {exc}"
        if self.debug:
            text += "\n\n" + "".join(traceback.format_exception(exc))
        return _plain(500, text)

    # -- system routes --------------------------------------------------------------------------

    @staticmethod
    def plain_response(status: int, body: bytes | str, media_type: str) -> Response:
        """A response for a system route."""
        return Response(body, status_code=status, media_type=media_type)

    async def aclose(self) -> None:
        """Stop the disconnect watchers."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        await self._watchers.aclose()

    async def _routes_json(self, request: Request) -> Response:
        table: dict[str, list[Any]] = {}
        for endpoint in self._router.endpoints.values():
            key = endpoint.route if endpoint.route is not None else endpoint.name
            table[key] = [endpoint.name, list(endpoint.methods)]
        return JSONResponse(table)

    async def _healthz(self, request: Request) -> Response:
        if self._router.state is not _RUNNING:
            return _plain(503, "not running")
        return _plain(200, "success")


def _send_with_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return send_with_header


class _Inbox:
    """The request's ``receive``, with a watcher that cancels the request's task when the client
    disconnects.

    The handler reads the body through :meth:`receive`. The watcher starts only when that can
    matter (the request has to wait, or has run through a sweep interval); from then on it is
    the one reader of the server's ``receive``: it hands body messages to the handler one at a
    time (it reads ahead at most one, so a large upload is never buffered here) and cancels the
    task on ``http.disconnect``, at any point of the request.
    """

    __slots__ = (
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

    def __init__(self, task: asyncio.Task[Any], receive: Receive, owner: TaskOwner) -> None:
        self._task = task
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
        """The next message for the handler."""
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


def _deadline_from_query(query: bytes) -> float | None:
    """The deadline the query parameters ask for; a bad value is the client's error (400)."""
    slo: dict[str, float | None] = {"relative_slo_ms": None, "absolute_slo_ms": None}
    for key, value in parse_qsl(query.decode("latin-1")):
        if key in slo:
            try:
                slo[key] = check_slo(key, float(value))
            except ValueError as exc:
                detail = str(exc) if isinstance(exc, ConfigError) else f"{key}={value!r}: {exc}"
                raise HTTPException(400, f"Bad query parameter: {detail}") from None
    if slo["relative_slo_ms"] is None and slo["absolute_slo_ms"] is None:
        return None
    return deadline_from(asyncio.get_running_loop(), slo["relative_slo_ms"], slo["absolute_slo_ms"])
