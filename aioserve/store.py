"""Persistence of the control state in SQLite: ``start(kv_store_path=...)``.

The SQLite file is one serialisation of :class:`~aioserve.state.ControlState` (the TOML deployment
is the other): saved whole in one transaction after every change and loaded when an instance starts
on the same path. What can be stored is checked when a backend is created, by
:meth:`~aioserve.state.BackendRecord.of`.

:class:`AsyncStateStore` is what the event loop uses: every SQLite call runs on one thread it owns,
in call order, so a file locked by another program stalls the control call that saves, never the
requests being served. :class:`StateStore` is the same file driven synchronously (that thread runs
it; scripts and tests may too).

A file is recognised by its SQLite ``application_id`` and ``user_version`` (the schema version).
A file that is not SQLite, is corrupt, belongs to another application or has a newer schema gives a
:class:`StoreError` and is never written to. A file another connection keeps locked for longer than
``busy_timeout_s`` gives a :class:`StoreError` saying so; nothing was saved, and the next successful
save writes the whole state.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .exceptions import ConfigError, ConfigTypeError, StoreError
from .state import BackendRecord, ControlState, EndpointRecord, target_spec

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AsyncStateStore",
    "StateStore",
]

_T = TypeVar("_T")

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


def _encode(state: ControlState) -> str:
    # The on-disk shape of schema version 1; origins are not stored.
    data = {
        "backends": [
            {
                "tag": b.tag,
                "target": b.target if isinstance(b.target, str) else target_spec(b.target),
                "init_args": b.init_args,
                "config": b.config,
            }
            for b in state.backends.values()
        ],
        "endpoints": [
            {
                "name": e.name,
                "route": e.route,
                "methods": e.methods,
                "traffic": e.traffic,
                "shadows": e.shadows,
            }
            for e in state.endpoints.values()
        ],
    }
    try:
        return json.dumps(data, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"The control state cannot be stored: {exc}. Only JSON values can be stored."
        ) from exc


class _Corrupt(Exception):
    pass


def _field(item: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    value = item.get(key)
    if not isinstance(value, types):
        raise _Corrupt(f"{where}.{key} is {value!r}")
    return value


def _decode(text: str) -> ControlState:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise _Corrupt("the snapshot is not a JSON object")
    snapshot = ControlState()
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
    objects (or processes) may use one path: each load reads the last save. A call waits up to
    ``busy_timeout_s`` for a lock another connection holds on the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        if isinstance(busy_timeout_s, bool) or not isinstance(busy_timeout_s, int | float):
            raise ConfigTypeError(f"busy_timeout_s must be a number, got {busy_timeout_s!r}.")
        if not busy_timeout_s >= 0:
            raise ConfigError(f"busy_timeout_s must be a number >= 0, got {busy_timeout_s!r}.")
        self.path = Path(path)
        self.busy_timeout_s = float(busy_timeout_s)
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

    def load(self) -> ControlState | None:
        """The saved state, or None for a new or empty file.

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
                raise self._failed(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        if row is None:
            return None
        try:
            return _decode(row[0])
        except (ValueError, TypeError, _Corrupt) as exc:
            raise self._corrupt(exc) from None

    def save(self, state: ControlState) -> None:
        """Replace the saved state, atomically (one transaction)."""
        self._write(_encode(state))

    def close(self) -> None:
        """Close the file. Idempotent; a closed store cannot be used again."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    # -- internals ------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
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
                raise self._failed(exc) from exc
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    def _connect(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"The state store {str(self.path)!r} is closed.")
        self._check_header()
        if self._conn is None:
            try:
                self._conn = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
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

    def _failed(self, exc: sqlite3.DatabaseError) -> StoreError:
        if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return StoreError(
                f"The state file {str(self.path)!r} stayed locked by another connection for "
                f"longer than the busy timeout of {self.busy_timeout_s:g} s ({exc}), so the state "
                f"was not read or saved. Stop the program that holds it, or pass another "
                f"kv_store_path."
            )
        return self._corrupt(exc)

    def _corrupt(self, exc: BaseException) -> StoreError:
        return StoreError(
            f"The state file {str(self.path)!r} is corrupt: {exc}. It was left untouched; move "
            f"it away or pass another kv_store_path."
        )


# -- the file, from the event loop ----------------------------------------------------------------


class AsyncStateStore:
    """A :class:`StateStore` used from the event loop: ``await load()``, ``await save(state)``,
    ``await aclose()``. Nothing of SQLite runs on the loop.

    Every call runs on one worker thread the store owns (started on first use), in call order.
    Saves are whole states, so the latest wins: a save that waits while another is written is
    skipped when a later save has written a newer state by the time its turn comes, and returns
    then. A save returns once a state at least as new as its own is in the file, or raises
    :class:`StoreError` (a locked file after ``busy_timeout_s``, a foreign or corrupt file, a
    closed store); a failed save changes nothing in the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 10.0) -> None:
        self._file = StateStore(path, busy_timeout_s=busy_timeout_s)
        self._executor: ThreadPoolExecutor | None = None
        self._turn = asyncio.Lock()  # one save at a time decides what to write
        self._latest = ""
        self._requested = 0  # number of the latest save asked for
        self._written = 0  # number of the latest save in the file
        self._closed = False

    @property
    def path(self) -> Path:
        """The state file."""
        return self._file.path

    @property
    def busy_timeout_s(self) -> float:
        """How long a call waits for a lock another connection holds on the file."""
        return self._file.busy_timeout_s

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncStateStore {str(self.path)!r} {state}>"

    async def __aenter__(self) -> AsyncStateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def load(self) -> ControlState | None:
        """The saved state, or None for a new or empty file (see :meth:`StateStore.load`)."""
        return await self._run(self._file.load)

    async def save(self, state: ControlState) -> None:
        """Replace the saved state with ``state`` as it is when this coroutine starts (a change
        made while it waits is not part of it); see the class docstring for order and errors."""
        text = _encode(state)  # JSON only, on the loop: it is the snapshot of this moment
        self._requested += 1
        mine = self._requested
        self._latest = text
        async with self._turn:
            if self._written >= mine:
                return
            text, number = self._latest, self._requested
            await self._run(self._file._write, text)
            self._written = number

    async def aclose(self) -> None:
        """Wait for the saves under way, close the file and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            self._file.close()  # never opened: nothing blocks
            return
        try:
            await asyncio.wrap_future(executor.submit(self._file.close))
        finally:
            # The worker has run everything queued before the close; it exits on its own.
            executor.shutdown(wait=False)

    async def _run(self, call: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise StoreError(f"The state store {str(self.path)!r} is closed.")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aioserve-store")
        return await asyncio.wrap_future(self._executor.submit(call, *args))
