"""``aioserve run --reload``: restart the server process when the code changes (development).

This is uvicorn's reloader (``uvicorn.supervisors.ChangeReload``: watchfiles when installed,
else polling ``*.py`` files every 0.25 s). The supervising process binds the port once and hands
the socket to each server process it starts, so a request made while the server restarts waits in
the listen backlog instead of being refused. Each server process loads the TARGET afresh and
serves it as ``aioserve run`` without ``--reload`` does (the same flags); at a change the
supervisor stops it with SIGTERM (it drains, as at any SIGTERM) and starts a new one. A server
process that fails (an edit with a syntax error) reports its error, and the next change starts a
new one. Ctrl-C stops the supervisor, which stops the server process.

What is watched: ``*.py`` files under the current directory, or under each ``--reload-dir``; and
a TOML TARGET itself. The supervising process loads the TARGET once, before anything starts, to
check it (a bad TARGET exits 2, as without ``--reload``) and to learn its address. Not with
``--workers`` (uvicorn's reloader runs one server process); with ``--server granian`` too.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from uvicorn.supervisors import ChangeReload
from uvicorn.supervisors.basereload import BaseReload
from uvicorn.supervisors.statreload import StatReload

from .cli import _CLIError, _cwd_on_path, _report, _serve_here, _setup_logging, _Target
from .config import ServerName
from .exceptions import BindError
from .servers import BACKLOG, bind

__all__ = ["check_reload", "run_reload"]

logger = logging.getLogger("aioserve.cli")


def check_reload(args: argparse.Namespace) -> None:
    """Refuse what ``--reload`` cannot do (exit 2), before anything starts."""
    if not args.reload:
        if args.reload_dirs:
            raise _CLIError("--reload-dir applies only with --reload; add --reload.")
        return
    if args.workers > 1:
        raise _CLIError(
            f"--reload cannot be used with --workers {args.workers}: the reloader restarts one "
            f"server process. Use --reload while developing and --workers in production."
        )
    for directory in args.reload_dirs or ():
        if not Path(directory).is_dir():
            raise _CLIError(f"--reload-dir {directory!r} is not a directory.")


def _reloader(files: list[Path]) -> type[BaseReload]:
    """uvicorn's reloader; when it polls (no watchfiles), one that also polls ``files``."""
    if not files or not issubclass(ChangeReload, StatReload):
        return ChangeReload

    class StatReloadWithFiles(StatReload):
        def iter_py_files(self) -> Iterator[Path]:
            yield from super().iter_py_files()
            yield from files

    return StatReloadWithFiles


def run_reload(args: argparse.Namespace, address: tuple[str, int], server: ServerName) -> int:
    """Supervise server processes until SIGINT/SIGTERM; 0 then, 1 if the port cannot be bound."""
    host, port = address
    try:
        sock = bind(host, port)
    except BindError as exc:
        raise _CLIError(str(exc), 1) from exc
    sock.listen(BACKLOG)  # from now on, connections wait for a server process to accept them
    dirs = [str(Path(d).resolve()) for d in args.reload_dirs or [os.getcwd()]]
    files: list[Path] = []
    includes: list[str] = []
    if args.target.endswith(".toml"):
        toml = Path(args.target).resolve()
        files.append(toml)
        if not issubclass(ChangeReload, StatReload):  # watchfiles: a pattern and its directory
            includes.append(toml.name)
            dirs.append(str(toml.parent))
    config = uvicorn.Config(
        "aioserve.cli:main",  # never loaded: the reloader's target serves instead
        reload=True,
        reload_dirs=dirs,
        reload_includes=includes or None,
        log_config=None,
        log_level=args.log_level,
    )
    child = functools.partial(_serve_reloaded, args, address, server)
    _reloader(files)(config, target=child, sockets=[sock]).run()
    return 0


def _serve_reloaded(
    args: argparse.Namespace,
    address: tuple[str, int],
    server: ServerName,
    *,
    sockets: list[socket.socket],
) -> None:
    """One server process of the reloader: load the TARGET afresh and serve it on the socket."""
    # The supervisor stops this process with SIGTERM; a Ctrl-C in the terminal reaches both
    # processes, and the supervisor's SIGTERM would then read as a second, impatient signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _setup_logging(args.log_level)
    _cwd_on_path()
    try:
        target = _Target.load(args.target)
        target.root_path_flag = args.root_path
        code = _serve_here(
            target, args, address, server, sock=sockets[0], signals=(signal.SIGTERM,)
        )
    except _CLIError as exc:
        _report(exc)
        code = exc.code
    if code:
        logger.warning("The server process exited with %d; a change to a file restarts it.", code)
    sys.exit(code)
