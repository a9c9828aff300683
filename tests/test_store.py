"""The SQLite state store: what can be stored, round trips, and files that are not ours."""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from _sample_backends import Greeter, shout

from aioserve import BackendConfig, ServeError
from aioserve.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    BackendRecord,
    EndpointRecord,
    Snapshot,
    StateStore,
    StoreError,
    check_storable,
    target_spec,
)


def _snapshot() -> Snapshot:
    greeter = BackendRecord.of(
        "greeter",
        Greeter,
        ["bonjour"],
        {"num_replicas": 2, "user_config": {"punctuation": "!", "sizes": [1, 2.5, None]}},
    )
    shouter = BackendRecord.of("shout", "_sample_backends:shout")
    return Snapshot(
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


# -- target_spec ----------------------------------------------------------------------------------


def test_target_spec_of_module_level_classes_functions_and_import_strings() -> None:
    assert target_spec(Greeter) == "_sample_backends:Greeter"
    assert target_spec(shout) == "_sample_backends:shout"
    assert target_spec(BackendConfig) == "aioserve.config:BackendConfig"
    # An import string is kept as given once it imports, in either spelling.
    assert target_spec("_sample_backends:Greeter") == "_sample_backends:Greeter"
    assert target_spec("_sample_backends.shout") == "_sample_backends.shout"


class _Outer:
    class Inner:
        """A nested class is importable by its qualified name."""

    def method(self) -> None:
        """Bound, it is not the object its qualified name imports."""


def test_target_spec_of_a_nested_class_uses_its_qualified_name() -> None:
    assert target_spec(_Outer.Inner) == f"{__name__}:_Outer.Inner"


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        (lambda request: "hi", "a lambda has no name"),
        (Greeter(), "instance of Greeter"),
        (functools.partial(shout, "x"), "instance of partial"),
        (_Outer().method, "imports a different object"),
        ("_sample_backends:Nope", "has no attribute"),
        ("no_such_module_xyz:thing", "Cannot import module"),
    ],
    ids=["lambda", "instance", "partial", "bound-method", "missing-attr", "missing-module"],
)
def test_target_spec_rejects_what_cannot_be_imported_again(target: object, needle: str) -> None:
    with pytest.raises(StoreError, match="cannot be stored") as info:
        target_spec(target)
    assert needle in str(info.value)


def test_target_spec_rejects_nested_functions() -> None:
    def nested(request: object) -> str:
        return "hi"

    with pytest.raises(StoreError, match="defined inside a function") as info:
        target_spec(nested)
    assert "top level of a module" in str(info.value)


def test_target_spec_rejects_main_module_objects() -> None:
    def fake() -> None: ...

    fake.__module__ = "__main__"
    fake.__qualname__ = "fake"
    with pytest.raises(StoreError, match="__main__") as info:
        target_spec(fake)
    assert "Move it into a module" in str(info.value)


def test_target_spec_rejects_a_rebound_name() -> None:
    def shout() -> None: ...

    shout.__module__ = "_sample_backends"
    shout.__qualname__ = "shout"
    with pytest.raises(StoreError, match="imports a different object"):
        target_spec(shout)


def test_store_errors_are_serve_and_value_errors() -> None:
    assert issubclass(StoreError, ServeError)
    assert issubclass(StoreError, ValueError)


# -- check_storable -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "text", [], {}, [1, "a", None, {"k": [1.5, False]}], {"a": {"b": []}}],
)
def test_check_storable_accepts_json_values(value: object) -> None:
    check_storable(value, "The user_config")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ((1, 2), "the value is the tuple (1, 2)"),
        ([1, (2,)], "the value at [1] is the tuple (2,)"),
        ({"a": {1: "x"}}, "the value at ['a'] is a dict with the non-str key 1"),
        ({"a": {1, 2}}, "the value at ['a'] is {1, 2} of type set"),
        ([object], "the value at [0] is <class 'object'> of type type"),
        ([b"raw"], "the value at [0] is b'raw' of type bytes"),
    ],
)
def test_check_storable_names_what_and_where(value: object, needle: str) -> None:
    with pytest.raises(StoreError) as info:
        check_storable(value, "The init args of backend 'm'")
    message = str(info.value)
    assert message.startswith("The init args of backend 'm' cannot be stored: ")
    assert needle in message
    assert "a tuple would come back as a list" in message


def test_backend_record_checks_target_init_args_and_user_config() -> None:
    with pytest.raises(StoreError, match=r"Backend 'b' cannot be persisted.*lambda"):
        BackendRecord.of("b", lambda r: r)
    with pytest.raises(StoreError, match="init args of backend 'b'"):
        BackendRecord.of("b", Greeter, [("a", "tuple")])
    with pytest.raises(StoreError, match="user_config of backend 'b'"):
        BackendRecord.of("b", Greeter, [], {"user_config": {"when": object()}})
    record = BackendRecord.of("b", Greeter, ("hi",), BackendConfig(num_replicas=3))
    assert record.init_args == ["hi"]
    assert record.config["num_replicas"] == 3
    assert record.config["max_concurrent_queries"] is None  # stored unresolved
    assert BackendConfig.coerce(record.config) == BackendConfig(num_replicas=3)


def test_endpoint_record_from_list_endpoints_info() -> None:
    info = {"route": None, "methods": ["GET"], "traffic": {"a": 1.0}, "shadows": {"b": 0.5}}
    assert EndpointRecord.from_info("e", info) == EndpointRecord(
        "e", None, ["GET"], {"a": 1.0}, {"b": 0.5}
    )


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
    smaller = Snapshot(backends={"shout": BackendRecord.of("shout", shout)})
    store.save(smaller)
    assert store.load() == smaller
    store.save(Snapshot())
    assert store.load() == Snapshot()


def test_two_stores_on_one_path_see_each_others_saves(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with StateStore(path) as first, StateStore(path) as second:
        first.save(_snapshot())
        assert second.load() == _snapshot()
        second.save(Snapshot())
        assert first.load() == Snapshot()


def test_saves_from_threads_are_atomic(store: StateStore) -> None:
    snapshots = [Snapshot(backends={f"b{i}": BackendRecord.of(f"b{i}", shout)}) for i in range(8)]
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
