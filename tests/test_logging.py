"""Tests for request ids and logging (the issue's "Logging through ``logging``" part).

Each HTTP request gets an id (``X-Request-ID`` taken or made, echoed in the response); the id is
``serve.context.request_id`` inside handlers and follows nested handle calls; log records from user
code inside a replica carry ``serve_request_id``, ``serve_endpoint``, ``serve_backend`` and
``serve_replica``; the access log (logger ``aioserve.access``) is off unless asked for; a handler
exception is logged once, with its traceback. Tests synchronise on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from _sample_backends import Gate

import aioserve
from aioserve import Serve

WAIT_S = 10.0  # turns a hang into a failure; never reached when things work

SERVE_ATTRS = ("serve_request_id", "serve_endpoint", "serve_backend", "serve_replica")
USER_LOGGER = "test_logging.user"


class Collector(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def by_message(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]


def collect(name: str, level: int) -> Iterator[Collector]:
    logger = logging.getLogger(name)
    collector = Collector()
    old_level = logger.level
    logger.setLevel(level)
    logger.addHandler(collector)
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.setLevel(old_level)


@pytest.fixture
def user_logs() -> Iterator[Collector]:
    """Records of the logger user code in these tests' backends writes to."""
    yield from collect(USER_LOGGER, logging.DEBUG)


@pytest.fixture
def access_logs() -> Iterator[Collector]:
    """Records of ``aioserve.access``, with INFO enabled so that nothing is filtered out."""
    yield from collect("aioserve.access", logging.INFO)


@pytest.fixture
def aioserve_logs() -> Iterator[Collector]:
    """Every record of the ``aioserve`` logger tree, DEBUG and up."""
    yield from collect("aioserve", logging.DEBUG)


@pytest.fixture
async def logged_serve() -> AsyncIterator[Serve]:
    """An instance with the access log on and no server of its own."""
    async with Serve(http_options={"location": "NoServer"}, access_log=True) as instance:
        yield instance


def client_for(s: Serve) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=s.asgi_app), base_url="http://x")


async def deploy(
    s: Serve, name: str, func_or_class: Any, *, methods: list[str] | None = None, **config: Any
) -> None:
    """A backend and an endpoint of the same name, routed at ``/{name}``."""
    await s.create_backend(name, func_or_class, config=config or None)
    await s.create_endpoint(name, backend=name, route=f"/{name}", methods=methods or ["GET"])


def request_id_and_log(*args: Any) -> str:
    """A sync handler: logs a line, answers with its request id."""
    logging.getLogger(USER_LOGGER).info("sync handler ran")
    return aioserve.context.request_id or "none"


async def async_request_id_and_log(*args: Any) -> str:
    """The same as an async handler."""
    logging.getLogger(USER_LOGGER).warning("async handler ran")
    return aioserve.context.request_id or "none"


# -- request ids ---------------------------------------------------------------------------------


async def test_a_given_x_request_id_is_echoed_and_seen_by_the_handler(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "sync", request_id_and_log)
    await deploy(serve, "async", async_request_id_and_log)
    for route in ("/sync", "/async"):
        response = await http.get(route, headers={"X-Request-ID": f"given{route}"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == f"given{route}"
        assert response.text == f"given{route}"


async def test_a_missing_x_request_id_is_made_echoed_and_distinct(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "sync", request_id_and_log)
    await deploy(serve, "async", async_request_id_and_log)
    responses = await asyncio.gather(
        *(http.get(route) for route in ("/sync", "/async") for _ in range(10))
    )
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(ids)
    assert len(set(ids)) == len(ids)
    # The id the handler saw is the one the client was told.
    assert [r.text for r in responses] == ids


async def test_failed_requests_echo_their_request_id_too(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def boom(*args: Any) -> str:
        raise RuntimeError("boom")

    await deploy(serve, "boom", boom)
    response = await http.get("/boom", headers={"X-Request-ID": "failing-1"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "failing-1"
    made = await http.get("/boom")
    assert made.status_code == 500
    assert made.headers["x-request-id"]


async def test_request_id_over_real_uvicorn(served: Serve) -> None:
    await deploy(served, "rid", async_request_id_and_log)
    assert served.url is not None
    async with httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
        given = await client.get("/rid", headers={"X-Request-ID": "over-tcp-7"})
        made = [await client.get("/rid") for _ in range(3)]
    assert given.headers["x-request-id"] == given.text == "over-tcp-7"
    made_ids = [r.headers["x-request-id"] for r in made]
    assert [r.text for r in made] == made_ids
    assert len(set(made_ids)) == 3


async def test_request_id_outside_a_request_is_none(serve: Serve) -> None:
    assert aioserve.context.request_id is None


async def test_handle_calls_get_their_own_request_ids(serve: Serve) -> None:
    await deploy(serve, "rid", async_request_id_and_log)
    await deploy(serve, "sync_rid", request_id_and_log)
    ids = await asyncio.gather(
        *(serve.get_handle(name).remote() for name in ("rid", "sync_rid") for _ in range(4))
    )
    assert all(i != "none" for i in ids)
    assert len(set(ids)) == len(ids)


async def test_a_nested_handle_call_keeps_the_request_id(
    serve: Serve, http: httpx.AsyncClient, user_logs: Collector
) -> None:
    async def inner(*args: Any) -> dict[str, Any]:
        logging.getLogger(USER_LOGGER).info("inner")
        return {"id": aioserve.context.request_id, "web": aioserve.context.web}

    async def outer(*args: Any) -> dict[str, Any]:
        logging.getLogger(USER_LOGGER).info("outer")
        nested = await serve.get_handle("inner").remote()
        return {"outer": aioserve.context.request_id, "inner": nested}

    await serve.create_backend("inner", inner)
    await serve.create_endpoint("inner", backend="inner")
    await deploy(serve, "outer", outer)
    response = await http.get("/outer", headers={"X-Request-ID": "trace-42"})
    assert response.json() == {"outer": "trace-42", "inner": {"id": "trace-42", "web": False}}

    # Without a header the made id is the one the nested call sees.
    response = await http.get("/outer")
    made = response.headers["x-request-id"]
    assert response.json()["inner"]["id"] == made

    (outer_record, *_) = user_logs.by_message("outer")
    (inner_record, *_) = user_logs.by_message("inner")
    assert outer_record.serve_request_id == inner_record.serve_request_id == "trace-42"
    assert (outer_record.serve_endpoint, outer_record.serve_backend) == ("outer", "outer")
    assert (inner_record.serve_endpoint, inner_record.serve_backend) == ("inner", "inner")
    assert inner_record.serve_replica.startswith("inner#")


def test_a_nested_call_from_a_sync_handler_keeps_the_request_id(
    client: aioserve.Client,
) -> None:
    def inner(*args: Any) -> str | None:
        return aioserve.context.request_id

    def outer(*args: Any) -> dict[str, Any]:
        # A sync handler runs on its replica's thread: it uses the sync facade, as users do.
        nested = aioserve.connect().get_handle("inner").remote().result(WAIT_S)
        return {"outer": aioserve.context.request_id, "inner": nested}

    client.create_backend("inner", inner)
    client.create_endpoint("inner", backend="inner")
    client.create_backend("outer", outer)
    client.create_endpoint("outer", backend="outer", route="/outer")
    assert client.url is not None
    with httpx.Client(base_url=client.url, timeout=WAIT_S) as http_client:
        response = http_client.get("/outer", headers={"X-Request-ID": "sync-nest-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "sync-nest-1"
    assert response.json() == {"outer": "sync-nest-1", "inner": "sync-nest-1"}


# -- log records carry the request and replica -------------------------------------------------


async def test_log_records_inside_sync_and_async_replicas_carry_the_serve_tags(
    serve: Serve, http: httpx.AsyncClient, user_logs: Collector
) -> None:
    def sync_handler(*args: Any) -> str:
        logging.getLogger(USER_LOGGER).info("sync handler ran")
        return aioserve.get_replica_context().replica_tag

    async def async_handler(*args: Any) -> str:
        logging.getLogger(USER_LOGGER).warning("async handler ran")
        return aioserve.get_replica_context().replica_tag

    await serve.create_backend("sync_be", sync_handler)
    await serve.create_endpoint("sync_ep", backend="sync_be", route="/sync")
    await serve.create_backend("async_be", async_handler)
    await serve.create_endpoint("async_ep", backend="async_be", route="/async")

    by_handle = await serve.get_handle("async_ep").remote()
    sync_response = await http.get("/sync", headers={"X-Request-ID": "sync-1"})
    async_response = await http.get("/async", headers={"X-Request-ID": "async-1"})

    (sync_record,) = user_logs.by_message("sync handler ran")
    assert sync_record.serve_request_id == "sync-1"
    assert sync_record.serve_endpoint == "sync_ep"
    assert sync_record.serve_backend == "sync_be"
    assert sync_record.serve_replica == sync_response.text
    assert sync_record.serve_replica.startswith("sync_be#")

    from_handle, from_http = user_logs.by_message("async handler ran")
    assert from_http.serve_request_id == "async-1"
    assert (from_http.serve_endpoint, from_http.serve_backend) == ("async_ep", "async_be")
    assert from_http.serve_replica == async_response.text == by_handle
    # The handle call got an id of its own; the record says so.
    assert from_handle.serve_request_id not in ("-", "async-1")
    assert (from_handle.serve_endpoint, from_handle.serve_backend) == ("async_ep", "async_be")
    assert from_handle.serve_replica == by_handle

    # The attributes work in a format string, as a user would configure them.
    formatter = logging.Formatter(
        "%(serve_request_id)s %(serve_endpoint)s %(serve_backend)s %(serve_replica)s %(message)s"
    )
    assert formatter.format(sync_record) == (
        f"sync-1 sync_ep sync_be {sync_response.text} sync handler ran"
    )


async def test_concurrent_requests_on_one_async_replica_keep_their_own_ids(
    serve: Serve, http: httpx.AsyncClient, user_logs: Collector
) -> None:
    gate = Gate()

    async def handler(request: Any) -> str:
        mine = request.query_params["n"]
        logging.getLogger(USER_LOGGER).info("before %s", mine)
        await gate.pass_through(mine)  # all of them are inside at once
        logging.getLogger(USER_LOGGER).info("after %s", mine)
        return mine

    await deploy(serve, "conc", handler)
    calls = [
        asyncio.ensure_future(http.get(f"/conc?n={n}", headers={"X-Request-ID": f"id-{n}"}))
        for n in range(4)
    ]
    await gate.until_inside(4)
    gate.release.set()
    responses = await asyncio.wait_for(asyncio.gather(*calls), WAIT_S)
    assert [r.text for r in responses] == ["0", "1", "2", "3"]
    assert len(user_logs.records) == 8
    replicas = set()
    for record in user_logs.records:
        n = record.getMessage().split()[1]
        assert record.serve_request_id == f"id-{n}"
        replicas.add(record.serve_replica)
    assert len(replicas) == 1  # all on the one replica, each record with its own request


async def test_sync_replicas_running_at_once_keep_their_own_ids(
    serve: Serve, http: httpx.AsyncClient, user_logs: Collector
) -> None:
    loop = asyncio.get_running_loop()
    inside = asyncio.Semaphore(0)
    release = asyncio.Event()

    def handler(request: Any) -> str:
        mine = request.query_params["n"]
        logging.getLogger(USER_LOGGER).info("before %s", mine)
        loop.call_soon_threadsafe(inside.release)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(WAIT_S)
        logging.getLogger(USER_LOGGER).info("after %s", mine)
        return aioserve.get_replica_context().replica_tag

    await deploy(serve, "threads", handler, num_replicas=3)
    calls = [
        asyncio.ensure_future(http.get(f"/threads?n={n}", headers={"X-Request-ID": f"t-{n}"}))
        for n in range(3)
    ]
    for _ in range(3):  # three replica threads are inside at once
        await asyncio.wait_for(inside.acquire(), WAIT_S)
    release.set()
    responses = await asyncio.wait_for(asyncio.gather(*calls), WAIT_S)
    replica_of = {f"t-{n}": r.text for n, r in enumerate(responses)}
    assert len(set(replica_of.values())) == 3
    assert len(user_logs.records) == 6
    for record in user_logs.records:
        n = record.getMessage().split()[1]
        assert record.serve_request_id == f"t-{n}"
        assert record.serve_replica == replica_of[f"t-{n}"]
        assert record.serve_backend == record.serve_endpoint == "threads"


async def test_a_constructor_logs_with_its_backend_and_replica(
    serve: Serve, user_logs: Collector
) -> None:
    class Model:
        def __init__(self) -> None:
            logging.getLogger(USER_LOGGER).info("loading")

        def __call__(self, *args: Any) -> str:
            return aioserve.get_replica_context().replica_tag

    await serve.create_backend("model", Model, config={"num_replicas": 2})
    await serve.create_endpoint("model", backend="model")
    records = user_logs.by_message("loading")
    assert len(records) == 2
    assert {r.serve_backend for r in records} == {"model"}
    assert len({r.serve_replica for r in records}) == 2
    assert all(r.serve_replica.startswith("model#") for r in records)
    assert {r.serve_request_id for r in records} == {"-"}  # no request is being served
    assert await serve.get_handle("model").remote() in {r.serve_replica for r in records}


async def test_outside_a_request_the_serve_attributes_are_dashes(
    serve: Serve, user_logs: Collector
) -> None:
    await deploy(serve, "rid", async_request_id_and_log)
    assert await serve.get_handle("rid").remote() != "none"
    logging.getLogger(USER_LOGGER).info("outside")
    (record,) = user_logs.by_message("outside")
    assert [getattr(record, name) for name in SERVE_ATTRS] == ["-"] * 4

    def from_thread() -> None:
        logging.getLogger(USER_LOGGER).info("plain thread")

    await asyncio.to_thread(from_thread)
    (record,) = user_logs.by_message("plain thread")
    assert [getattr(record, name) for name in SERVE_ATTRS] == ["-"] * 4


async def test_an_answered_request_does_not_stay_in_the_callers_context(
    serve: Serve, http: httpx.AsyncClient, user_logs: Collector
) -> None:
    """ASGITransport (and any host that awaits the app in its own task) runs the app in the
    caller's task: once the response is back, the caller is no longer inside that request."""
    await deploy(serve, "rid", async_request_id_and_log)
    response = await http.get("/rid", headers={"X-Request-ID": "finished-1"})
    assert response.text == "finished-1"

    assert aioserve.context.request_id is None
    assert aioserve.context.web is False
    logging.getLogger(USER_LOGGER).info("after the request")
    (record,) = user_logs.by_message("after the request")
    assert [getattr(record, name) for name in SERVE_ATTRS] == ["-"] * 4
    # A later top-level handle call is a new request with an id of its own.
    assert await serve.get_handle("rid").remote() not in ("finished-1", "none")


# -- the access log ------------------------------------------------------------------------------


async def test_access_log_has_one_record_per_http_request(
    logged_serve: Serve, access_logs: Collector
) -> None:
    def boom(*args: Any) -> str:
        raise RuntimeError("boom")

    await deploy(logged_serve, "ok", async_request_id_and_log, methods=["GET", "POST"])
    await deploy(logged_serve, "boom", boom)
    async with client_for(logged_serve) as client:
        given = await client.get("/ok", headers={"X-Request-ID": "acc-1"})
        posted = await client.post("/ok", content=b"x")
        failed = await client.get("/boom", headers={"X-Request-ID": "acc-3"})
    # Handle calls are not HTTP requests: they are not in the access log.
    assert await logged_serve.get_handle("ok").remote() != "none"

    expected = [
        ("acc-1", "GET", "/ok", 200),
        (posted.headers["x-request-id"], "POST", "/ok", 200),
        ("acc-3", "GET", "/boom", 500),
    ]
    assert [given.status_code, posted.status_code, failed.status_code] == [200, 200, 500]
    assert len(access_logs.records) == len(expected)
    for record, (request_id, method, path, status) in zip(
        access_logs.records, expected, strict=True
    ):
        assert record.levelno == logging.INFO
        assert record.name == "aioserve.access"
        message = record.getMessage()
        assert request_id in message
        assert re.search(rf"\b{method}\b", message)
        assert path in message
        assert re.search(rf"\b{status}\b", message)


async def test_requests_no_endpoint_answers_echo_their_request_id(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "ok", async_request_id_and_log)
    missing = await http.get("/missing", headers={"X-Request-ID": "rid-404"})
    wrong_method = await http.delete("/ok", headers={"X-Request-ID": "rid-405"})
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    assert missing.headers.get("x-request-id") == "rid-404"
    assert wrong_method.headers.get("x-request-id") == "rid-405"


async def test_access_log_covers_requests_no_endpoint_answers(
    logged_serve: Serve, access_logs: Collector
) -> None:
    await deploy(logged_serve, "ok", async_request_id_and_log)
    async with client_for(logged_serve) as client:
        missing = await client.get("/missing", headers={"X-Request-ID": "acc-404"})
        wrong_method = await client.delete("/ok", headers={"X-Request-ID": "acc-405"})
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    messages = access_logs.messages()
    assert len(messages) == 2
    assert "acc-404" in messages[0] and "/missing" in messages[0] and "404" in messages[0]
    assert "acc-405" in messages[1] and "DELETE" in messages[1] and "405" in messages[1]


async def test_access_log_over_real_uvicorn(access_logs: Collector) -> None:
    async with Serve(http_options={"host": "127.0.0.1", "port": 0}, access_log=True) as s:
        await deploy(s, "ok", async_request_id_and_log)
        assert s.url is not None
        async with httpx.AsyncClient(base_url=s.url, timeout=WAIT_S) as client:
            for n in range(3):
                response = await client.get("/ok", headers={"X-Request-ID": f"tcp-{n}"})
                assert response.text == f"tcp-{n}"
    messages = access_logs.messages()
    assert len(messages) == 3
    for n, message in enumerate(messages):
        assert f"tcp-{n}" in message and "GET" in message and "/ok" in message
        assert "200" in message


async def test_access_log_is_off_by_default(
    serve: Serve, http: httpx.AsyncClient, served: Serve, access_logs: Collector
) -> None:
    def boom(*args: Any) -> str:
        raise RuntimeError("boom")

    for s in (serve, served):
        await deploy(s, "ok", async_request_id_and_log)
        await deploy(s, "boom", boom)
    assert (await http.get("/ok")).status_code == 200
    assert (await http.get("/boom")).status_code == 500
    assert served.url is not None
    async with httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
        assert (await client.get("/ok")).status_code == 200
    assert access_logs.records == []


# -- handler exceptions --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_handler_exception_is_logged_once_with_its_traceback(
    serve: Serve, http: httpx.AsyncClient, aioserve_logs: Collector, kind: str
) -> None:
    def sync_boom(*args: Any) -> str:
        raise ValueError("the model broke")

    async def async_boom(*args: Any) -> str:
        raise ValueError("the model broke")

    await deploy(serve, "boom", sync_boom if kind == "sync" else async_boom)
    response = await http.get("/boom", headers={"X-Request-ID": "err-1"})
    assert response.status_code == 500
    assert "ValueError" in response.text
    assert "Traceback" not in response.text  # not in debug mode

    errors = [r for r in aioserve_logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    (record,) = errors
    assert record.exc_info is not None
    exc = record.exc_info[1]
    assert isinstance(exc, ValueError) and str(exc) == "the model broke"
    text = logging.Formatter().format(record)
    assert "Traceback" in text
    assert f"{kind}_boom" in text  # the traceback reaches into the user's code
    # The record tells which request failed.
    assert record.serve_request_id == "err-1"
    assert record.serve_endpoint == "boom"
