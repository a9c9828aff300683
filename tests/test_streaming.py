"""Streams both ways, through a real server (uvicorn, then granian): generator handlers stream their
results from inside their replica (holding its slot), and handlers read request bodies as they
arrive."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, wait_until
from starlette.requests import Request

from aioserve import Serve


class SlowTicks:
    """A sync generator handler: yields the name of the thread each item is made on, and waits
    for the test between items so the test sees the stream while it is open."""

    def __init__(self) -> None:
        self.next_item = threading.Semaphore(0)
        self.closed = threading.Event()

    def __call__(self, request: Any = None) -> Iterator[str]:
        try:
            for i in range(3):
                if i:
                    self.next_item.acquire(timeout=HANG_GUARD_S)
                yield f"{i}:{threading.current_thread().name}\n"
        finally:
            self.closed.set()


def _ticks_function(ticks: SlowTicks) -> Any:
    def ticks_handler(request: Any = None) -> Iterator[str]:
        yield from ticks(request)

    return ticks_handler


async def test_a_sync_generator_streams_from_its_replica_thread_and_holds_its_slot(
    served: Serve,
) -> None:
    ticks = SlowTicks()
    await served.create_backend(
        "ticks", _ticks_function(ticks), config={"max_concurrent_queries": 1}
    )
    await served.create_endpoint("ticks", backend="ticks", route="/ticks")
    async with httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as client:
        async with client.stream("GET", "/ticks") as response:
            lines = response.aiter_lines()
            first = await anext(lines)
            # The stream is open: its replica's one slot is taken, so a second request waits.
            assert served.backend_statistics("ticks").num_running == 1
            second = asyncio.create_task(client.get("/ticks"))
            await wait_until(
                lambda: served.backend_statistics("ticks").num_queued == 1, "the second waits"
            )
            assert not second.done()
            rest = []
            for _ in range(2):
                ticks.next_item.release()
                rest.append(await anext(lines))
        # Every item was made on the replica's own thread, none on the loop or a Starlette pool.
        for line in [first, *rest]:
            assert line.split(":", 1)[1].startswith("aioserve-ticks#"), line
        for _ in range(2):
            ticks.next_item.release()
        done = await asyncio.wait_for(second, HANG_GUARD_S)
    assert done.status_code == 200 and done.text.count("aioserve-ticks#") == 3
    assert served.backend_statistics("ticks").num_running == 0


async def test_a_sync_generator_through_a_handle_streams_on_its_thread_until_closed(
    serve: Serve,
) -> None:
    ticks = SlowTicks()
    await serve.create_backend(
        "ticks", _ticks_function(ticks), config={"max_concurrent_queries": 1}
    )
    await serve.create_endpoint("ticks", backend="ticks")
    handle = serve.get_handle("ticks")
    stream = await handle.remote()
    first = await anext(stream)
    assert first.split(":", 1)[1].startswith("aioserve-ticks#")
    assert serve.backend_statistics("ticks").num_running == 1
    # Closing the stream early closes the generator (its finally runs) and frees the slot.
    await stream.aclose()
    assert ticks.closed.is_set()
    assert serve.backend_statistics("ticks").num_running == 0
    ticks.closed.clear()
    for _ in range(2):
        ticks.next_item.release()
    items = [item async for item in await handle.remote()]
    assert len(items) == 3 and ticks.closed.is_set()
    assert serve.backend_statistics("ticks").num_running == 0


async def test_an_async_generator_through_a_handle_holds_its_slot_until_exhausted(
    serve: Serve,
) -> None:
    step = asyncio.Event()

    async def counter(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await step.wait()
            step.clear()
            yield i

    await serve.create_backend("count", counter, config={"max_concurrent_queries": 1})
    await serve.create_endpoint("count", backend="count")
    stream = await serve.get_handle("count").remote(2)
    step.set()
    assert await anext(stream) == 0
    assert serve.backend_statistics("count").num_running == 1
    step.set()
    assert await anext(stream) == 1
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert serve.backend_statistics("count").num_running == 0


async def test_a_handler_reads_a_50_mb_upload_chunk_by_chunk_with_memory_flat() -> None:
    # Past the default body limit (16 MiB), which a server that streams big uploads raises.
    options = {"host": "127.0.0.1", "port": 0, "max_body_bytes": 64 * 1024 * 1024}
    async with Serve(http_options=options) as served:
        await _upload_50_mb(served)


async def _upload_50_mb(served: Serve) -> None:
    chunk_sizes: list[int] = []

    async def count_bytes(request: Request) -> dict[str, int]:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            chunk_sizes.append(len(chunk))
        return {"bytes": total}

    await served.create_backend("upload", count_bytes)
    await served.create_endpoint("upload", backend="upload", route="/upload", methods=["POST"])
    size = 50 * 1024 * 1024
    piece = 64 * 1024

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // piece):
            yield bytes(piece)  # made as sent: the client holds one piece at a time

    tracemalloc.start()
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            r = await client.post("/upload", content=body())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (r.status_code, r.json()) == (200, {"bytes": size})
    assert len(chunk_sizes) > 100  # the handler saw it arrive in pieces, not as one buffer
    # Client, server and handler together never held more than a few MB of it at once.
    assert peak < 8 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


async def test_a_client_that_disconnects_at_once_cancels_its_running_request(
    served: Serve,
) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def wait_forever(request: Request) -> str:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    await served.create_backend("forever", wait_forever)
    await served.create_endpoint("forever", backend="forever", route="/forever")
    assert served.http_port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", served.http_port)
    writer.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(entered.wait(), HANG_GUARD_S)
    # Gone the moment the handler starts, long before any sweep interval has passed.
    writer.transport.abort()
    await asyncio.wait_for(cancelled.wait(), HANG_GUARD_S)
    await wait_until(
        lambda: served.backend_statistics("forever").num_running == 0, "the slot is free"
    )
