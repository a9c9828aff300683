"""The code snippets of the five reference documents (``/work/shared/reference/``), run as written.

Each test is one section of one document and runs its snippets with ``import aioserve as serve``
against a real uvicorn server on a free port (the documents' port 8000 becomes the port the instance
reports in ``client.url``). Seeds 000, 002 and 003 use the module-level functions (the 0.8/1.3
style); seed 001 uses a ``Client`` object (the 1.0-1.2 style); seed 004 covers handles, HTTP
server locations and path parameters. Every test starts a fresh instance and shuts it down, even
on failure.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from starlette.requests import Request
from starlette.responses import Response

import aioserve as serve

LOCAL = {"host": "127.0.0.1", "port": 0}

# The keys of a list_backends() value that the documents print; the package reports more.
DOC_INFO = {"accepts_batches": False, "num_replicas": 1, "max_batch_size": None}

WAIT_S = 20.0  # upper bound for a future or HTTP call that should answer at once


def shown(backends: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``list_backends()`` cut down to the keys the documents show."""
    return {tag: {key: info[key] for key in DOC_INFO} for tag, info in backends.items()}


def shown_endpoints(endpoints: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``list_endpoints()`` cut down to the keys the documents show."""
    return {
        name: {key: info[key] for key in ("route", "methods", "traffic")}
        for name, info in endpoints.items()
    }


def get(url: str) -> requests.Response:
    # A new connection per request: on this loopback a reused keep-alive connection answers only
    # after ~40 ms (delayed ACK; bare uvicorn does the same), which would make loops slow.
    return requests.get(url, timeout=WAIT_S)


def body_value(response: requests.Response) -> Any:
    """The value a response carries: decoded JSON, or the text of a plain-text answer."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


pytestmark = pytest.mark.usefixtures("no_instance_left")


@pytest.fixture
def inited() -> Iterator[serve.Client]:
    """``serve.init()`` as the 0.8/1.3 documents call it, on a free port instead of 8000."""
    client = serve.init(http_port=0)
    try:
        assert client.url is not None
        assert serve.list_backends() == {}  # a fresh instance, not one left by another test
        yield client
    finally:
        client.shutdown()


@pytest.fixture
def started() -> Iterator[serve.Client]:
    """``client = serve.start()`` as the 1.x documents call it, on a free port."""
    client = serve.start(http_options=LOCAL)
    try:
        yield client
    finally:
        client.shutdown()


# -- the handlers of seeds 000 and 001 (seed 003's class takes no constructor argument) ----------


def handle_request(flask_request: Any) -> str:
    return "hello world"


class RequestHandler:
    # Take the message to return as an argument to the constructor.
    def __init__(self, msg: str) -> None:
        self.msg = msg

    def __call__(self, flask_request: Any) -> str:
        return self.msg


class RequestHandlerNoArgs:
    def __init__(self) -> None:
        self.msg = "hello, world!"

    def __call__(self, flask_request: Any) -> str:
        return self.msg


# -- seed 000: Key Concepts, module-level functions with serve.init() ---------------------------


def test_000_key_concepts_backends(inited: serve.Client) -> None:
    serve.create_backend("simple_backend", handle_request)
    # Pass in the message that the backend will return as an argument.
    serve.create_backend("simple_backend_class", RequestHandler, "hello, world!")

    assert shown(serve.list_backends()) == {
        "simple_backend": DOC_INFO,
        "simple_backend_class": DOC_INFO,
    }
    serve.delete_backend("simple_backend")
    assert shown(serve.list_backends()) == {"simple_backend_class": DOC_INFO}

    # "If we call this backend, it will respond with 'hello, world!'."
    serve.create_endpoint("class_endpoint", backend="simple_backend_class", route="/class")
    assert get(f"{inited.url}/class").text == "hello, world!"
    assert serve.get_handle("class_endpoint").remote().result(WAIT_S) == "hello, world!"


def test_000_key_concepts_endpoints(inited: serve.Client) -> None:
    serve.create_backend("simple_backend", handle_request)
    serve.create_endpoint(
        "simple_endpoint", backend="simple_backend", route="/simple", methods=["GET"]
    )
    response = get(f"{inited.url}/simple")
    assert response.status_code == 200
    assert response.text == "hello world"

    # The document prints 'traffic': {} right after create_endpoint(..., backend=...); API.md fixes
    # traffic as {backend: weight}, and an endpoint created with a backend sends it all its traffic.
    assert shown_endpoints(serve.list_endpoints()) == {
        "simple_endpoint": {
            "route": "/simple",
            "methods": ["GET"],
            "traffic": {"simple_backend": 1.0},
        }
    }

    # "A backend cannot be deleted while it is in use by an endpoint."
    with pytest.raises(ValueError, match="simple_backend"):
        serve.delete_backend("simple_backend")
    assert get(f"{inited.url}/simple").text == "hello world"

    # "Endpoints and backends are independent, so deleting an endpoint will not delete its
    # backends. However, an endpoint must be deleted in order to delete the backends..."
    serve.delete_endpoint("simple_endpoint")
    assert serve.list_endpoints() == {}
    assert list(serve.list_backends()) == ["simple_backend"]
    assert get(f"{inited.url}/simple").status_code == 404
    serve.delete_backend("simple_backend")
    assert serve.list_backends() == {}


# -- seed 001: Key Concepts, the 1.0-1.2 Client object ------------------------------------------


def test_001_key_concepts_backends(started: serve.Client) -> None:
    client = started
    client.create_backend("simple_backend", handle_request)
    # If we call this backend, it will respond with "hello, world!".
    client.create_backend("simple_backend_class", RequestHandler, "hello, world!")

    assert shown(client.list_backends()) == {
        "simple_backend": DOC_INFO,
        "simple_backend_class": DOC_INFO,
    }
    client.delete_backend("simple_backend")
    assert shown(client.list_backends()) == {"simple_backend_class": DOC_INFO}

    client.create_endpoint("class_endpoint", backend="simple_backend_class", route="/class")
    assert get(f"{client.url}/class").text == "hello, world!"

    # "The handler should take as input a Starlette Request object ... the handler may return a
    # Starlette Response object."
    def custom(starlette_request: Request) -> Response:
        assert isinstance(starlette_request, Request)
        name = starlette_request.query_params["name"]
        return Response(f"made for {name}", status_code=201, headers={"X-Custom": "yes"})

    client.create_backend("custom", custom)
    client.create_endpoint("custom", backend="custom", route="/custom")
    response = get(f"{client.url}/custom?name=ada")
    assert (response.status_code, response.text) == (201, "made for ada")
    assert response.headers["x-custom"] == "yes"


def test_001_key_concepts_endpoints(started: serve.Client) -> None:
    client = started
    client.create_backend("simple_backend", handle_request)
    client.create_endpoint(
        "simple_endpoint", backend="simple_backend", route="/simple", methods=["GET"]
    )
    assert get(f"http://127.0.0.1:{client.http_port}/simple").text == "hello world"

    # The document prints 'traffic': {}; API.md fixes traffic as {backend: weight} and an endpoint
    # created with a backend sends it all its traffic.
    assert shown_endpoints(client.list_endpoints()) == {
        "simple_endpoint": {
            "route": "/simple",
            "methods": ["GET"],
            "traffic": {"simple_backend": 1.0},
        }
    }
    with pytest.raises(ValueError, match="simple_backend"):
        client.delete_backend("simple_backend")

    client.delete_endpoint("simple_endpoint")
    assert client.list_endpoints() == {}
    assert list(client.list_backends()) == ["simple_backend"]
    assert get(f"{client.url}/simple").status_code == 404
    client.delete_backend("simple_backend")
    assert client.list_backends() == {}


# -- seed 002: the 0.8 "Full example of ray.serve module" and its API reference ------------------


def echo_v1(flask_request: Any, response: str = "hello from python!") -> Any:
    if serve.context.web:
        response = flask_request.url
    return response


def echo_v2(flask_request: Any) -> str:
    # magic, only from web.
    return "something new"


def echo_setup() -> serve.BackendConfig:
    """The first steps of the full example: endpoint first, then the backend, then link."""
    # an endpoint is associated with an http URL.
    serve.create_endpoint("my_endpoint", "/echo")
    serve.create_backend(echo_v1, "echo:v1")
    backend_config_v1 = serve.get_backend_config("echo:v1")
    serve.link("my_endpoint", "echo:v1")
    return backend_config_v1


def test_002_full_example_endpoint_backend_link(inited: serve.Client) -> None:
    url = f"{inited.url}/echo"
    serve.create_endpoint("my_endpoint", "/echo")
    assert shown_endpoints(serve.list_endpoints()) == {
        "my_endpoint": {"route": "/echo", "methods": ["GET"], "traffic": {}}
    }
    # No backend yet: a clear "unavailable" instead of a hang or a 500.
    assert get(url).status_code == 503

    serve.create_backend(echo_v1, "echo:v1")  # the 0.8 argument order
    backend_config_v1 = serve.get_backend_config("echo:v1")
    assert isinstance(backend_config_v1, serve.BackendConfig)
    assert backend_config_v1.num_replicas == 1
    assert backend_config_v1.max_batch_size is None

    serve.link("my_endpoint", "echo:v1")
    # link(name, tag) is split(name, {tag: 1.0}).
    assert serve.list_endpoints()["my_endpoint"]["traffic"] == {"echo:v1": 1.0}

    # The service is reachable from HTTP: echo_v1 sees serve.context.web and answers with the
    # request's URL. It is a Starlette URL object, so the body may be JSON: what must come back
    # is the full URL string.
    response = get(url)
    assert response.status_code == 200
    assert body_value(response) == url

    # ... as well as from Python: serve.context.web is False and the keyword argument is used.
    handle = serve.get_handle("my_endpoint")
    assert handle.remote(response="hi").result(WAIT_S) == "hi"
    assert handle.remote().result(WAIT_S) == "hello from python!"


def test_002_full_example_split_traffic(inited: serve.Client) -> None:
    echo_setup()
    serve.create_backend(echo_v2, "echo:v2")
    backend_config_v2 = serve.get_backend_config("echo:v2")
    assert backend_config_v2.num_replicas == 1

    # The two backend will now split the traffic 50%-50%.
    serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})
    assert serve.list_endpoints()["my_endpoint"]["traffic"] == {"echo:v1": 0.5, "echo:v2": 0.5}

    # Observe requests are now split between two backends. With 200 requests the chance that one
    # backend gets none is 2 * 0.5**200, about 1e-60.
    url = f"{inited.url}/echo"
    seen: collections.Counter[Any] = collections.Counter()
    for _ in range(200):
        response = get(url)
        assert response.status_code == 200
        seen[body_value(response)] += 1
    assert set(seen) == {url, "something new"}


def test_002_full_example_set_backend_config(inited: serve.Client) -> None:
    backend_config_v1 = echo_setup()
    serve.create_backend(echo_v2, "echo:v2")
    backend_config_v2 = serve.get_backend_config("echo:v2")
    serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})

    # You can also change number of replicas for each backend independently.
    backend_config_v1.num_replicas = 2
    # get_backend_config gave a copy: nothing changes until set_backend_config.
    assert serve.get_backend_config("echo:v1").num_replicas == 1
    serve.set_backend_config("echo:v1", backend_config_v1)
    assert serve.get_backend_config("echo:v1").num_replicas == 2
    assert serve.get_backend_config("echo:v2").num_replicas == 1

    backend_config_v2.num_replicas = 2
    serve.set_backend_config("echo:v2", backend_config_v2)
    assert serve.get_backend_config("echo:v2").num_replicas == 2
    listed = shown(serve.list_backends())
    assert listed == {
        "echo:v1": {**DOC_INFO, "num_replicas": 2},
        "echo:v2": {**DOC_INFO, "num_replicas": 2},
    }

    # The endpoint still answers after the change.
    assert get(f"{inited.url}/echo").status_code == 200
    assert serve.get_handle("my_endpoint").options().remote().result(WAIT_S) in {
        "hello from python!",
        "something new",
    }


def test_002_accept_batch(inited: serve.Client) -> None:
    batches: list[list[Any]] = []

    @serve.accept_batch
    def serving_func(flask_request: Any) -> list[Any]:
        assert isinstance(flask_request, list)
        batches.append(flask_request)
        return [
            f"web {r.query_params['x']}" if isinstance(r, Request) else f"python {r}"
            for r in flask_request
        ]

    # Each batch waits until it is full (4) or 10 s have passed (a fixed wait, the 1.x rule): 4
    # concurrent requests must all arrive in one batch, well before the timeout.
    serve.create_backend(
        "batched",
        serving_func,
        config={"max_batch_size": 4, "batch_wait_timeout": 10.0, "batch_wait_policy": "fixed"},
    )
    serve.create_endpoint("batched", backend="batched", route="/batched")
    assert shown(serve.list_backends())["batched"] == {
        "accepts_batches": True,
        "num_replicas": 1,
        "max_batch_size": 4,
    }

    handle = serve.get_handle("batched")
    futures = [handle.remote(i) for i in range(4)]
    assert [f.result(WAIT_S) for f in futures] == [f"python {i}" for i in range(4)]
    assert [len(b) for b in batches] == [4]

    # Over HTTP the batch is a list of Starlette Requests.
    batches.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda i: get(f"{inited.url}/batched?x={i}").text, range(4)))
    assert texts == [f"web {i}" for i in range(4)]
    assert [len(b) for b in batches] == [4]
    assert all(isinstance(r, Request) for r in batches[0])

    # The class form: the marked __call__ takes lists too.
    class ServingActor:
        @serve.accept_batch
        def __call__(self, python_arg: list[int]) -> list[int]:
            assert isinstance(python_arg, list)
            return [x * 10 for x in python_arg]

    serve.create_backend("actor", ServingActor, config={"max_batch_size": 2})
    serve.create_endpoint("actor", backend="actor")
    assert serve.list_backends()["actor"]["accepts_batches"] is True
    assert serve.get_handle("actor").remote(7).result(WAIT_S) == 70


def test_002_init_returns_the_running_instance(inited: serve.Client) -> None:
    # "If serve cluster has already initialized, this function will just return."
    serve.create_backend(echo_v1, "echo:v1")
    again = serve.init(http_port=0)
    assert again is inited
    assert list(serve.list_backends()) == ["echo:v1"]


def test_002_init_route_policy() -> None:
    # serve.init(queueing_policy=...): the policy is chosen per instance. RoundRobin over a 50/50
    # split answers each backend exactly every other request.
    client = serve.init(http_port=0, queueing_policy=serve.RoutePolicy.RoundRobin)
    try:
        echo_setup()
        serve.create_backend(echo_v2, "echo:v2")
        serve.split("my_endpoint", {"echo:v1": 0.5, "echo:v2": 0.5})
        url = f"{client.url}/echo"
        answers = [body_value(get(url)) for _ in range(10)]
        assert collections.Counter(answers) == {url: 5, "something new": 5}
    finally:
        client.shutdown()


def test_002_get_handle_slo_and_missing_ok(inited: serve.Client) -> None:
    echo_setup()
    # relative_slo_ms / absolute_slo_ms: generous deadlines are met.
    relative = serve.get_handle("my_endpoint", relative_slo_ms=10_000)
    assert relative.remote(response="r").result(WAIT_S) == "r"
    absolute = serve.get_handle("my_endpoint", absolute_slo_ms=time.time() * 1000 + 10_000)
    assert absolute.remote(response="a").result(WAIT_S) == "a"
    # A deadline already passed fails with a timeout error instead of running.
    past = serve.get_handle("my_endpoint", absolute_slo_ms=time.time() * 1000 - 1_000)
    with pytest.raises(TimeoutError):
        past.remote(response="late").result(WAIT_S)

    # missing_ok: "skip the check for the endpoint existence"; calls wait until it exists.
    with pytest.raises(KeyError, match="later"):
        serve.get_handle("later")
    later = serve.get_handle("later", missing_ok=True)
    future = later.remote(response="finally")
    assert not future.done()  # it cannot be answered: the endpoint does not exist yet
    serve.create_endpoint("later", "echo:v1")
    assert future.result(WAIT_S) == "finally"


@pytest.mark.skipif(
    not hasattr(serve, "stat"),
    reason="serve.stat() does not exist yet: lands with issue 6 (stat/route/persistence)",
)
def test_002_stat(inited: serve.Client) -> None:
    echo_setup()
    for _ in range(5):
        assert get(f"{inited.url}/echo").status_code == 200

    stats = serve.stat()
    text = json.dumps(stats, default=str)
    assert "my_endpoint" in text
    assert "echo:v1" in text
    for p in (50, 90, 95):
        for window in (10, 60, 300, 600, 3600):
            assert f"_{p}th_perc_{window}_window" in text

    custom = json.dumps(
        serve.stat(percentiles=[99], agg_windows_seconds=[5]),
        default=str,
    )
    assert "_99th_perc_5_window" in custom
    assert not re.search(r"_50th_perc_", custom)


@pytest.mark.skipif(
    not hasattr(serve, "route"),
    reason="@serve.route does not exist yet: lands with issue 6 (stat/route/persistence)",
)
def test_002_route_decorator(inited: serve.Client) -> None:
    def my_handler(flask_request: Any) -> str:
        return "hello from route"

    # "An endpoint is created with the same name of the function, a backend is created ... linked
    # together ... The handle is returned."
    handle = serve.route("/my_handler")(my_handler)
    assert get(f"{inited.url}/my_handler").text == "hello from route"
    endpoint = serve.list_endpoints()["my_handler"]
    assert endpoint["route"] == "/my_handler"
    assert len(endpoint["traffic"]) == 1
    assert handle.remote().result(WAIT_S) == "hello from route"


@pytest.mark.skipif(
    "kv_store_path" not in inspect.signature(serve.init).parameters,
    reason="serve.init(kv_store_path=...) does not exist yet: lands with issue 6 "
    "(stat/route/persistence)",
)
def test_002_init_kv_store_path(tmp_path: Any) -> None:
    path = str(tmp_path / "serve.sqlite")
    first = serve.init(kv_store_path=path, http_port=0)
    try:
        echo_setup()
        serve.set_backend_config("echo:v1", {"num_replicas": 2})
        endpoints = serve.list_endpoints()
        backends = shown(serve.list_backends())
    finally:
        first.shutdown()

    second = serve.init(kv_store_path=path, http_port=0)
    try:
        assert second is not first
        assert serve.list_endpoints() == endpoints
        assert shown(serve.list_backends()) == backends
        url = f"{second.url}/echo"
        assert body_value(get(url)) == url
    finally:
        second.shutdown()


# -- seed 003: Key Concepts (the 0.8.x docs), module-level functions -----------------------------


def test_003_key_concepts_backends(inited: serve.Client) -> None:
    serve.create_backend("simple_backend", handle_request)
    serve.create_backend("simple_backend_class", RequestHandlerNoArgs)
    assert shown(serve.list_backends()) == {
        "simple_backend": DOC_INFO,
        "simple_backend_class": DOC_INFO,
    }
    serve.create_endpoint("class_endpoint", "simple_backend_class", route="/class")
    assert get(f"{inited.url}/class").text == "hello, world!"


def test_003_key_concepts_endpoints(inited: serve.Client) -> None:
    serve.create_backend("simple_backend", handle_request)
    # The backend as the second positional argument.
    serve.create_endpoint("simple_endpoint", "simple_backend", route="/simple", methods=["GET"])
    response = get(f"{inited.url}/simple")
    assert (response.status_code, response.text) == (200, "hello world")
    assert response.headers["content-type"].startswith("text/plain")
    assert shown_endpoints(serve.list_endpoints()) == {
        "simple_endpoint": {
            "route": "/simple",
            "methods": ["GET"],
            "traffic": {"simple_backend": 1.0},
        }
    }
    # Only the methods given are served.
    assert requests.post(f"{inited.url}/simple", timeout=WAIT_S).status_code == 405


# -- seed 004: Advanced Topics and Configurations ------------------------------------------------


def test_004_sync_handle(started: serve.Client) -> None:
    serve.create_backend("echo", lambda request: f"sync {request.query_params['x']}")
    serve.create_endpoint("echo", backend="echo")
    handle = serve.get_handle("echo", sync=True)
    future = handle.remote(x=1)
    # Ray returned an ObjectRef; here the sync handle gives a concurrent.futures.Future.
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(WAIT_S) == "sync 1"
    # sync=True is the default.
    assert serve.get_handle("echo").remote(x=2).result(WAIT_S) == "sync 2"


@pytest.fixture
def async_endpoint(started: serve.Client) -> serve.Client:
    async def echo(request: Any) -> str:
        return f"async {request.query_params['x']}"

    serve.create_backend("echo", echo)
    serve.create_endpoint("echo", backend="echo")
    return started


async def test_004_async_handle(async_endpoint: serve.Client) -> None:
    # Awaited from this test's own event loop, not the loop the instance runs on.
    assert asyncio.get_running_loop() is not async_endpoint.serve.loop
    handle = serve.get_handle("echo", sync=False)
    assert isinstance(handle, serve.ServeHandle)
    assert await handle.remote(x=1) == "async 1"
    results = await asyncio.gather(*(handle.remote(x=i) for i in range(10)))
    assert results == [f"async {i}" for i in range(10)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("location", ["HeadOnly", "EveryNode"])
def test_004_http_server_location_starts_one_server(location: str) -> None:
    client = serve.start(http_options={**LOCAL, "location": location})
    try:
        assert client.url is not None
        assert client.http_port
        serve.create_backend("hello", handle_request)
        serve.create_endpoint("hello", backend="hello", route="/hello")
        assert get(f"{client.url}/hello").text == "hello world"
    finally:
        client.shutdown()


@pytest.mark.parametrize("location", ["NoServer", None])
def test_004_http_server_location_no_server(location: str | None) -> None:
    port = free_port()
    client = serve.start(http_options={"host": "127.0.0.1", "port": port, "location": location})
    try:
        assert client.url is None
        assert client.http_port is None
        serve.create_backend("hello", handle_request)
        serve.create_endpoint("hello", backend="hello", route="/hello")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/hello", timeout=WAIT_S)
        # Handles still work without a server.
        assert serve.get_handle("hello").remote().result(WAIT_S) == "hello world"
    finally:
        client.shutdown()


def test_004_variable_http_routes(started: serve.Client) -> None:
    def my_backend(request: Request) -> str:
        username = request.path_params["username"]
        return f"hello {username}"

    handler_types: list[tuple[type, type]] = []

    def f(request: Request) -> dict[str, Any]:
        params = request.path_params
        handler_types.append((type(params["user_id"]), type(params["number"])))
        return dict(params)

    serve.create_backend("my_backend", my_backend)
    serve.create_endpoint("my_endpoint", backend="my_backend", route="/api/{username}")
    serve.create_backend("f", f)
    serve.create_endpoint("complex", backend="f", route="/api/{user_id:int}/{number:float}")

    assert get(f"{started.url}/api/alice").text == "hello alice"

    response = get(f"{started.url}/api/123/3.14")
    assert response.status_code == 200
    params = response.json()
    assert params == {"user_id": 123, "number": 3.14}
    assert type(params["user_id"]) is int
    assert type(params["number"]) is float
    # "where 123 is a Python int and 3.14 is a Python float" inside the backend.
    assert handler_types == [(int, float)]

    # A path that does not convert does not match the typed route.
    assert get(f"{started.url}/api/abc/3.14").status_code == 404
