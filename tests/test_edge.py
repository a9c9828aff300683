"""The HTTP edge under hostile clients and stuck code, through a real uvicorn on 127.0.0.1: body
and header limits, slow and idle connections, request ids, error bodies, system routes,
readiness, and a shutdown that stays bounded with a handler stuck in its thread."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, wait_until
from starlette.exceptions import HTTPException
from starlette.requests import Request

from aioserve import Serve


@pytest.fixture
async def edge() -> AsyncIterator[Serve]:
    """A real server with small limits, so that tests cross them quickly."""
    options = {
        "host": "127.0.0.1",
        "port": 0,
        "max_body_bytes": 1024 * 1024,
        "header_timeout_s": 0.5,
        "keep_alive_timeout_s": 0.5,
    }
    async with Serve(http_options=options, seed=0) as instance:
        yield instance


async def deploy(s: Serve, name: str, handler: Any, **config: Any) -> None:
    await s.create_backend(name, handler, config=config or None)
    await s.create_endpoint(name, backend=name, route=f"/{name}", methods=["GET", "POST"])


async def raw_exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a raw request; return all the server sent back before it closed or went quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), HANG_GUARD_S)
    finally:
        writer.close()


async def count_bytes(request: Request) -> int:
    return len(await request.body())


# -- body limits ---------------------------------------------------------------------------------


async def test_a_declared_body_over_the_limit_is_413_before_the_handler_runs(edge: Serve) -> None:
    ran = []

    async def handler(request: Request) -> str:
        ran.append(1)
        return "ran"

    await deploy(edge, "up", handler)
    assert edge.http_port is not None
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n"
    answer = await raw_exchange(edge.http_port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"1048576 bytes" in answer
    assert ran == []


async def test_a_streamed_body_over_the_limit_is_413_while_it_streams(edge: Serve) -> None:
    await deploy(edge, "count", count_bytes)

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield bytes(64 * 1024)

    async with httpx.AsyncClient(base_url=edge.url or "", timeout=HANG_GUARD_S) as client:
        small = await client.post("/count", content=chunks(8))  # 512 KiB, no Content-Length
        assert (small.status_code, small.text) == (200, str(8 * 64 * 1024))
        big = await client.post("/count", content=chunks(40))  # 2.5 MiB
    assert big.status_code == 413
    assert "max_body_bytes" in big.text


async def test_four_concurrent_over_limit_uploads_leave_memory_flat(edge: Serve) -> None:
    await deploy(edge, "count", count_bytes)
    assert edge.http_port is not None
    port = edge.http_port

    async def upload() -> bytes:
        # 50 MB declared, sent in pieces until the server answers.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n")
            answer = asyncio.ensure_future(reader.read(4096))
            piece = bytes(64 * 1024)
            for _ in range(800):
                if answer.done():
                    break
                writer.write(piece)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            return await asyncio.wait_for(answer, HANG_GUARD_S)
        finally:
            writer.close()

    tracemalloc.start()
    try:
        answers = await asyncio.gather(*(upload() for _ in range(4)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(a.startswith(b"HTTP/1.1 413") for a in answers), [a[:40] for a in answers]
    assert peak < 4 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


# -- headers ---------------------------------------------------------------------------------------


async def test_too_many_or_too_large_headers_are_431(edge: Serve) -> None:
    await deploy(edge, "hello", lambda request: "hello")
    assert edge.http_port is not None
    many = b"".join(b"X-Filler-%d: v\r\n" % i for i in range(150))
    answer = await raw_exchange(
        edge.http_port, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    big = b"X-Big: " + b"a" * (60 * 1024) + b"\r\nX-Big2: " + b"b" * (10 * 1024) + b"\r\n"
    answer = await raw_exchange(
        edge.http_port, b"GET /hello HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    answer = await raw_exchange(edge.http_port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


# -- slow and idle connections --------------------------------------------------------------------


async def test_idle_and_slowloris_connections_are_closed_after_the_header_timeout(
    edge: Serve,
) -> None:
    await deploy(edge, "hello", lambda request: "hello")
    assert edge.http_port is not None
    conns = [await asyncio.open_connection("127.0.0.1", edge.http_port) for _ in range(40)]
    try:
        for i, (_, writer) in enumerate(conns):
            if i % 2:  # a request head that never ends
                writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        # Each read ends when the server closes the connection (b"" at EOF).
        reads = await asyncio.wait_for(
            asyncio.gather(*(reader.read(1024) for reader, _ in conns)), HANG_GUARD_S
        )
        elapsed = time.monotonic() - started
    finally:
        for _, writer in conns:
            writer.close()
    assert reads == [b""] * 40
    assert elapsed < 5.0
    # A well-behaved client is still served.
    async with httpx.AsyncClient(base_url=edge.url or "") as client:
        assert (await client.get("/hello")).text == "hello"


async def test_a_kept_alive_connection_that_goes_quiet_is_closed(edge: Serve) -> None:
    await deploy(edge, "hello", lambda request: "hello")
    assert edge.http_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.http_port)
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"hello"), HANG_GUARD_S)
        assert first.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.read(1024), HANG_GUARD_S) == b""
    finally:
        writer.close()


# -- request ids and error bodies ------------------------------------------------------------------


async def test_request_ids_are_echoed_only_when_short_and_visible(edge: Serve) -> None:
    await deploy(edge, "hello", lambda request: "hello")
    async with httpx.AsyncClient(base_url=edge.url or "") as client:
        ok = await client.get("/hello", headers={"X-Request-ID": "trace-42.a:b"})
        assert ok.headers["x-request-id"] == "trace-42.a:b"
        long_id = "x" * 8192
        replaced = await client.get("/hello", headers={"X-Request-ID": long_id})
        assert replaced.status_code == 200
        assert replaced.headers["x-request-id"] != long_id
        assert 0 < len(replaced.headers["x-request-id"]) <= 128
        spaced = await client.get("/hello", headers={"X-Request-ID": "a b"})
        assert spaced.headers["x-request-id"] != "a b"


async def test_client_mistakes_are_4xx_and_error_bodies_are_clean(edge: Serve) -> None:
    async def parse(request: Request) -> Any:
        data = await request.json()
        if data.get("teapot"):
            raise HTTPException(418, "short and stout")
        if data.get("boom"):
            raise ValueError("line one\r\nline two\x00" + "z" * 5000)
        return data

    await deploy(edge, "parse", parse)
    async with httpx.AsyncClient(base_url=edge.url or "") as client:
        bad = await client.post("/parse", content=b"{not json")
        assert bad.status_code == 400
        assert "cannot be decoded" in bad.text
        # JSON that Python will not decode is the client's mistake too, not a 500.
        huge = await client.post("/parse", content=b'{"n": ' + b"1" * 5000 + b"}")
        assert huge.status_code == 400
        assert "digits" in huge.text
        deep = await client.post("/parse", content=b"[" * 200_000 + b"]" * 200_000)
        assert deep.status_code == 400
        assert "nested too deeply" in deep.text
        teapot = await client.post("/parse", json={"teapot": True})
        assert (teapot.status_code, teapot.text) == (418, "short and stout")
        boom = await client.post("/parse", json={"boom": True})
        assert boom.status_code == 500
        assert boom.text.startswith("ValueError: line one")
        assert not any(c in boom.text for c in "\r\n\x00")
        assert len(boom.text) <= 1000
        good = await client.post("/parse", json={"a": 1})
        assert good.json() == {"a": 1}


# -- system routes and readiness -------------------------------------------------------------------


async def test_system_routes_can_be_turned_off_or_moved_to_their_own_port() -> None:
    async with (
        Serve(http_options={"port": 0, "system_routes": False}) as off,
        httpx.AsyncClient(base_url=off.url or "") as client,
    ):
        for path in ("/-/metrics", "/-/routes", "/-/healthz"):
            assert (await client.get(path)).status_code == 404, path
    async with Serve(http_options={"port": 0, "system_port": 0}) as apart:
        assert apart.system_port is not None and apart.system_port != apart.http_port
        async with httpx.AsyncClient() as client:
            main = f"http://127.0.0.1:{apart.http_port}"
            system = f"http://127.0.0.1:{apart.system_port}"
            assert (await client.get(f"{main}/-/metrics")).status_code == 404
            metrics = await client.get(f"{system}/-/metrics")
            assert metrics.status_code == 200 and "aioserve_" in metrics.text
            assert (await client.get(f"{system}/-/ready")).status_code == 200


async def test_readiness_is_apart_from_liveness() -> None:
    s = Serve(http_options={"port": 0})
    s.set_ready(False)  # e.g. a deployment still being built
    async with s, httpx.AsyncClient(base_url=s.url or "") as client:
        assert (await client.get("/-/healthz")).status_code == 200
        assert (await client.get("/-/ready")).status_code == 503
        # A route that may come with the deployment: "try again", not "there is none".
        starting = await client.get("/not-yet")
        assert (starting.status_code, starting.headers["Retry-After"]) == (503, "1")
        assert "starting" in starting.text
        s.set_ready(True)
        assert (await client.get("/-/ready")).status_code == 200
        assert (await client.get("/not-yet")).status_code == 404
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold(request: Request) -> str:
            entered.set()
            await release.wait()
            return "done"

        await deploy(s, "hold", hold)
        held = asyncio.create_task(client.get("/hold"))
        await asyncio.wait_for(entered.wait(), HANG_GUARD_S)
        closing = asyncio.create_task(s.aclose())
        await wait_until(lambda: not s.ready, "the instance drains")
        assert (await client.get("/-/ready")).status_code == 503
        assert (await client.get("/-/healthz")).status_code == 200  # alive while draining
        release.set()
        assert (await held).text == "done"
        await closing


# -- a stuck sync handler at shutdown ------------------------------------------------------------


async def test_shutdown_with_a_stuck_sync_handler_is_bounded_and_answers_503() -> None:
    stuck = threading.Event()
    entered = threading.Event()

    def handler(request: Any) -> str:
        entered.set()
        stuck.wait()  # never returns on its own
        return "never"

    s = Serve(http_options={"port": 0})
    try:
        await s.start()
        await s.create_backend("stuck", handler, config={"graceful_shutdown_timeout_s": 0.5})
        await s.create_endpoint("stuck", backend="stuck", route="/stuck")
        async with httpx.AsyncClient(base_url=s.url or "", timeout=HANG_GUARD_S) as client:
            request = asyncio.create_task(client.get("/stuck"))
            await asyncio.to_thread(entered.wait, HANG_GUARD_S)
            started = time.monotonic()
            await asyncio.wait_for(s.aclose(), HANG_GUARD_S)
            took = time.monotonic() - started
            answer = await request
        assert 0.4 < took < 0.5 + 2.0
        assert answer.status_code == 503
        assert "ReplicaStopped" in answer.text
    finally:
        stuck.set()
        await s.aclose()


# -- sync handlers read the body ------------------------------------------------------------------


async def test_a_sync_handler_reads_json_and_text_the_flask_way(edge: Serve) -> None:
    seen: list[str] = []

    def predict(request: Any) -> dict[str, Any]:
        seen.append(threading.current_thread().name)
        if request.args.get("raw"):
            return {"text": request.get_data(as_text=True), "bytes": len(request.data)}
        return {"sum": sum(request.get_json()["pixels"])}

    await deploy(edge, "predict", predict)
    async with httpx.AsyncClient(base_url=edge.url or "", timeout=HANG_GUARD_S) as client:
        r = await client.post("/predict", json={"pixels": [1, 2, 3.5]})
        assert (r.status_code, r.json()) == (200, {"sum": 6.5})
        r = await client.post("/predict", params={"raw": "1"}, content="héllo".encode())
        assert r.json() == {"text": "héllo", "bytes": 6}
        bad = await client.post("/predict", content=b"{nope")
        assert bad.status_code == 400
        huge = await client.post("/predict", content=b"1" * 5000)
        assert huge.status_code == 400
        too_big = await client.post("/predict", content=bytes(2 * 1024 * 1024))
        assert too_big.status_code == 413
    # On the replica's thread, never the event loop's.
    assert seen and all(name.startswith("aioserve-predict#") for name in seen)


async def test_an_async_handler_is_told_to_await_the_body(edge: Serve) -> None:
    async def early(request: Any) -> str:
        return request.get_json()  # type: ignore[no-any-return]

    await deploy(edge, "early", early)
    async with httpx.AsyncClient(base_url=edge.url or "") as client:
        r = await client.post("/early", json={"a": 1})
    assert r.status_code == 500
    assert "await request.body()" in r.text
