"""The task and thread helpers every background task and every sync call goes through."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from aioserve import ServeShutdown
from aioserve._concurrency import (
    ReplicaThread,
    TaskOwner,
    current_task,
    new_event_loop,
    spawn_threadsafe,
)


def test_new_event_loop_is_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed here")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_new_event_loop_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    loop = new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


async def test_task_owner_cancels_and_awaits_what_it_owns_and_then_refuses() -> None:
    owner = TaskOwner("test tasks")
    started = asyncio.Event()
    cleaned_up = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.append(True)

    owner.spawn(forever())
    await started.wait()
    assert len(owner) == 1
    assert "tasks=1" in repr(owner)
    await owner.aclose()
    assert cleaned_up == [True]  # the task ran its finally before aclose returned
    assert owner.closed and len(owner) == 0

    async def never() -> None:  # pragma: no cover - refused before it can run
        pass

    with pytest.raises(ServeShutdown, match="closed"):
        owner.spawn(never())


async def test_task_owner_drops_finished_tasks() -> None:
    owner = TaskOwner("test tasks")

    async def quick() -> int:
        return 1

    assert await owner.spawn(quick()) == 1
    await asyncio.sleep(0)  # one loop turn: the done callback runs
    assert len(owner) == 0
    await owner.aclose()


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own, like the sync facade's."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_spawn_threadsafe_returns_the_result_and_the_exception(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    owner = TaskOwner("handles")

    async def double(x: int) -> int:
        return 2 * x

    async def fail() -> None:
        raise KeyError("nope")

    assert spawn_threadsafe(owner, other_loop, double(21)).result(timeout=10) == 42
    with pytest.raises(KeyError, match="nope"):
        spawn_threadsafe(owner, other_loop, fail()).result(timeout=10)


def test_cancelling_the_future_cancels_the_task(other_loop: asyncio.AbstractEventLoop) -> None:
    owner = TaskOwner("handles")
    entered = threading.Event()
    cancelled = threading.Event()

    async def blocked() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = spawn_threadsafe(owner, other_loop, blocked())
    assert entered.wait(timeout=10)
    assert future.cancel()
    assert cancelled.wait(timeout=10)


def test_a_task_cancelled_on_its_loop_cancels_the_future(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    owner = TaskOwner("handles")
    entered = threading.Event()

    async def blocked() -> None:
        entered.set()
        await asyncio.Event().wait()

    future = spawn_threadsafe(owner, other_loop, blocked())
    assert entered.wait(timeout=10)
    asyncio.run_coroutine_threadsafe(owner.aclose(), other_loop).result(timeout=10)
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=10)


def test_spawn_threadsafe_on_a_closed_owner_or_loop_raises_serve_shutdown(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    owner = TaskOwner("handles")
    asyncio.run_coroutine_threadsafe(owner.aclose(), other_loop).result(timeout=10)

    async def work() -> int:  # pragma: no cover - refused before it can run
        return 1

    with pytest.raises(ServeShutdown):
        spawn_threadsafe(owner, other_loop, work()).result(timeout=10)

    closed = asyncio.new_event_loop()
    closed.close()
    with pytest.raises(ServeShutdown, match="shut down"):
        spawn_threadsafe(TaskOwner("handles"), closed, work())


async def test_replica_thread_runs_calls_in_order_off_the_loop_thread() -> None:
    thread = ReplicaThread("test-replica")
    loop_thread = threading.get_ident()
    seen: list[tuple[int, int]] = []

    def record(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i

    try:
        results = await asyncio.gather(*(thread.run(record, i) for i in range(20)))
    finally:
        thread.shutdown()
    assert results == list(range(20))
    assert [i for i, _ in seen] == list(range(20))  # one at a time, in order
    idents = {ident for _, ident in seen}
    assert len(idents) == 1 and loop_thread not in idents


async def test_self_removing_tasks_leave_the_owner_and_never_accumulate() -> None:
    owner = TaskOwner("handles")

    async def work() -> int:
        try:
            return 1
        finally:
            owner.discard(asyncio.current_task())

    assert await owner.spawn(work(), self_removing=True) == 1
    assert len(owner) == 0  # removed by the task itself, no loop turn needed
    # Tasks cancelled before they ever ran cannot remove themselves: pruning bounds them.
    for _ in range(1000):
        owner.spawn(work(), self_removing=True).cancel()
        await asyncio.sleep(0)  # one loop turn: the cancelled task finishes
    assert len(owner) <= 130
    await owner.aclose()


@pytest.mark.parametrize("factory", [asyncio.new_event_loop, new_event_loop])
def test_current_task_agrees_with_asyncio_in_tasks_and_callbacks(factory: Any) -> None:
    seen: list[tuple[object, object, object]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen.append((current_task(), current_task(loop), asyncio.current_task()))
        in_callback = loop.create_future()
        loop.call_soon(lambda: in_callback.set_result((current_task(loop), asyncio.current_task())))
        outside = await in_callback
        seen.append((outside[0], outside[0], outside[1]))

    loop = factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    in_task, in_callback = seen
    assert in_task[0] is in_task[1] is in_task[2] is not None
    assert in_callback == (None, None, None)
