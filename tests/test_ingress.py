"""FastAPI ingress (``@serve.ingress``): a class backend serving a FastAPI app under a prefix,
over a real server (uvicorn and granian), through the one request path."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import httpx
import pytest
from _sample_backends import Gate, until_queued, wait_until
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, WebSocket
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
