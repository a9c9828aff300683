"""The HTTP server an instance runs its ASGI app on: uvicorn, on the instance's own loop.

:func:`bind` makes the listening socket (so a bind failure raises at start, with the fix), and
:class:`UvicornServer` serves an ASGI app on it as a task of the instance, without taking the host
program's signals, and tells when it is ready. A second server (granian) would implement the same
``start``/``stop`` pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any, Protocol

import uvicorn

from ._concurrency import TaskOwner
from .config import HTTPOptions
from .exceptions import BindError, ServeError

__all__ = ["Server", "UvicornServer", "bind", "make_server"]


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
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            root_path=options.root_path,
            timeout_graceful_shutdown=5,
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
