"""Declarative deployments: a TOML file naming the backends and endpoints to create.

``aioserve run deployment.toml`` serves one (see :mod:`aioserve.cli`); in code::

    deployment = load_deployment("deployment.toml")  # checks the whole file, starts nothing
    async with Serve(http_options=deployment.http) as serve:
        await deployment.state.apply(serve)

The file is one serialisation of :class:`~aioserve.state.ControlState` (the SQLite state file is
the other): ``deployment.state`` is what it declares, and the ``[http]`` table, which is not control
state, is ``deployment.http``. The file (read with the stdlib ``tomllib``)::

    [http]                      # optional: HTTPOptions (aioserve run --host/--port/--server win)
    host = "127.0.0.1"
    port = 8000
    root_path = ""
    server = "uvicorn"          # or "granian" (the aioserve[granian] extra)

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
summing to 1. Each error is reported as ``FILE:LINE: key.path: message`` (for example
``deployment.toml:14: backends[1].config.num_replicas: num_replicas must be >= 1, got 0.``); array
indexes count from 0. :func:`load_deployment` raises one :class:`DeploymentError` listing every
problem of the file.

tomllib gives no positions, so the line is looked up in the text: each line that starts a table
(``[a.b]``, ``[[a]]``) or sets a key (``a.b = ...``) is read on its own with tomllib, which decodes
its key (quoted keys included). A key path's line is the deepest table header that contains it,
then the line in that table's body that sets the longest leading part of the rest of the path; a
key inside an inline table or an array is reported at the line of the key that holds it. Limits:
lines inside multi-line strings are skipped by counting triple quotes, and a line inside a
multi-line array that reads as a table header on its own (``["x"]``) is taken for one; the error
then names a wrong line, never a wrong key path or message. Without a line, the file alone is named.

Errors that only ``Serve`` can detect while building (a constructor that raises, ``max_batch_size``
on a callable that does not batch) are raised by :meth:`ControlState.apply` as a
:class:`DeploymentError` located the same way (each item of the state carries its origin), with
Serve's error as its ``__cause__``; what was created before the failing step stays (the caller
shuts the instance down).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from ._importer import import_attr
from .config import BackendConfig, HTTPOptions
from .exceptions import ConfigError, DeploymentError, ServeError
from .policy import validate_shadow_proportion, validate_traffic
from .state import BackendRecord, ControlState, EndpointRecord

__all__ = ["Deployment", "load_deployment"]


# -- locating keys in a TOML text ------------------------------------------------------------------

_KeyPath = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _format_key_path(path: _KeyPath) -> str:
    """``("backends", 1, "config", "num_replicas")`` -> ``backends[1].config.num_replicas``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE.fullmatch(part) else json.dumps(part)
            out += f".{text}" if out else text
    return out


def _key_of(data: dict[str, Any]) -> tuple[list[str], bool]:
    """The key path of a one-statement document, and whether it ends in an array of tables."""
    parts: list[str] = []
    value: Any = data
    while isinstance(value, dict) and len(value) == 1:
        key, value = next(iter(value.items()))
        parts.append(key)
    return parts, isinstance(value, list)


class _Lines:
    """Where the tables and keys of a TOML text are, read line by line with tomllib."""

    def __init__(self, text: str) -> None:
        #: (line, resolved path, is an array-of-tables header) of each table header, in order.
        self.headers: list[tuple[int, _KeyPath, bool]] = []
        #: (line, index in headers or -1 for the root table, key parts) of each ``key = value``.
        self.keys: list[tuple[int, int, tuple[str, ...]]] = []
        counts: dict[_KeyPath, int] = {}  # array-of-tables path -> index of its current element
        quote: str | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if quote is not None:  # inside a multi-line string
                if line.count(quote) % 2 == 1:
                    quote = None
                continue
            stripped = line.strip()
            if stripped.startswith("["):
                header = _parse(line)
                if header is not None:
                    parts, is_array = _key_of(header)
                    path = self._resolve(parts, counts, is_array)
                    self.headers.append((number, path, is_array))
                    continue
            for equals in (i for i, c in enumerate(line) if c == "="):
                setting = _parse(line[:equals] + "= 0")
                if setting is not None:
                    parts, _ = _key_of(setting)
                    self.keys.append((number, len(self.headers) - 1, tuple(parts)))
                    value = line[equals + 1 :]
                    for triple in ('"""', "'''"):
                        if value.count(triple) % 2 == 1:
                            quote = triple
                    break

    @staticmethod
    def _resolve(parts: list[str], counts: dict[_KeyPath, int], is_array: bool) -> _KeyPath:
        out: list[str | int] = []
        for i, part in enumerate(parts):
            out.append(part)
            key = tuple(out)
            if is_array and i == len(parts) - 1:
                counts[key] = counts.get(key, -1) + 1
            if key in counts:
                out.append(counts[key])
        return tuple(out)

    def find(self, path: _KeyPath) -> int | None:
        """The line of ``path``, of the key holding it, or of its table (None: not found)."""
        table, depth = -1, 0
        for index, (number, header, is_array) in enumerate(self.headers):
            if header == path or (is_array and header[:-1] == path):
                return number
            if len(header) > depth and path[: len(header)] == header:
                table, depth = index, len(header)
        rest = path[depth:]
        best: tuple[int, int] | None = None  # (parts matched, line)
        for number, index, parts in self.keys:
            if index != table or not parts or tuple(rest[: len(parts)]) != parts:
                continue
            if best is None or len(parts) > best[0]:
                best = (len(parts), number)
        if best is not None:
            return best[1]
        return self.headers[table][0] if table >= 0 else None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


# -- the TOML deployment ---------------------------------------------------------------------------


def load_deployment(path: str | os.PathLike[str]) -> Deployment:
    """Read and check the deployment file at ``path``.

    Raises :class:`DeploymentError` when the file cannot be read, is not TOML, or has any problem;
    its report lists every problem, each as ``FILE:LINE: key.path: message``.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeploymentError(f"No such deployment file: {source!r}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"Cannot read the deployment file {source!r}: {exc}.") from None
    return Deployment(text, source=source)


class Deployment:
    """A checked deployment: the control state it declares, and its HTTP options.

    ``Deployment(text, source=...)`` checks ``text`` (``source`` names it in error reports) and
    raises :class:`DeploymentError` listing every problem; :func:`load_deployment` reads a file.
    ``state`` is a :class:`~aioserve.state.ControlState` in file order whose items carry their
    origin (``FILE:LINE: key.path``); create it with ``await deployment.state.apply(serve)``.
    ``http`` holds the ``[http]`` keys the file sets (valid :class:`~aioserve.HTTPOptions` fields,
    for whoever makes the ``Serve``).
    """

    def __init__(self, text: str, *, source: str = "<deployment>") -> None:
        checker = _Checker(source, text)
        self.source = source
        self.http: dict[str, Any] = checker.http
        self.state = checker.state

    def __repr__(self) -> str:
        return (
            f"<Deployment {self.source!r}: {len(self.state.backends)} backends, "
            f"{len(self.state.endpoints)} endpoints>"
        )


_TOP_KEYS = ("http", "backends", "endpoints")
_HTTP_KEYS = ("host", "port", "root_path", "server")
_BACKEND_KEYS = ("tag", "target", "init_args", "config")
_ENDPOINT_KEYS = ("name", "backend", "route", "methods", "traffic", "shadows")


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"{type(value).__name__} {value!r}")


class _Checker:
    """Checks a TOML text, collecting every error, and keeps what is valid."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = _Lines(text)
        self._errors: list[str] = []
        self.http: dict[str, Any] = {}
        self.state = ControlState()
        # Every backend tag, endpoint name and route declared, valid or not.
        self._tags: dict[str, _KeyPath] = {}
        self._names: dict[str, _KeyPath] = {}
        self._routes: dict[str, _KeyPath] = {}
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = re.search(r"at line (\d+)", str(exc))
            where = f"{source}:{line.group(1)}" if line else source
            message = f"{where}: invalid TOML: {exc}"
            raise DeploymentError(message, [message]) from None
        self._check(data)
        if self._errors:
            count = len(self._errors)
            head = f"{source} has {count} error{'s' if count > 1 else ''}; nothing was started."
            raise DeploymentError("\n".join([head, *self._errors]), self._errors)

    def _error(self, path: _KeyPath, message: str) -> None:
        self._errors.append(f"{self.origin(path)}: {message}")

    def origin(self, path: _KeyPath) -> str:
        """``FILE:LINE: key.path`` (without the line when it cannot be found)."""
        line = self.lines.find(path)
        where = f"{self.source}:{line}" if line is not None else self.source
        return f"{where}: {_format_key_path(path)}"

    # -- validation -----------------------------------------------------------------------------

    def _keys(self, table: dict[str, Any], path: _KeyPath, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self._error(
                    (*path, key), f"unknown key {key!r}. Known keys here: {', '.join(known)}."
                )

    def _string(
        self, table: dict[str, Any], path: _KeyPath, key: str, *, required: bool
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

    def _check_backend(self, path: _KeyPath, table: dict[str, Any]) -> None:
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
            self.state.backends[tag] = BackendRecord(
                tag, target, list(init_args), dict(config), origin=self.origin(path)
            )

    def _tag(self, path: _KeyPath, tag: str) -> bool:
        if tag in self._tags:
            return True
        known = ", ".join(map(repr, self._tags)) or "none"
        self._error(path, f"no backend tagged {tag!r} in this file. Backends: {known}.")
        return False

    def _check_endpoint(self, path: _KeyPath, table: dict[str, Any]) -> None:
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
            key = "backend" if backend is not None else "traffic"
            self.state.endpoints[name] = EndpointRecord(
                name,
                route,
                list(methods),
                {backend: 1.0} if backend is not None else traffic,
                shadows,
                origin=self.origin(path),
                traffic_origin=self.origin((*path, key)),
                shadow_origins={tag: self.origin((*path, "shadows", tag)) for tag in shadows},
            )

    def _traffic(self, path: _KeyPath, traffic: object) -> dict[str, float]:
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

    def _shadows(self, path: _KeyPath, shadows: object) -> dict[str, float]:
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
