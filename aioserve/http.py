"""The HTTP front door: an ASGI app that routes to endpoints and turns results into responses.

It is a thin adapter onto the one request path handles use too (:meth:`Router.enter`): a request
becomes a :class:`~aioserve._types.Call`, its result a response; one table maps errors to HTTP
statuses; watching for a client that disconnects wraps ``receive`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ._concurrency import TaskOwner, current_task
from ._types import ASGI_METHOD, Call, Lifecycle, Message, Receive, Scope, Send, new_request_id
from .accesslog import serve_logged
from .calloptions import check_slo, deadline_from
from .config import HTTPOptions
from .context import call_var
from .exceptions import (
    BodyTooLarge,
    ConfigError,
    DeadlineExceeded,
    Overloaded,
    ServeShutdown,
)
from .httperrors import body_limit_as_413, error_response, plain
from .inbox import Inbox, ServeRequest
from .responses import to_response

if TYPE_CHECKING:
    from .router import Endpoint, Router

__all__ = ["HTTPApp"]

logger = logging.getLogger(__name__)

# A request still running after a full sweep interval (50-100 ms) starts watching for its client
# going away (a queued one starts at once); quick requests pay for no task and no timer.
WATCH_RUNNING_AFTER_S = 0.05

# An X-Request-ID a client sends is echoed only if it is short, visible ASCII; else a new one.
_REQUEST_ID = re.compile(rb"[!-~]{1,128}")


def route_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (``root_path`` removed)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


SystemRoute = Callable[[Request], Awaitable[Response]]
_RUNNING = Lifecycle.RUNNING
_FIRST = asyncio.FIRST_COMPLETED


class HTTPApp:
    """The ASGI app of one aioserve instance (``Serve.asgi_app`` wraps it in the middlewares).

    For a request: match its path against the router's route index, build a :class:`Call` whose
    only argument is the Starlette ``Request``, ``await router.enter(call)``, and turn the result
    (or the error) into a response. The request body is not read here: the handler reads it
    (streamed, chunk by chunk, if it wants), through a ``receive`` that also watches for the
    client going away.
    """

    def __init__(
        self,
        router: Router,
        *,
        debug: bool = False,
        access_log: bool = False,
        options: HTTPOptions | None = None,
    ) -> None:
        self._router = router
        self.debug = debug
        self.access_log = access_log
        options = options or HTTPOptions()
        self._max_body_bytes = options.max_body_bytes
        self._max_header_bytes = options.max_header_bytes
        self._max_headers = options.max_headers
        # System routes on the serving port, unless turned off or given a port of their own.
        self.serves_system_routes = options.system_routes and options.system_port is None
        self.loop: asyncio.AbstractEventLoop | None = None  # the instance's, once it runs
        self._watchers = TaskOwner("HTTP disconnect watchers")
        self._in_flight: set[Inbox] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._going_away: asyncio.Future[None] | None = None
        self.system_routes: dict[str, SystemRoute] = {
            "/-/routes": self._routes_json,
            "/-/healthz": self._healthz,
            "/-/ready": self._ready,
        }

    def __repr__(self) -> str:
        return f"<HTTPApp endpoints={len(self._router.endpoints)}>"

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.access_log:
                await serve_logged(self._http, scope, receive, send)
            else:
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
            await self._websocket(scope, receive, send)

    async def system_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An ASGI app that answers the system routes only (for ``system_port``)."""
        if scope["type"] == "http":
            await self._system(route_path(scope), scope, receive, send)
        elif scope["type"] == "lifespan":
            await self(scope, receive, send)

    async def _system(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        system = self.system_routes.get(path)
        response = (
            await system(Request(scope, receive))
            if system is not None
            else plain(404, f"No system route {path!r}. See GET /-/routes.")
        )
        await response(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path.startswith("/-/"):
            if self.serves_system_routes:
                await self._system(path, scope, receive, send)
            else:
                await plain(404, f"No endpoint is served at {path!r}.")(scope, receive, send)
            return
        method_name = shard_key = request_id = None
        content_length = -1
        headers = scope["headers"]
        header_bytes = 0
        for key, value in headers:
            header_bytes += len(key) + len(value)
            if key.startswith(b"x-"):
                if key == b"x-serve-call-method":
                    method_name = value.decode("latin-1")
                elif key == b"x-serve-shard-key":
                    shard_key = value.decode("latin-1")
                elif key == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                    request_id = value.decode("latin-1")
            elif key == b"content-length" and value.isdigit():
                content_length = int(value)
        if len(headers) > self._max_headers or header_bytes > self._max_header_bytes:
            response = plain(
                431,
                f"The request headers are too large: {len(headers)} header(s), {header_bytes} "
                f"bytes; this server takes at most {self._max_headers} and "
                f"{self._max_header_bytes} bytes.",
            )
            await response(scope, receive, send)
            return
        if self._max_body_bytes is not None and content_length > self._max_body_bytes:
            await self.error_response(BodyTooLarge(self._max_body_bytes))(scope, receive, send)
            return
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
                if not running:
                    response = plain(503, "This aioserve instance is not running.")
                elif not router.ready:
                    # Still being built (aioserve run, a reload): the route may come in a moment.
                    response = plain(
                        503,
                        "This aioserve instance is starting: its deployment is not in place "
                        "yet. See GET /-/ready.",
                        {"Retry-After": "1"},
                    )
                else:
                    response = plain(404, f"No endpoint is served at {path!r}. See GET /-/routes.")
            elif endpoint.ingress:
                call.method = ASGI_METHOD
                await self._ingress(scope, receive, send, endpoint, call)
                return
            elif scope["method"] not in endpoint.http_methods:
                allow = ", ".join(sorted(endpoint.http_methods))
                response = plain(
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
                    scope["aioserve.request_id"] = request_id  # for the access log's 499 line
                    return  # the client went away: nobody is left to answer
                response, users_own = answer
            header = (b"x-request-id", request_id.encode("latin-1"))
            if users_own:
                # The handler's own Response object may be shared: never change it.
                send = _send_with_header(send, header)
            else:
                response.raw_headers.append(header)
            await response(scope, receive, send)
        finally:
            call_var.reset(token)

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, call: Call
    ) -> tuple[Response, bool] | None:
        """Run the request through the router: its response, and whether that is the handler's
        own Response object; None if the client disconnected meanwhile."""
        task = current_task(self.loop)
        assert task is not None  # an ASGI app always runs in a task
        inbox = Inbox(task, receive, self._watchers, self._max_body_bytes)
        request = ServeRequest(scope, inbox.receive, send)
        call.args = (request,)
        call.prefetch = request.body
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

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket goes to the app of an ingress endpoint whose prefix matches its path;
        any other is refused (closed before it is accepted: HTTP 403 to the client)."""
        router = self._router
        endpoint = router.match(route_path(scope))[0] if router.state is _RUNNING else None
        if endpoint is None or not endpoint.ingress:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1000})
            return
        request_id = new_request_id()
        shard_key = None
        for key, value in scope["headers"]:
            if key == b"x-request-id" and _REQUEST_ID.fullmatch(value):
                request_id = value.decode("latin-1")
            elif key == b"x-serve-shard-key":
                shard_key = value.decode("latin-1")
        call = Call(
            endpoint.name, method=ASGI_METHOD, shard_key=shard_key, request_id=request_id, web=True
        )
        token = call_var.set(call)
        try:
            await self._ingress(scope, receive, send, endpoint, call)
        finally:
            call_var.reset(token)

    async def _ingress(
        self, scope: Scope, receive: Receive, send: Send, endpoint: Endpoint, call: Call
    ) -> None:
        """Hand an HTTP request or a WebSocket to the app of an ingress backend, which answers
        through ``send`` inside its replica. The app sees the endpoint's route as its mount
        point (``root_path``), as under a Starlette ``Mount``."""
        websocket = scope["type"] == "websocket"
        header = (b"x-request-id", call.request_id.encode("latin-1"))
        status = 0
        closed = False  # a WebSocket the app closed

        async def send_out(message: Message) -> None:
            nonlocal status, closed
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                if not any(key.lower() == b"x-request-id" for key, _ in headers):
                    message = {**message, "headers": [*headers, header]}
            elif kind == "http.response.body":
                if inbox is not None and not message.get("more_body", False):
                    # Answered: the client leaving now cancels nothing (background tasks of the
                    # app still run, and the request counts as served).
                    inbox.stop()
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close":
                closed = True
                status = status or 403
            await send(message)

        # The app is mounted at the endpoint's route: its own root (url_for, base_url, docs)
        # and its own router (not a host app's, when aioserve is itself mounted in one).
        child = {key: value for key, value in scope.items() if key != "router"}
        child["root_path"] = child["app_root_path"] = scope.get("root_path", "") + (
            endpoint.route or ""
        ).rstrip("/")
        scope["aioserve.request_id"] = call.request_id  # the access log's 499 line
        task = current_task(self.loop)
        assert task is not None  # an ASGI app always runs in a task
        inbox: Inbox | None = None
        if websocket:
            going_away = self._going_away_signal()

            async def receive_until_shutdown() -> Message:
                # Until accepted: the handshake. Then each message, unless the instance starts
                # shutting down first: the client is told "going away" (1001) and the app sees
                # it leave, so a drain never waits for a socket that stays open.
                if status == 101 and not going_away.done():
                    message = asyncio.ensure_future(receive())
                    try:
                        await asyncio.wait((message, going_away), return_when=_FIRST)
                    except BaseException:
                        message.cancel()
                        raise
                    if message.done():
                        return message.result()
                    message.cancel()
                elif status != 101:
                    return await receive()
                if not closed:
                    with contextlib.suppress(Exception):
                        await send_out({"type": "websocket.close", "code": 1001})
                return {"type": "websocket.disconnect", "code": 1001}

            call.args = (child, receive_until_shutdown, send_out)
        else:
            inbox = Inbox(task, receive, self._watchers, self._max_body_bytes)
            call.args = (child, body_limit_as_413(inbox.receive), send_out)
        error: Exception | None = None
        try:
            query = scope.get("query_string", b"")
            if query and b"slo_ms" in query:
                call.deadline = _deadline_from_query(query)
        except HTTPException as exc:
            error = exc
        if error is None:
            if inbox is not None:
                call.on_wait = inbox.start
                self._in_flight.add(inbox)
                if self._sweep_timer is None:
                    self._sweep_timer = asyncio.get_running_loop().call_later(
                        WATCH_RUNNING_AFTER_S, self._sweep
                    )
            try:
                await self._router.enter(call)
            except asyncio.CancelledError:
                if inbox is not None and inbox.disconnected and task.uncancel() == 0:
                    return  # the client went away: nobody is left to answer
                raise
            except ClientDisconnect:
                return
            except Exception as exc:
                error = exc
            finally:
                if inbox is not None:
                    call.on_wait = None
                    self._in_flight.discard(inbox)
                    inbox.stop()
        if error is not None:
            if status:
                # The app answered (FastAPI sends its 500 and then raises): log it, and close a
                # WebSocket it left open.
                if websocket and not closed:
                    with contextlib.suppress(Exception):
                        await send({"type": "websocket.close", "code": 1011})
                logger.error(
                    "Request %s to endpoint %r failed after its response started: %s: %s",
                    call.request_id,
                    endpoint.name,
                    type(error).__name__,
                    error,
                    exc_info=error,
                )
            elif websocket:
                retry = isinstance(error, (Overloaded, DeadlineExceeded, ServeShutdown))
                self.error_response(error)  # logs it as for HTTP
                await send({"type": "websocket.close", "code": 1013 if retry else 1011})
            else:
                response = self.error_response(error)
                response.raw_headers.append(header)
                await response(scope, receive, send)

    def _going_away_signal(self) -> asyncio.Future[None]:
        """Done once the instance starts shutting down (see :meth:`begin_shutdown`)."""
        if self._going_away is None:
            self._going_away = asyncio.get_running_loop().create_future()
        return self._going_away

    def begin_shutdown(self) -> None:
        """The instance stops admitting: open WebSockets of ingress apps are closed (1001)."""
        if self._going_away is None and self.loop is not None:
            self._going_away = self.loop.create_future()
        if self._going_away is not None and not self._going_away.done():
            self._going_away.set_result(None)

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
        """The response for an error raised while serving a request (the one status table:
        :mod:`aioserve.httperrors`)."""
        return error_response(exc, debug=self.debug)

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
        # Liveness: the instance runs (also while its deployment is built, and while it drains).
        state = self._router.state
        if state is _RUNNING or state is Lifecycle.DRAINING:
            return plain(200, "success")
        return plain(503, f"not running: {state.value}")

    async def _ready(self, request: Request) -> Response:
        # Readiness: send traffic here (the deployment is in place and not draining).
        router = self._router
        if router.state is _RUNNING and router.ready:
            return plain(200, "ready")
        state = router.state.value if router.state is not _RUNNING else "starting"
        return plain(503, f"not ready: {state}")


def _send_with_header(send: Send, header: tuple[bytes, bytes]) -> Send:
    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return send_with_header


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
