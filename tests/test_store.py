"""The SQLite state store: round trips, files that are not ours, locked files, and the async store
that keeps SQLite off the event loop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from _sample_backends import Greeter, shout

from aioserve import ServeError, StoreError
from aioserve.state import BackendRecord, ControlState, EndpointRecord
from aioserve.store import APPLICATION_ID, SCHEMA_VERSION, AsyncStateStore, StateStore


def _snapshot() -> ControlState:
    greeter = BackendRecord.of(
        "greeter",
        Greeter,
        ["bonjour"],
        {"num_replicas": 2, "user_config": {"punctuation": "!", "sizes": [1, 2.5, None]}},
    )
    shouter = BackendRecord.of("shout", "_sample_backends:shout")
    return ControlState(
        backends={"greeter": greeter, "shout": shouter},
        endpoints={
            "greet": EndpointRecord(
                "greet", "/greet", ["GET", "POST"], {"greeter": 0.25, "shout": 0.75}, {"shout": 0.1}
            ),
            "headless": EndpointRecord("headless"),
        },
    )


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with StateStore(tmp_path / "state.db") as s:
        yield s


# -- the file -------------------------------------------------------------------------------------


def test_a_fresh_path_loads_none_then_round_trips(store: StateStore) -> None:
    assert store.load() is None
    assert not store.path.exists()  # loading creates nothing
    snapshot = _snapshot()
    store.save(snapshot)
    loaded = store.load()
    assert loaded == snapshot
    assert loaded is not None
    assert list(loaded.backends) == ["greeter", "shout"]  # creation order kept
    assert list(loaded.endpoints) == ["greet", "headless"]
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_save_replaces_the_previous_snapshot(store: StateStore) -> None:
    store.save(_snapshot())
    smaller = ControlState(backends={"shout": BackendRecord.of("shout", shout)})
    store.save(smaller)
    assert store.load() == smaller
    store.save(ControlState())
    assert store.load() == ControlState()


def test_two_stores_on_one_path_see_each_others_saves(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with StateStore(path) as first, StateStore(path) as second:
        first.save(_snapshot())
        assert second.load() == _snapshot()
        second.save(ControlState())
        assert first.load() == ControlState()


def test_saves_from_threads_are_atomic(store: StateStore) -> None:
    snapshots = [
        ControlState(backends={f"b{i}": BackendRecord.of(f"b{i}", shout)}) for i in range(8)
    ]
    threads = [threading.Thread(target=store.save, args=(s,)) for s in snapshots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load() in snapshots


def _refused(path: Path, needle: str) -> None:
    before = path.read_bytes()
    for call in (lambda s: s.load(), lambda s: s.save(_snapshot())):
        with StateStore(path) as s, pytest.raises(StoreError) as info:
            call(s)
        assert needle in str(info.value), str(info.value)
        assert "left untouched" in str(info.value)
        assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_random_bytes_are_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "random.db"
    path.write_bytes(os.urandom(4096))
    _refused(path, "is not an aioserve state file: it is not an SQLite database")


def test_a_text_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my precious notes\n")
    _refused(path, "not an SQLite database")


def test_another_applications_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    _refused(path, "SQLite database of another application")


def test_a_file_with_another_application_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other-id.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.commit()
    conn.close()
    _refused(path, "application_id 1234")


def test_a_newer_schema_is_refused_and_left_untouched(store: StateStore) -> None:
    store.save(_snapshot())
    store.close()
    conn = sqlite3.connect(store.path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    _refused(store.path, f"schema version {SCHEMA_VERSION + 1}, newer")


def test_damaged_pages_are_refused_and_left_untouched(store: StateStore) -> None:
    store.save(_snapshot())
    store.close()
    data = bytearray(store.path.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # keep the header, wreck the pages
    store.path.write_bytes(bytes(data))
    _refused(store.path, "is corrupt")


def test_a_damaged_snapshot_is_refused(store: StateStore) -> None:
    store.save(_snapshot())
    conn = sqlite3.connect(store.path)
    conn.execute(
        'UPDATE aioserve_state SET snapshot = \'{"backends": [{"tag": 1}], "endpoints": []}\''
    )
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match=r"is corrupt: backends\[0\]\.tag is 1"):
        store.load()


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with StateStore(tmp_path) as s, pytest.raises(StoreError, match="is a directory"):
        s.load()


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "x.db")
    s.close()
    s.close()  # idempotent
    assert "closed" in repr(s)
    with pytest.raises(StoreError, match="is closed"):
        s.load()


def test_a_file_locked_past_the_busy_timeout_is_a_clear_error(
    tmp_path: Path, sqlite_lock: Any
) -> None:
    path = tmp_path / "locked.db"
    with StateStore(path, busy_timeout_s=0) as s:
        s.save(_snapshot())
        with sqlite_lock(path):
            for call in (s.load, lambda: s.save(ControlState())):
                with pytest.raises(StoreError) as info:
                    call()
                message = str(info.value)
                assert "stayed locked by another connection" in message
                assert "busy timeout of 0 s" in message
                assert "corrupt" not in message
        assert s.load() == _snapshot()  # nothing was written


@pytest.mark.parametrize(
    ("value", "error"), [(-1, "must be a number >= 0, got -1"), ("5", "must be a number, got '5'")]
)
def test_the_busy_timeout_is_checked(tmp_path: Path, value: Any, error: str) -> None:
    with pytest.raises(ServeError, match=error):
        StateStore(tmp_path / "x.db", busy_timeout_s=value)
    with pytest.raises(ServeError, match=error):
        AsyncStateStore(tmp_path / "x.db", busy_timeout_s=value)


# -- the async store ------------------------------------------------------------------------------


async def test_the_async_store_round_trips_and_closes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with AsyncStateStore(path) as store:
        assert store.path == path
        assert store.busy_timeout_s == 10.0
        assert await store.load() is None
        assert not path.exists()
        await store.save(_snapshot())
        assert await store.load() == _snapshot()
        with StateStore(path) as sync:
            assert sync.load() == _snapshot()  # the same file, the same format
    assert repr(store) == f"<AsyncStateStore {str(path)!r} closed>"
    await store.aclose()  # idempotent
    with pytest.raises(StoreError, match="is closed"):
        await store.load()
    # A store never used closes without touching anything.
    await AsyncStateStore(tmp_path / "unused.db").aclose()
    assert not (tmp_path / "unused.db").exists()


async def test_the_async_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my precious notes\n")
    async with AsyncStateStore(path) as store:
        with pytest.raises(StoreError, match="not an SQLite database"):
            await store.load()
        with pytest.raises(StoreError, match="not an SQLite database"):
            await store.save(_snapshot())
    assert path.read_text() == "my precious notes\n"


async def test_a_state_that_cannot_be_stored_is_refused_before_the_thread(tmp_path: Path) -> None:
    async with AsyncStateStore(tmp_path / "state.db") as store:
        nested = ControlState({"n": BackendRecord("n", lambda r: r)})
        with pytest.raises(StoreError, match="a lambda has no name"):
            await store.save(nested)
        unencodable = ControlState({"b": BackendRecord("b", "_sample_backends:shout", [{1j}])})
        with pytest.raises(StoreError, match="cannot be stored"):
            await store.save(unencodable)
        assert await store.load() is None


async def test_concurrent_saves_end_with_the_last_state(tmp_path: Path) -> None:
    states = [ControlState(backends={f"b{i}": BackendRecord.of(f"b{i}", shout)}) for i in range(8)]
    async with AsyncStateStore(tmp_path / "state.db") as store:
        await asyncio.gather(*(store.save(s) for s in states))
        assert await store.load() == states[-1]


async def test_a_save_writes_the_state_as_it_was_when_the_save_started(
    tmp_path: Path, sqlite_lock: Any
) -> None:
    path = tmp_path / "state.db"
    async with AsyncStateStore(path, busy_timeout_s=30) as store:
        await store.save(ControlState())
        state = _snapshot()
        with sqlite_lock(path):
            saving = asyncio.ensure_future(store.save(state))
            with pytest.raises(TimeoutError):  # the save has started, and waits for the lock
                await asyncio.wait_for(asyncio.shield(saving), 0.2)
            state.backends.clear()  # a change made meanwhile is not part of this save
        await saving
        assert await store.load() == _snapshot()


async def test_a_locked_file_stalls_the_save_not_the_loop(tmp_path: Path, sqlite_lock: Any) -> None:
    path = tmp_path / "state.db"
    loop = asyncio.get_running_loop()
    async with AsyncStateStore(path, busy_timeout_s=30) as store:
        await store.save(ControlState())
        with sqlite_lock(path):
            save = asyncio.ensure_future(store.save(_snapshot()))
            started = loop.time()
            # Run on SQLite's thread, the save waits for the lock while the loop runs on: this
            # wait ends by its own timeout. A save on the loop would block it for 30 s instead.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(save), 0.2)
            assert loop.time() - started < 5
            assert not save.done()
        await save  # the lock is gone: the save goes through
        assert await store.load() == _snapshot()


async def test_a_save_past_the_busy_timeout_raises_and_the_next_one_catches_up(
    tmp_path: Path, sqlite_lock: Any
) -> None:
    path = tmp_path / "state.db"
    async with AsyncStateStore(path, busy_timeout_s=0.05) as store:
        await store.save(ControlState())
        with (
            sqlite_lock(path),
            pytest.raises(StoreError, match="stayed locked by another connection"),
        ):
            await store.save(_snapshot())
        assert await store.load() == ControlState()  # the failed save changed nothing
        bigger = _snapshot()
        bigger.endpoints["more"] = EndpointRecord("more")
        await store.save(bigger)
        assert await store.load() == bigger


async def test_aclose_waits_for_a_save_under_way(tmp_path: Path, sqlite_lock: Any) -> None:
    path = tmp_path / "state.db"
    store = AsyncStateStore(path, busy_timeout_s=30)
    await store.save(ControlState())
    with sqlite_lock(path):
        save = asyncio.ensure_future(store.save(_snapshot()))
        closing = asyncio.ensure_future(store.aclose())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(closing), 0.2)
    await asyncio.gather(save, closing)
    with StateStore(path) as sync:
        assert sync.load() == _snapshot()
