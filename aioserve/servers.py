"""The HTTP server an instance runs its ASGI app on, on the instance's own loop: uvicorn or granian.

:func:`bind` makes the listening socket (so a bind failure raises at start, with the fix), and
:func:`make_server` the server ``http_options["server"]`` names, which serves the ASGI app on that
socket without taking the host program's signals: :class:`UvicornServer` (the default) as a task of
the instance, :class:`GranianServer` (the ``aioserve[granian]`` extra) with granian's Rust HTTP
stack on its own threads handing each request to a task on the instance's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import socket
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ._concurrency import TaskOwner, current_task
from .config import HTTPOptions
from .exceptions import BindError, ConfigError, ServeError

__all__ = [
    "GRANIAN_EXTRA",
    "GranianServer",
    "GuardedProtocol",
    "Server",
    "UvicornServer",
    "bind",
    "granian_version",
    "guarded_protocol",
    "load_granian",
    "make_server",
    "uvicorn_limits",
]

logger = logging.getLogger(__name__)

# How long open responses may take to finish once the server stops (uvicorn's bound, both servers).
GRACEFUL_SHUTDOWN_S = 5.0
# The listen backlog and, for granian, the most connections it serves at once (uvicorn's backlog).
BACKLOG = 2048
GRANIAN_EXTRA = "aioserve[granian]"


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0 picks a free one); :class:`BindError` if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only for sockets
    # that say TCP, and without it every keep-alive response after the first waits ~40 ms
    # for the client's delayed ACK (uvicorn writes head and body separately).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BindError(
            f"The HTTP server cannot bind {host}:{port}: {exc.strerror or exc}. "
            f"Pick another port (port=0 picks a free one) or stop what uses it."
        ) from exc
    return sock


def uvicorn_limits(options: HTTPOptions) -> dict[str, Any]:
    """The ``uvicorn.Config`` settings that enforce ``options``' connection limits."""
    return {
        "timeout_keep_alive": max(1, math.ceil(options.keep_alive_timeout_s)),
        "limit_concurrency": options.max_connections,
        "h11_max_incomplete_event_size": options.max_header_bytes,
        "http": guarded_protocol(options.header_timeout_s),
    }


class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a header timeout.

    uvicorn never times out a connection that sends nothing, or a request head that trickles in
    byte by byte, so idle and slowloris clients could hold every descriptor. Here a connection
    must send a whole request head within ``header_timeout_s`` of opening and of each response
    (uvicorn's own keep-alive timeout still closes idle connections sooner); else it is closed.
    """

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _seen_cycle: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:
            self._seen_cycle = cycle  # a whole request head has arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """:class:`GuardedProtocol` with this header timeout (a subclass, so instances with other
    timeouts in the same process keep theirs)."""
    if header_timeout_s == GuardedProtocol.header_timeout_s:
        return GuardedProtocol
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout_s": header_timeout_s})


class _Server(uvicorn.Server):
    """uvicorn without signal capture (the host program owns signals) and with a ready event."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()


class Server(Protocol):
    """An HTTP server serving an instance's ASGI app on its bound socket, on the running loop."""

    async def start(self, owner: TaskOwner) -> None:
        """Start serving as a task of ``owner``; return once connections are accepted."""

    async def stop(self) -> None:
        """Stop accepting, let open responses finish within the server's bound, and wait."""

    def stop_accepting(self) -> None:
        """Take no new connection from now on (others sharing the socket go on accepting);
        the open ones are served until :meth:`stop`."""


def make_server(app: Any, sock: socket.socket, options: HTTPOptions) -> Server:
    """The server ``options.server`` names, serving ``app`` on ``sock``.

    :class:`~aioserve.ConfigError` (and ``sock`` closed) when that server is not installed.
    """
    if options.server == "granian":
        return GranianServer(app, sock, options)
    return UvicornServer(app, sock, options)


class UvicornServer:
    """uvicorn serving ``app`` on a bound socket, as a task owned by ``owner``."""

    def __init__(self, app: Any, sock: socket.socket, options: HTTPOptions) -> None:
        self._sock = sock
        config = uvicorn.Config(
            app,
            interface="asgi3",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            root_path=options.root_path,
            timeout_graceful_shutdown=5,
            **uvicorn_limits(options),
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<UvicornServer {self._sock.getsockname()!r}>"

    async def start(self, owner: TaskOwner) -> None:
        """Start serving; returns once the server accepts connections, raises if it failed."""
        server = self._server
        task = owner.spawn(server.serve(sockets=[self._sock]), name="aioserve uvicorn")
        self._task = task
        ready = asyncio.ensure_future(server.ready.wait())
        try:
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not server.ready.is_set():
            self._sock.close()
            error = task.exception() if task.done() and not task.cancelled() else None
            raise ServeError(f"The HTTP server failed to start: {error!r}") from error

    def stop_accepting(self) -> None:
        """Close this process's listening socket(s); keep serving the open connections."""
        for server in self._server.servers:
            server.close()

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (uvicorn's own bound), and wait."""
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


# -- granian ------------------------------------------------------------------------------------

# The granian releases whose worker interface GranianServer drives (granian.server.embed's).
_GRANIAN_SUPPORTED = ((2, 8), (3, 0))


def granian_version() -> str | None:
    """The installed granian's version, or None when it is not installed."""
    try:
        module = importlib.import_module("granian")
    except ImportError:
        return None
    return str(module.__version__)


def load_granian() -> Any:
    """granian's worker interface, or :class:`ConfigError` naming the extra to install."""
    version = granian_version()
    if version is None:
        raise ConfigError(
            f"The HTTP server 'granian' is not installed: pip install '{GRANIAN_EXTRA}' "
            f"(or use the default server, 'uvicorn')."
        )
    release = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    low, high = _GRANIAN_SUPPORTED
    if not low <= release < high:
        raise ConfigError(
            f"The HTTP server 'granian' must be >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}; "
            f"granian {version} is installed: pip install '{GRANIAN_EXTRA}'."
        )
    # granian's embeddable worker (what granian.server.embed drives), used directly so that it
    # serves the socket aioserve bound (port 0, bind errors at start) and configures no logging.
    api = importlib.import_module("granian._granian")
    futures = importlib.import_module("granian._futures")
    http = importlib.import_module("granian.http")
    return _GranianAPI(api, futures, http)


class _GranianAPI:
    __slots__ = ("futures", "http", "native")

    def __init__(self, native: Any, futures: Any, http: Any) -> None:
        self.native = native
        self.futures = futures
        self.http = http


# The request callback granian's scheduler starts as a task: it gets granian's per-request watcher.
_Callback = Callable[[Any], Coroutine[Any, Any, None]]


class GranianServer:
    """granian serving ``app`` on a bound socket: its Rust HTTP/1.1 stack runs on threads of its
    own and hands every request to a task on the running loop (the instance's), as granian's
    embedded server does.

    Differences from uvicorn, handled here: granian leaves ``root_path`` out of ``path``, which
    uvicorn (and so Starlette's ``request.url``) includes, so the callback adds it; and it has no
    bound of its own on a graceful shutdown, so :meth:`stop` cancels what still runs after
    :data:`GRACEFUL_SHUTDOWN_S`, as uvicorn does.
    """

    def __init__(self, app: Any, sock: socket.socket, options: HTTPOptions) -> None:
        # Connections past max_connections wait in the listen backlog (granian has no 503 for
        # them); bodies and header counts are bounded by the HTTP app, as on uvicorn.
        self._max_connections = options.max_connections or BACKLOG
        timeout_s = min(options.header_timeout_s, options.keep_alive_timeout_s)
        self._header_timeout_ms = max(1, int(timeout_s * 1000))
        self._max_buffer_size = max(options.max_header_bytes, 64 * 1024)
        try:
            self._granian = load_granian()
        except BaseException:
            sock.close()
            raise
        self._app = app
        self._sock = sock
        self._root_path = options.root_path
        self._live: set[asyncio.Task[Any]] = set()  # the request tasks running now
        self._signal: Any = None
        self._stopped: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        where = "closed" if self._sock.fileno() < 0 else repr(self._sock.getsockname())
        return f"<GranianServer {where}>"

    def _callback(self, loop: asyncio.AbstractEventLoop) -> _Callback:
        app, live, root_path = self._app, self._live, self._root_path

        async def serve_request(watcher: Any) -> None:
            scope = watcher.scope
            scope["root_path"] = root_path
            if root_path:
                scope["path"] = root_path + scope["path"]
            proto = watcher.proto
            task = current_task(loop)
            live.add(task)  # type: ignore[arg-type]  # always a task: granian's asyncio impl
            try:
                await app(scope, proto.receive, proto.send)
            except asyncio.CancelledError:
                watcher.done()  # a 500 if nothing was sent yet
                raise
            except BaseException as exc:
                watcher.err(exc)  # logged by granian; a 500 if nothing was sent yet
                return
            finally:
                live.discard(task)
            watcher.done()

        return serve_request

    async def start(self, owner: TaskOwner) -> None:
        """Start serving; returns once the socket listens (granian accepts on its own threads)."""
        loop = asyncio.get_running_loop()
        native, futures, http = (
            self._granian.native,
            self._granian.futures,
            self._granian.http,
        )
        # granian owns (and closes, when it stops) a duplicate; aioserve closes its own.
        fd = os.dup(self._sock.fileno())
        try:
            holder = native.SocketHolder(fd, False, BACKLOG)
            worker = native.ASGIWorker(
                worker_id=1,
                sock=(None, holder),
                ipc=None,
                threads=1,
                blocking_threads=512,
                py_threads=1,
                py_threads_idle_timeout=30,
                backpressure=self._max_connections,
                http_mode="1",
                # granian's one timer covers the wait for a request head and the idle time of a
                # kept-alive connection: the shorter of aioserve's two bounds.
                http1_opts=http.HTTP1Settings(
                    header_read_timeout=self._header_timeout_ms,
                    max_buffer_size=self._max_buffer_size,
                ),
                http2_opts=None,
                websockets_enabled=True,
                static_files=None,
                ssl_enabled=False,
            )
            stopped = loop.create_future()
            signal = native.WorkerSignal()

            def set_stopped() -> None:
                if not stopped.done():
                    stopped.set_result(None)

            def on_stopped() -> None:
                # Called on one of granian's threads once every connection has closed.
                with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                    loop.call_soon_threadsafe(set_stopped)

            signal.add_cb(on_stopped)
            scheduler = futures._new_cbscheduler(loop, self._callback(loop), impl_asyncio=True)
            worker.serve_mtr(scheduler, loop, signal)
        except Exception as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._sock.close()
            raise ServeError(
                f"The HTTP server (granian {granian_version()}) failed to start: {exc!r}"
            ) from exc
        self._signal = signal
        self._stopped = stopped

    def stop_accepting(self) -> None:
        """granian's embedded worker has no way to stop accepting alone: :meth:`stop` does it."""

    async def stop(self) -> None:
        """Stop accepting, let open responses finish for up to :data:`GRACEFUL_SHUTDOWN_S`,
        then cancel the requests still running, and wait for granian to close its connections."""
        signal, stopped = self._signal, self._stopped
        if signal is None or stopped is None:
            return
        self._signal = None
        signal.set()
        self._sock.close()
        if not await _within(stopped, GRACEFUL_SHUTDOWN_S):
            for task in list(self._live):
                task.cancel()
            if not await _within(stopped, GRACEFUL_SHUTDOWN_S):
                logger.warning(
                    "granian did not close its connections within %.0f s of stopping.",
                    2 * GRACEFUL_SHUTDOWN_S,
                )


async def _within(future: asyncio.Future[None], timeout_s: float) -> bool:
    """Whether ``future`` is done within ``timeout_s`` (it is not cancelled either way)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(future), timeout_s)
    return future.done()
