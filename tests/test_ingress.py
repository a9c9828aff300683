"""FastAPI ingress (``@serve.ingress``): a class backend serving a FastAPI app under a prefix,
over a real server (uvicorn and granian), through the one request path."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, Gate, until_queued, wait_until
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Request,
    WebSocket,
)
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import aioserve as serve
from aioserve import ConfigError, ConfigTypeError, Serve

pytestmark = pytest.mark.usefixtures("no_loop_errors")


class Item(BaseModel):
    value: int


classifier_app = FastAPI(title="classifier")


def token(x_token: str = Header(default="")) -> str:
    if x_token != "secret":
        raise HTTPException(401, "bad token")
    return x_token


@serve.ingress(classifier_app)
class Classifier:
    def __init__(self, factor: int = 1, gate: Gate | None = None) -> None:
        self.factor = factor
        self.gate = gate

    @classifier_app.post("/predict")
    def predict(self, item: Item) -> dict[str, Any]:
        return {
            "value": item.value * self.factor,
            "thread": threading.current_thread().name,
        }

    @classifier_app.get("/items/{item_id}")
    async def read(self, item_id: int, q: str = "none") -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "factor": self.factor}

    @classifier_app.get("/private")
    def private(self, user: str = Depends(token)) -> str:
        return f"hello {user}"

    @classifier_app.get("/wait")
    async def wait(self) -> str:
        assert self.gate is not None
        await self.gate.pass_through("wait")
        return "done"

    @classifier_app.get("/crash")
    def crash(self) -> None:
        raise RuntimeError("the model broke")

    @classifier_app.websocket("/echo")
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text(f"{text} x{self.factor}")

    def helper(self, x: int) -> int:
        """Not a route: reached through a handle only."""
        return x + self.factor


@classifier_app.get("/health")
def health() -> str:
    """A route function outside the class: left as it is."""
    return "ok"


router = APIRouter(prefix="/v1")


@serve.ingress(router)
class Routed:
    @router.get("/who")
    def who(self) -> str:
        return type(self).__name__


def plain(request: Any) -> str:
    return "plain"


async def _deploy(instance: Serve, route: str = "/clf", **config: Any) -> None:
    await instance.create_backend("clf", Classifier, 3, config=config or None)
    await instance.create_endpoint("clf", backend="clf", route=route, methods=["GET", "POST"])


async def test_routes_validation_and_docs_under_the_prefix(served: Serve) -> None:
    await _deploy(served)
    async with httpx.AsyncClient(base_url=served.url) as http:
        answer = await http.post("/clf/predict", json={"value": 2})
        assert answer.status_code == 200
        body = answer.json()
        assert body["value"] == 6  # the replica's instance is self (factor 3)
        assert body["thread"].startswith("aioserve-clf#")  # a def route: the replica's thread
        assert answer.headers["x-request-id"]

        bad = await http.post("/clf/predict", json={"value": "many"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "value"]

        read = await http.get("/clf/items/7", params={"q": "x"})
        assert read.json() == {"item_id": 7, "q": "x", "factor": 3}
        assert (await http.get("/clf/items/seven")).status_code == 422
        assert (await http.get("/clf/health")).text == '"ok"'
        assert (await http.get("/clf/private")).status_code == 401
        private = await http.get("/clf/private", headers={"X-Token": "secret"})
        assert private.json() == "hello secret"
        assert (await http.get("/clf/nowhere")).status_code == 404
        assert (await http.get("/elsewhere/predict")).status_code == 404

        schema = (await http.get("/clf/openapi.json")).json()
        assert schema["info"]["title"] == "classifier"
        assert {"/predict", "/items/{item_id}", "/private", "/health"} <= set(schema["paths"])
        # self is injected, never a parameter a client sees
        parameters = schema["paths"]["/items/{item_id}"]["get"]["parameters"]
        assert [p["name"] for p in parameters] == ["item_id", "q"]
        docs = await http.get("/clf/docs")
        assert docs.status_code == 200
        assert "/clf/openapi.json" in docs.text


async def test_an_app_error_is_a_500_and_is_logged(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    await _deploy(served)
    async with httpx.AsyncClient(base_url=served.url) as http:
        answer = await http.get("/clf/crash")
    assert answer.status_code == 500
    assert "the model broke" in caplog.text
    assert served.stat()["endpoints"]["clf"]["num_errors"] == 1


async def test_a_websocket_is_routed_to_the_replica(served: Serve) -> None:
    await _deploy(served)
    url = served.url.replace("http://", "ws://")
    async with websocket_connect(f"{url}/clf/echo") as websocket:
        await websocket.send("hi")
        assert await websocket.recv() == "hi x3"
        await websocket.send("again")
        assert await websocket.recv() == "again x3"
    with pytest.raises(InvalidStatus) as refused:
        async with websocket_connect(f"{url}/not-an-endpoint/echo"):
            pass
    assert refused.value.response.status_code == 403


async def test_traffic_splits_over_two_ingress_backends(served: Serve) -> None:
    await served.create_backend("v1", Classifier, 1)
    await served.create_backend("v2", Classifier, 2)
    await served.create_endpoint("clf", backend="v1", route="/clf", methods=["GET"])
    await served.set_traffic("clf", {"v1": 0.5, "v2": 0.5})
    seen: collections.Counter[int] = collections.Counter()
    async with httpx.AsyncClient(base_url=served.url) as http:
        for i in range(60):
            seen[(await http.get(f"/clf/items/{i}")).json()["factor"]] += 1
    # P(one version gets fewer than 10 of 60 at p=0.5) is about 1e-7.
    assert seen[1] >= 10 and seen[2] >= 10 and seen[1] + seen[2] == 60
    counts = served.stat()["backends"]
    assert (counts["v1"]["num_requests"], counts["v2"]["num_requests"]) == (seen[1], seen[2])


async def test_handles_call_its_methods(served: Serve) -> None:
    await _deploy(served)
    handle = served.get_handle("clf")
    result = await handle.predict.remote(Item(value=5))
    assert result["value"] == 15
    assert await handle.read.remote(1) == {"item_id": 1, "q": "none", "factor": 3}
    assert await handle.options(method_name="helper").remote(1) == 4


async def test_a_client_cannot_pick_a_method_by_header(served: Serve) -> None:
    await _deploy(served)
    async with httpx.AsyncClient(base_url=served.url) as http:
        answer = await http.get("/clf/items/1", headers={"X-Serve-Call-Method": "helper"})
        assert answer.json()["item_id"] == 1  # the app's routing, not the header, decides
        assert (await http.get("/clf/helper")).status_code == 404


async def test_the_backend_limits_and_queue_apply(served: Serve) -> None:
    gate = Gate()
    await served.create_backend(
        "clf",
        Classifier,
        1,
        gate,
        config={"max_concurrent_queries": 1, "max_queued_queries": 1},
    )
    await served.create_endpoint("clf", backend="clf", route="/clf")
    async with httpx.AsyncClient(base_url=served.url) as http:
        first = asyncio.ensure_future(http.get("/clf/wait"))
        await gate.until_inside(1)
        second = asyncio.ensure_future(http.get("/clf/wait"))
        await until_queued(served, "clf", 1)
        third = await http.get("/clf/wait")
        assert third.status_code == 503  # the queue is full: fast, with Retry-After
        assert "Retry-After" in third.headers
        assert gate.inside == 1  # the queued one did not start: one slot
        gate.release.set()
        assert [(await first).text, (await second).text] == ['"done"', '"done"']


async def test_a_deadline_from_the_query_applies(served: Serve) -> None:
    gate = Gate()
    await served.create_backend("clf", Classifier, 1, gate, config={"max_concurrent_queries": 1})
    await served.create_endpoint("clf", backend="clf", route="/clf")
    async with httpx.AsyncClient(base_url=served.url) as http:
        first = asyncio.ensure_future(http.get("/clf/wait"))
        await gate.until_inside(1)
        late = asyncio.ensure_future(http.get("/clf/items/1", params={"relative_slo_ms": 1}))
        await until_queued(served, "clf", 1)
        loop = asyncio.get_running_loop()
        deadline_passed = loop.time() + 0.002
        await wait_until(lambda: loop.time() > deadline_passed, "the queued deadline passed")
        gate.release.set()
        assert (await late).status_code == 504
        assert (await first).status_code == 200
        bad = await http.get("/clf/items/1", params={"relative_slo_ms": "soon"})
        assert bad.status_code == 400


async def test_a_body_past_the_limit_is_413(server_name: str) -> None:
    options = {"host": "127.0.0.1", "port": 0, "server": server_name, "max_body_bytes": 1000}
    async with Serve(http_options=options) as instance:
        await _deploy(instance)

        async def chunks() -> Any:
            for _ in range(5):
                yield b'{"value": 1' + b" " * 400

        async with httpx.AsyncClient(base_url=instance.url) as http:
            streamed = await http.post("/clf/predict", content=chunks())
            declared = await http.post("/clf/predict", content=b"1" * 2000)
            fine = await http.post("/clf/predict", json={"value": 1})
    assert streamed.status_code == 413
    assert declared.status_code == 413
    assert fine.status_code == 200


async def test_a_router_is_served_too(serve: Serve, http: httpx.AsyncClient) -> None:
    await serve.create_backend("routed", Routed)
    await serve.create_endpoint("routed", backend="routed", route="/r")
    assert (await http.get("/r/v1/who")).json() == "Routed"


async def test_the_root_route_takes_every_path_but_the_system_ones(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await _deploy(serve, route="/")
    await serve.create_backend("plain", plain)
    await serve.create_endpoint("plain", backend="plain", route="/plain")
    assert (await http.get("/items/2")).json()["item_id"] == 2
    assert (await http.get("/plain")).text == "plain"  # an exact route wins over a prefix
    assert (await http.get("/-/healthz")).text == "success"
    await serve.delete_endpoint("clf")
    assert (await http.get("/items/2")).status_code == 404  # the prefix went with it


async def test_mistakes_are_refused_and_change_nothing(serve: Serve) -> None:
    await serve.create_backend("clf", Classifier)
    await serve.create_backend("plain", plain)
    await serve.create_endpoint("mixed", backend="plain", route="/mixed")
    with pytest.raises(ConfigError, match="cannot mix"):
        await serve.set_traffic("mixed", {"clf": 0.5, "plain": 0.5})
    assert serve.list_endpoints()["mixed"]["traffic"] == {"plain": 1.0}
    with pytest.raises(ConfigError, match="has parameters"):
        await serve.create_endpoint("param", backend="clf", route="/m/{name}")
    assert "param" not in serve.list_endpoints()
    await serve.create_endpoint("clf", backend="clf", route="/clf")
    with pytest.raises(ConfigError, match="cannot be copied"):
        await serve.shadow_traffic("clf", "plain", 0.5)
    with pytest.raises(ConfigError, match="cannot be copied"):
        await serve.shadow_traffic("mixed", "clf", 0.5)
    assert serve.list_endpoints()["clf"]["shadows"] == {}
    await serve.shadow_traffic("mixed", "plain", 0.5)
    with pytest.raises(ConfigError, match="has shadow backends"):
        await serve.set_traffic("mixed", {"clf": 1.0})


def test_the_decorator_checks_what_it_is_given() -> None:
    app = FastAPI()
    with pytest.raises(ConfigTypeError, match="FastAPI app or APIRouter"):
        serve.ingress(object())
    with pytest.raises(ConfigTypeError, match="decorates a class"):
        serve.ingress(app)(plain)  # type: ignore[type-var]

    bad = FastAPI()

    def no_parameters() -> int:
        return 1

    bad.get("/y")(no_parameters)

    class Holder:
        y = no_parameters

    with pytest.raises(ConfigTypeError, match="needs a first parameter"):
        serve.ingress(bad)(Holder)


async def test_the_app_alone_says_it_needs_a_replica() -> None:
    transport = httpx.ASGITransport(app=classifier_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        answer = await http.get("/items/1")
    assert answer.status_code == 500


async def test_a_queued_request_whose_client_left_never_runs(served: Serve) -> None:
    gate = Gate()
    await served.create_backend("clf", Classifier, 1, gate, config={"max_concurrent_queries": 1})
    await served.create_endpoint("clf", backend="clf", route="/clf")
    async with httpx.AsyncClient(base_url=served.url) as first_client:
        first = asyncio.ensure_future(first_client.get("/clf/wait"))
        await gate.until_inside(1)
        async with httpx.AsyncClient(base_url=served.url) as leaving_client:
            leaving = asyncio.ensure_future(leaving_client.get("/clf/wait"))
            await until_queued(served, "clf", 1)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
        await until_queued(served, "clf", 0)  # the server saw the client go and dequeued it
        gate.release.set()
        assert (await first).status_code == 200
    assert gate.entries == ["wait"]


broken_app = FastAPI()


@serve.ingress(broken_app)
class BrokenSocket:
    @broken_app.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()
        raise RuntimeError("the socket handler broke")


async def test_a_websocket_handler_that_raises_is_closed_with_1011(
    served: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    await served.create_backend("broken", BrokenSocket)
    await served.create_endpoint("broken", backend="broken", route="/b")
    url = served.url.replace("http://", "ws://")
    async with websocket_connect(f"{url}/b/ws") as websocket:
        await websocket.send("x")
        with pytest.raises(ConnectionClosed) as closed:
            await websocket.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    # The close may reach the client before the server's task logs the error.
    await wait_until(lambda: "the socket handler broke" in caplog.text, "the error is logged")


# -- what an independent review found -------------------------------------------------------------

extras_app = FastAPI()


@serve.ingress(extras_app)
class Extras:
    def __init__(self, done: asyncio.Queue[str] | None = None) -> None:
        self.done = done

    async def _record(self, what: str) -> None:
        await asyncio.sleep(0)  # a task that outlives the response by a loop turn at least
        assert self.done is not None
        self.done.put_nowait(what)

    @extras_app.get("/background")
    async def background(self, tasks: BackgroundTasks) -> str:
        tasks.add_task(self._record, "background ran")
        return "answered"

    @extras_app.get("/stream")
    async def stream(self) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"{i};".encode()

        return StreamingResponse(chunks())

    @extras_app.get("/where", name="where")
    async def where(self, request: Request) -> dict[str, str]:
        return {"url_for": str(request.url_for("where")), "base": str(request.base_url)}

    @extras_app.get("/own-id")
    async def own_id(self) -> JSONResponse:
        return JSONResponse("mine", headers={"X-Request-ID": "app-chosen"})

    @extras_app.websocket("/hold")
    async def hold(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("open")
        await websocket.receive_text()  # until the client, or a shutdown, closes it


late_router = APIRouter(prefix="/late")


@late_router.get("/added")
def added_after(self: Any) -> str:
    return type(self).__name__


Extras.added_after = added_after  # type: ignore[attr-defined]
extras_app.include_router(late_router)  # after the class was decorated


async def test_background_tasks_run_and_every_request_counts(served: Serve) -> None:
    done: asyncio.Queue[str] = asyncio.Queue()
    await served.create_backend("extras", Extras, done)
    await served.create_endpoint("extras", backend="extras", route="/x")
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/x/background")).text == '"answered"'
        assert await asyncio.wait_for(done.get(), HANG_GUARD_S) == "background ran"
        assert (await http.get("/x/stream")).text == "0;1;2;"
    await wait_until(
        lambda: served.stat()["backends"]["extras"]["num_requests"] == 2, "both requests counted"
    )
    assert served.stat()["backends"]["extras"]["num_errors"] == 0


async def test_url_for_and_the_request_id_under_the_prefix(server_name: str) -> None:
    options = {"host": "127.0.0.1", "port": 0, "server": server_name, "root_path": "/base"}
    async with Serve(http_options=options) as instance:
        await instance.create_backend("extras", Extras)
        await instance.create_endpoint("extras", backend="extras", route="/x")
        async with httpx.AsyncClient(base_url=instance.url) as http:
            where = (await http.get("/x/where")).json()
            own = await http.get("/x/own-id")
    assert where["url_for"].endswith("/base/x/where")
    assert where["base"].endswith("/base/x/")
    assert own.headers.get_list("x-request-id") == ["app-chosen"]  # the app's own, once


async def test_url_for_inside_aioserve_mounted_in_a_host_app() -> None:
    instance = Serve(http_options={"location": "NoServer"})
    host = FastAPI()
    host.mount("/models", instance.asgi_app)
    async with instance:
        await instance.create_backend("extras", Extras)
        await instance.create_endpoint("extras", backend="extras", route="/x")
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
            answer = await http.get("/models/x/where")
    assert answer.status_code == 200
    assert answer.json()["url_for"] == "http://host/models/x/where"


async def test_routes_added_after_the_decorator_are_bound(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await serve.create_backend("extras", Extras)
    await serve.create_endpoint("extras", backend="extras", route="/x")
    assert (await http.get("/x/late/added")).json() == "Extras"
    schema = (await http.get("/x/openapi.json")).json()
    assert "parameters" not in schema["paths"]["/late/added"]["get"]  # no "self" query parameter


async def test_shutdown_closes_open_websockets_going_away(
    server_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"host": "127.0.0.1", "port": 0, "server": server_name}
    instance = Serve(http_options=options)
    async with instance:
        await instance.create_backend("extras", Extras, config={"graceful_shutdown_timeout_s": 60})
        await instance.create_endpoint("extras", backend="extras", route="/x")
        url = str(instance.url).replace("http://", "ws://")
        async with websocket_connect(f"{url}/x/hold") as websocket:
            assert await websocket.recv() == "open"
            loop = asyncio.get_running_loop()
            started = loop.time()
            closing = asyncio.ensure_future(instance.aclose())
            with pytest.raises(ConnectionClosed) as closed:
                await websocket.recv()
            await asyncio.wait_for(closing, HANG_GUARD_S)
            took = loop.time() - started
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert took < 10  # not the 60 s graceful timeout: the socket was told to go away
    assert "failed" not in caplog.text


async def test_the_asgi_entry_is_not_a_method_name() -> None:
    async with Serve(http_options={"location": "NoServer"}) as instance:
        await instance.create_backend("clf", Classifier)
        await instance.create_endpoint("clf", backend="clf")
        handle = instance.get_handle("clf")
        with pytest.raises(ConfigError, match="reserved"):
            handle.options(method_name="__asgi__")
        with pytest.raises(serve.MethodNotFound, match="has no method '__call__'"):
            await handle.remote()


async def test_an_ingress_class_by_import_path_with_batching_config_serves() -> None:
    async with Serve(http_options={"location": "NoServer"}) as instance:
        # An import path: taken to accept batches (1.3), but the app's connections never batch.
        await instance.create_backend(
            "clf", "test_ingress:Classifier", 2, config={"max_batch_size": 4}
        )
        await instance.create_endpoint("clf", backend="clf", route="/clf")
        transport = httpx.ASGITransport(app=instance.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
            assert (await http.get("/clf/items/1")).json()["factor"] == 2


def test_one_app_serves_one_class() -> None:
    with pytest.raises(ConfigTypeError, match="already serves the class Classifier"):

        @serve.ingress(classifier_app)
        class Another:
            pass


async def test_two_ingress_endpoints_cannot_share_a_prefix(serve: Serve) -> None:
    await serve.create_backend("clf", Classifier)
    await serve.create_endpoint("clf", backend="clf", route="/clf")
    with pytest.raises(ConfigError, match="same prefix"):
        await serve.create_endpoint("clf2", backend="clf", route="/clf/")
    assert "clf2" not in serve.list_endpoints()


def real_source() -> str:
    return "real"


overridden_app = FastAPI()


@serve.ingress(overridden_app)
class Overridden:
    @overridden_app.get("/http")
    async def http_source(self, source: str = Depends(real_source)) -> str:
        return source

    @overridden_app.websocket("/ws")
    async def ws_source(self, websocket: WebSocket, source: str = Depends(real_source)) -> None:
        await websocket.accept()
        await websocket.send_text(source)
        await websocket.close()


overridden_app.dependency_overrides[real_source] = lambda: "overridden"


async def test_dependency_overrides_apply_to_http_and_websocket_routes(served: Serve) -> None:
    await served.create_backend("o", Overridden)
    await served.create_endpoint("o", backend="o", route="/o")
    async with httpx.AsyncClient(base_url=served.url) as http:
        assert (await http.get("/o/http")).json() == "overridden"
    url = served.url.replace("http://", "ws://")
    async with websocket_connect(f"{url}/o/ws") as websocket:
        assert await websocket.recv() == "overridden"
