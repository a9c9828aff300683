"""Declarative deployments: a TOML file naming the backends and endpoints to create.

``aioserve run deployment.toml`` serves one (see :mod:`aioserve.cli`); in code::

    deployment = load_deployment("deployment.toml")  # checks the whole file, starts nothing
    async with Serve(http_options=deployment.http) as serve:
        await deployment.apply(serve)

The file (read with the stdlib ``tomllib``)::

    [http]                      # optional: HTTPOptions (aioserve run --host/--port win)
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
key: best effort (the line of the nearest enclosing key when the key itself is not found).
:func:`load_deployment` raises one :class:`DeploymentError` listing every problem of the file.

Errors that only ``Serve`` can detect while building (a constructor that raises, ``max_batch_size``
on a callable that does not batch) are raised by :meth:`Deployment.apply` as a
:class:`DeploymentError` located the same way, with Serve's error as its ``__cause__``; what was
created before the failing step stays (the caller shuts the instance down).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._importer import import_attr
from .config import BackendConfig, HTTPOptions
from .exceptions import ConfigError, DeploymentError, ServeError
from .policy import validate_shadow_proportion, validate_traffic

if TYPE_CHECKING:
    from .serve import Serve

__all__ = ["BackendSpec", "Deployment", "EndpointSpec", "load_deployment"]


# -- locating keys in a TOML text ------------------------------------------------------------------

_KeyPath = tuple[str | int, ...]

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


def _format_key_path(path: _KeyPath) -> str:
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
        self._lines: dict[_KeyPath, int] = {}
        self._arrays: dict[_KeyPath, int] = {}  # array-of-tables path -> current index
        table: _KeyPath = ()
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

    def _resolve(self, parts: list[str]) -> _KeyPath:
        out: list[str | int] = []
        for part in parts:
            out.append(part)
            index = self._arrays.get(tuple(out))
            if index is not None:
                out.append(index)
        return tuple(out)

    def _header(self, is_array: bool, parts: list[str], number: int) -> _KeyPath:
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

    def find(self, path: _KeyPath) -> int | None:
        """The line of ``path``, or of its nearest enclosing key that was found."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


# -- the TOML deployment ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One checked ``[[backends]]`` table: the arguments of :meth:`Serve.create_backend`.

    ``path`` is where the table is in the file, e.g. ``("backends", 1)``.
    """

    path: _KeyPath
    tag: str
    target: str
    init_args: list[Any]
    config: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class EndpointSpec:
    """One checked ``[[endpoints]]`` table: an endpoint, its traffic (empty: the one ``backend``,
    if any) and its shadows. ``path`` is where the table is in the file."""

    path: _KeyPath
    name: str
    backend: str | None
    route: str | None
    methods: list[str]
    traffic: dict[str, float]
    shadows: dict[str, float]


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
    """A checked deployment: what to create, in file order, and where each key is in the file.

    ``Deployment(text, source=...)`` checks ``text`` (``source`` names it in error reports) and
    raises :class:`DeploymentError` listing every problem; :func:`load_deployment` reads a file.
    ``http`` holds the ``[http]`` keys the file sets (valid :class:`~aioserve.HTTPOptions` fields,
    for whoever makes the ``Serve``); ``backends`` and ``endpoints`` are :class:`BackendSpec` and
    :class:`EndpointSpec` tuples.
    """

    def __init__(self, text: str, *, source: str = "<deployment>") -> None:
        checker = _Checker(source, text)
        self.source = source
        self.http: dict[str, Any] = checker.http
        self.backends: tuple[BackendSpec, ...] = tuple(checker.backends)
        self.endpoints: tuple[EndpointSpec, ...] = tuple(checker.endpoints)
        self._lines = checker.lines

    def __repr__(self) -> str:
        return (
            f"<Deployment {self.source!r}: {len(self.backends)} backends, "
            f"{len(self.endpoints)} endpoints>"
        )

    async def apply(self, serve: Serve) -> None:
        """Create the backends, then the endpoints with their traffic and shadows, in file order,
        on the started ``serve``.

        Raises :class:`DeploymentError` for the first step ``serve`` refuses, located at its table
        or key, with ``serve``'s error as ``__cause__``; what was created before it stays.
        """
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

    async def _step(self, path: _KeyPath, call: Coroutine[Any, Any, None]) -> None:
        try:
            await call
        except ServeError as exc:
            line = _locate(self.source, self._lines, path, str(exc))
            raise DeploymentError(line, [line]) from exc


def _locate(source: str, lines: _KeyLines, path: _KeyPath, message: str) -> str:
    """``FILE:LINE: key.path: message`` (without the line when it cannot be found)."""
    line = lines.find(path)
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {_format_key_path(path)}: {message}"


_TOP_KEYS = ("http", "backends", "endpoints")
_HTTP_KEYS = ("host", "port", "root_path")
_BACKEND_KEYS = ("tag", "target", "init_args", "config")
_ENDPOINT_KEYS = ("name", "backend", "route", "methods", "traffic", "shadows")


def _type_name(value: object) -> str:
    names = {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"{type(value).__name__} {value!r}")


class _Checker:
    """Checks a TOML text, collecting every error, and keeps what is valid."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.lines = _KeyLines(text)
        self._errors: list[str] = []
        self.http: dict[str, Any] = {}
        self.backends: list[BackendSpec] = []
        self.endpoints: list[EndpointSpec] = []
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
        self._errors.append(_locate(self.source, self.lines, path, message))

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
            self.backends.append(BackendSpec(path, tag, target, list(init_args), dict(config)))

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
            self.endpoints.append(
                EndpointSpec(path, name, backend, route, list(methods), traffic, shadows)
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
