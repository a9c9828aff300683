"""``aioserve run --workers N``: N processes sharing one port through the server's own process
manager (uvicorn's, or granian's with ``--server granian``); each builds the deployment on its own
``Serve`` behind that server, reports to the parent when it is ready, and at a signal stops
admitting at once, then drains. See :mod:`aioserve.cli`.

The parent makes a directory for the run through which the workers share their metrics, so that
``/-/metrics`` on any of them gives the whole server's figures (:mod:`aioserve.workermetrics`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from ._types import Lifecycle
from .cli import (
    _WORKER_ENV,
    DEFAULT_DRAIN_S,
    _CLIError,
    _cwd_on_path,
    _exit_code,
    _limits,
    _Receive,
    _report,
    _Scope,
    _Send,
    _setup_logging,
    _start_and_populate,
    _Target,
    _traceback,
)
from .clisummary import log_drain, startup_summary, summary_claimed, summary_marker
from .config import HTTPOptions, ServerName
from .exceptions import ConfigError
from .serve import Serve
from .servers import BACKLOG, GuardedProtocol, load_granian, uvicorn_limits
from .workermetrics import WorkerMetrics, shared_directory

__all__ = ["SERVER_GRACE_MARGIN_S", "check_server", "check_workers", "run_workers"]

# The server's own graceful timeout is the drain's plus this: a worker's drain stops what still
# runs first (503), so the server never has to cut a request short itself (a 500).
SERVER_GRACE_MARGIN_S = 3.0

logger = logging.getLogger("aioserve.cli")


class _ReadyWatcher:
    """In the parent: waits for every worker to report, then prints the serving line."""

    def __init__(self, workers: int, url: str) -> None:
        self.token = secrets.token_hex(8)
        self.exit_code = 0
        self._workers = workers
        self._url = url
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._watch, name="aioserve workers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._sock.close()

    def _watch(self) -> None:
        ready: set[str] = set()
        while len(ready) < self._workers:
            try:
                data = self._sock.recv(256).decode("utf-8", "replace").split()
            except OSError:
                return
            if len(data) != 3 or data[0] != self.token:
                continue
            if data[1] == "ready":
                ready.add(data[2])
            else:
                # The worker reported its error itself; uvicorn stops the others.
                self.exit_code = int(data[2]) if data[2].isdigit() else 1
                return
        print(
            f"aioserve is serving on {self._url} with {self._workers} worker processes",
            flush=True,
        )


def _notify(settings: dict[str, Any], *words: object) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        text = " ".join(str(w) for w in (settings["token"], *words))
        sock.sendto(text.encode(), ("127.0.0.1", settings["notify_port"]))


class _WorkerApp:
    """The ASGI app of one worker process: builds the deployment at lifespan startup."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._serve: Serve | None = None
        self._metrics: WorkerMetrics | None = None
        self._closing: asyncio.Task[None] | None = None  # the drain a signal started

    def __repr__(self) -> str:
        return f"<aioserve worker {os.getpid()} {self._settings['target']!r}>"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self._serve is None:
            raise RuntimeError("The aioserve worker got a request before its lifespan startup.")
        root_path = self._settings["root_path"]
        if root_path:
            # granian leaves root_path out of path; uvicorn puts it in (see GranianServer).
            scope["root_path"] = root_path
            scope["path"] = root_path + scope["path"]
        await self._serve.asgi_app(scope, receive, send)

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._serve = await self._start()
                except Exception as exc:
                    error = (
                        exc
                        if isinstance(exc, _CLIError)
                        else _CLIError(
                            f"Building {self._settings['target']!r} raised "
                            f"{type(exc).__name__}: {exc}",
                            _exit_code(exc),
                            details=_traceback(exc),
                        )
                    )
                    _report(error)
                    _notify(self._settings, "failed", error.code)
                    # No message: uvicorn would log the one just reported a second time.
                    await send({"type": "lifespan.startup.failed", "message": ""})
                    return
                _notify(self._settings, "ready", os.getpid())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._serve is not None:
                    await self._serve.aclose()  # joins the drain a signal started, if any
                if self._metrics is not None:
                    # After the drain: the requests it finished count in the final figures.
                    await self._metrics.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> Serve:
        settings = self._settings
        target = _Target.load(settings["target"])
        serve = target.make_serve(
            None,
            None,
            settings["limits"],
            access_log=settings["access_log"],
            debug=settings["debug"],
        )
        try:
            await _start_and_populate(target, serve)
            self._metrics = await self._share_metrics(serve)
        except BaseException:
            await serve.aclose()
            raise
        self._drain_on_signals(serve, settings["timeout_graceful_shutdown"])
        if summary_claimed(summary_marker(settings["metrics_dir"])):
            summary = startup_summary(
                serve,
                url=settings["url"],
                server=settings["server"],
                pid=os.getpid(),
                workers=settings["workers"],
                root_path=target.root_path,
            )
            logger.info("%s", summary)
        return serve

    async def _share_metrics(self, serve: Serve) -> WorkerMetrics | None:
        if sys.platform == "win32":
            # No flock there: the slots of the shared directory cannot be claimed safely.
            logger.warning(
                "Under --workers on Windows, /-/metrics shows the figures of the worker that "
                "answers the scrape only."
            )
            return None
        return await WorkerMetrics.open(serve.metrics, Path(self._settings["metrics_dir"]))

    def _drain_on_signals(self, serve: Serve, timeout_s: float) -> None:
        """On SIGINT/SIGTERM: stop admitting at once (503, not ready), log how many requests
        drain, and drain for up to ``timeout_s``, then stop what still runs (503, as in one
        process); the server's own handler closes the connections meanwhile, with a margin
        (:data:`SERVER_GRACE_MARGIN_S`) so that it never cuts a request short first."""
        loop = asyncio.get_running_loop()

        def drain() -> None:
            if self._closing is None and serve.state is Lifecycle.RUNNING:
                log_drain(serve, timeout_s)
                self._closing = loop.create_task(serve.aclose(drain_timeout_s=timeout_s))

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(
                signum: int, frame: Any, previous: Callable[[int, Any], Any] = previous
            ) -> None:
                loop.call_soon_threadsafe(drain)
                previous(signum, frame)

            signal.signal(sig, handler)


def _worker_app() -> _WorkerApp:
    """uvicorn's app factory in each worker process (settings come from the environment)."""
    settings = json.loads(os.environ[_WORKER_ENV])
    GuardedProtocol.header_timeout_s = HTTPOptions(**settings["limits"]).header_timeout_s
    _setup_logging(settings["log_level"])
    _cwd_on_path()
    return _WorkerApp(settings)


def check_workers(args: argparse.Namespace, address: tuple[str, int]) -> None:
    if args.workers == 1:
        return
    if address[1] == 0:
        raise _CLIError("--port 0 cannot be used with --workers; give a port number.")
    if args.kv_store_path is not None:
        raise _CLIError(
            "--kv-store-path cannot be used with --workers: the processes would overwrite each "
            "other's state."
        )


def check_server(server: ServerName) -> None:
    """A missing granian is the user's error (exit 2), reported before anything binds."""
    if server == "granian":
        try:
            load_granian()
        except ConfigError as exc:
            raise _CLIError(str(exc)) from None


def run_workers(
    target: _Target, args: argparse.Namespace, address: tuple[str, int], server: ServerName
) -> int:
    if args.timeout_graceful_shutdown is None:
        # The servers' process managers need a number before the deployment exists.
        args.timeout_graceful_shutdown = DEFAULT_DRAIN_S
    with shared_directory() as metrics_dir:
        return _run_workers(target, args, address, server, metrics_dir)


def _run_workers(
    target: _Target,
    args: argparse.Namespace,
    address: tuple[str, int],
    server: ServerName,
    metrics_dir: Path,
) -> int:
    host, port = address
    display = f"[{host}]" if ":" in host else host
    watcher = _ReadyWatcher(args.workers, f"http://{display}:{port}")
    limits = _limits(args)
    settings = {
        "target": str(Path(target.spec).resolve()) if target.deployment else target.spec,
        "limits": limits,
        "log_level": args.log_level,
        "notify_port": watcher.port,
        "token": watcher.token,
        "url": watcher._url,
        "server": server,
        "workers": args.workers,
        "access_log": args.access_log,
        "debug": args.debug,
        "timeout_graceful_shutdown": args.timeout_graceful_shutdown,
        # uvicorn adds root_path to the path itself; with granian the worker app does.
        "root_path": target.root_path if server == "granian" else "",
        "metrics_dir": str(metrics_dir),
    }
    os.environ[_WORKER_ENV] = json.dumps(settings)
    watcher.start()
    try:
        if server == "granian":
            _run_granian_workers(host, port, args)
        else:
            uvicorn.run(
                "aioserve.cliworkers:_worker_app",
                factory=True,
                host=host,
                port=port,
                workers=args.workers,
                lifespan="on",
                log_config=None,
                log_level=args.log_level,
                access_log=False,
                root_path=target.root_path,
                # Requests in flight at a signal drain for up to this long, as in one process.
                timeout_graceful_shutdown=args.timeout_graceful_shutdown + SERVER_GRACE_MARGIN_S,
                # The protocol class crosses to the workers by name; its timeout is set there.
                **{**uvicorn_limits(HTTPOptions(**limits)), "http": GuardedProtocol},
            )
    finally:
        watcher.close()
        os.environ.pop(_WORKER_ENV, None)
    return watcher.exit_code


def _run_granian_workers(host: str, port: int, args: argparse.Namespace) -> None:
    """granian's process manager: it binds, forks the workers, runs their lifespan and owns
    SIGINT/SIGTERM; each worker loads ``_worker_app`` as uvicorn's do."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server import Server as Granian

    Granian(
        "aioserve.cliworkers:_worker_app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        factory=True,
        http=HTTPModes.http1,
        backlog=BACKLOG,
        log_level=LogLevels(args.log_level),
        log_access=False,
        # Requests in flight at a signal drain for up to this long, as with uvicorn.
        workers_kill_timeout=math.ceil(args.timeout_graceful_shutdown + SERVER_GRACE_MARGIN_S),
    ).serve()
