"""Regression tests for the review fixes to the instance, backend and replica lifecycles: bad
deadlines over HTTP, shared Response objects, shutdown from inside a backend, clients that go away
during their upload, scale-down, deletion, updates and instance shutdown with work in flight,
async generator handlers, classes with one batching method, and interpreter exit.

Each test checks what a user would notice. They synchronise on events, futures and the instance's
public state (``backend_statistics``, ``list_backends``, refused calls), never on sleeps or counts
of loop turns; timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, Gate, gated, until_queued, wait_until
from starlette.requests import Request
from starlette.responses import PlainTextResponse

import aioserve
from aioserve import (
    ReplicaStopped,
    Serve,
    ServeError,
    ServeHandle,
    ServeShutdown,
    accept_batch,
    get_replica_context,
)

try:
    import uvloop
except ImportError:  # pragma: no cover - the [fast] extra is installed in CI
    uvloop = None


async def deploy(s: Serve, tag: str, target: Any, *, config: Any = None) -> ServeHandle:
    """A backend and a headless endpoint of the same name; a handle to it."""
    await s.create_backend(tag, target, config=config)
    await s.create_endpoint(tag, backend=tag)
    return s.get_handle(tag)


async def deploy_http(
    s: Serve,
    tag: str,
    target: Any,
    *,
    config: Any = None,
    methods: list[str] | None = None,
) -> None:
    """A backend and an endpoint of the same name, routed at ``/{tag}``."""
    await s.create_backend(tag, target, config=config)
    await s.create_endpoint(tag, backend=tag, route=f"/{tag}", methods=methods or ["GET"])


async def until_shutdown_has_begun(probe: ServeHandle) -> None:
    """Call ``probe`` (a handler that answers at once) until the instance refuses new top-level
    calls: its shutdown has begun. Calls made before that are answered as usual."""
    async with asyncio.timeout(HANG_GUARD_S):
        while True:
            try:
                await probe.remote("probe")
            except ServeShutdown:
                return


def replica_threads_left(backend_tag: str, *, keep: str | None = None) -> list[str]:
    """Names of the replica threads of ``backend_tag`` still alive after a bounded join
    (threads of the replica tagged ``keep`` are left alone)."""
    deadline = time.monotonic() + HANG_GUARD_S
    left = []
    for thread in threading.enumerate():
        name = thread.name
        if not name.startswith(f"aioserve-{backend_tag}#"):
            continue
        if keep is not None and name.startswith(f"aioserve-{keep}_"):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(name)
    return left


# -- 1. bad deadlines in the query string --------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("relative_slo_ms", "nan"),
        ("relative_slo_ms", "inf"),
        ("relative_slo_ms", "-1"),
        ("relative_slo_ms", "abc"),
        ("absolute_slo_ms", "nan"),
    ],
)
async def test_bad_slo_query_parameter_is_a_400_naming_it(
    serve: Serve, http: httpx.AsyncClient, param: str, value: str
) -> None:
    await deploy_http(serve, "echo", lambda request: "ok")
    r = await http.get("/echo", params={param: value})
    assert r.status_code == 400
    assert param in r.text
    after = await http.get("/echo")
    assert (after.status_code, after.text) == (200, "ok")


async def test_nan_deadline_while_the_only_replica_is_busy_strands_no_slot(
    serve: Serve, http: httpx.AsyncClient, gate: Gate
) -> None:
    async def held(request: Request) -> str:
        await gate.pass_through(request.url.path)
        return "done"

    await deploy_http(serve, "held", held, config={"max_concurrent_queries": 1})
    first = asyncio.create_task(http.get("/held"))
    await gate.until_inside(1)
    bad = await asyncio.wait_for(http.get("/held", params={"relative_slo_ms": "nan"}), HANG_GUARD_S)
    assert bad.status_code == 400
    assert "relative_slo_ms" in bad.text
    gate.release.set()
    assert (await first).status_code == 200
    # Every slot came back: several requests in a row all answer.
    answers = await asyncio.wait_for(
        asyncio.gather(*(http.get("/held") for _ in range(4))), HANG_GUARD_S
    )
    assert [(r.status_code, r.text) for r in answers] == [(200, "done")] * 4


def test_nan_deadline_on_the_sync_facade_strands_no_slot(client: aioserve.Client) -> None:
    """The facade's loop is uvloop when installed; its call_at refuses a NaN time outright."""
    if uvloop is not None:
        assert isinstance(client.serve.loop, uvloop.Loop)
    entered = threading.Event()
    release = threading.Event()

    def held(arg: Any = None) -> str:
        if arg == "hold":
            entered.set()
            release.wait(HANG_GUARD_S)
            return "held"
        return "ok"

    client.create_backend("held", held, config={"max_concurrent_queries": 1})
    client.create_endpoint("held", backend="held", route="/held")
    assert client.url is not None
    try:
        busy = client.get_handle("held").remote("hold")
        assert entered.wait(HANG_GUARD_S)
        with httpx.Client(base_url=client.url, timeout=HANG_GUARD_S) as http:
            bad = http.get("/held", params={"relative_slo_ms": "nan"})
            assert bad.status_code == 400
            assert "relative_slo_ms" in bad.text
            release.set()
            assert busy.result(HANG_GUARD_S) == "held"
            for _ in range(4):
                r = http.get("/held")
                assert (r.status_code, r.text) == (200, "ok")
    finally:
        release.set()


# -- 2. a shared Response object -----------------------------------------------------------------

SHARED_OK = PlainTextResponse("ok")


async def test_shared_response_gets_one_request_id_per_answer_and_never_grows(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    before = list(SHARED_OK.raw_headers)
    await deploy_http(serve, "shared", lambda request: SHARED_OK)
    ids = []
    for _ in range(3):
        r = await http.get("/shared")
        assert (r.status_code, r.text) == (200, "ok")
        assert len(r.headers.get_list("x-request-id")) == 1
        ids.append(r.headers["x-request-id"])
    assert len(set(ids)) == 3
    assert SHARED_OK.raw_headers == before


# -- 3. serve.shutdown() from inside a backend ---------------------------------------------------


@pytest.mark.usefixtures("no_instance_left")
def test_module_shutdown_inside_a_sync_backend_raises_and_the_instance_keeps_running(
    client: aioserve.Client,
) -> None:
    def stopper(x: Any) -> str:
        aioserve.shutdown()
        return "shut down"

    client.create_backend("stopper", stopper)
    client.create_endpoint("stopper", backend="stopper")
    client.create_backend("echo", lambda x: x)
    client.create_endpoint("echo", backend="echo")
    with pytest.raises(ServeError, match="cannot be shut down from inside"):
        client.get_handle("stopper").remote(1).result(HANG_GUARD_S)
    assert client.running
    assert aioserve.connect() is client
    assert set(aioserve.list_backends()) == {"stopper", "echo"}
    assert client.get_handle("echo").remote(7).result(HANG_GUARD_S) == 7


# -- 4. a client that goes away during its upload ------------------------------------------------


async def test_client_gone_during_upload_logs_no_asgi_exception(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Real uvicorn, raw TCP: headers promise 1000 bytes, 100 arrive, then the client closes."""
    sizes: list[int] = []

    async def upload(request: Request) -> int:
        sizes.append(len(await request.body()))
        return sizes[-1]

    await deploy_http(served, "upload", upload, methods=["POST"])
    assert served.url is not None and served.http_port is not None
    caplog.set_level(logging.ERROR, logger="uvicorn.error")
    _, writer = await asyncio.open_connection("127.0.0.1", served.http_port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: aioserve\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # The server goes on answering (and has long handled the broken upload by then).
    async with httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as http:
        r = await http.post("/upload", content=b"y" * 10)
    assert (r.status_code, r.json()) == (200, 10)
    # Shutdown waits for every request the server took (uvicorn cancels, and logs, any still
    # running after its graceful timeout): the broken upload has been handled by then.
    await asyncio.wait_for(served.aclose(), HANG_GUARD_S)
    assert sizes == [10]  # the broken upload never reached the handler
    errors = [rec for rec in caplog.records if rec.name == "uvicorn.error"]
    assert not [rec for rec in errors if "Exception in ASGI application" in rec.getMessage()]
    assert not [rec for rec in errors if "timeout graceful shutdown" in rec.getMessage()]


# -- 5. scale-down, then force deletion or instance shutdown -------------------------------------


async def test_force_delete_after_scale_down_stops_the_retiring_replicas_request(
    serve: Serve, gate: Gate
) -> None:
    h = await deploy(
        serve, "force-deleted", gated(gate), config={"num_replicas": 2, "max_concurrent_queries": 1}
    )
    calls = [h.remote(i) for i in range(2)]
    await gate.until_inside(2)  # one request on each replica
    await serve.update_backend_config("force-deleted", {"num_replicas": 1})
    await serve.delete_endpoint("force-deleted")
    await asyncio.wait_for(serve.delete_backend("force-deleted", force=True), HANG_GUARD_S)
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), HANG_GUARD_S)
    assert [type(r) for r in results] == [ReplicaStopped, ReplicaStopped]
    assert replica_threads_left("force-deleted") == []


async def test_graceful_aclose_waits_for_a_retiring_replicas_request(serve: Serve) -> None:
    release = {"a": asyncio.Event(), "b": asyncio.Event()}
    seen: dict[str, str] = {}

    async def held(x: str) -> tuple[str, str]:
        tag = get_replica_context().replica_tag
        seen[x] = tag
        if x in release:
            await release[x].wait()
        return x, tag

    h = await deploy(serve, "b", held, config={"num_replicas": 2, "max_concurrent_queries": 2})
    calls = {x: h.remote(x) for x in release}
    await wait_until(lambda: len(seen) == 2, "both requests running")
    assert len(set(seen.values())) == 2  # one on each replica
    await serve.update_backend_config("b", {"num_replicas": 1})
    _, kept_tag = await asyncio.wait_for(h.remote("probe"), HANG_GUARD_S)
    retiring = next(x for x, tag in seen.items() if tag != kept_tag)
    kept = next(x for x in release if x != retiring)
    release[kept].set()
    assert await calls[kept] == (kept, kept_tag)
    # Only the replica taken out of routing still has a request now.
    order: list[str] = []
    calls[retiring].add_done_callback(lambda _: order.append("request"))
    closing = asyncio.create_task(serve.aclose())
    closing.add_done_callback(lambda _: order.append("aclose"))
    await until_shutdown_has_begun(h)
    assert not closing.done()
    release[retiring].set()
    await asyncio.wait_for(closing, HANG_GUARD_S)
    assert order == ["request", "aclose"]
    assert calls[retiring].result() == (retiring, seen[retiring])


# -- 6. a cancelled update -----------------------------------------------------------------------


@pytest.mark.parametrize("blocked_in", ["constructor", "reconfigure"])
async def test_cancelled_update_changes_nothing(serve: Serve, gate: Gate, blocked_in: str) -> None:
    loop = asyncio.get_running_loop()
    blocked = asyncio.Event()
    unblock_constructor = threading.Event()
    never = asyncio.Event()
    built: list[object] = []

    class Model:
        def __init__(self) -> None:
            built.append(self)
            if blocked_in == "constructor" and len(built) > 1:
                loop.call_soon_threadsafe(blocked.set)
                unblock_constructor.wait(HANG_GUARD_S)

        async def reconfigure(self, user_config: str) -> None:
            if blocked_in == "reconfigure" and user_config == "new" and self is built[0]:
                blocked.set()
                await never.wait()

        async def __call__(self, x: str) -> str:
            tag = get_replica_context().replica_tag
            if x == "hold":
                await gate.pass_through(tag)
            return tag

    h = await deploy(serve, "update-cancelled", Model, config={"user_config": "old"})
    old_tag = await h.remote("probe")
    config_before = serve.get_backend_config("update-cancelled")
    listed_before = serve.list_backends()
    update = asyncio.create_task(
        serve.update_backend_config("update-cancelled", {"num_replicas": 3, "user_config": "new"})
    )
    await asyncio.wait_for(blocked.wait(), HANG_GUARD_S)
    # Nothing is in force before every step has worked ...
    assert serve.get_backend_config("update-cancelled") == config_before
    assert serve.list_backends() == listed_before
    update.cancel()
    with pytest.raises(asyncio.CancelledError):
        await update
    unblock_constructor.set()
    # ... and a cancelled update leaves it all as it was.
    assert serve.get_backend_config("update-cancelled") == config_before
    assert serve.list_backends() == listed_before
    # Held calls spread over every replica in routing: only the old one serves.
    calls = [h.remote("hold") for _ in range(6)]
    await gate.until_inside(6)
    gate.release.set()
    assert set(await asyncio.gather(*calls)) == {old_tag}
    assert replica_threads_left("update-cancelled", keep=old_tag) == []


# -- 7. graceful instance shutdown with work in flight -------------------------------------------


async def test_graceful_aclose_serves_nested_calls_and_refuses_new_top_level_ones(
    serve: Serve,
) -> None:
    async def down(x: int) -> int:
        return x * 2

    down_handle = await deploy(serve, "down", down)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def up(x: int) -> int:
        entered.set()
        await release.wait()
        return await down_handle.remote(x)

    call = (await deploy(serve, "up", up)).remote(21)
    await asyncio.wait_for(entered.wait(), HANG_GUARD_S)
    order: list[str] = []
    call.add_done_callback(lambda _: order.append("request"))
    closing = asyncio.create_task(serve.aclose())
    closing.add_done_callback(lambda _: order.append("aclose"))
    await until_shutdown_has_begun(down_handle)
    assert not closing.done()
    with pytest.raises(ServeShutdown):
        await down_handle.remote(1)  # a new top-level call once shutdown has begun
    release.set()
    assert await asyncio.wait_for(call, HANG_GUARD_S) == 42
    await asyncio.wait_for(closing, HANG_GUARD_S)
    assert order == ["request", "aclose"]


async def test_graceful_aclose_lets_an_http_request_in_flight_finish(served: Serve) -> None:
    """Real uvicorn (whose own graceful timeout is 5 s): the instance drains its backends while
    the server still runs, refusing new requests with 503, and only then stops the server."""
    entered = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def slow(request: Request) -> str:
        entered.set()
        await release.wait()
        order.append("handler")
        return "done"

    await deploy_http(served, "slow", slow, config={"graceful_shutdown_timeout_s": 30})
    await deploy_http(served, "ping", lambda request: "pong")
    assert served.url is not None
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as first_client,
        httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as late_client,
    ):
        in_flight = asyncio.create_task(first_client.get("/slow"))
        await asyncio.wait_for(entered.wait(), HANG_GUARD_S)
        closing = asyncio.create_task(served.aclose())
        closing.add_done_callback(lambda _: order.append("aclose"))
        # Shutdown has begun once the server refuses a request it would answer at once.
        async with asyncio.timeout(HANG_GUARD_S):
            while (await late_client.get("/ping")).status_code != 503:
                pass
        late = await late_client.get("/slow")
        assert late.status_code == 503
        assert not closing.done()
        release.set()
        r = await in_flight
        assert (r.status_code, r.text) == (200, "done")
        await asyncio.wait_for(closing, HANG_GUARD_S)
    assert order == ["handler", "aclose"]


# -- 8. a delete_backend caller cancelled mid-drain ----------------------------------------------


async def test_cancelled_delete_backend_still_drains_and_leaves_no_thread(serve: Serve) -> None:
    loop = asyncio.get_running_loop()
    running = asyncio.Event()
    release = threading.Event()

    def held(x: int) -> int:
        loop.call_soon_threadsafe(running.set)
        release.wait(HANG_GUARD_S)
        return x

    h = await deploy(serve, "delete-cancelled", held)
    try:
        call = h.remote(1)
        await asyncio.wait_for(running.wait(), HANG_GUARD_S)
        await serve.delete_endpoint("delete-cancelled")
        deleting = asyncio.create_task(serve.delete_backend("delete-cancelled"))
        await wait_until(
            lambda: "delete-cancelled" not in serve.list_backends(), "the deletion has begun"
        )
        assert "delete-cancelled" not in serve.list_backends()
        assert not deleting.done()  # draining the request in flight
        deleting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await deleting
        assert not call.done()
        release.set()
        assert await asyncio.wait_for(call, HANG_GUARD_S) == 1
        await asyncio.wait_for(serve.aclose(), HANG_GUARD_S)
    finally:
        release.set()
    assert replica_threads_left("delete-cancelled") == []


# -- 9. create_backend under way when the instance shuts down ------------------------------------


async def test_aclose_waits_for_a_create_backend_under_way_then_stops_it(serve: Serve) -> None:
    """Pinned: the create succeeds (shutdown waits for the control call), then shutdown stops
    the new backend and its replica thread."""
    loop = asyncio.get_running_loop()
    constructing = asyncio.Event()
    release = threading.Event()

    class Slow:
        def __init__(self) -> None:
            loop.call_soon_threadsafe(constructing.set)
            release.wait(HANG_GUARD_S)

        def __call__(self, x: int) -> int:
            return x

    probe = await deploy(serve, "probe", lambda x: x)
    try:
        creating = asyncio.create_task(serve.create_backend("created-while-closing", Slow))
        await asyncio.wait_for(constructing.wait(), HANG_GUARD_S)
        closing = asyncio.create_task(serve.aclose())
        await until_shutdown_has_begun(probe)
        assert not closing.done()
        release.set()
        await asyncio.wait_for(creating, HANG_GUARD_S)  # pinned: it succeeds (no ServeError)
        await asyncio.wait_for(closing, HANG_GUARD_S)
    finally:
        release.set()
    with pytest.raises(ServeShutdown):
        await serve.create_backend("other", Slow)
    assert replica_threads_left("created-while-closing") == []


# -- 10. async generator handlers ----------------------------------------------------------------


async def test_async_generator_handler_holds_its_slot_and_sees_its_replica(
    serve: Serve, http: httpx.AsyncClient, gate: Gate
) -> None:
    bodies = {"running": 0, "peak": 0}

    async def stream(request: Request) -> AsyncIterator[str]:
        bodies["running"] += 1
        bodies["peak"] = max(bodies["peak"], bodies["running"])
        try:
            await gate.pass_through(None)
            yield get_replica_context().replica_tag + "\n"
            yield "end\n"
        finally:
            bodies["running"] -= 1

    await deploy_http(serve, "g", stream, config={"max_concurrent_queries": 1})
    requests = [asyncio.create_task(http.get("/g")) for _ in range(2)]
    await gate.until_inside(1)
    await until_queued(serve, "g", 1)
    assert bodies["running"] == 1  # the second stream waits for the only slot
    gate.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*requests), HANG_GUARD_S)
    for r in answers:
        assert r.status_code == 200
        tag, end = r.text.splitlines()
        assert tag.startswith("g#")
        assert end == "end"
    assert bodies["peak"] == 1


# -- 11. a class with one batching method --------------------------------------------------------


async def test_class_with_one_batch_method_runs_its_call_up_to_max_concurrent_queries(
    serve: Serve, gate: Gate
) -> None:
    class Model:
        @accept_batch
        async def many(self, items: list[int]) -> list[int]:
            return [i * 10 for i in items]

        async def __call__(self, x: int) -> object:
            return await gate.pass_through(x)

    h = await deploy(serve, "m", Model, config={"max_concurrent_queries": 3})
    assert serve.get_backend_config("m").max_concurrent_queries == 3
    calls = [h.remote(i) for i in range(5)]
    await gate.until_inside(3)
    await until_queued(serve, "m", 2)
    assert gate.inside == 3  # and no more: the limit still holds
    gate.release.set()
    assert await asyncio.gather(*calls) == list(range(5))
    assert gate.max_inside == 3
    assert await h.many.remote(4) == 40


# -- 12. interpreter exit with sync work queued --------------------------------------------------

EXIT_SCRIPT = """
import threading

import aioserve as serve

running = threading.Event()
release = threading.Event()


def work(x):
    if x == 0:
        running.set()
        release.wait(60)
    return x


serve.start(http_options={"host": None})
serve.create_backend(
    "w", work, config={"max_concurrent_queries": 1, "graceful_shutdown_timeout_s": 20}
)
serve.create_endpoint("w", backend="w")
handle = serve.get_handle("w")
futures = [handle.remote(i) for i in range(6)]
assert running.wait(30)
serve.list_backends()  # a round trip to the loop: the five others wait in the backend's queue
release.set()
print("exiting with", sum(not f.done() for f in futures), "request(s) pending", flush=True)
"""


def test_interpreter_exit_with_queued_sync_calls_is_prompt(tmp_path: Path) -> None:
    """The drain at exit used to wait out graceful_shutdown_timeout_s (20 s): Python had stopped
    the thread executors before aioserve's exit hook ran, so queued sync calls could not run."""
    script = tmp_path / "queued_at_exit.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    started = time.monotonic()
    # The child imports the aioserve these tests import, wherever it was installed from.
    env = {**os.environ, "PYTHONPATH": str(Path(aioserve.__file__).parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
        env=env,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "exiting with" in done.stdout
    assert "Traceback" not in done.stderr
    assert elapsed < 15, f"exit took {elapsed:.1f} s"
