"""The HTTP server an instance runs its ASGI app on: uvicorn, on the instance's own loop.

:func:`bind` makes the listening socket (so a bind failure raises at start, with the fix), and
:class:`UvicornServer` serves an ASGI app on it as a task of the instance, without taking the host
program's signals, and tells when it is ready. A second server (granian) would implement the same
``start``/``stop`` pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator
from typing import Any, Protocol

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ._concurrency import TaskOwner
from .config import HTTPOptions
from .exceptions import BindError, ServeError

__all__ = [
    "GuardedProtocol",
    "Server",
    "UvicornServer",
    "bind",
    "guarded_protocol",
    "make_server",
    "uvicorn_limits",
]


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


def make_server(app: Any, sock: socket.socket, options: HTTPOptions) -> Server:
    """The server ``options`` asks for, serving ``app`` on ``sock``."""
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

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (uvicorn's own bound), and wait."""
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
