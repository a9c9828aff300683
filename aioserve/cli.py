"""The command line: ``aioserve run TARGET`` (also ``python -m aioserve run TARGET``).

Usage::

    aioserve run TARGET [--host HOST] [--port PORT] [--server uvicorn|granian] [--workers N]
                        [--reload [--reload-dir DIR]] [--root-path PATH] [--debug]
                        [--access-log | --no-access-log] [--log-level LEVEL]
                        [--timeout-graceful-shutdown S] [--kv-store-path PATH] [limits]
    aioserve --version

TARGET is one of:

- ``module:attr`` naming a :class:`~aioserve.Serve` instance (started as configured; ``--host`` and
  ``--port``, when given, replace its host and port) or an ``async def setup(serve: Serve) -> None``
  (called once the instance has started, to create backends and endpoints);
- a path ending in ``.toml``: a declarative deployment (see :mod:`aioserve.deployment`).

The current directory is put on ``sys.path`` first, as uvicorn does, so
``examples.deployment:setup`` imports from where the command runs. A TARGET that does not load
says how to fix it: a file name for a module (``app.py:setup`` -> ``app:setup``), a module that is
not there (where Python looked, and the modules with a similar name), a missing attribute (the
module's public names nearest to it), or an object that ``run`` cannot serve (what it can).

Once the deployment is built, one line goes to stdout::

    aioserve is serving on http://127.0.0.1:8000

and a summary is logged at INFO (URL, pid, server, each endpoint with its methods, route and
traffic, each backend with its replicas; see :mod:`aioserve.clisummary`). SIGINT or SIGTERM shuts
down gracefully (a log line says how many requests drain, for how long at most) and exits 0.
``--port 0`` picks a free port (the line shows it; not with ``--workers``).

One access line per request is logged to ``aioserve.access`` (format: :mod:`aioserve.accesslog`);
``--no-access-log`` turns it off. ``--debug`` puts the traceback in the body of a 500 response.
``--root-path /prefix`` serves behind a proxy that strips ``/prefix`` (uvicorn's ``root_path``).

``--reload`` restarts the server process whenever a ``.py`` file (or the TOML TARGET) under the
current directory or a ``--reload-dir`` changes, with uvicorn's reloader: the supervising process
holds the port, so requests made during a restart wait instead of failing (see
:mod:`aioserve.clireload`). Not with ``--workers``.

``--server`` chooses the HTTP server (default: the file's or the instance's ``server``, else
uvicorn); ``granian`` needs the ``aioserve[granian]`` extra, and says so (exit 2) without it.

``--workers N`` (N > 1) runs N processes sharing one listening socket through the server's own
process manager (uvicorn's or granian's); each process builds the same deployment on its own
``Serve`` (no server of its own, behind the shared server, which runs its lifespan). This is the
way to use more cores: one aioserve instance runs on one event loop. Backends, replicas and batch
queues are per process; every worker logs its own access lines, and the first one ready logs the
startup summary.

``--kv-store-path`` persists the control state (see :mod:`aioserve.store`). The TARGET's
deployment is applied only when nothing was restored; once the file holds state, the restored
state is served as it is and the TARGET's deployment is skipped (a warning says so). Not with
``--workers``, nor with a ``Serve`` instance (give that one its own ``kv_store_path``).

A TOML deployment file (its schema, and how its errors are reported as
``FILE:LINE: key.path: message``: see :mod:`aioserve.deployment`) is checked whole before anything
starts, and every problem is reported. Errors that only ``Serve`` can detect while building (a
constructor that raises, ``max_batch_size`` on a callable that does not batch) are reported the same
way after shutting down what started.

Exit codes: 0 after a signal (and for ``--version``), 2 for a bad TARGET, file or option (nothing
started, or what started has been shut down), 1 for other failures (a port in use, a backend
constructor that raised).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import Any

from . import __version__
from ._concurrency import new_event_loop
from .clisummary import startup_summary
from .clitarget import DEFAULT_HOST, DEFAULT_PORT
from .clitarget import _CLIError as _CLIError
from .clitarget import _exit_code as _exit_code
from .clitarget import _Target as _Target
from .clitarget import _traceback as _traceback
from .config import BackendConfig, ServerName
from .context import LOG_FORMAT, install_log_context
from .exceptions import BindError
from .serve import Serve

__all__ = ["main"]

logger = logging.getLogger(__name__)

_WORKER_ENV = "AIOSERVE_CLI_WORKER"
# What requests in flight get at a signal without --timeout-graceful-shutdown, with --workers
# (in one process: the longest graceful_shutdown_timeout_s of the backends, this by default).
DEFAULT_DRAIN_S = BackendConfig().graceful_shutdown_timeout_s
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


# -- one process -----------------------------------------------------------------------------------


async def _run_one(
    target: _Target,
    args: argparse.Namespace,
    address: tuple[str, int],
    server: ServerName,
    *,
    sock: socket.socket | None = None,
    signals: Sequence[signal.Signals] = _SIGNALS,
) -> int:
    """Serve ``target`` in this process until one of ``signals``; ``sock``: a socket bound by a
    supervisor (``--reload``), else the instance binds ``address``."""
    serve = target.make_serve(
        address,
        args.kv_store_path,
        _limits(args),
        server,
        access_log=args.access_log,
        debug=args.debug,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            # A second signal: the operator does not want to wait for the drain.
            print(f"aioserve: {sig.name} again; exiting now.", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
            continue
        installed.append(sig)
    try:
        started = await _until(stop, _start_and_populate(target, serve, sock))
        if started:
            print(f"aioserve is serving on {serve.url}", flush=True)
            summary = startup_summary(
                serve,
                url=str(serve.url),
                server=server,
                pid=os.getpid(),
                root_path=target.root_path,
            )
            logger.info("%s", summary)
            await stop.wait()
        # Under --reload the supervisor takes the signals and stops this process itself.
        second = " (a second signal exits at once)" if sock is None else ""
        logger.info("Shutting down%s.", second)
        return 0
    finally:
        await serve.aclose(drain_timeout_s=args.timeout_graceful_shutdown)
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _start_and_populate(
    target: _Target, serve: Serve, sock: socket.socket | None = None
) -> None:
    # Not ready (GET /-/ready answers 503) until the whole deployment is in place.
    serve.set_ready(False)
    if sock is not None:
        # A reload's new process, on the socket its supervisor holds: the deployment is built
        # before the first accept, so requests made during the restart wait in the backlog.
        await serve.start(sock=sock, before_serving=target.populate)
    else:
        try:
            await serve.start()
        except BindError as exc:
            raise _CLIError(str(exc), 1) from exc
        await target.populate(serve)
    serve.set_ready(True)


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` unless ``stop`` is set first; True if it finished (its errors propagate)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
        # Retrieve the outcome either way, so no exception is left unobserved.
        await asyncio.gather(task, stopping, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


def _serve_here(
    target: _Target,
    args: argparse.Namespace,
    address: tuple[str, int],
    server: ServerName,
    **kwargs: Any,
) -> int:
    """Run :func:`_run_one` on a new event loop: uvloop when installed (aioserve[fast]), as
    uvicorn itself would choose."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_run_one(target, args, address, server, **kwargs))


# -- entry point -----------------------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    install_log_context()  # records made before the instance starts have the tags too
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _report(exc: _CLIError) -> None:
    if exc.details:
        print(exc.details, file=sys.stderr)
    print(f"aioserve: error: {exc}", file=sys.stderr, flush=True)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _root_path(text: str) -> str:
    if text and not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"must be '' or start with '/', got {text!r}")
    return text.rstrip("/")  # '/api/' serves as '/api'; '/' as no prefix


_LIMIT_FLAGS = {
    "max_body_bytes": "max_body_bytes",
    "max_connections": "max_connections",
    "header_timeout": "header_timeout_s",
    "keep_alive_timeout": "keep_alive_timeout_s",
}


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """The HTTP options given as flags (the others keep the target's values)."""
    given = {field: getattr(args, flag) for flag, field in _LIMIT_FLAGS.items()}
    return {field: value for field, value in given.items() if value is not None}


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioserve", description="Serve Python functions and classes with aioserve."
    )
    version = f"aioserve {__version__}"
    parser.add_argument("--version", action="version", version=version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve a deployment",
        description="Serve a Serve instance, an async setup function or a TOML deployment file.",
    )
    run.add_argument("--version", action="version", version=version)
    run.add_argument("target", metavar="TARGET", help="module:attr or a path ending in .toml")
    run.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST})")
    run.add_argument(
        "--port", type=_port, default=None, help=f"port, 0 for a free one (default {DEFAULT_PORT})"
    )
    run.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default=None,
        help="HTTP server (default: the target's, else uvicorn; granian: aioserve[granian])",
    )
    run.add_argument(
        "--workers",
        type=_count,
        default=1,
        metavar="N",
        help="processes sharing the port (default 1)",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="restart when a .py file (or the TOML TARGET) changes; for development",
    )
    run.add_argument(
        "--reload-dir",
        action="append",
        default=None,
        metavar="DIR",
        dest="reload_dirs",
        help="with --reload: watch this directory (repeatable; default the current one)",
    )
    run.add_argument(
        "--root-path",
        type=_root_path,
        default=None,
        metavar="PATH",
        help="the prefix a proxy in front strips (default: the target's, else none)",
    )
    run.add_argument(
        "--debug", action="store_true", help="tracebacks in the bodies of 500 responses"
    )
    run.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one log line per request, to the aioserve.access logger (default on)",
    )
    run.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="(default info)")
    limits = run.add_argument_group("limits (default: the target's http options, else safe ones)")
    limits.add_argument("--max-body-bytes", type=_count, metavar="N", help="413 past this")
    limits.add_argument("--max-connections", type=_count, metavar="N", help="503 past this")
    limits.add_argument(
        "--header-timeout", type=_seconds, metavar="S", help="close slow or idle clients after S"
    )
    limits.add_argument(
        "--keep-alive-timeout", type=_seconds, metavar="S", help="close idle keep-alive after S"
    )
    run.add_argument(
        "--timeout-graceful-shutdown",
        type=_seconds,
        default=None,
        metavar="S",
        help="how long requests in flight may take at a signal (default: the longest "
        f"graceful_shutdown_timeout_s of the backends, {DEFAULT_DRAIN_S:g} s unless configured)",
    )
    run.add_argument(
        "--kv-store-path", default=None, metavar="PATH", help="persist the state in this file"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _cwd_on_path()
        target = _Target.load(args.target)
        target.root_path_flag = args.root_path
        address = target.address(args.host, args.port)
        server = target.server(args.server)
        from .clireload import check_reload, run_reload
        from .cliworkers import check_server, check_workers, run_workers

        check_server(server)
        check_workers(args, address)
        check_reload(args)
        # Only now: every error so far is the user's, reported before anything started.
        _setup_logging(args.log_level)
        if args.reload:
            return run_reload(args, address, server)
        if args.workers > 1:
            return run_workers(target, args, address, server)
        return _serve_here(target, args, address, server)
    except _CLIError as exc:
        _report(exc)
        return exc.code
    except KeyboardInterrupt:  # pragma: no cover - only where signal handlers cannot be set
        return 0
