"""The command line: ``aioserve run TARGET`` (also ``python -m aioserve run TARGET``).

Usage::

    aioserve run TARGET [--host HOST] [--port PORT] [--server uvicorn|granian] [--workers N]
                        [--log-level LEVEL] [--kv-store-path PATH]

TARGET is one of:

- ``module:attr`` naming a :class:`~aioserve.Serve` instance (started as configured; ``--host`` and
  ``--port``, when given, replace its host and port) or an ``async def setup(serve: Serve) -> None``
  (called once the instance has started, to create backends and endpoints);
- a path ending in ``.toml``: a declarative deployment (see :mod:`aioserve.deployment`).

The current directory is put on ``sys.path`` first, as uvicorn does, so
``examples.deployment:setup`` imports from where the command runs. Once the deployment is built,
one line goes to stdout::

    aioserve is serving on http://127.0.0.1:8000

SIGINT or SIGTERM shuts down gracefully and exits 0. ``--port 0`` picks a free port (the line shows
it; not with ``--workers``).

``--server`` chooses the HTTP server (default: the file's or the instance's ``server``, else
uvicorn); ``granian`` needs the ``aioserve[granian]`` extra, and says so (exit 2) without it.

``--workers N`` (N > 1) runs N processes sharing one listening socket through the server's own
process manager (uvicorn's or granian's); each process builds the same deployment on its own
``Serve`` (no server of its own, behind the shared server, which runs its lifespan). This is the
way to use more cores: one aioserve instance runs on one event loop. Backends, replicas and batch
queues are per process.

``--kv-store-path`` persists the control state (see :mod:`aioserve.store`). The TARGET's
deployment is applied only when nothing was restored; once the file holds state, the restored
state is served as it is and the TARGET's deployment is skipped (a warning says so). Not with
``--workers``, nor with a ``Serve`` instance (give that one its own ``kv_store_path``).

A TOML deployment file (its schema, and how its errors are reported as
``FILE:LINE: key.path: message``: see :mod:`aioserve.deployment`) is checked whole before anything
starts, and every problem is reported. Errors that only ``Serve`` can detect while building (a
constructor that raises, ``max_batch_size`` on a callable that does not batch) are reported the same
way after shutting down what started.

Exit codes: 0 after a signal, 2 for a bad TARGET, file or option (nothing started, or what started
has been shut down), 1 for other failures (a port in use, a backend constructor that raised).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, cast

from ._concurrency import new_event_loop
from ._importer import import_attr
from .config import HTTPOptions, ServerName
from .context import LOG_FORMAT, install_log_context
from .deployment import Deployment, load_deployment
from .exceptions import BindError, ConfigError, ConfigTypeError, DeploymentError
from .serve import Serve

__all__ = ["main"]

logger = logging.getLogger(__name__)

_WORKER_ENV = "AIOSERVE_CLI_WORKER"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 8000

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


class _CLIError(Exception):
    """An error reported on stderr as ``aioserve: error: ...``; the process exits with ``code``."""

    def __init__(self, message: str, code: int = 2, *, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details  # a traceback worth showing above the one-line message


def _exit_code(exc: BaseException) -> int:
    return 2 if isinstance(exc, ConfigError | ConfigTypeError) else 1


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


# -- targets ---------------------------------------------------------------------------------------

Setup = Callable[[Serve], Awaitable[None]]


@dataclasses.dataclass
class _Target:
    """What ``run`` serves: a TOML deployment, an async setup function, or a Serve instance."""

    spec: str
    deployment: Deployment | None = None
    setup: Setup | None = None
    instance: Serve | None = None

    @classmethod
    def load(cls, spec: str) -> _Target:
        """Resolve TARGET; :class:`_CLIError` (exit 2) when it is not something ``run`` serves."""
        if spec.endswith(".toml"):
            try:
                return cls(spec, deployment=load_deployment(spec))
            except DeploymentError as exc:
                raise _CLIError(str(exc)) from None
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise _CLIError(
                f"TARGET {spec!r} must be 'module:attr' (a Serve instance or an async setup "
                f"function) or the path of a .toml deployment file."
            )
        try:
            obj = import_attr(spec)
        except ConfigError as exc:
            raise _CLIError(f"Cannot load {spec!r}: {exc}") from None
        except Exception as exc:
            raise _CLIError(
                f"Importing {module!r} raised {type(exc).__name__}: {exc}",
                details=_traceback(exc),
            ) from None
        if isinstance(obj, Serve):
            return cls(spec, instance=obj)
        if inspect.iscoroutinefunction(obj):
            try:
                inspect.signature(obj).bind(None)
            except TypeError:
                raise _CLIError(
                    f"The setup function {spec!r} must take one argument, the Serve instance: "
                    f"'async def {attr.rpartition('.')[2]}(serve: Serve) -> None'."
                ) from None
            return cls(spec, setup=obj)
        if inspect.isclass(obj):
            what = f"the class {obj.__qualname__}"
        elif inspect.isroutine(obj):
            what = "a sync function"
        else:
            what = f"{obj!r} of type {type(obj).__name__}"
        raise _CLIError(
            f"{spec!r} is {what}. 'aioserve run module:attr' needs a Serve instance or an async "
            f"setup function 'async def setup(serve: Serve) -> None'."
        )

    def server(self, flag: ServerName | None) -> ServerName:
        """The HTTP server: the flag, else the file's or the instance's, else uvicorn."""
        if flag is not None:
            return flag
        if self.instance is not None:
            return self.instance.http_options.server
        if self.deployment is not None:
            # The file's [http] table holds valid HTTPOptions values only (checked on load).
            return cast(ServerName, self.deployment.http.get("server", "uvicorn"))
        return "uvicorn"

    @property
    def root_path(self) -> str:
        """The root_path of the file's [http] table or of the instance."""
        if self.instance is not None:
            return self.instance.http_options.root_path
        if self.deployment is not None:
            return str(self.deployment.http.get("root_path", ""))
        return ""

    def address(self, host: str | None, port: int | None) -> tuple[str, int]:
        """Where to serve: the flags, else the file's or the instance's, else the defaults."""
        given: dict[str, Any] = {}
        if self.instance is not None and self.instance.http_options.serves:
            given = {
                "host": self.instance.http_options.host,
                "port": self.instance.http_options.port,
            }
        elif self.deployment is not None:
            given = self.deployment.http
        return (
            host if host is not None else given.get("host", _DEFAULT_HOST),
            port if port is not None else given.get("port", _DEFAULT_PORT),
        )

    def make_serve(
        self,
        address: tuple[str, int] | None,
        kv_store_path: str | None,
        limits: dict[str, Any] | None = None,
        server: ServerName = "uvicorn",
    ) -> Serve:
        """The instance to run; without an address it has no server of its own (a worker).

        ``limits`` are HTTP options given on the command line; they replace the target's.
        """
        limits = limits or {}
        if self.instance is not None:
            if kv_store_path is not None:
                raise _CLIError(
                    "--kv-store-path does not apply to a Serve instance; give the instance its "
                    "own kv_store_path."
                )
            opts = self.instance.http_options
            if address is None:
                new = dataclasses.replace(opts, location="NoServer", **limits)
            else:
                host, port = address
                new = dataclasses.replace(
                    opts, host=host, port=port, location="HeadOnly", server=server, **limits
                )
            self.instance.http_options = new
            return self.instance
        if address is None:
            options = HTTPOptions(location="NoServer", root_path=self.root_path, **limits)
        else:
            host, port = address
            options = HTTPOptions(
                host=host, port=port, root_path=self.root_path, server=server, **limits
            )
        return _new_serve(options, kv_store_path)

    async def populate(self, serve: Serve) -> None:
        """Create the deployment on a started instance (nothing to do for an instance target)."""
        if self.instance is not None:
            return
        if serve.list_backends() or serve.list_endpoints():
            logger.warning(
                "State restored from the kv store (%d backends, %d endpoints); %s is not applied.",
                len(serve.list_backends()),
                len(serve.list_endpoints()),
                self.spec,
            )
            return
        if self.deployment is not None:
            try:
                await self.deployment.state.apply(serve)
            except DeploymentError as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                config = isinstance(cause, ConfigError | ConfigTypeError)
                details = "" if config else _traceback(cause)
                raise _CLIError(str(exc), _exit_code(cause), details=details) from exc
        elif self.setup is not None:
            try:
                await self.setup(serve)
            except Exception as exc:
                raise _CLIError(
                    f"The setup function {self.spec!r} raised {type(exc).__name__}: {exc}",
                    _exit_code(exc),
                    details=_traceback(exc),
                ) from exc


def _new_serve(options: HTTPOptions, kv_store_path: str | None) -> Serve:
    return Serve(http_options=options, kv_store_path=kv_store_path)


# -- one process -----------------------------------------------------------------------------------


async def _run_one(
    target: _Target,
    address: tuple[str, int],
    kv_store_path: str | None,
    limits: dict[str, Any],
    server: ServerName,
) -> int:
    serve = target.make_serve(address, kv_store_path, limits, server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            # A second signal: the operator does not want to wait for the drain.
            print(f"aioserve: {sig.name} again; exiting now.", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
            continue
        installed.append(sig)
    try:
        started = await _until(stop, _start_and_populate(target, serve))
        if started:
            print(f"aioserve is serving on {serve.url}", flush=True)
            await stop.wait()
        logger.info("Shutting down (a second signal exits at once).")
        return 0
    finally:
        await serve.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _start_and_populate(target: _Target, serve: Serve) -> None:
    # Not ready (GET /-/ready answers 503) until the whole deployment is in place.
    serve.set_ready(False)
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


def _workers(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="serve a deployment",
        description="Serve a Serve instance, an async setup function or a TOML deployment file.",
    )
    run.add_argument("target", metavar="TARGET", help="module:attr or a path ending in .toml")
    run.add_argument("--host", default=None, help=f"bind address (default {_DEFAULT_HOST})")
    run.add_argument(
        "--port", type=_port, default=None, help=f"port, 0 for a free one (default {_DEFAULT_PORT})"
    )
    run.add_argument(
        "--server",
        choices=("uvicorn", "granian"),
        default=None,
        help="HTTP server (default: the target's, else uvicorn; granian: aioserve[granian])",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes sharing the port (default 1)",
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
        default=20.0,
        metavar="S",
        help="with --workers: how long a worker waits for requests in flight (default 20)",
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
        address = target.address(args.host, args.port)
        server = target.server(args.server)
        from .cliworkers import check_server, check_workers, run_workers

        check_server(server)
        check_workers(args, address)
        # Only now: every error so far is the user's, reported before anything started.
        _setup_logging(args.log_level)
        if args.workers > 1:
            return run_workers(target, args, address, server)
        # uvloop when installed (aioserve[fast]), as uvicorn itself would choose.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(_run_one(target, address, args.kv_store_path, _limits(args), server))
    except _CLIError as exc:
        _report(exc)
        return exc.code
    except KeyboardInterrupt:  # pragma: no cover - only where signal handlers cannot be set
        return 0
