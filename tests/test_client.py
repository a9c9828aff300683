"""The sync facade (``Client`` and the module-level functions), driven from plain threads.

These tests use aioserve as scripts do: ``serve.start()`` runs an instance on a background
event-loop thread and every call blocks until done. They synchronise on ``threading.Event``s,
barriers and futures, never on sleeps, and every instance they start is shut down, even on failure.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

import aioserve
import aioserve as serve

WAIT_S = 20.0  # upper bound for anything that should answer at once


def local() -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": 0}


def get(url: str) -> requests.Response:
    # A new connection per request: a reused keep-alive connection answers only after ~40 ms on
    # this loopback (delayed ACK; bare uvicorn does the same).
    return requests.get(url, timeout=WAIT_S)


pytestmark = pytest.mark.usefixtures("no_instance_left")


Start = Callable[..., serve.Client]


@pytest.fixture
def start() -> Iterator[Start]:
    """``serve.start`` on a free port; every instance it started is shut down afterwards."""
    started: list[serve.Client] = []

    def _start(**kwargs: Any) -> serve.Client:
        kwargs.setdefault("http_options", local())
        client = serve.start(**kwargs)
        started.append(client)
        return client

    yield _start
    for client in reversed(started):
        client.shutdown()


def loop_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "aioserve-loop")


class InvalidInput(Exception):
    """A user error raised inside a backend."""


# -- start / connect / shutdown / init ----------------------------------------------------------


def test_start_returns_client_and_module_functions_act_on_it(start: Start) -> None:
    client = start()
    assert isinstance(client, serve.Client)
    assert serve.connect() is client

    client.create_backend("a", lambda request: "from a")
    serve.create_backend("b", lambda request: "from b")
    assert sorted(client.list_backends()) == ["a", "b"]
    assert serve.list_backends() == client.list_backends()

    serve.create_endpoint("a", backend="a", route="/a")
    client.create_endpoint("b", "b", route="/b")
    assert serve.list_endpoints() == client.list_endpoints()
    assert sorted(client.list_endpoints()) == ["a", "b"]
    assert get(f"{client.url}/a").text == "from a"
    assert get(f"{client.url}/b").text == "from b"
    assert client.get_handle("b").remote().result(WAIT_S) == "from b"


def test_shutdown_stops_the_current_instance_and_later_calls_raise(start: Start) -> None:
    client = start()
    serve.create_backend("hello", lambda request: "hello")
    serve.create_endpoint("hello", backend="hello", route="/hello")
    handle = serve.get_handle("hello")
    url = f"{client.url}/hello"
    assert get(url).text == "hello"

    serve.shutdown()
    assert not client.running
    with pytest.raises(requests.ConnectionError):
        get(url)
    # Calls on the stopped instance: ServeShutdown, a ServeError and a RuntimeError.
    with pytest.raises(serve.ServeShutdown, match="shut down"):
        client.list_backends()
    with pytest.raises(serve.ServeShutdown):
        client.create_backend("other", lambda request: "other")
    with pytest.raises(serve.ServeShutdown):
        client.get_handle("hello")
    with pytest.raises(serve.ServeShutdown):
        handle.remote().result(WAIT_S)
    assert issubclass(serve.ServeShutdown, serve.ServeError)
    # No current instance any more: the module-level functions say so.
    with pytest.raises(serve.ServeError, match="start"):
        serve.list_backends()
    with pytest.raises(serve.ServeError):
        serve.connect()
    serve.shutdown()  # nothing to stop: a no-op
    client.shutdown()  # idempotent


def test_init_returns_the_running_instance_else_starts_one(start: Start) -> None:
    first = serve.init(http_port=0)
    try:
        assert first.running
        assert first.url is not None
        assert serve.connect() is first
        assert serve.init(http_port=0) is first  # 0.8: "will just return"
        second = start()
        assert serve.init() is second
    finally:
        first.shutdown()


def test_several_instances_keep_their_own_state(start: Start) -> None:
    a = start()
    b = start()
    assert a.http_port != b.http_port
    assert serve.connect() is b  # the last started is current

    a.create_backend("model", lambda request: "from a")
    a.create_backend("only_a", lambda request: "only a")
    a.create_endpoint("model", backend="model", route="/model")
    b.create_backend("model", lambda request: "from b")
    b.create_endpoint("model", backend="model", route="/model")
    assert sorted(a.list_backends()) == ["model", "only_a"]
    assert sorted(b.list_backends()) == ["model"]
    assert serve.list_backends() == b.list_backends()

    assert get(f"{a.url}/model").text == "from a"
    assert get(f"{b.url}/model").text == "from b"
    assert a.get_handle("model").remote().result(WAIT_S) == "from a"
    assert b.get_handle("model").remote().result(WAIT_S) == "from b"

    # Shutting the current one down leaves the other serving, and current again.
    serve.shutdown()
    assert not b.running
    with pytest.raises(requests.ConnectionError):
        get(f"{b.url}/model")
    assert get(f"{a.url}/model").text == "from a"
    assert serve.connect() is a
    assert sorted(serve.list_backends()) == ["model", "only_a"]


# -- sync and async handles ---------------------------------------------------------------------


def test_sync_handle_from_many_threads(start: Start) -> None:
    client = start()

    def triple(x: int) -> int:
        return 3 * x

    client.create_backend("triple", triple, config={"num_replicas": 2})
    client.create_endpoint("triple", backend="triple")
    handle = serve.get_handle("triple")
    assert isinstance(handle, serve.SyncServeHandle)
    future = handle.remote(1)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(WAIT_S) == 3

    def worker(t: int) -> list[int]:
        futures = [handle.remote(t * 1000 + i) for i in range(50)]
        return [f.result(WAIT_S) for f in futures]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    assert results == [[3 * (t * 1000 + i) for i in range(50)] for t in range(8)]


def picky_sync(x: int) -> int:
    if x < 0:
        raise InvalidInput(f"negative input {x}")
    return x


async def picky_async(x: int) -> int:
    if x < 0:
        raise InvalidInput(f"negative input {x}")
    return x


@pytest.mark.parametrize("fn", [picky_sync, picky_async], ids=["sync", "async"])
def test_user_exception_comes_back_with_its_type(start: Start, fn: Callable[..., Any]) -> None:
    start()
    serve.create_backend("picky", fn)
    serve.create_endpoint("picky", backend="picky")
    handle = serve.get_handle("picky")
    with pytest.raises(InvalidInput, match="negative input -7"):
        handle.remote(-7).result(WAIT_S)
    # The replica goes on serving.
    assert handle.remote(7).result(WAIT_S) == 7


def test_async_handle_from_another_event_loop(start: Start) -> None:
    client = start()

    async def square(x: int) -> int:
        return x * x

    serve.create_backend("square", square)
    serve.create_endpoint("square", backend="square")
    handle = serve.get_handle("square", sync=False)
    assert isinstance(handle, serve.ServeHandle)

    async def main() -> list[int]:
        assert asyncio.get_running_loop() is not client.serve.loop
        return list(await asyncio.gather(*(handle.remote(i) for i in range(20))))

    assert asyncio.run(main()) == [i * i for i in range(20)]
    # A second, fresh loop works too.
    assert asyncio.run(main()) == [i * i for i in range(20)]


# -- blocking calls from the loop thread --------------------------------------------------------


def test_blocking_call_from_the_loop_thread_raises_instead_of_deadlocking(start: Start) -> None:
    client = start()

    async def lists(request: Any) -> Any:
        return serve.list_backends()

    async def creates(request: Any) -> str:
        serve.create_backend("inner", lambda r: "inner")
        return "created"

    serve.create_backend("lists", lists)
    serve.create_endpoint("lists", backend="lists", route="/lists")
    serve.create_backend("creates", creates)
    serve.create_endpoint("creates", backend="creates", route="/creates")

    for name in ("lists", "creates"):
        response = get(f"{client.url}/{name}")
        assert response.status_code == 500
        assert "ServeError" in response.text
        assert "event loop" in response.text
        with pytest.raises(serve.ServeError, match="event loop"):
            serve.get_handle(name).remote().result(WAIT_S)

    assert "inner" not in serve.list_backends()
    # The instance is not wedged.
    serve.create_backend("fine", lambda request: "fine")
    serve.create_endpoint("fine", backend="fine", route="/fine")
    assert get(f"{client.url}/fine").text == "fine"


def test_sync_handle_result_on_the_loop_thread_raises_instead_of_deadlocking(
    start: Start,
) -> None:
    # An async backend using the sync handle (the default of serve.get_handle) and blocking on its
    # result would block the loop that has to produce that result. It must fail with a clear
    # ServeError. The backend waits at most 2 s so that the failure, if any, is not a hang.
    start()
    serve.create_backend("inner", lambda x: x + 1)
    serve.create_endpoint("inner", backend="inner")

    async def outer(x: int) -> Any:
        return serve.get_handle("inner").remote(x).result(timeout=2)

    serve.create_backend("outer", outer)
    serve.create_endpoint("outer", backend="outer")
    with pytest.raises(serve.ServeError) as info:
        serve.get_handle("outer").remote(1).result(WAIT_S)
    assert not isinstance(info.value, TimeoutError)
    # The instance is not wedged.
    assert serve.get_handle("inner").remote(1).result(WAIT_S) == 2


# -- inside a backend ---------------------------------------------------------------------------


def test_connect_and_replica_context_inside_a_backend(start: Start) -> None:
    a = start()
    b = start()
    b.create_backend("b_only", lambda request: "b")
    assert serve.connect() is b

    barrier = threading.Barrier(2, timeout=WAIT_S)

    def where(wait: bool = False) -> dict[str, Any]:
        if wait:
            barrier.wait()  # both calls must run at once: on two replicas
        ctx = serve.get_replica_context()
        return {
            "client": serve.connect(),
            "backends": sorted(serve.list_backends()),  # a sync backend may block
            "backend_tag": ctx.backend_tag,
            "replica_tag": ctx.replica_tag,
        }

    async def where_async() -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {"client": serve.connect(), "backend_tag": ctx.backend_tag}

    a.create_backend("where", where, config={"num_replicas": 2})
    a.create_endpoint("where", backend="where")
    a.create_backend("where_async", where_async)
    a.create_endpoint("where_async", backend="where_async")

    handle = a.get_handle("where")
    info = handle.remote().result(WAIT_S)
    assert info["client"] is a  # the instance it runs in, not the current one
    assert info["backends"] == ["where", "where_async"]
    assert info["backend_tag"] == "where"
    tag, sep, suffix = info["replica_tag"].partition("#")
    assert (tag, sep) == ("where", "#")
    assert suffix

    # Two calls that wait for each other run on two replicas with two distinct tags.
    futures = [handle.remote(wait=True) for _ in range(2)]
    tags = {f.result(WAIT_S)["replica_tag"] for f in futures}
    assert len(tags) == 2
    assert all(t.startswith("where#") for t in tags)

    info = a.get_handle("where_async").remote().result(WAIT_S)
    assert info == {"client": a, "backend_tag": "where_async"}

    with pytest.raises(serve.ServeError, match="outside"):
        serve.get_replica_context()


def test_model_composition_through_the_facade(start: Start) -> None:
    client = start()

    def plus_one(x: int) -> int:
        return x + 1

    def composed_sync(x: int) -> int:
        return serve.get_handle("b").remote(x).result(WAIT_S) * 10

    async def composed_async(x: int) -> int:
        handle = serve.get_handle("b", sync=False)
        return await handle.remote(x) * 100

    client.create_backend("b", plus_one)
    client.create_endpoint("b", backend="b")
    client.create_backend("a_sync", composed_sync)
    client.create_endpoint("a_sync", backend="a_sync")
    client.create_backend("a_async", composed_async)
    client.create_endpoint("a_async", backend="a_async")

    assert serve.get_handle("a_sync").remote(4).result(WAIT_S) == 50
    assert serve.get_handle("a_async").remote(4).result(WAIT_S) == 500
    futures = [
        serve.get_handle(name).remote(i) for i in range(10) for name in ("a_sync", "a_async")
    ]
    assert [f.result(WAIT_S) for f in futures] == [
        v for i in range(10) for v in ((i + 1) * 10, (i + 1) * 100)
    ]


def test_a_blocked_sync_handler_does_not_hold_up_async_endpoints(start: Start) -> None:
    client = start()
    entered = threading.Event()
    release = threading.Event()

    def blocker(request: Any) -> str:
        entered.set()
        return "released" if release.wait(WAIT_S) else "timed out"

    async def quick(request: Any) -> str:
        return "quick"

    serve.create_backend("blocker", blocker)
    serve.create_endpoint("blocker", backend="blocker")
    serve.create_backend("quick", quick)
    serve.create_endpoint("quick", backend="quick", route="/quick")

    blocked = serve.get_handle("blocker").remote()
    try:
        assert entered.wait(WAIT_S)
        answers = [get(f"{client.url}/quick").text for _ in range(50)]
        assert answers == ["quick"] * 50
        # The sync handler was busy the whole time: the async answers did not wait for it.
        assert not blocked.done()
    finally:
        release.set()
    assert blocked.result(WAIT_S) == "released"


# -- detached instances and start failures ------------------------------------------------------


def test_detached_instance_outlives_its_client_object() -> None:
    client = serve.start(detached=True, http_options=local())
    try:
        assert client.detached
        client.create_backend("hello", lambda request: "still here")
        client.create_endpoint("hello", backend="hello", route="/hello")
        url = client.url
        del client
        gc.collect()
        assert get(f"{url}/hello").text == "still here"
        current = serve.connect()
        assert current.url == url
        assert current.running
    finally:
        serve.shutdown()
    with pytest.raises(requests.ConnectionError):
        get(f"{url}/hello")


def test_bind_failure_raises_at_start_and_leaves_no_instance(start: Start) -> None:
    threads_before = loop_threads()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = {"host": "127.0.0.1", "port": port}

        with pytest.raises(serve.BindError, match=str(port)) as info:
            serve.start(http_options=taken)
        assert isinstance(info.value, OSError)
        assert isinstance(info.value, aioserve.ServeError)
        # No half-started instance: nothing is current, no loop thread is left running.
        with pytest.raises(serve.ServeError):
            serve.connect()
        assert loop_threads() == threads_before

        # With an instance running, a failed start does not replace it as the current one.
        running = start()
        with pytest.raises(serve.BindError):
            serve.start(http_options=taken)
        assert serve.connect() is running
        assert loop_threads() == threads_before + 1


class _ComposesThroughTheModuleAPI:
    """A backend that reaches its own instance through ``serve.get_handle``, as 1.x code does."""

    def __init__(self) -> None:
        self.inner_async = serve.get_handle("inner", sync=False)
        self.inner_sync = serve.get_handle("inner")
        self.backends = sorted(serve.list_backends())  # a blocking call, from the replica thread

    async def __call__(self, x: int) -> list[Any]:
        return [await self.inner_async.remote(x), await self.inner_sync.remote(x), self.backends]


def test_the_module_api_inside_a_backend_of_an_instance_run_as_the_core(
    no_instance_left: None,
) -> None:
    async def main() -> list[Any]:
        async with serve.Serve(http_options={"location": "NoServer"}) as instance:
            await instance.create_backend("inner", lambda x: x * 2)
            await instance.create_endpoint("inner", backend="inner")
            await instance.create_backend("outer", _ComposesThroughTheModuleAPI)
            await instance.create_endpoint("outer", backend="outer")
            result: list[Any] = await instance.get_handle("outer").remote(4)
            with pytest.raises(serve.ServeError, match="No aioserve instance is running"):
                serve.connect()  # outside its backends, no instance is current
            return result

    # The constructor runs before the backend is registered: it sees only "inner".
    assert asyncio.run(main()) == [8, 8, ["inner"]]
