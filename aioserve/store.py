"""Persistence of the control state in SQLite: ``start(kv_store_path=...)``.

The control state is what the mutating calls build: backends (by import path, with their init args
and config), endpoints (route, methods), traffic and shadows. :class:`StateStore` keeps one
:class:`Snapshot` of it in an SQLite file, saved whole in one transaction after every change and
loaded when an instance starts on the same path.

What can be stored, and checked when a backend is created with persistence on:

- the target: an import path string (``"package.module:Name"``) that imports, or a function or class
  defined at the top level of an importable module (:func:`target_spec`). Lambdas, nested functions,
  instances and anything defined in ``__main__`` cannot be found again by another process;
- init args and ``user_config``: JSON values only (:func:`check_storable`): None, bool, int, float,
  str, list, and dict with str keys. Tuples are refused because they would come back as lists.

A file is recognised by its SQLite ``application_id`` and ``user_version`` (the schema version).
A file that is not SQLite, is corrupt, belongs to another application or has a newer schema gives a
:class:`StoreError` and is never written to.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._importer import import_attr
from .config import BackendConfig
from .exceptions import ConfigError, StoreError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "BackendRecord",
    "EndpointRecord",
    "Snapshot",
    "StateStore",
    "check_storable",
    "target_spec",
]

#: ``PRAGMA application_id`` of an aioserve state file: the bytes "aios".
APPLICATION_ID = 0x61696F73
#: ``PRAGMA user_version``: the schema version this module writes and reads.
SCHEMA_VERSION = 1

_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLE = "aioserve_state"
_SCHEMA = (
    f"CREATE TABLE {_TABLE} ("
    "id INTEGER PRIMARY KEY CHECK (id = 1), "
    "snapshot TEXT NOT NULL, "
    "saved_at REAL NOT NULL)"
)
_JSON_HELP = (
    "Only JSON values can be stored: None, bool, int, float, str, list, and dict with str keys "
    "(a tuple would come back as a list, so pass a list)."
)


# -- what can be stored ---------------------------------------------------------------------------


def target_spec(target: object) -> str:
    """The import path under which ``target`` is stored: ``"package.module:QualName"``.

    An import path string is returned as given once it imports. A function or class must be
    importable again by that name (``import_attr(spec) is target``); anything else raises
    :class:`StoreError` saying why and how to fix it.
    """
    if isinstance(target, str):
        try:
            import_attr(target)
        except ConfigError as exc:
            raise StoreError(f"The backend target {target!r} cannot be stored: {exc}") from exc
        return target
    if not (inspect.isclass(target) or inspect.isroutine(target)):
        kind = type(target).__name__
        raise StoreError(
            f"The backend target {target!r} cannot be stored: it is an instance of {kind}, which "
            f"has no import path. Pass a module-level function or class (and its init args) or "
            f"an import path 'package.module:Name'."
        )
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    name = qualname or repr(target)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise StoreError(
            f"The backend target {name} cannot be stored: it has no module and qualified name "
            f"to import it by. Pass an import path 'package.module:Name' instead."
        )
    if "<lambda>" in qualname:
        raise StoreError(
            f"The backend target {module}.{qualname} cannot be stored: a lambda has no name to "
            f"import it by. Define it with 'def' at the top level of a module, or pass its import "
            f"path 'package.module:name'."
        )
    if "<locals>" in qualname:
        raise StoreError(
            f"The backend target {module}.{qualname} cannot be stored: it is defined inside a "
            f"function, so no other process can import it. Move it to the top level of a module."
        )
    if module == "__main__":
        raise StoreError(
            f"The backend target {qualname} cannot be stored: it is defined in the __main__ "
            f"module (the script being run), which another process cannot import by that name. "
            f"Move it into a module and import it from there."
        )
    spec = f"{module}:{qualname}"
    try:
        found = import_attr(spec)
    except ConfigError as exc:
        raise StoreError(
            f"The backend target {name} cannot be stored: {spec!r} does not import ({exc})."
        ) from exc
    if found is not target:
        raise StoreError(
            f"The backend target {name} cannot be stored: {spec!r} imports a different object "
            f"(the name was rebound, or a decorator did not keep __module__ and __qualname__). "
            f"Pass an import path 'package.module:Name' that names it."
        )
    return spec


def check_storable(value: object, what: str) -> None:
    """Raise :class:`StoreError` naming ``what`` unless ``value`` round-trips through JSON."""
    problem = _json_problem(value, "")
    if problem is not None:
        where, description = problem
        at = f" at {where}" if where else ""
        raise StoreError(f"{what} cannot be stored: the value{at} is {description}. {_JSON_HELP}")


def _json_problem(value: object, where: str) -> tuple[str, str] | None:
    kind = type(value)
    # Exact types: a subclass (IntEnum, OrderedDict, a str subclass) would come back as its base.
    if value is None or kind in (bool, int, float, str):
        return None
    if isinstance(value, list) and kind is list:
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict) and kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{where}", f"a dict with the non-str key {key!r}"
            problem = _json_problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if kind is tuple:
        return where, f"the tuple {value!r}"
    return where, f"{value!r} of type {kind.__name__}"


# -- records --------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackendRecord:
    """A backend as stored: its tag, target import path, init args and config fields."""

    tag: str
    target: str
    init_args: list[Any] = dataclasses.field(default_factory=list)
    #: The BackendConfig fields as given (``max_concurrent_queries`` unresolved), user_config too.
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        tag: str,
        target: object,
        init_args: Sequence[Any] = (),
        config: BackendConfig | Mapping[str, Any] | None = None,
    ) -> BackendRecord:
        """The record of a backend about to be created; :class:`StoreError` if it cannot be."""
        try:
            spec = target_spec(target)
        except StoreError as exc:
            raise StoreError(f"Backend {tag!r} cannot be persisted. {exc}") from exc
        args = list(init_args)
        check_storable(args, f"The init args of backend {tag!r}")
        fields = BackendConfig.coerce(config).to_dict()
        check_storable(fields["user_config"], f"The user_config of backend {tag!r}")
        return cls(tag=tag, target=spec, init_args=args, config=fields)


@dataclasses.dataclass
class EndpointRecord:
    """An endpoint as stored: name, route, methods, traffic and shadows."""

    name: str
    route: str | None = None
    methods: list[str] = dataclasses.field(default_factory=lambda: ["GET"])
    traffic: dict[str, float] = dataclasses.field(default_factory=dict)
    shadows: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_info(cls, name: str, info: Mapping[str, Any]) -> EndpointRecord:
        """The record of one entry of ``Serve.list_endpoints()``."""
        return cls(
            name=name,
            route=info.get("route"),
            methods=list(info.get("methods", ["GET"])),
            traffic=dict(info.get("traffic", {})),
            shadows=dict(info.get("shadows", {})),
        )


@dataclasses.dataclass
class Snapshot:
    """The whole control state: backends and endpoints, each in creation order."""

    backends: dict[str, BackendRecord] = dataclasses.field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = dataclasses.field(default_factory=dict)


def _encode(snapshot: Snapshot) -> str:
    data = {
        "backends": [dataclasses.asdict(b) for b in snapshot.backends.values()],
        "endpoints": [dataclasses.asdict(e) for e in snapshot.endpoints.values()],
    }
    try:
        return json.dumps(data, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"The snapshot cannot be stored: {exc}. {_JSON_HELP}") from exc


class _Corrupt(Exception):
    pass


def _field(item: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    value = item.get(key)
    if not isinstance(value, types):
        raise _Corrupt(f"{where}.{key} is {value!r}")
    return value


def _decode(text: str) -> Snapshot:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise _Corrupt("the snapshot is not a JSON object")
    snapshot = Snapshot()
    backends = data.get("backends")
    endpoints = data.get("endpoints")
    if not isinstance(backends, list) or not isinstance(endpoints, list):
        raise _Corrupt("the snapshot has no 'backends' and 'endpoints' lists")
    for i, item in enumerate(backends):
        where = f"backends[{i}]"
        if not isinstance(item, dict):
            raise _Corrupt(f"{where} is {item!r}")
        record = BackendRecord(
            tag=_field(item, "tag", str, where),
            target=_field(item, "target", str, where),
            init_args=_field(item, "init_args", list, where),
            config=_field(item, "config", dict, where),
        )
        if record.tag in snapshot.backends:
            raise _Corrupt(f"backend {record.tag!r} appears twice")
        snapshot.backends[record.tag] = record
    for i, item in enumerate(endpoints):
        where = f"endpoints[{i}]"
        if not isinstance(item, dict):
            raise _Corrupt(f"{where} is {item!r}")
        endpoint = EndpointRecord(
            name=_field(item, "name", str, where),
            route=_field(item, "route", (str, type(None)), where),
            methods=_field(item, "methods", list, where),
            traffic=_field(item, "traffic", dict, where),
            shadows=_field(item, "shadows", dict, where),
        )
        if endpoint.name in snapshot.endpoints:
            raise _Corrupt(f"endpoint {endpoint.name!r} appears twice")
        snapshot.endpoints[endpoint.name] = endpoint
    return snapshot


# -- the file -------------------------------------------------------------------------------------


class StateStore:
    """One SQLite state file. Synchronous and thread-safe; each call is one short transaction.

    The file is opened on first use, so making a StateStore touches nothing. Several StateStore
    objects (or processes) may use one path: each load reads the last save.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._conn is not None else "unopened"
        return f"<StateStore {str(self.path)!r} {state}>"

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def load(self) -> Snapshot | None:
        """The saved snapshot, or None for a new or empty file.

        Raises :class:`StoreError` (and leaves the file untouched) if the file is not SQLite, is
        corrupt, belongs to another application or was written by a newer aioserve.
        """
        with self._lock:
            if self._conn is None and not self._closed and not self.path.exists():
                return None  # nothing saved yet; do not create the file just to read it
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                if not self._check(conn):
                    return None
                row = conn.execute(f"SELECT snapshot FROM {_TABLE} WHERE id = 1").fetchone()
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        if row is None:
            return None
        try:
            return _decode(row[0])
        except (ValueError, TypeError, _Corrupt) as exc:
            raise self._corrupt(exc) from None

    def save(self, snapshot: Snapshot) -> None:
        """Replace the saved snapshot, atomically (one transaction)."""
        text = _encode(snapshot)
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                if not self._check(conn):
                    # A new, empty database: make it ours.
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute(_SCHEMA)
                conn.execute(
                    f"INSERT OR REPLACE INTO {_TABLE} (id, snapshot, saved_at) VALUES (1, ?, ?)",
                    (text, time.time()),
                )
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise self._corrupt(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close the file. Idempotent; a closed store cannot be used again."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    # -- internals ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"The state store {str(self.path)!r} is closed.")
        self._check_header()
        if self._conn is None:
            try:
                self._conn = sqlite3.connect(
                    self.path, timeout=10.0, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise StoreError(f"Cannot open the state file {str(self.path)!r}: {exc}.") from exc
        return self._conn

    def _check_header(self) -> None:
        # sqlite3 would happily open anything; refuse a non-SQLite file before it does.
        try:
            with open(self.path, "rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise StoreError(
                f"The state file {str(self.path)!r} is a directory; pass the path of a file."
            ) from None
        except OSError as exc:
            raise StoreError(f"Cannot read the state file {str(self.path)!r}: {exc}.") from exc
        if header and header != _SQLITE_MAGIC:
            raise StoreError(
                f"{str(self.path)!r} is not an aioserve state file: it is not an SQLite database. "
                f"It was left untouched; pass another kv_store_path or move the file away."
            )

    def _check(self, conn: sqlite3.Connection) -> bool:
        """True if the file holds our schema, False if it is an empty database; else raise."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master ORDER BY name")]
        where = str(self.path)
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The state file {where!r} has schema version {version}, newer than this "
                    f"aioserve reads ({SCHEMA_VERSION}). Upgrade aioserve or use another file; "
                    f"it was left untouched."
                )
            if version < 1 or _TABLE not in names:
                raise StoreError(
                    f"The state file {where!r} is damaged: it has aioserve's id but not its "
                    f"table (schema version {version}). It was left untouched; move it away."
                )
            return True
        if app_id == 0 and version == 0 and not names:
            return False
        tables = ", ".join(map(repr, names)) or "none"
        raise StoreError(
            f"{where!r} is not an aioserve state file: it is an SQLite database of another "
            f"application (application_id {app_id}, tables {tables}). It was left untouched; "
            f"pass another kv_store_path."
        )

    def _corrupt(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"The state file {str(self.path)!r} is corrupt: {exc}. It was left untouched; move "
            f"it away or pass another kv_store_path."
        )
