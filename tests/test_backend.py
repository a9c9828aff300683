"""Tests of backends through the public ``Serve`` API (API.md §2): creation, replicas, concurrency
limits, queueing, configuration updates, deletion and the replica context."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from _sample_backends import Gate, until_queued, wait_until

import aioserve
from aioserve import (
    BackendConfig,
    BackendError,
    Overloaded,
    ReplicaStopped,
    Serve,
    ServeError,
    ServeHandle,
    get_replica_context,
)


async def deploy(
    serve: Serve, tag: str, target: Any, *init_args: Any, config: Any = None
) -> ServeHandle:
    """Create a backend and a headless endpoint of the same name; return a handle to it."""
    await serve.create_backend(tag, target, *init_args, config=config)
    await serve.create_endpoint(tag, backend=tag)
    return serve.get_handle(tag)


@pytest.fixture
def thread_gate(serve: Serve) -> Iterator[threading.Event]:
    """A threading.Event sync handlers block on; set on teardown, before the instance drains."""
    event = threading.Event()
    yield event
    event.set()


def gated(gate: Gate) -> Any:
    """An async handler that waits at ``gate`` and returns (its replica tag, its argument)."""

    async def handler(x: Any = None) -> Any:
        return await gate.pass_through((get_replica_context().replica_tag, x))

    return handler


# -- what create_backend accepts ------------------------------------------------------------------


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


async def async_double(x: int) -> int:
    await asyncio.sleep(0)  # really suspends: this runs as a coroutine on the loop
    return 2 * x


class Scaler:
    def __init__(self, factor: int, offset: int = 0) -> None:
        self.factor = factor
        self.offset = offset

    def __call__(self, x: int) -> int:
        return x * self.factor + self.offset


class AsyncScaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0)
        return x * self.factor


@pytest.mark.parametrize(
    ("target", "init_args", "arg", "expected"),
    [
        (double, (), 4, 8),
        (async_double, (), 4, 8),
        (Scaler, (3, 1), 4, 13),
        (AsyncScaler, (5,), 4, 20),
        ("_sample_backends:Greeter", ("hi",), "bob", "hi bob"),
        ("_sample_backends.Greeter", (), "bob", "hello bob"),
        ("_sample_backends:shout", (), "bob", "BOB"),
    ],
    ids=["sync-fn", "async-fn", "sync-class", "async-class", "path-colon", "path-dot", "path-fn"],
)
async def test_create_backend_kinds(
    serve: Serve, target: Any, init_args: tuple[Any, ...], arg: Any, expected: Any
) -> None:
    handle = await deploy(serve, "b", target, *init_args)
    assert await handle.remote(arg) == expected
    assert list(serve.list_backends()) == ["b"]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((Scaler(2),), TypeError, "Scaler"),
        ((double, 1), TypeError, "double"),
        ((42,), TypeError, "42"),
        (("no_such_module_for_aioserve:Thing",), ValueError, "no_such_module_for_aioserve"),
        (("_sample_backends:Missing",), ValueError, "Missing"),
        (("_sample_backends.Missing",), ValueError, "Missing"),
        (("justaname",), ValueError, "justaname"),
        (("",), ValueError, "''"),
    ],
    ids=[
        "instance",
        "fn-with-init-args",
        "not-callable",
        "bad-module",
        "bad-attr-colon",
        "bad-attr-dot",
        "no-module",
        "empty-path",
    ],
)
async def test_create_backend_rejects_and_registers_nothing(
    serve: Serve, args: tuple[Any, ...], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await serve.create_backend("x", *args)
    assert serve.list_backends() == {}
    handle = await deploy(serve, "x", double)
    assert await handle.remote(5) == 10


async def test_duplicate_tag_is_rejected_and_keeps_the_first(serve: Serve) -> None:
    handle = await deploy(serve, "x", double)
    before = serve.list_backends()
    with pytest.raises(ValueError, match="'x'"):
        await serve.create_backend("x", triple)
    assert serve.list_backends() == before
    assert await handle.remote(5) == 10


class BrokenInit:
    def __init__(self, record: list[BaseException]) -> None:
        exc = FileNotFoundError("weights.bin is missing")
        record.append(exc)
        raise exc

    def __call__(self) -> str:
        return "never"


async def test_constructor_error_is_a_backend_error_chaining_the_original(serve: Serve) -> None:
    record: list[BaseException] = []
    with pytest.raises(BackendError) as info:
        await serve.create_backend("x", BrokenInit, record)
    assert isinstance(info.value, ServeError)
    assert "weights.bin is missing" in str(info.value)
    assert info.value.__cause__ is record[0]
    assert serve.list_backends() == {}
    handle = await deploy(serve, "x", Scaler, 2)
    assert await handle.remote(3) == 6


class FailsOnSecond:
    def __init__(self, attempts: list[int], lock: threading.Lock) -> None:
        with lock:
            attempts.append(len(attempts) + 1)
            n = attempts[-1]
        if n == 2:
            raise ValueError("replica number two failed")

    def __call__(self) -> str:
        return "ok"


async def test_one_failing_replica_registers_nothing(serve: Serve) -> None:
    attempts: list[int] = []
    lock = threading.Lock()
    with pytest.raises(BackendError, match="replica number two failed"):
        await serve.create_backend("x", FailsOnSecond, attempts, lock, config={"num_replicas": 3})
    assert len(attempts) == 3
    assert serve.list_backends() == {}
    handle = await deploy(serve, "x", FailsOnSecond, attempts, lock, config={"num_replicas": 2})
    assert await handle.remote() == "ok"
    assert serve.list_backends()["x"]["num_replicas"] == 2


# -- replicas, threads and concurrency -----------------------------------------------------------


class Rendezvous:
    def __init__(self, barrier: threading.Barrier, finished: list[str]) -> None:
        # Fails with BrokenBarrierError unless the other replica's constructor runs meanwhile.
        barrier.wait(timeout=5)
        finished.append(get_replica_context().replica_tag)

    def __call__(self) -> str:
        return "ok"


async def test_replicas_start_concurrently(serve: Serve) -> None:
    barrier = threading.Barrier(2)
    finished: list[str] = []
    await serve.create_backend("x", Rendezvous, barrier, finished, config={"num_replicas": 2})
    assert len(set(finished)) == 2
    assert not barrier.broken
    assert serve.list_backends()["x"]["num_replicas"] == 2


class ThreadRecorder:
    def __init__(self, idents: list[tuple[str, int]]) -> None:
        self.idents = idents
        idents.append(("init", threading.get_ident()))

    def reconfigure(self, config: Any) -> None:
        self.idents.append(("reconfigure", threading.get_ident()))

    def __call__(self, x: int) -> int:
        self.idents.append(("call", threading.get_ident()))
        return x


class AsyncWithSyncInit:
    def __init__(self, idents: list[tuple[str, int]]) -> None:
        idents.append(("init", threading.get_ident()))

    async def __call__(self, x: int) -> int:
        return x


async def test_sync_user_code_never_runs_on_the_loop_thread(serve: Serve) -> None:
    loop_thread = threading.get_ident()
    idents: list[tuple[str, int]] = []
    handle = await deploy(
        serve, "sync", ThreadRecorder, idents, config={"num_replicas": 2, "user_config": 1}
    )
    assert await asyncio.gather(*(handle.remote(i) for i in range(10))) == list(range(10))
    await serve.update_backend_config("sync", {"user_config": 2})

    calls: list[int] = []

    def sync_fn(x: int) -> int:
        calls.append(threading.get_ident())
        return x

    fn_handle = await deploy(serve, "fn", sync_fn)
    assert await fn_handle.remote(1) == 1
    await deploy(serve, "async-class", AsyncWithSyncInit, idents)

    kinds = Counter(kind for kind, _ in idents)
    assert kinds == {"init": 3, "reconfigure": 4, "call": 10}
    assert all(ident != loop_thread for _, ident in idents)
    assert calls and calls[0] != loop_thread


class Exclusive:
    def __init__(self, lock: threading.Lock, inside: Counter[str], peak: Counter[str]) -> None:
        self.lock, self.inside, self.peak = lock, inside, peak
        self.tag = get_replica_context().replica_tag

    def __call__(self, x: int) -> int:
        with self.lock:
            self.inside[self.tag] += 1
            self.peak[self.tag] = max(self.peak[self.tag], self.inside[self.tag])
        time.sleep(0.002)  # work: widens the window in which an overlap would show
        with self.lock:
            self.inside[self.tag] -= 1
        return x


async def test_sync_replica_runs_one_call_at_a_time(serve: Serve) -> None:
    lock = threading.Lock()
    inside: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    handle = await deploy(
        serve,
        "x",
        Exclusive,
        lock,
        inside,
        peak,
        config={"num_replicas": 2, "max_concurrent_queries": 4},
    )
    results = await asyncio.gather(*(handle.remote(i) for i in range(40)))
    assert results == list(range(40))
    assert len(peak) == 2  # both replicas served
    assert set(peak.values()) == {1}


async def test_async_replica_runs_up_to_max_concurrent_queries(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 3})
    refs = [handle.remote(i) for i in range(7)]
    await gate.until_inside(3)
    await until_queued(serve, "x", 4)  # every request has reached the backend
    assert gate.inside == 3
    assert not any(ref.done() for ref in refs)
    gate.release.set()
    results = await asyncio.gather(*refs)
    assert [x for _, x in results] == list(range(7))
    assert gate.max_inside == 3


@pytest.mark.parametrize(("mcq", "calls"), [(1, 2), (4, 4)])
async def test_least_loaded_replica_is_chosen(
    serve: Serve, gate: Gate, mcq: int, calls: int
) -> None:
    handle = await deploy(
        serve, "x", gated(gate), config={"num_replicas": 2, "max_concurrent_queries": mcq}
    )
    refs = [handle.remote(i) for i in range(calls)]
    await gate.until_inside(calls)
    gate.release.set()
    tags = Counter(tag for tag, _ in await asyncio.gather(*refs))
    assert len(tags) == 2
    assert set(tags.values()) == {calls // 2}


async def test_bounded_queue_rejects_fast_and_admitted_ones_complete(
    serve: Serve, gate: Gate
) -> None:
    handle = await deploy(
        serve, "x", gated(gate), config={"max_concurrent_queries": 1, "max_queued_queries": 2}
    )
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = [handle.remote("q1"), handle.remote("q2")]
    await until_queued(serve, "x", 2)
    with pytest.raises(Overloaded) as info:
        # Raises at once; the wait_for only turns a hang into a clear failure.
        await asyncio.wait_for(handle.remote("rejected"), 5)
    assert "'x'" in str(info.value)  # names the backend
    assert isinstance(info.value, ServeError)
    gate.release.set()
    results = await asyncio.gather(running, *queued)
    assert [x for _, x in results] == ["running", "q1", "q2"]
    assert gate.entries == [(results[0][0], x) for x in ("running", "q1", "q2")]


# -- list_backends, get_backend_config, update_backend_config ------------------------------------


@aioserve.accept_batch
def batch_echo(items: list[Any]) -> list[Any]:
    return items


async def test_list_backends_shape(serve: Serve) -> None:
    await serve.create_backend("sync", double, config={"num_replicas": 2})
    await serve.create_backend("async", async_double)
    await serve.create_backend("batch", batch_echo, config={"max_batch_size": 4})
    listed = serve.list_backends()
    assert set(listed) == {"sync", "async", "batch"}
    common = {
        "batch_wait_timeout": 0.0,
        "max_queued_queries": 1000,
        "user_config": None,
        "graceful_shutdown_wait_loop_s": 2.0,
        "graceful_shutdown_timeout_s": 20.0,
        "batch_wait_policy": "adaptive",
    }
    expected = {
        "sync": {"accepts_batches": False, "num_replicas": 2, "max_batch_size": None,
                 "max_concurrent_queries": 8},
        "async": {"accepts_batches": False, "num_replicas": 1, "max_batch_size": None,
                  "max_concurrent_queries": 100},
        "batch": {"accepts_batches": True, "num_replicas": 1, "max_batch_size": 4,
                  "max_concurrent_queries": 8},
    }  # fmt: skip
    for tag, info in listed.items():
        assert isinstance(info, dict)
        assert {**common, **expected[tag]}.items() <= info.items(), tag
    # A snapshot: changing it changes nothing.
    listed["sync"]["num_replicas"] = 99
    assert serve.list_backends()["sync"]["num_replicas"] == 2


async def test_get_backend_config_is_a_copy(serve: Serve) -> None:
    await serve.create_backend("x", Scaler, 2, config={"num_replicas": 1})
    config = serve.get_backend_config("x")
    assert isinstance(config, BackendConfig)
    assert config.max_concurrent_queries == 8  # resolved
    config.num_replicas = 3
    assert serve.get_backend_config("x").num_replicas == 1
    assert serve.list_backends()["x"]["num_replicas"] == 1
    await serve.update_backend_config("x", config)
    assert serve.get_backend_config("x").num_replicas == 3
    assert serve.list_backends()["x"]["num_replicas"] == 3


async def test_get_backend_config_unknown_tag(serve: Serve) -> None:
    with pytest.raises(ValueError, match="'nope'"):
        serve.get_backend_config("nope")


class Recorder:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log
        self.tag = get_replica_context().replica_tag
        self.config: Any = None
        log.append(("init", self.tag))

    def reconfigure(self, config: Any) -> None:
        self.config = config
        self.log.append(("reconfigure", self.tag, config))

    def __call__(self) -> tuple[str, Any]:
        return self.tag, self.config


async def replica_views(handle: ServeHandle, n: int) -> set[tuple[str, Any]]:
    """(replica tag, config) as seen by ``n`` concurrent calls.

    The calls are spawned together, so each picks its replica before any has finished: the
    least-loaded choice spreads them over every replica.
    """
    results = await asyncio.gather(*(handle.remote() for _ in range(n)))
    return {(tag, tuple(sorted(cfg.items()))) for tag, cfg in results}


async def test_update_num_replicas_up_and_user_config(serve: Serve) -> None:
    log: list[tuple[Any, ...]] = []
    handle = await deploy(serve, "x", Recorder, log, config={"user_config": {"v": 1}})
    first = log[0][1]
    assert log == [("init", first), ("reconfigure", first, {"v": 1})]

    await serve.update_backend_config("x", {"num_replicas": 3})
    # In force on return: the new replicas are constructed and got the current user_config.
    inits = [entry[1] for entry in log if entry[0] == "init"]
    assert len(set(inits)) == 3
    for tag in inits[1:]:
        assert log.index(("init", tag)) < log.index(("reconfigure", tag, {"v": 1}))
    assert serve.list_backends()["x"]["num_replicas"] == 3
    assert {tag for tag, _ in await replica_views(handle, 9)} == set(inits)

    del log[:]
    await serve.update_backend_config("x", {"user_config": {"v": 2}})
    assert sorted(log) == sorted(("reconfigure", tag, {"v": 2}) for tag in inits)
    assert await replica_views(handle, 9) == {(tag, (("v", 2),)) for tag in inits}
    assert serve.get_backend_config("x").user_config == {"v": 2}


async def test_update_num_replicas_down(serve: Serve) -> None:
    log: list[tuple[Any, ...]] = []
    handle = await deploy(
        serve, "x", Recorder, log, config={"num_replicas": 3, "user_config": {"v": 1}}
    )
    await serve.update_backend_config("x", {"num_replicas": 1})
    assert serve.list_backends()["x"]["num_replicas"] == 1
    views = await replica_views(handle, 6)
    assert len(views) == 1
    assert len(log) == 6  # 3 inits, 3 reconfigures: nothing was restarted or reconfigured


async def test_update_down_loses_no_in_flight_request(serve: Serve, gate: Gate) -> None:
    handle = await deploy(
        serve, "x", gated(gate), config={"num_replicas": 2, "max_concurrent_queries": 1}
    )
    refs = [handle.remote(i) for i in range(4)]
    await gate.until_inside(2)
    await serve.update_backend_config("x", {"num_replicas": 1})
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(*refs), 10)
    assert [x for _, x in results] == [0, 1, 2, 3]
    assert len(gate.entries) == 4  # each ran exactly once
    tags_after = {tag for tag, x in results[2:]}
    assert len(tags_after) == 1


async def test_update_max_concurrent_queries_takes_effect(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    refs = [handle.remote(i) for i in range(3)]
    await gate.until_inside(1)
    await until_queued(serve, "x", 2)
    assert gate.inside == 1
    await serve.update_backend_config("x", {"max_concurrent_queries": 3})
    assert serve.list_backends()["x"]["max_concurrent_queries"] == 3
    await gate.until_inside(3)  # the waiting requests got the new slots
    gate.release.set()
    assert [x for _, x in await asyncio.gather(*refs)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"num_replicas": 0}, ValueError),
        ({"num_replicas": 3, "max_queued_queries": 0}, ValueError),
        ({"num_replicas": 3, "max_concurrent_queries": True}, TypeError),
        ({"num_replicas": 3, "bogus": 1}, ValueError),
        ({"num_replicas": 3, "max_batch_size": 2}, ValueError),
        ("num_replicas=3", TypeError),
    ],
)
async def test_bad_update_raises_and_changes_nothing(
    serve: Serve, change: Any, error: type[Exception]
) -> None:
    log: list[tuple[Any, ...]] = []
    handle = await deploy(serve, "x", Recorder, log, config={"user_config": {"v": 1}})
    before = serve.list_backends()
    with pytest.raises(error):
        await serve.update_backend_config("x", change)
    assert serve.list_backends() == before
    assert len(log) == 2  # no replica was started or reconfigured
    assert await handle.remote() == (log[0][1], {"v": 1})


async def test_bad_assignment_to_a_config_object_changes_nothing(serve: Serve) -> None:
    await deploy(serve, "x", double)
    config = serve.get_backend_config("x")
    before = serve.list_backends()
    with pytest.raises(ValueError, match="num_replicas"):
        config.num_replicas = 0
    await serve.update_backend_config("x", config)
    assert serve.list_backends() == before


async def test_user_config_update_on_a_function_backend_is_rejected(serve: Serve) -> None:
    await deploy(serve, "x", double)
    with pytest.raises(ValueError, match="reconfigure"):
        await serve.update_backend_config("x", {"user_config": {"v": 1}})
    assert serve.list_backends()["x"]["user_config"] is None


async def test_update_unknown_backend(serve: Serve) -> None:
    with pytest.raises(ValueError, match="'ghost'"):
        await serve.update_backend_config("ghost", {"num_replicas": 2})
    assert serve.list_backends() == {}


# -- delete_backend --------------------------------------------------------------------------------


async def test_delete_backend_in_use_names_the_endpoint(serve: Serve) -> None:
    await serve.create_backend("x", double)
    await serve.create_endpoint("users_of_x", backend="x")
    with pytest.raises(ValueError, match="users_of_x"):
        await serve.delete_backend("x")
    assert list(serve.list_backends()) == ["x"]
    assert await serve.get_handle("users_of_x").remote(1) == 2


async def test_delete_backend_used_as_shadow_is_refused(serve: Serve) -> None:
    await serve.create_backend("main", double)
    await serve.create_backend("shadow", triple)
    await serve.create_endpoint("ep", backend="main")
    await serve.shadow_traffic("ep", "shadow", 0.5)
    with pytest.raises(ValueError, match="'ep'"):
        await serve.delete_backend("shadow")
    assert set(serve.list_backends()) == {"main", "shadow"}


async def test_delete_missing_backend_is_a_no_op(serve: Serve) -> None:
    await serve.create_backend("x", double)
    await serve.delete_backend("missing")
    await serve.delete_backend("missing", force=True)
    assert list(serve.list_backends()) == ["x"]


async def test_graceful_delete_finishes_in_flight_and_queued(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = handle.remote("queued")
    await until_queued(serve, "x", 1)
    await serve.delete_endpoint("x")
    deleting = asyncio.create_task(serve.delete_backend("x"))
    await wait_until(lambda: "x" not in serve.list_backends(), "the deletion has begun")
    assert not deleting.done()  # draining: waits for the work it has
    assert "x" not in serve.list_backends()
    gate.release.set()
    assert (await running)[1] == "running"
    assert (await queued)[1] == "queued"
    await asyncio.wait_for(deleting, 10)
    assert [x for _, x in gate.entries] == ["running", "queued"]


async def test_force_delete_cancels_in_flight_async_request(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = handle.remote("queued")
    await until_queued(serve, "x", 1)
    await serve.delete_endpoint("x")
    await asyncio.wait_for(serve.delete_backend("x", force=True), 5)
    with pytest.raises(ReplicaStopped):
        await running
    with pytest.raises(ServeError):
        await queued
    assert gate.cancelled == [(gate.entries[0][0], "running")]  # the handler was cancelled
    assert [x for _, x in gate.entries] == ["running"]  # the queued one never ran
    assert serve.list_backends() == {}


async def test_tag_can_be_reused_after_delete(serve: Serve) -> None:
    handle = await deploy(serve, "x", double)
    assert await handle.remote(2) == 4
    await serve.delete_endpoint("x")
    await serve.delete_backend("x")
    assert serve.list_backends() == {}
    handle = await deploy(serve, "x", triple)
    assert await handle.remote(2) == 6


# -- the replica context ---------------------------------------------------------------------------


class ContextAware:
    def __init__(self) -> None:
        self.at_init = get_replica_context()

    def __call__(self) -> tuple[Any, Any]:
        return self.at_init, get_replica_context()


async def async_context() -> tuple[str, str]:
    ctx = get_replica_context()
    return ctx.backend_tag, ctx.replica_tag


async def test_replica_context_inside_a_replica(serve: Serve) -> None:
    handle = await deploy(serve, "ctx", ContextAware, config={"num_replicas": 2})
    results = await asyncio.gather(*(handle.remote() for _ in range(4)))
    tags = set()
    for at_init, at_call in results:
        assert at_init.backend_tag == at_call.backend_tag == "ctx"
        assert at_init.replica_tag == at_call.replica_tag
        assert at_call.replica_tag.startswith("ctx#")
        assert len(at_call.replica_tag) > len("ctx#")
        tags.add(at_call.replica_tag)
    assert len(tags) == 2

    async_handle = await deploy(serve, "actx", async_context)
    backend_tag, replica_tag = await async_handle.remote()
    assert backend_tag == "actx"
    assert replica_tag.startswith("actx#")


async def test_replica_context_outside_a_replica_raises(serve: Serve) -> None:
    with pytest.raises(ServeError):
        get_replica_context()
    handle = await deploy(serve, "actx", async_context)
    await handle.remote()
    with pytest.raises(ServeError):  # nothing leaks into the caller's context
        get_replica_context()


async def test_a_shadow_copy_and_its_primary_each_see_their_own_replica(
    serve: Serve, gate: Gate
) -> None:
    # Both run at once, in tasks that share the primary's request: neither may see the other's.
    async def where(x: Any) -> tuple[str, str]:
        before = get_replica_context().backend_tag
        await gate.pass_through(before)
        return before, get_replica_context().backend_tag

    shadow_saw: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()

    async def shadow(x: Any) -> None:
        shadow_saw.set_result(await where(x))

    handle = await deploy(serve, "primary", where)
    await serve.create_backend("copy", shadow)
    await serve.shadow_traffic("primary", "copy", 1.0)
    call = handle.remote(1)
    await gate.until_inside(2)
    gate.release.set()
    assert await call == ("primary", "primary")
    assert await asyncio.wait_for(shadow_saw, 10) == ("copy", "copy")


async def test_code_a_request_starts_elsewhere_sees_its_own_replica(serve: Serve) -> None:
    # A handler creating a backend (its constructor) and changing another's user_config (its
    # reconfigure) runs them as that replica's own code, not as part of the request.
    seen: dict[str, Any] = {}

    class Made:
        def __init__(self) -> None:
            seen["init"] = get_replica_context().backend_tag, aioserve.context.request_id

        def reconfigure(self, config: Any) -> None:
            seen["reconfigure"] = get_replica_context().backend_tag, aioserve.context.request_id

        def __call__(self) -> str:
            return "made"

    async def maker() -> str:
        await serve.create_backend("made", Made)
        await serve.update_backend_config("made", {"user_config": {"v": 2}})
        return get_replica_context().backend_tag

    handle = await deploy(serve, "maker", maker)
    assert await handle.remote() == "maker"
    assert seen == {"init": ("made", None), "reconfigure": ("made", None)}


async def test_a_task_a_handler_starts_keeps_its_replica_after_the_request(serve: Serve) -> None:
    later: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def report() -> None:
        await done.wait()
        later.set_result(get_replica_context().backend_tag)

    async def starts_a_task() -> str:
        background.append(asyncio.create_task(report()))
        return "answered"

    background: list[asyncio.Task[None]] = []
    handle = await deploy(serve, "starter", starts_a_task)
    assert await handle.remote() == "answered"
    done.set()  # the request is over; the task it started runs on
    assert await asyncio.wait_for(later, 10) == "starter"  # turns a hang into a failure
    await background[0]


# -- sync code does not block the loop -------------------------------------------------------------


async def test_blocked_sync_handler_does_not_block_the_loop(
    serve: Serve, thread_gate: threading.Event
) -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    def blocking(x: int) -> int:
        loop.call_soon_threadsafe(entered.set)
        if not thread_gate.wait(timeout=20):
            raise TimeoutError("never released")
        return x

    answered = 0

    async def quick(x: int) -> int:
        nonlocal answered
        answered += 1
        return x

    slow = await deploy(serve, "slow", blocking)
    fast = await deploy(serve, "fast", quick)
    blocked = slow.remote(1)
    await asyncio.wait_for(entered.wait(), 10)
    results = await asyncio.wait_for(asyncio.gather(*(fast.remote(i) for i in range(100))), 10)
    assert results == list(range(100))
    assert answered == 100
    assert not blocked.done()
    thread_gate.set()
    assert await asyncio.wait_for(blocked, 10) == 1


async def test_graceful_delete_cancels_stragglers_after_the_timeout(
    serve: Serve, gate: Gate
) -> None:
    handle = await deploy(
        serve,
        "x",
        gated(gate),
        config={"max_concurrent_queries": 1, "graceful_shutdown_timeout_s": 0.05},
    )
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = handle.remote("queued")
    await until_queued(serve, "x", 1)
    await serve.delete_endpoint("x")
    # Returns once the 0.05 s drain has passed (the wait_for only turns a hang into a failure).
    await asyncio.wait_for(serve.delete_backend("x"), 10)
    with pytest.raises(ReplicaStopped):
        await running
    with pytest.raises(ServeError):
        await queued
    assert [x for _, x in gate.entries] == ["running"]
    assert len(gate.cancelled) == 1


async def test_update_num_replicas_up_serves_the_waiting_requests(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    refs = [handle.remote(i) for i in range(3)]
    await gate.until_inside(1)
    await until_queued(serve, "x", 2)
    assert gate.inside == 1
    await serve.update_backend_config("x", {"num_replicas": 3})
    await gate.until_inside(3)  # the two waiting requests went to the new replicas
    gate.release.set()
    results = await asyncio.gather(*refs)
    assert [x for _, x in results] == [0, 1, 2]
    assert len({tag for tag, _ in results}) == 3


class Picky:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log
        self.tag = get_replica_context().replica_tag
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        if config == "bad":
            raise ValueError("user_config 'bad' is not accepted")
        self.config = config
        self.log.append((self.tag, config))

    def __call__(self) -> Any:
        return self.config


async def test_failed_reconfigure_changes_nothing(serve: Serve) -> None:
    log: list[tuple[Any, ...]] = []
    handle = await deploy(serve, "x", Picky, log, config={"user_config": {"v": 1}})
    before = serve.list_backends()
    with pytest.raises(BackendError, match="is not accepted") as info:
        await serve.update_backend_config("x", {"user_config": "bad"})
    assert isinstance(info.value.__cause__, ValueError)
    assert await handle.remote() == {"v": 1}  # the replica kept its config
    # The rejected user_config is not reported as the backend's config...
    assert serve.get_backend_config("x").user_config == {"v": 1}
    assert serve.list_backends() == before
    # ...nor given to new replicas: scaling up still works.
    await serve.update_backend_config("x", {"num_replicas": 2})
    assert [config for _, config in log] == [{"v": 1}, {"v": 1}]
