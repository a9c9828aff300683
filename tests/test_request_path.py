"""The request path's edges: bodies read after the disconnect watcher started, clients that leave
mid-upload, streams cancelled or dropped, batches next to plain calls, drains with batches queued.
Every test drives the public API or the ASGI app and waits on state, never on a clock."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from _sample_backends import HANG_GUARD_S, until_queued, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

import aioserve
from aioserve import Serve


def http_scope(path: str, tag: str, length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-tag", tag.encode()), (b"content-length", str(length).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }


class Client:
    """An ASGI client whose body arrives in the pieces the test gives, and which can leave."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [
            {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
            for i, p in enumerate(pieces)
        ]
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.pieces:
            return self.pieces.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def test_a_streaming_response_reads_the_body_after_the_watcher_started(serve: Serve) -> None:
    hold = asyncio.Event()

    async def echo(request: Request) -> Any:
        if request.headers["x-tag"] == "hold":
            await hold.wait()
            return "held"

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                yield chunk

        return StreamingResponse(chunks())

    await serve.create_backend("echo", echo, config={"max_concurrent_queries": 1})
    await serve.create_endpoint("echo", backend="echo", route="/echo", methods=["POST"])
    app = serve.asgi_app
    holder = Client([b""])
    held = asyncio.create_task(app(http_scope("/echo", "hold", 0), holder.receive, holder.send))
    await wait_until(lambda: serve.backend_statistics("echo").num_running == 1, "one runs")
    # Queued behind it: its disconnect watcher starts, and reads ahead.
    client = Client([b"aaa", b"bbb", b"ccc"])
    echoed = asyncio.create_task(app(http_scope("/echo", "e", 9), client.receive, client.send))
    await until_queued(serve, "echo", 1)
    hold.set()
    await asyncio.wait_for(asyncio.gather(held, echoed), HANG_GUARD_S)
    assert client.body == b"aaabbbccc"


async def test_a_queued_request_whose_client_leaves_mid_upload_never_runs(serve: Serve) -> None:
    ran: list[str] = []
    release = asyncio.Event()

    async def handler(request: Request) -> str:
        ran.append(request.headers["x-tag"])
        if request.headers["x-tag"] == "A":
            await release.wait()
        return "done"

    await serve.create_backend("h", handler, config={"max_concurrent_queries": 1})
    await serve.create_endpoint("h", backend="h", route="/h", methods=["POST"])
    app = serve.asgi_app
    a = Client([b""])
    task_a = asyncio.create_task(app(http_scope("/h", "A", 0), a.receive, a.send))
    await wait_until(lambda: ran == ["A"], "A runs")
    b = Client([b"x" * 1000])  # the first of two pieces; the second never comes
    b.pieces[0]["more_body"] = True
    task_b = asyncio.create_task(app(http_scope("/h", "B", 2000), b.receive, b.send))
    await until_queued(serve, "h", 1)
    b.gone.set()
    await until_queued(serve, "h", 0)  # withdrawn, not dispatched
    release.set()
    await asyncio.wait_for(asyncio.gather(task_a, task_b), HANG_GUARD_S)
    assert ran == ["A"]
    assert b.sent == []  # nobody was left to answer


async def test_a_graceful_delete_serves_what_waits_for_a_batch(serve: Serve) -> None:
    @aioserve.accept_batch
    async def double(items: list[int]) -> list[int]:
        return [i * 2 for i in items]

    config = {"max_batch_size": 4, "batch_wait_timeout": 30, "graceful_shutdown_timeout_s": 30}
    await serve.create_backend("b", double, config=config)
    await serve.create_endpoint("e", backend="b")
    call = serve.get_handle("e").remote(21)
    await until_queued(serve, "b", 1)
    await serve.delete_endpoint("e")
    started = time.monotonic()
    await asyncio.wait_for(serve.delete_backend("b"), HANG_GUARD_S)
    assert await call == 42
    assert time.monotonic() - started < 5  # flushed at once, not after the 30 s timeouts


async def test_batched_calls_are_not_starved_by_plain_calls_on_the_same_replica(
    serve: Serve,
) -> None:
    class Model:
        async def plain(self, x: int) -> int:
            await asyncio.sleep(0)
            return x

        @aioserve.accept_batch
        async def batched(self, xs: list[int]) -> list[int]:
            return xs

    await serve.create_backend(
        "m", Model, config={"max_batch_size": 4, "max_concurrent_queries": 1}
    )
    await serve.create_endpoint("m", backend="m")
    h = serve.get_handle("m")
    stop = False

    async def hammer() -> None:
        while not stop:
            await h.plain.remote(1)

    workers = [asyncio.create_task(hammer()) for _ in range(4)]
    await until_queued(serve, "m", 3)  # plain calls keep the wait queue busy
    try:
        assert await asyncio.wait_for(h.batched.remote(7), HANG_GUARD_S) == 7
    finally:
        stop = True
        await asyncio.gather(*workers)


def ticks() -> Iterator[int]:
    yield 1
    yield 2


def test_a_stream_dropped_unread_through_the_sync_handle_gives_its_slot_back(
    client: aioserve.Client,
) -> None:
    client.create_backend("g", ticks, config={"max_concurrent_queries": 1})
    client.create_endpoint("g", backend="g")
    handle = client.get_handle("g")
    stream = handle.remote().result(timeout=HANG_GUARD_S)
    assert client.backend_statistics("g").num_running == 1
    del stream
    gc.collect()
    # The second call gets the one slot: the first stream's came back.
    second = handle.remote().result(timeout=HANG_GUARD_S)
    assert second is not None
    del second
    gc.collect()


async def test_a_sync_generator_cancelled_mid_step_closes_on_its_thread_then_frees_its_slot(
    serve: Serve,
) -> None:
    step = threading.Event()
    stepping = threading.Event()
    closed_on: list[str] = []

    def slow() -> Iterator[int]:
        try:
            yield 1
            stepping.set()
            step.wait(HANG_GUARD_S)  # a slow step on the replica's thread
            yield 2
        finally:
            closed_on.append(threading.current_thread().name)

    await serve.create_backend("g", slow, config={"max_concurrent_queries": 1})
    await serve.create_endpoint("g", backend="g")
    stream = await serve.get_handle("g").remote()
    assert await anext(stream) == 1

    async def read_rest() -> None:
        async for _ in stream:
            pass

    reader = asyncio.create_task(read_rest())
    await asyncio.to_thread(stepping.wait, HANG_GUARD_S)
    for _ in range(3):  # cancelled again and again, as a task group does
        reader.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await reader
    # The step still runs on the thread: the slot is still taken.
    assert serve.backend_statistics("g").num_running == 1
    step.set()
    await wait_until(lambda: serve.backend_statistics("g").num_running == 0, "the slot is back")
    assert len(closed_on) == 1 and closed_on[0].startswith("aioserve-g#")


async def test_a_stopped_replica_stops_its_open_async_stream(serve: Serve) -> None:
    async def forever() -> AsyncIterator[int]:
        i = 0
        while True:
            await asyncio.sleep(0)
            i += 1
            yield i

    await serve.create_backend("g", forever, config={"graceful_shutdown_timeout_s": 0})
    await serve.create_endpoint("g", backend="g")
    stream = await serve.get_handle("g").remote()
    await anext(stream)
    await serve.delete_endpoint("g")
    await serve.delete_backend("g", force=True)
    with pytest.raises(aioserve.ReplicaStopped):
        for _ in range(1000):
            await anext(stream)
