"""Tests for aioserve.http: the HTTP front door (API.md §3 routes, §4 HTTP, §5 errors).

Most tests speak to ``serve.asgi_app`` in process (the ``http`` fixture); the ones marked "real
uvicorn" go through the ``served`` fixture's server on 127.0.0.1. Tests synchronise on events and
on the instance's own state, never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import logging
import pathlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pydantic
import pytest
from _sample_backends import HANG_GUARD_S, until_queued
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import aioserve
from aioserve import Serve

pytestmark = pytest.mark.usefixtures("no_loop_errors")


async def deploy(
    s: Serve,
    name: str,
    func_or_class: Any,
    *init_args: Any,
    route: str | None = None,
    methods: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> None:
    """A backend and an endpoint of the same name, routed at ``/{name}`` unless told otherwise."""
    await s.create_backend(name, func_or_class, *init_args, config=config)
    await s.create_endpoint(
        name, backend=name, route=route or f"/{name}", methods=methods or ["GET"]
    )


# -- result -> response --------------------------------------------------------------------------


async def test_str_result_is_utf8_plain_text(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "hello", lambda request: "héllo wörld")
    r = await http.get("/hello")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.text == "héllo wörld"


async def test_bytes_result_is_the_raw_body(serve: Serve, http: httpx.AsyncClient) -> None:
    payload = bytes(range(256))
    await deploy(serve, "raw", lambda request: payload)
    r = await http.get("/raw")
    assert r.status_code == 200
    assert r.content == payload


async def test_none_result_is_an_empty_200(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "nothing", lambda request: None)
    r = await http.get("/nothing")
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize(
    ("make", "status", "check"),
    [
        pytest.param(
            lambda: JSONResponse({"id": 7}, status_code=201, headers={"X-Created": "yes"}),
            201,
            lambda r: r.json() == {"id": 7} and r.headers["x-created"] == "yes",
            id="JSONResponse-201-header",
        ),
        pytest.param(
            lambda: RedirectResponse("/elsewhere"),
            307,
            lambda r: r.headers["location"] == "/elsewhere",
            id="RedirectResponse-307",
        ),
        pytest.param(
            lambda: PlainTextResponse("I'm a teapot", status_code=418),
            418,
            lambda r: r.text == "I'm a teapot",
            id="PlainTextResponse-418",
        ),
        pytest.param(
            lambda: Response(b"<a/>", status_code=202, media_type="application/xml"),
            202,
            lambda r: r.content == b"<a/>" and r.headers["content-type"] == "application/xml",
            id="Response-202-xml",
        ),
    ],
)
async def test_starlette_responses_pass_through_unchanged(
    serve: Serve,
    http: httpx.AsyncClient,
    make: Callable[[], Response],
    status: int,
    check: Callable[[httpx.Response], bool],
) -> None:
    await deploy(serve, "resp", lambda request: make())
    r = await http.get("/resp")  # httpx does not follow redirects unless told to
    assert r.status_code == status
    assert check(r), (r.headers, r.content)


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.5, None], "b": {"c": True}}, [1, "x", None, {"k": "v"}], [], {}, 42, "x"],
    ids=["dict", "list", "empty-list", "empty-dict", "int", "str-is-text"],
)
async def test_plain_data_is_json(serve: Serve, http: httpx.AsyncClient, value: Any) -> None:
    await deploy(serve, "data", lambda request: value)
    r = await http.get("/data")
    assert r.status_code == 200
    if isinstance(value, str):
        assert r.text == value
    else:
        assert r.headers["content-type"] == "application/json"
        assert r.json() == value


async def test_numpy_arrays_and_scalars_encode_as_json(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def model(request: Request) -> Any:
        return {
            "matrix": np.arange(6).reshape(2, 3),
            "floats": np.array([0.5, 1.5], dtype=np.float32),
            "f64": np.float64(2.25),
            "f32": np.float32(0.5),
            "i64": np.int64(-7),
            "u8": np.uint8(255),
            "flag": np.bool_(True),
        }

    await deploy(serve, "np", model)
    await deploy(serve, "bare", lambda request: np.array([[1, 2], [3, 4]]))
    r = await http.get("/np")
    assert r.status_code == 200
    assert r.json() == {
        "matrix": [[0, 1, 2], [3, 4, 5]],
        "floats": [0.5, 1.5],
        "f64": 2.25,
        "f32": 0.5,
        "i64": -7,
        "u8": 255,
        "flag": True,
    }
    # The types survive: ints stay ints and the bool stays a bool.
    assert isinstance(r.json()["i64"], int)
    assert r.json()["flag"] is True
    r = await http.get("/bare")
    assert r.status_code == 200
    assert r.json() == [[1, 2], [3, 4]]


@dataclasses.dataclass
class Point:
    x: int
    y: float
    tags: list[str] = dataclasses.field(default_factory=list)


class Prediction(pydantic.BaseModel):
    label: str
    score: float
    point: Point | None = None


async def test_dataclasses_and_pydantic_models_encode_as_json(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "dc", lambda request: Point(1, 2.5, ["a"]))
    await deploy(serve, "pyd", lambda request: Prediction(label="cat", score=0.9))
    await deploy(
        serve,
        "mixed",
        lambda request: [Prediction(label="dog", score=0.1, point=Point(3, 4.0)), Point(0, 0.0)],
    )
    assert (await http.get("/dc")).json() == {"x": 1, "y": 2.5, "tags": ["a"]}
    assert (await http.get("/pyd")).json() == {"label": "cat", "score": 0.9, "point": None}
    assert (await http.get("/mixed")).json() == [
        {"label": "dog", "score": 0.1, "point": {"x": 3, "y": 4.0, "tags": []}},
        {"x": 0, "y": 0.0, "tags": []},
    ]


class Opaque:
    """Something JSON cannot encode."""


async def test_unencodable_result_is_500_naming_the_type(
    serve: Serve, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await deploy(serve, "opaque", lambda request: {"thing": Opaque()})
    with caplog.at_level(logging.ERROR):
        r = await http.get("/opaque")
    assert r.status_code == 500
    assert "Opaque" in r.text
    assert "Traceback" not in r.text


# -- streaming -----------------------------------------------------------------------------------


async def test_async_generator_is_streamed_chunk_by_chunk(served: Serve) -> None:
    """Real uvicorn: the first chunk reaches the client while the handler is still blocked."""
    release = asyncio.Event()
    resumed = asyncio.Event()

    async def tokens(request: Request) -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        await release.wait()  # set by the test only once it has the first chunk
        resumed.set()
        yield b"second chunk\n"
        yield b"third chunk\n"

    await deploy(served, "tokens", tokens)
    assert served.url is not None
    async with (
        asyncio.timeout(HANG_GUARD_S),
        httpx.AsyncClient(base_url=served.url) as client,
        client.stream("GET", "/tokens") as r,
    ):
        assert r.status_code == 200
        chunks = r.aiter_raw()
        first = await anext(chunks)
        assert first == b"first chunk\n"
        assert not resumed.is_set()  # the handler is still blocked: nothing was buffered
        release.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert resumed.is_set()
    assert rest == b"second chunk\nthird chunk\n"


async def test_streaming_response_is_streamed_chunk_by_chunk(served: Serve) -> None:
    """Real uvicorn: a StreamingResponse returned by a handler is not buffered either."""
    release = asyncio.Event()
    resumed = asyncio.Event()

    async def events() -> AsyncIterator[str]:
        yield "data: one\n\n"
        await release.wait()
        resumed.set()
        yield "data: two\n\n"

    async def sse(request: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream", status_code=200)

    await deploy(served, "sse", sse)
    assert served.url is not None
    async with (
        asyncio.timeout(HANG_GUARD_S),
        httpx.AsyncClient(base_url=served.url) as client,
        client.stream("GET", "/sse") as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = r.aiter_raw()
        assert await anext(chunks) == b"data: one\n\n"
        assert not resumed.is_set()
        release.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"data: two\n\n"


async def test_streamed_items_that_are_not_bytes_are_encoded(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    async def mixed(request: Request) -> AsyncIterator[Any]:
        yield {"n": 1}
        yield "text;"
        yield b"bytes;"
        yield [np.int64(2)]

    await deploy(serve, "mixed", mixed)
    r = await http.get("/mixed")
    assert r.status_code == 200
    assert r.content == b'{"n":1}\ntext;bytes;[2]\n'


# -- requests ------------------------------------------------------------------------------------


async def test_handler_gets_the_starlette_request(serve: Serve, http: httpx.AsyncClient) -> None:
    async def echo(request: Request) -> dict[str, Any]:
        return {
            "is_starlette": isinstance(request, Request),
            "method": request.method,
            "body": (await request.body()).decode(),
            "query": dict(request.query_params),
            "multi": request.query_params.getlist("tag"),
            "token": request.headers.get("x-token"),
            "path": request.url.path,
        }

    await deploy(serve, "echo", echo, methods=["POST"])
    r = await http.post(
        "/echo?name=ada&tag=a&tag=b", content=b"payload bytes", headers={"X-Token": "s3cret"}
    )
    assert r.status_code == 200
    assert r.json() == {
        "is_starlette": True,
        "method": "POST",
        "body": "payload bytes",
        "query": {"name": "ada", "tag": "b"},
        "multi": ["a", "b"],
        "token": "s3cret",
        "path": "/echo",
    }


async def test_path_params_are_converted(serve: Serve, http: httpx.AsyncClient) -> None:
    def params(request: Request) -> dict[str, Any]:
        return {k: [v, type(v).__name__] for k, v in request.path_params.items()}

    await deploy(serve, "api", params, route="/api/{user_id:int}/{number:float}")
    r = await http.get("/api/123/3.14")
    assert r.status_code == 200
    assert r.json() == {"user_id": [123, "int"], "number": [3.14, "float"]}
    # A segment the convertor rejects does not match the route.
    assert (await http.get("/api/abc/3.14")).status_code == 404
    assert (await http.get("/api/123")).status_code == 404


async def test_methods_are_upper_cased(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "submit", lambda request: "submitted", methods=["post", "Put"])
    assert serve.list_endpoints()["submit"]["methods"] == ["POST", "PUT"]
    assert (await http.post("/submit")).text == "submitted"
    assert (await http.put("/submit")).text == "submitted"
    r = await http.get("/submit")
    assert r.status_code == 405


async def test_get_endpoints_answer_head(served: Serve) -> None:
    """Real uvicorn: HEAD gets the GET answer's status and headers and no body."""
    calls: list[str] = []

    def hello(request: Request) -> str:
        calls.append(request.method)
        return "hello world"

    await deploy(served, "hello", hello)
    await deploy(served, "post_only", lambda request: "posted", methods=["POST"])
    assert served.url is not None
    async with httpx.AsyncClient(base_url=served.url) as client:
        r = await client.head("/hello")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert r.content == b""
        assert (await client.head("/post_only")).status_code == 405
    assert calls == ["HEAD"]


# -- the status table ----------------------------------------------------------------------------


async def test_unknown_path_is_404_naming_the_routes_endpoint(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "hello", lambda request: "hi")
    r = await http.get("/helo")
    assert r.status_code == 404
    assert "/-/routes" in r.text
    assert "/helo" in r.text
    assert len(r.text) < 300


async def test_wrong_method_is_405_with_allow(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "hello", lambda request: "hi")
    r = await http.delete("/hello")
    assert r.status_code == 405
    assert "/-/routes" in r.text
    assert len(r.text) < 300
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD"}


def _fail(request: Request) -> None:
    raise ValueError("bad input 42")


async def test_handler_exception_is_500_without_traceback_and_logged_once(
    serve: Serve, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    await deploy(serve, "fail", _fail)
    with caplog.at_level(logging.DEBUG, logger="aioserve"):
        r = await http.get("/fail")
    assert r.status_code == 500
    assert "ValueError" in r.text
    assert "bad input 42" in r.text
    assert "Traceback" not in r.text
    assert "_fail" not in r.text  # no frame names either
    logged = [
        rec
        for rec in caplog.records
        if "bad input 42" in rec.getMessage()
        or (rec.exc_info is not None and "bad input 42" in str(rec.exc_info[1]))
    ]
    assert len(logged) == 1, [rec.getMessage() for rec in logged]
    (record,) = logged
    assert record.levelno >= logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert "Traceback" in caplog.text
    assert 'raise ValueError("bad input 42")' in caplog.text


async def test_debug_mode_sends_the_traceback() -> None:
    async with Serve(http_options={"location": "NoServer"}, debug=True) as s:
        await deploy(s, "fail", _fail)
        transport = httpx.ASGITransport(app=s.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://aioserve") as http:
            r = await http.get("/fail")
    assert r.status_code == 500
    assert "ValueError: bad input 42" in r.text
    assert "Traceback" in r.text
    assert "_fail" in r.text


async def test_endpoint_without_a_backend_is_503(serve: Serve, http: httpx.AsyncClient) -> None:
    await serve.create_endpoint("pending", route="/pending")
    r = await http.get("/pending")
    assert r.status_code == 503
    assert "pending" in r.text
    # A misconfiguration, not a load: retrying later will not help until someone links a backend.
    assert "retry-after" not in r.headers
    # Linking a backend makes it answer.
    await serve.create_backend("ready", lambda request: "ready")
    await serve.set_traffic("pending", {"ready": 1.0})
    assert (await http.get("/pending")).text == "ready"


async def test_overload_is_a_fast_503_with_retry_after(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def busy(request: Request) -> str:
        entered.set()
        await release.wait()
        return "done"

    await deploy(serve, "busy", busy, config={"max_concurrent_queries": 1, "max_queued_queries": 1})
    running = asyncio.create_task(http.get("/busy"))
    await entered.wait()
    queued = asyncio.create_task(http.get("/busy"))
    await until_queued(serve, "busy", 1)  # the second request

    async with asyncio.timeout(HANG_GUARD_S):  # "fast": it does not wait for the busy replica
        r = await http.get("/busy")
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert "busy" in r.text
    assert not running.done() and not queued.done()

    release.set()
    assert (await running).text == "done"
    assert (await queued).text == "done"
    # With the queue drained, new requests are admitted again.
    assert (await http.get("/busy")).text == "done"


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(lambda: "relative_slo_ms=0", id="relative-0"),
        # absolute_slo_ms is wall-clock milliseconds since the epoch (Ray 0.8): a minute ago.
        pytest.param(
            lambda: f"absolute_slo_ms={(time.time() - 60) * 1000:.0f}", id="absolute-past"
        ),
    ],
)
async def test_passed_deadline_is_504_and_the_handler_never_runs(
    serve: Serve, http: httpx.AsyncClient, query: Callable[[], str]
) -> None:
    calls: list[int] = []

    def work(request: Request) -> str:
        calls.append(1)
        return "done"

    await deploy(serve, "work", work)
    r = await http.get(f"/work?{query()}")
    assert r.status_code == 504
    assert calls == []
    # A deadline far ahead does not get in the way.
    r = await http.get(f"/work?relative_slo_ms=60000&absolute_slo_ms={(time.time() + 60) * 1000}")
    assert r.status_code == 200
    assert calls == [1]


async def test_starlette_http_exception_sets_the_status(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def taken(request: Request) -> None:
        raise HTTPException(status_code=409, detail="name 'ada' is already taken")

    await deploy(serve, "taken", taken)
    r = await http.get("/taken")
    assert r.status_code == 409
    assert "name 'ada' is already taken" in r.text


async def test_status_table_over_real_uvicorn(served: Serve) -> None:
    """Real uvicorn: the same statuses reach a client over the network."""
    await deploy(served, "hello", lambda request: "hello world")
    await deploy(served, "fail", _fail)
    await served.create_endpoint("pending", route="/pending")
    assert served.url is not None
    async with httpx.AsyncClient(base_url=served.url) as client:
        r = await client.get("/hello")
        assert (r.status_code, r.text) == (200, "hello world")
        assert (await client.get("/nope")).status_code == 404
        assert (await client.post("/hello")).status_code == 405
        r = await client.get("/fail")
        assert r.status_code == 500
        assert "bad input 42" in r.text
        assert "Traceback" not in r.text
        assert (await client.get("/pending")).status_code == 503
        assert (await client.get("/hello?relative_slo_ms=0")).status_code == 504


# -- X-Serve-Call-Method -------------------------------------------------------------------------


class Model:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def __call__(self, request: Request) -> str:
        return f"{self.greeting} from __call__"

    async def predict(self, request: Request) -> str:
        return f"{self.greeting} from predict"

    def explain(self, request: Request) -> str:
        return "explained"

    def _secret(self, request: Request) -> str:
        return "leaked secret"


async def test_call_method_header_calls_that_method(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "model", Model, "hi")
    assert (await http.get("/model")).text == "hi from __call__"
    r = await http.get("/model", headers={"X-Serve-Call-Method": "predict"})
    assert (r.status_code, r.text) == (200, "hi from predict")
    r = await http.get("/model", headers={"x-serve-call-method": "explain"})
    assert (r.status_code, r.text) == (200, "explained")


async def test_unknown_call_method_is_404_without_the_class_methods(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "model", Model, "hi")
    r = await http.get("/model", headers={"X-Serve-Call-Method": "predikt"})
    assert r.status_code == 404
    assert "predikt" in r.text
    # An HTTP client is not shown what else the class has ...
    assert "predict" not in r.text.replace("predikt", "")
    assert "explain" not in r.text
    # ... a handle caller, in the same process, is.
    with pytest.raises(aioserve.MethodNotFound, match="explain") as caught:
        await serve.get_handle("model").options(method_name="predikt").remote(None)
    assert "predict" in str(caught.value).replace("predikt", "")
    assert "_secret" not in str(caught.value)


class Guarded:
    """A class whose lifecycle hook, properties and attributes must not be reachable by name."""

    def __init__(self) -> None:
        self.reconfigured_with: list[object] = []
        self.probes = 0
        self.helper = lambda request: "helper ran"  # an instance attribute, not a method

    def __call__(self, request: Request) -> str:
        return f"ok {len(self.reconfigured_with)}"

    def reconfigure(self, config: object) -> None:
        self.reconfigured_with.append(config)

    @property
    def expensive(self) -> str:
        self.probes += 1
        return "property ran"

    def status(self, request: Request) -> str:
        return f"reconfigured {len(self.reconfigured_with)} probed {self.probes}"


async def test_no_client_reaches_lifecycle_hooks_properties_or_attributes(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "guarded", Guarded)
    names = ("reconfigure", "expensive", "helper", "__init__", "__class__", "__call__x", "mro")
    for name in names:
        r = await http.get("/guarded", headers={"X-Serve-Call-Method": name})
        assert r.status_code == 404, (name, r.status_code, r.text)
        with pytest.raises(aioserve.MethodNotFound):
            await serve.get_handle("guarded").options(method_name=name).remote(None)
    with pytest.raises(aioserve.MethodNotFound):
        await serve.get_handle("guarded").reconfigure.remote(None)
    # Nothing above ran: no reconfigure() call, no property read, and the replica still serves.
    r = await http.get("/guarded", headers={"X-Serve-Call-Method": "status"})
    assert (r.status_code, r.text) == (200, "reconfigured 0 probed 0")
    assert (await http.get("/guarded")).text == "ok 0"


async def test_private_call_method_is_refused(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "model", Model, "hi")
    for name in ("_secret", "__init__", "__class__"):
        r = await http.get("/model", headers={"X-Serve-Call-Method": name})
        assert r.status_code == 404, name
        assert "leaked secret" not in r.text


# -- system routes -------------------------------------------------------------------------------


async def test_routes_lists_every_endpoint(serve: Serve, http: httpx.AsyncClient) -> None:
    await deploy(serve, "a", lambda request: "a")
    await deploy(serve, "b", lambda request: "b", route="/b/{x:int}", methods=["post", "PUT"])
    await serve.create_backend("h", lambda x: x)
    await serve.create_endpoint("headless", backend="h")
    r = await http.get("/-/routes")
    assert r.status_code == 200
    assert r.json() == {
        "/a": ["a", ["GET"]],
        "/b/{x:int}": ["b", ["POST", "PUT"]],
        "headless": ["headless", ["GET"]],
    }


async def test_healthz_and_unknown_system_routes(serve: Serve, http: httpx.AsyncClient) -> None:
    assert (await http.get("/-/healthz")).status_code == 200
    r = await http.get("/-/whatever")
    assert r.status_code == 404
    assert "/-/routes" in r.text
    # An endpoint cannot shadow the system namespace by accident: /-/ paths stay system paths.
    assert (await http.get("/-/")).status_code == 404


# -- routes --------------------------------------------------------------------------------------


async def test_duplicate_route_is_a_value_error_and_changes_nothing(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "first", lambda request: "first", route="/taken")
    await serve.create_backend("second", lambda request: "second")
    endpoints = serve.list_endpoints()
    routes = (await http.get("/-/routes")).json()

    with pytest.raises(aioserve.RouteConflict) as info:
        await serve.create_endpoint("second", backend="second", route="/taken")
    assert isinstance(info.value, ValueError)
    assert "/taken" in str(info.value)
    with pytest.raises(ValueError):
        await serve.create_endpoint("first", backend="second", route="/other")
    with pytest.raises(ValueError):  # unknown backend
        await serve.create_endpoint("third", backend="missing", route="/third")

    assert serve.list_endpoints() == endpoints
    assert (await http.get("/-/routes")).json() == routes
    assert (await http.get("/taken")).text == "first"
    assert (await http.get("/other")).status_code == 404
    assert (await http.get("/third")).status_code == 404


@pytest.mark.parametrize("route", [123, b"/bytes", "no-slash", ["/list"]])
async def test_invalid_route_type_is_a_type_error(
    serve: Serve, http: httpx.AsyncClient, route: Any
) -> None:
    await serve.create_backend("b", lambda request: "b")
    with pytest.raises(TypeError):
        await serve.create_endpoint("e", backend="b", route=route)
    assert serve.list_endpoints() == {}
    assert (await http.get("/-/routes")).json() == {}


async def test_headless_endpoint_is_not_on_http_but_answers_handles(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await serve.create_backend("double", lambda x: x * 2)
    await serve.create_endpoint("double", backend="double", route=None)
    assert serve.list_endpoints()["double"]["route"] is None
    assert (await http.get("/double")).status_code == 404
    assert await serve.get_handle("double").remote(21) == 42


async def test_deleting_an_endpoint_removes_its_route_and_keeps_the_backend(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "hello", lambda request: "hello")
    await deploy(serve, "dyn", lambda request: "dyn", route="/dyn/{n:int}")
    assert (await http.get("/hello")).status_code == 200
    await serve.delete_endpoint("hello")
    await serve.delete_endpoint("dyn")
    assert (await http.get("/hello")).status_code == 404
    assert (await http.get("/dyn/1")).status_code == 404
    assert (await http.get("/-/routes")).json() == {}
    assert set(serve.list_backends()) == {"hello", "dyn"}
    # The route is free again and the surviving backend serves it.
    await serve.create_endpoint("hello2", backend="hello", route="/hello")
    assert (await http.get("/hello")).text == "hello"


async def test_route_table_with_1000_static_endpoints(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def which(request: Request) -> str:
        return request.url.path

    await serve.create_backend("which", which)
    for i in range(1000):
        await serve.create_endpoint(f"ep{i}", backend="which", route=f"/models/m{i}")
    await deploy(serve, "dyn", lambda request: "dynamic", route="/models/m{n:int}/x")
    assert len((await http.get("/-/routes")).json()) == 1001
    for i in (0, 1, 499, 998, 999):
        r = await http.get(f"/models/m{i}")
        assert (r.status_code, r.text) == (200, f"/models/m{i}")
    assert (await http.get("/models/m1000")).status_code == 404
    assert (await http.get("/models/m7/x")).text == "dynamic"
    await serve.delete_endpoint("ep499")
    assert (await http.get("/models/m499")).status_code == 404
    assert (await http.get("/models/m500")).text == "/models/m500"


# -- http_options --------------------------------------------------------------------------------


class AddHeader:
    """A pure ASGI middleware that stamps every response with a header."""

    def __init__(self, app: ASGIApp, name: str, value: str) -> None:
        self.app = app
        self.name = name.lower().encode()
        self.value = value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (self.name, self.value)]
            await send(message)

        await self.app(scope, receive, stamped)


async def test_middlewares_wrap_the_app(server_name: str) -> None:
    """Real server: a user middleware sees every response, endpoints and errors alike."""
    options = {
        "host": "127.0.0.1",
        "port": 0,
        "server": server_name,
        "middlewares": [
            Middleware(AddHeader, name="X-Outer", value="1"),
            Middleware(AddHeader, name="X-Inner", value="2"),
        ],
    }
    async with Serve(http_options=options) as s:
        await deploy(s, "hello", lambda request: "hello")
        assert s.url is not None
        async with httpx.AsyncClient(base_url=s.url) as client:
            for path, status in (("/hello", 200), ("/nope", 404), ("/-/routes", 200)):
                r = await client.get(path)
                assert r.status_code == status
                assert r.headers["x-outer"] == "1"
                assert r.headers["x-inner"] == "2"
            # The first middleware in the list is the outermost (Starlette's order): the inner
            # one stamps the response first.
            names = [k for k in r.headers if k.startswith("x-")]
            assert names == ["x-inner", "x-outer"]


async def test_root_path_follows_uvicorn(server_name: str) -> None:
    """Real server with ``root_path="/prefix"``, granian the same as uvicorn.

    uvicorn's ``root_path`` (``--root-path``) means "a proxy in front strips this prefix": since
    uvicorn 0.26 the server answers at ``/hello`` and the app sees the full public path
    ``/prefix/hello`` (``request.url``), exactly as a Starlette app run with ``--root-path`` would.
    The prefix itself is not served a second time: ``/prefix/hello`` is ``/prefix/prefix/hello``
    publicly, which is no route.
    """

    def where(request: Request) -> dict[str, str]:
        return {"url_path": request.url.path, "root_path": request.scope["root_path"]}

    options = {"host": "127.0.0.1", "port": 0, "root_path": "/prefix", "server": server_name}
    async with Serve(http_options=options) as s:
        await deploy(s, "hello", where)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.http_port}") as client:
            r = await client.get("/hello")
            assert r.status_code == 200
            assert r.json() == {"url_path": "/prefix/hello", "root_path": "/prefix"}
            assert (await client.get("/prefix/hello")).status_code == 404
            assert (await client.get("/-/routes")).json() == {"/hello": ["hello", ["GET"]]}


async def test_url_with_root_path_reaches_the_endpoints(server_name: str) -> None:
    """Real server: ``s.url`` is "the base URL of this instance's own HTTP server", so a client
    that joins a route onto it must reach the endpoint, root_path or not (Ray 1.x did:
    ``requests.get(handle.url)`` with the prefix in it)."""
    options = {"host": "127.0.0.1", "port": 0, "root_path": "/prefix", "server": server_name}
    async with Serve(http_options=options) as s:
        await deploy(s, "hello", lambda request: "hello")
        assert s.url is not None
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{s.url}/hello")
            assert (r.status_code, r.text) == (200, "hello")


async def test_bind_failure_raises_bind_error_at_start(server_name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        s = Serve(http_options={"host": "127.0.0.1", "port": port, "server": server_name})
        with pytest.raises(aioserve.BindError) as info:
            await s.start()
        assert isinstance(info.value, OSError)
        assert str(port) in str(info.value)
        assert s.url is None
        await s.aclose()


async def test_port_0_picks_a_free_port(served: Serve, server_name: str) -> None:
    """Real server: the chosen port is readable and the server answers there."""
    port = served.http_port
    assert isinstance(port, int) and port > 0
    assert served.url == f"http://127.0.0.1:{port}"
    await deploy(served, "hello", lambda request: "hello")
    async with httpx.AsyncClient(base_url=served.url) as client:
        assert (await client.get("/-/healthz")).status_code == 200
        assert (await client.get("/hello")).text == "hello"
    # A second instance on port 0 gets a different port: both serve at once.
    async with Serve(http_options={"host": "127.0.0.1", "port": 0, "server": server_name}) as other:
        assert other.http_port not in (None, port)
        await deploy(other, "hello", lambda request: "other")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{other.url}/hello")).text == "other"
            assert (await client.get(f"{served.url}/hello")).text == "hello"


@pytest.mark.parametrize(
    "options",
    [{"host": None}, {"location": "NoServer"}, {"location": None}],
    ids=["host-None", "NoServer", "location-None"],
)
async def test_no_server_options_start_no_server(options: dict[str, Any]) -> None:
    async with Serve(http_options={"port": 0, **options}) as s:
        assert s.url is None
        assert s.http_port is None
        await deploy(s, "hello", lambda request: "hello")
        # The app is still there to be mounted or driven in process.
        transport = httpx.ASGITransport(app=s.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            assert (await http.get("/hello")).text == "hello"


class Colour(enum.Enum):
    RED = "red"


async def test_common_stdlib_values_are_encoded_as_json(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def values(request: Request) -> dict[str, Any]:
        return {
            "set": {3},
            "tuple": (1, 2),
            "date": datetime.date(2026, 11, 21),
            "enum": Colour.RED,
            "uuid": uuid.UUID(int=1),
            "decimal": decimal.Decimal("1.5"),
            "path": pathlib.PurePosixPath("/tmp/x"),
        }

    await serve.create_backend("values", values)
    await serve.create_endpoint("values", backend="values", route="/values")
    response = await http.get("/values")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "set": [3],
        "tuple": [1, 2],
        "date": "2026-11-21",
        "enum": "red",
        "uuid": "00000000-0000-0000-0000-000000000001",
        "decimal": "1.5",
        "path": "/tmp/x",
    }


async def test_a_sync_generator_is_streamed_item_by_item(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def lines(request: Request) -> Any:
        yield "a,"
        yield b"b,"
        yield {"c": 1}

    await serve.create_backend("lines", lines)
    await serve.create_endpoint("lines", backend="lines", route="/lines")
    response = await http.get("/lines")
    assert response.status_code == 200
    assert response.text == 'a,b,{"c":1}\n'


async def test_the_app_acknowledges_lifespan_and_refuses_websockets(serve: Serve) -> None:
    sent: list[Message] = []
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await serve.asgi_app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    sent.clear()
    inbox[:] = [{"type": "websocket.connect"}]
    await serve.asgi_app({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1000}]
