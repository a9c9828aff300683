"""The command line: ``aioserve run TARGET`` (also ``python -m aioserve run TARGET``).

Usage::

    aioserve run TARGET [--host HOST] [--port PORT] [--workers N] [--log-level LEVEL]
                        [--kv-store-path PATH]

TARGET is one of:

- ``module:attr`` naming a :class:`~aioserve.Serve` instance (started as configured; ``--host`` and
  ``--port``, when given, replace its host and port) or an ``async def setup(serve: Serve) -> None``
  (called once the instance has started, to create backends and endpoints);
- a path ending in ``.toml``: a declarative deployment, described below.

The current directory is put on ``sys.path`` first, as uvicorn does, so
``examples.deployment:setup`` imports from where the command runs. Once the deployment is built,
one line goes to stdout::

    aioserve is serving on http://127.0.0.1:8000

SIGINT or SIGTERM shuts down gracefully and exits 0. ``--port 0`` picks a free port (the line shows
it; not with ``--workers``).

``--workers N`` (N > 1) runs N processes sharing one listening socket through uvicorn's process
manager; each process builds the same deployment on its own ``Serve`` (no server of its own,
behind the shared uvicorn). This is the way to use more cores: one aioserve instance runs on one
event loop. Backends, replicas and batch queues are per process.

``--kv-store-path`` persists the control state (see :mod:`aioserve.store`). The TARGET's
deployment is applied only when nothing was restored; once the file holds state, the restored
state is served as it is and the TARGET's deployment is skipped (a warning says so). Not with
``--workers``, nor with a ``Serve`` instance (give that one its own ``kv_store_path``).

The TOML deployment file (read with the stdlib ``tomllib``)::

    [http]                      # optional; --host/--port override host and port
    host = "127.0.0.1"
    port = 8000
    root_path = ""

    [[backends]]                # any number
    tag = "greeter"             # required, unique
    target = "pkg.module:Name"  # required: a function or class, by import path
    init_args = ["hello"]       # optional: constructor arguments of a class
    [backends.config]           # optional: BackendConfig fields
    num_replicas = 2
    user_config = { punctuation = "!" }

    [[endpoints]]               # any number
    name = "greet"              # required, unique
    backend = "greeter"         # optional: all traffic to one backend ...
    route = "/greet"            # optional: without it the endpoint is reachable by handle only
    methods = ["GET", "POST"]   # optional, default ["GET"]
    traffic = { greeter = 1.0 } # ... or a split by weight (not both)
    shadows = { other = 0.1 }   # optional: backend -> proportion of requests copied to it

The whole file is checked before anything starts: unknown keys, wrong types, missing required
keys, bad config values, unknown backends in ``backend``/``traffic``/``shadows``, weights not
summing to 1.
Each error is reported as ``FILE:LINE: key.path: message`` (for example
``deployment.toml:14: backends[1].config.num_replicas: num_replicas must be >= 1, got 0.``); array
indexes count from 0. tomllib gives no positions, so the line is found by scanning the text for the
key: best effort (the line of the nearest enclosing key when the key itself is not found). Errors
that only ``Serve`` can detect while building (a constructor that raises, ``max_batch_size`` on a
callable that does not batch) are reported the same way after shutting down what started.

Exit codes: 0 after a signal, 2 for a bad TARGET, file or option (nothing started, or what started
has been shut down), 1 for other failures (a port in use, a backend constructor that raised).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import tomllib
import traceback
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn

from .config import BackendConfig, HTTPOptions
from .exceptions import BindError, ConfigError, ConfigTypeError, ServeError
from .policy import validate_shadow_proportion, validate_traffic
from .replica import import_attr
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


# -- locating keys in a TOML text ------------------------------------------------------------------

KeyPath = tuple[str | int, ...]

_BARE = r"[A-Za-z0-9_-]+"
_BASIC = r'"(?:[^"\\]|\\.)*"'
_LITERAL = r"'[^']*'"
_KEY_PART = f"(?:{_BARE}|{_BASIC}|{_LITERAL})"
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(rf"^\s*({_DOTTED})\s*=(.*)$")
_INLINE_KEY_RE = re.compile(rf"[{{,]\s*({_KEY_PART})\s*=")
_PART_RE = re.compile(_KEY_PART)


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for token in _PART_RE.findall(dotted):
        if token.startswith('"'):
            try:
                parts.append(json.loads(token))
            except ValueError:
                parts.append(token[1:-1])
        elif token.startswith("'"):
            parts.append(token[1:-1])
        else:
            parts.append(token)
    return parts


def _format_key_path(path: KeyPath) -> str:
    """``("backends", 1, "config", "num_replicas")`` -> ``backends[1].config.num_replicas``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if re.fullmatch(_BARE, part) else json.dumps(part)
            out += f".{text}" if out else text
    return out


class _KeyLines:
    """Best-effort map from key paths to the line that defines them (tomllib has no positions)."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        self._arrays: dict[KeyPath, int] = {}  # array-of-tables path -> current index
        table: KeyPath = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            header = _HEADER_RE.match(line)
            if header is not None:
                table = self._header(header.group(1) == "[[", _key_parts(header.group(2)), number)
                continue
            key = _KEY_RE.match(line)
            if key is None:
                continue
            path = table + tuple(_key_parts(key.group(1)))
            self._lines.setdefault(path, number)
            value = key.group(2)
            for quote in ('"""', "'''"):
                if value.count(quote) % 2 == 1:
                    in_multiline = quote
            if value.lstrip().startswith("{"):
                for inner in _INLINE_KEY_RE.finditer(value):
                    self._lines.setdefault(path + tuple(_key_parts(inner.group(1))), number)

    def _resolve(self, parts: list[str]) -> KeyPath:
        out: list[str | int] = []
        for part in parts:
            out.append(part)
            index = self._arrays.get(tuple(out))
            if index is not None:
                out.append(index)
        return tuple(out)

    def _header(self, is_array: bool, parts: list[str], number: int) -> KeyPath:
        if not is_array:
            path = self._resolve(parts)
            self._lines.setdefault(path, number)
            return path
        key = (*self._resolve(parts[:-1]), parts[-1])
        index = self._arrays.get(key, -1) + 1
        self._arrays[key] = index
        self._lines.setdefault(key, number)
        self._lines.setdefault((*key, index), number)
        return (*key, index)

    def find(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest enclosing key that was found."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


# -- the TOML deployment ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BackendSpec:
    path: KeyPath
    tag: str
    target: str
    init_args: list[Any]
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _EndpointSpec:
    path: KeyPath
    name: str
    backend: str | None
    route: str | None
    methods: list[str]
    traffic: dict[str, float]
    shadows: dict[str, float]


_TOP_KEYS = ("http", "backends", "endpoints")
_HTTP_KEYS = ("host", "port", "root_path")
_BACKEND_KEYS = ("tag", "target", "init_args", "config")
_ENDPOINT_KEYS = ("name", "backend", "route", "methods", "traffic", "shadows")


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"{type(value).__name__} {value!r}")


class _Deployment:
    """A validated TOML deployment file: what to create, and where each key is in the file."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = _KeyLines(text)
        self._errors: list[str] = []
        self.http: dict[str, Any] = {}
        self.backends: list[_BackendSpec] = []
        self.endpoints: list[_EndpointSpec] = []
        # Every backend tag, endpoint name and route declared, valid or not.
        self._tags: dict[str, KeyPath] = {}
        self._names: dict[str, KeyPath] = {}
        self._routes: dict[str, KeyPath] = {}
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = re.search(r"at line (\d+)", str(exc))
            where = f"{source}:{line.group(1)}" if line else source
            raise _CLIError(f"{where}: invalid TOML: {exc}") from None
        self._check(data)
        if self._errors:
            count = len(self._errors)
            head = f"{source} has {count} error{'s' if count > 1 else ''}; nothing was started."
            raise _CLIError("\n".join([head, *self._errors]))

    @classmethod
    def load(cls, spec: str) -> _Deployment:
        """Read and check the file ``spec``; :class:`_CLIError` listing every problem."""
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _CLIError(f"No such deployment file: {spec!r}.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _CLIError(f"Cannot read the deployment file {spec!r}: {exc}.") from None
        return cls(spec, text)

    def locate(self, path: KeyPath, message: str) -> str:
        """``FILE:LINE: key.path: message`` (without the line when it cannot be found)."""
        line = self._lines.find(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        return f"{where}: {_format_key_path(path)}: {message}"

    def _error(self, path: KeyPath, message: str) -> None:
        self._errors.append(self.locate(path, message))

    # -- validation -----------------------------------------------------------------------------

    def _keys(self, table: dict[str, Any], path: KeyPath, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self._error(
                    (*path, key), f"unknown key {key!r}. Known keys here: {', '.join(known)}."
                )

    def _string(
        self, table: dict[str, Any], path: KeyPath, key: str, *, required: bool
    ) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                self._error(path, f"missing required key {key!r} (a non-empty string).")
            return None
        if not isinstance(value, str) or not value:
            self._error((*path, key), f"must be a non-empty string, got {_type_name(value)}.")
            return None
        return value

    def _array_of_tables(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self._error(
                (key,), f"must be an array of tables ([[{key}]] sections), got {_type_name(value)}."
            )
            return []
        return value

    def _check(self, data: dict[str, Any]) -> None:
        self._keys(data, (), _TOP_KEYS)
        http = data.get("http", {})
        if isinstance(http, dict):
            self._check_http(http)
        else:
            self._error(("http",), f"must be a table ([http]), got {_type_name(http)}.")
        for index, table in enumerate(self._array_of_tables(data, "backends")):
            self._check_backend(("backends", index), table)
        for index, table in enumerate(self._array_of_tables(data, "endpoints")):
            self._check_endpoint(("endpoints", index), table)

    def _check_http(self, table: dict[str, Any]) -> None:
        self._keys(table, ("http",), _HTTP_KEYS)
        for key in _HTTP_KEYS:
            if key not in table:
                continue
            try:
                HTTPOptions(**{key: table[key]})
            except ServeError as exc:
                self._error(("http", key), str(exc))
            else:
                self.http[key] = table[key]

    def _check_backend(self, path: KeyPath, table: dict[str, Any]) -> None:
        ok = len(self._errors)
        self._keys(table, path, _BACKEND_KEYS)
        tag = self._string(table, path, "tag", required=True)
        target = self._string(table, path, "target", required=True)
        if tag is not None:
            other = self._tags.setdefault(tag, path)
            if other != path:
                self._error(
                    (*path, "tag"),
                    f"backend tag {tag!r} is already used by {_format_key_path(other)}.",
                )
        if target is not None:
            try:
                obj = import_attr(target)
            except ConfigError as exc:
                self._error((*path, "target"), str(exc))
            else:
                if not callable(obj):
                    self._error(
                        (*path, "target"),
                        f"{target!r} is {obj!r} of type {type(obj).__name__}, "
                        f"not a function or a class.",
                    )
        init_args = table.get("init_args", [])
        if not isinstance(init_args, list):
            self._error((*path, "init_args"), f"must be an array, got {_type_name(init_args)}.")
        config = table.get("config", {})
        if not isinstance(config, dict):
            self._error((*path, "config"), f"must be a table, got {_type_name(config)}.")
            config = {}
        for key, value in config.items():
            try:
                BackendConfig.coerce({key: value})
            except ServeError as exc:
                self._error((*path, "config", key), str(exc))
        if len(self._errors) == ok:
            try:
                BackendConfig.coerce(config)
            except ServeError as exc:
                self._error((*path, "config"), str(exc))
        if len(self._errors) == ok and tag is not None and target is not None:
            self.backends.append(_BackendSpec(path, tag, target, list(init_args), dict(config)))

    def _tag(self, path: KeyPath, tag: str) -> bool:
        if tag in self._tags:
            return True
        known = ", ".join(map(repr, self._tags)) or "none"
        self._error(path, f"no backend tagged {tag!r} in this file. Backends: {known}.")
        return False

    def _check_endpoint(self, path: KeyPath, table: dict[str, Any]) -> None:
        ok = len(self._errors)
        self._keys(table, path, _ENDPOINT_KEYS)
        name = self._string(table, path, "name", required=True)
        backend = self._string(table, path, "backend", required=False)
        route = self._string(table, path, "route", required=False)
        if name is not None:
            other = self._names.setdefault(name, path)
            if other != path:
                self._error(
                    (*path, "name"),
                    f"endpoint name {name!r} is already used by {_format_key_path(other)}.",
                )
        if route is not None:
            other = self._routes.setdefault(route, path)
            if not route.startswith("/"):
                self._error((*path, "route"), f"must start with '/', got {route!r}.")
            elif other != path:
                self._error(
                    (*path, "route"),
                    f"route {route!r} is already used by {_format_key_path(other)}.",
                )
        if backend is not None:
            self._tag((*path, "backend"), backend)
        methods = table.get("methods", ["GET"])
        if (
            not isinstance(methods, list)
            or not methods
            or not all(isinstance(m, str) and m for m in methods)
        ):
            self._error(
                (*path, "methods"),
                f'must be a non-empty array of strings like ["GET"], got {methods!r}.',
            )
        traffic: dict[str, float] = {}
        if "traffic" in table:
            if backend is not None:
                self._error((*path, "traffic"), "give either 'backend' or 'traffic', not both.")
            traffic = self._traffic((*path, "traffic"), table["traffic"])
        shadows = self._shadows((*path, "shadows"), table.get("shadows", {}))
        if len(self._errors) == ok and name is not None:
            self.endpoints.append(
                _EndpointSpec(path, name, backend, route, list(methods), traffic, shadows)
            )

    def _traffic(self, path: KeyPath, traffic: object) -> dict[str, float]:
        if not isinstance(traffic, dict):
            self._error(path, f"must be a table of backend = weight, got {_type_name(traffic)}.")
            return {}
        known = [self._tag((*path, tag), tag) for tag in traffic]
        if not all(known):
            return {}
        try:
            return validate_traffic(traffic, self._tags)
        except ServeError as exc:
            self._error(path, str(exc))
            return {}

    def _shadows(self, path: KeyPath, shadows: object) -> dict[str, float]:
        if not isinstance(shadows, dict):
            self._error(
                path, f"must be a table of backend = proportion, got {_type_name(shadows)}."
            )
            return {}
        out: dict[str, float] = {}
        for tag, proportion in shadows.items():
            if not self._tag((*path, tag), tag):
                continue
            try:
                out[tag] = validate_shadow_proportion(proportion)
            except ServeError as exc:
                self._error((*path, tag), str(exc))
        return out

    # -- building -------------------------------------------------------------------------------

    async def _step(self, path: KeyPath, call: Coroutine[Any, Any, None]) -> None:
        try:
            await call
        except ServeError as exc:
            details = "" if isinstance(exc, ConfigError | ConfigTypeError) else _traceback(exc)
            raise _CLIError(self.locate(path, str(exc)), _exit_code(exc), details=details) from exc

    async def build(self, serve: Serve) -> None:
        """Create the backends, then the endpoints with their traffic and shadows, in file order."""
        for b in self.backends:
            await self._step(
                b.path, serve.create_backend(b.tag, b.target, *b.init_args, config=b.config)
            )
        for e in self.endpoints:
            await self._step(
                e.path, serve.create_endpoint(e.name, e.backend, route=e.route, methods=e.methods)
            )
            if e.traffic:
                await self._step((*e.path, "traffic"), serve.set_traffic(e.name, e.traffic))
            for tag, proportion in e.shadows.items():
                await self._step(
                    (*e.path, "shadows", tag), serve.shadow_traffic(e.name, tag, proportion)
                )


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


# -- targets ---------------------------------------------------------------------------------------

Setup = Callable[[Serve], Awaitable[None]]


@dataclasses.dataclass
class _Target:
    """What ``run`` serves: a TOML deployment, an async setup function, or a Serve instance."""

    spec: str
    deployment: _Deployment | None = None
    setup: Setup | None = None
    instance: Serve | None = None

    @classmethod
    def load(cls, spec: str) -> _Target:
        """Resolve TARGET; :class:`_CLIError` (exit 2) when it is not something ``run`` serves."""
        if spec.endswith(".toml"):
            return cls(spec, deployment=_Deployment.load(spec))
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

    def make_serve(self, address: tuple[str, int] | None, kv_store_path: str | None) -> Serve:
        """The instance to run; without an address it has no server of its own (a worker)."""
        if self.instance is not None:
            if kv_store_path is not None:
                raise _CLIError(
                    "--kv-store-path does not apply to a Serve instance; give the instance its "
                    "own kv_store_path."
                )
            opts = self.instance.http_options
            if address is None:
                new = dataclasses.replace(opts, location="NoServer")
            else:
                host, port = address
                new = dataclasses.replace(opts, host=host, port=port, location="HeadOnly")
            self.instance.http_options = new
            return self.instance
        if address is None:
            options = HTTPOptions(location="NoServer", root_path=self.root_path)
        else:
            host, port = address
            options = HTTPOptions(host=host, port=port, root_path=self.root_path)
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
            await self.deployment.build(serve)
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


async def _run_one(target: _Target, address: tuple[str, int], kv_store_path: str | None) -> int:
    serve = target.make_serve(address, kv_store_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on this platform
            continue
        installed.append(sig)
    try:
        started = await _until(stop, _start_and_populate(target, serve))
        if started:
            print(f"aioserve is serving on {serve.url}", flush=True)
            await stop.wait()
        logger.info("Shutting down.")
        return 0
    finally:
        await serve.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _start_and_populate(target: _Target, serve: Serve) -> None:
    try:
        await serve.start()
    except BindError as exc:
        raise _CLIError(str(exc), 1) from exc
    await target.populate(serve)


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


# -- worker processes ------------------------------------------------------------------------------


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

    def __repr__(self) -> str:
        return f"<aioserve worker {os.getpid()} {self._settings['target']!r}>"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self._serve is None:
            raise RuntimeError("The aioserve worker got a request before its lifespan startup.")
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
                    await self._serve.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> Serve:
        target = _Target.load(self._settings["target"])
        serve = target.make_serve(None, None)
        try:
            await serve.start()
            await target.populate(serve)
        except BaseException:
            await serve.aclose()
            raise
        return serve


def _worker_app() -> _WorkerApp:
    """uvicorn's app factory in each worker process (settings come from the environment)."""
    settings = json.loads(os.environ[_WORKER_ENV])
    _setup_logging(settings["log_level"])
    _cwd_on_path()
    return _WorkerApp(settings)


def _check_workers(args: argparse.Namespace, address: tuple[str, int]) -> None:
    if args.workers == 1:
        return
    if address[1] == 0:
        raise _CLIError("--port 0 cannot be used with --workers; give a port number.")
    if args.kv_store_path is not None:
        raise _CLIError(
            "--kv-store-path cannot be used with --workers: the processes would overwrite each "
            "other's state."
        )


def _run_workers(target: _Target, args: argparse.Namespace, address: tuple[str, int]) -> int:
    host, port = address
    display = f"[{host}]" if ":" in host else host
    watcher = _ReadyWatcher(args.workers, f"http://{display}:{port}")
    settings = {
        "target": str(Path(target.spec).resolve()) if target.deployment else target.spec,
        "log_level": args.log_level,
        "notify_port": watcher.port,
        "token": watcher.token,
    }
    os.environ[_WORKER_ENV] = json.dumps(settings)
    watcher.start()
    try:
        uvicorn.run(
            "aioserve.cli:_worker_app",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            lifespan="on",
            log_config=None,
            log_level=args.log_level,
            access_log=False,
            root_path=target.root_path,
            timeout_graceful_shutdown=5,
        )
    finally:
        watcher.close()
        os.environ.pop(_WORKER_ENV, None)
    return watcher.exit_code


# -- entry point -----------------------------------------------------------------------------------


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes sharing the port (default 1)",
    )
    run.add_argument("--log-level", choices=_LOG_LEVELS, default="info", help="(default info)")
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
        _check_workers(args, address)
        # Only now: every error so far is the user's, reported before anything started.
        _setup_logging(args.log_level)
        if args.workers > 1:
            return _run_workers(target, args, address)
        return asyncio.run(_run_one(target, address, args.kv_store_path))
    except _CLIError as exc:
        _report(exc)
        return exc.code
    except KeyboardInterrupt:  # pragma: no cover - only where signal handlers cannot be set
        return 0
