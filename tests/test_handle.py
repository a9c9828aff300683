"""Tests of handles (API.md §4): remote(), options(), legacy calling conventions, composition,
overload, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import httpx
import pytest
from _sample_backends import Gate, gated, until_queued, wait_until
from starlette.requests import Request

import aioserve
from aioserve import (
    DeadlineExceeded,
    EndpointNotFound,
    Overloaded,
    PythonRequest,
    Serve,
    ServeError,
    ServeHandle,
)


async def deploy(
    serve: Serve, tag: str, target: Any, *init_args: Any, config: Any = None, route: Any = None
) -> ServeHandle:
    """Create a backend and an endpoint of the same name; return a handle to it."""
    await serve.create_backend(tag, target, *init_args, config=config)
    await serve.create_endpoint(tag, backend=tag, route=route)
    return serve.get_handle(tag)


# -- remote() -----------------------------------------------------------------------------------


async def test_remote_returns_at_once_with_the_request_started(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate))
    ref = handle.remote(7)
    assert inspect.isawaitable(ref)
    assert gate.entries == []  # nothing ran inside remote() itself
    await gate.until_inside(1)  # the request runs without anyone awaiting ref
    assert gate.entries == [7]
    assert not ref.done()
    gate.release.set()
    assert await ref == 7


async def test_gather_fans_out_and_keeps_order(serve: Serve) -> None:
    n = 50
    all_inside = asyncio.Event()
    inside = 0

    async def together(i: int) -> int:
        nonlocal inside
        inside += 1
        if inside == n:
            all_inside.set()
        # Finishes only once every request is running at the same time: a real fan-out.
        await asyncio.wait_for(all_inside.wait(), 10)
        return i * i

    handle = await deploy(serve, "x", together)
    results = await asyncio.gather(*[handle.remote(i) for i in range(n)])
    assert results == [i * i for i in range(n)]


def echo_args(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def keyword_only(a: int, b: int = 10, *, c: int) -> tuple[int, int, int]:
    return a, b, c


async def test_remote_passes_exactly_the_given_arguments(serve: Serve) -> None:
    handle = await deploy(serve, "echo", echo_args)
    payload = {"nested": [1, 2]}
    assert await handle.remote() == ((), {})
    assert await handle.remote(1, "a", payload, k=2) == ((1, "a", payload), {"k": 2})
    args, _ = await handle.remote(payload)
    assert args[0] is payload  # no copy, no serialisation
    kw = await deploy(serve, "kw", keyword_only)
    assert await kw.remote(1, c=3) == (1, 10, 3)
    assert await kw.remote(a=1, b=2, c=3) == (1, 2, 3)


async def test_starlette_request_arrives_unchanged(serve: Serve) -> None:
    async def inspect_request(request: Any) -> Any:
        return request

    handle = await deploy(serve, "x", inspect_request)
    scope = {"type": "http", "method": "GET", "path": "/p", "query_string": b"a=1", "headers": []}
    request = Request(scope)
    assert await handle.remote(request) is request


async def test_http_request_forwarded_through_a_handle(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    async def inner(request: Any) -> dict[str, Any]:
        assert isinstance(request, Request)
        body = await request.body()
        return {"q": request.query_params["q"], "body": body.decode(), "web": aioserve.context.web}

    async def outer(request: Request) -> Any:
        return await serve.get_handle("inner").remote(request)

    await deploy(serve, "inner", inner)
    await deploy(serve, "outer", outer, route="/outer")
    response = await http.request("GET", "/outer?q=hi", content=b"payload")
    assert response.status_code == 200
    assert response.json() == {"q": "hi", "body": "payload", "web": False}


class CustomError(Exception):
    pass


async def test_user_exceptions_keep_type_and_message(serve: Serve) -> None:
    def sync_fail(x: int) -> None:
        raise CustomError(f"bad input {x}")

    async def async_fail(x: int) -> None:
        raise KeyError(f"missing {x}")

    sync_handle = await deploy(serve, "sync", sync_fail)
    async_handle = await deploy(serve, "async", async_fail)
    with pytest.raises(CustomError, match="bad input 3"):
        await sync_handle.remote(3)
    with pytest.raises(KeyError, match="missing 4"):
        await async_handle.remote(4)
    # The replica goes on serving after a user error.
    with pytest.raises(CustomError, match="bad input 5"):
        await sync_handle.remote(5)


# -- options() ----------------------------------------------------------------------------------


class Multi:
    def __call__(self) -> str:
        return "call"

    def other(self) -> str:
        return "other"

    async def third(self, x: int = 0) -> str:
        return f"third {x}"


async def test_options_returns_a_new_handle_and_leaves_the_original(serve: Serve) -> None:
    handle = await deploy(serve, "multi", Multi)
    original_repr = repr(handle)
    other = handle.options(method_name="other")
    assert other is not handle
    assert await other.remote() == "other"
    assert await handle.remote() == "call"
    assert repr(handle) == original_repr

    keyed = handle.options(shard_key="user-1")
    slo = handle.options(relative_slo_ms=5000.0)
    assert "user-1" in repr(keyed)
    assert "5000" in repr(slo)
    assert repr(handle) == original_repr
    assert await keyed.remote() == "call"
    assert await slo.remote() == "call"
    # A handle fetched again does not see options set on another one.
    assert repr(serve.get_handle("multi")) == original_repr
    assert await serve.get_handle("multi").remote() == "call"


async def test_options_chain_and_override(serve: Serve) -> None:
    handle = await deploy(serve, "multi", Multi)
    chained = handle.options(method_name="other").options(shard_key="k")
    assert await chained.remote() == "other"
    assert "k" in repr(chained)
    overridden = chained.options(method_name="third")
    assert await overridden.remote(2) == "third 2"
    assert await chained.remote() == "other"
    reset = overridden.options(method_name=None)
    assert await reset.remote() == "call"


async def test_attribute_sugar_calls_the_method(serve: Serve) -> None:
    handle = await deploy(serve, "multi", Multi)
    assert await handle.other.remote() == "other"
    assert await handle.third.remote(9) == "third 9"
    assert await handle.remote() == "call"


async def test_unknown_method_is_an_error(serve: Serve) -> None:
    handle = await deploy(serve, "multi", Multi)
    with pytest.raises(AttributeError, match="nope"):
        await handle.nope.remote()
    assert await handle.remote() == "call"


async def test_repr_names_the_endpoint(serve: Serve) -> None:
    handle = await deploy(serve, "summarize", Multi)
    assert "summarize" in repr(handle)
    assert "other" in repr(handle.options(method_name="other"))


async def test_get_handle_unknown_endpoint(serve: Serve) -> None:
    await deploy(serve, "known", Multi)
    with pytest.raises(KeyError) as info:
        serve.get_handle("unknown")
    assert isinstance(info.value, EndpointNotFound)
    assert "unknown" in str(info.value)
    assert "known" in str(info.value)


async def test_missing_ok_handle_waits_for_the_endpoint(serve: Serve) -> None:
    probe = await deploy(serve, "probe", echo_args)
    handle = serve.get_handle("later", missing_ok=True)
    ref = handle.remote(4)
    # A call sent later is answered by now: the first one had every chance to fail at once.
    assert await probe.remote(5) == ((5,), {})
    assert not ref.done()
    await deploy(serve, "later", echo_args)
    assert await asyncio.wait_for(ref, 10) == ((4,), {})


# -- legacy calling conventions ----------------------------------------------------------------


async def test_0_8_style_request_then_kwargs(serve: Serve) -> None:
    def legacy(request: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            "python_request": isinstance(request, PythonRequest),
            "starlette": isinstance(request, Request),
            "query_params": dict(request.query_params),
            "kwargs": kwargs,
        }

    handle = await deploy(serve, "legacy", legacy)
    assert await handle.remote(a=1, b="two") == {
        "python_request": True,
        "starlette": False,
        "query_params": {"a": 1, "b": "two"},
        "kwargs": {"a": 1, "b": "two"},
    }
    empty = await handle.remote()
    assert empty["python_request"] is True
    assert empty["kwargs"] == {}


async def test_1_x_style_request_only(serve: Serve) -> None:
    async def one_x(request: Any) -> Any:
        if isinstance(request, PythonRequest):
            return {
                "query_params": dict(request.query_params),
                "body": await request.body(),
                "json": await request.json(),
                "method": request.method,
                "headers": dict(request.headers),
                "path_params": dict(request.path_params),
            }
        return ("as given", request)

    handle = await deploy(serve, "one_x", one_x)
    # Keyword arguments only: they become the query params.
    got = await handle.remote(name="ann", n=2)
    assert got["query_params"] == {"name": "ann", "n": 2}
    assert got["body"] is None
    assert got["path_params"] == {}
    assert isinstance(got["method"], str)
    # One positional argument binds to the parameter as given.
    assert await handle.remote({"x": 1}) == ("as given", {"x": 1})
    # A positional argument and keyword arguments: the positional one is the body.
    got = await handle.remote('{"k": [1, 2]}', flag=True)
    assert got["query_params"] == {"flag": True}
    assert got["body"] == '{"k": [1, 2]}'
    assert got["json"] == {"k": [1, 2]}
    got = await handle.remote(b'{"k": 3}', flag=True)
    assert got["json"] == {"k": 3}
    got = await handle.remote({"already": "decoded"}, flag=True)
    assert got["body"] == got["json"] == {"already": "decoded"}


async def test_context_web_is_false_for_handles_and_true_over_http(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def sync_web(request: Any) -> bool:
        return aioserve.context.web

    async def async_web(request: Any) -> bool:
        return aioserve.context.web

    sync_handle = await deploy(serve, "sync", sync_web, route="/sync")
    async_handle = await deploy(serve, "async", async_web, route="/async")
    assert await sync_handle.remote() is False
    assert await async_handle.remote() is False
    for path in ("/sync", "/async"):
        response = await http.get(path)
        assert response.status_code == 200
        assert response.json() is True
    # Interleaved: an HTTP call does not leak "web" into a handle call or back.
    results = await asyncio.gather(http.get("/async"), async_handle.remote(), http.get("/sync"))
    assert [results[0].json(), results[1], results[2].json()] == [True, False, True]


async def test_impossible_call_shape_is_a_type_error_naming_the_signature(serve: Serve) -> None:
    def two(a: int, b: int) -> int:
        return a + b

    def none() -> str:
        return "none"

    handle = await deploy(serve, "two", two, config={"max_concurrent_queries": 1})
    with pytest.raises(TypeError, match=r"two\(a\b.*, b\b.*\)"):
        await handle.remote(1, 2, 3)
    with pytest.raises(TypeError, match="two"):
        await handle.remote(1, 2, c=3)
    # The slot is given back: the single-slot replica still serves.
    assert await asyncio.wait_for(handle.remote(1, 2), 5) == 3
    none_handle = await deploy(serve, "none", none)
    with pytest.raises(TypeError, match="none"):
        await none_handle.remote(1)
    assert await none_handle.remote() == "none"


# -- composition --------------------------------------------------------------------------------


async def test_handle_inside_a_backend(serve: Serve) -> None:
    async def inner(x: int) -> int:
        return x + 1

    async def outer(x: int) -> int:
        return 10 * await serve.get_handle("inner").remote(x)

    async def fan_out(n: int) -> list[int]:
        handle = serve.get_handle("inner")
        return await asyncio.gather(*[handle.remote(i) for i in range(n)])

    await deploy(serve, "inner", inner)
    outer_handle = await deploy(serve, "outer", outer)
    fan_handle = await deploy(serve, "fan", fan_out)
    assert await outer_handle.remote(4) == 50
    assert await fan_handle.remote(20) == list(range(1, 21))
    results = await asyncio.gather(*(outer_handle.remote(i) for i in range(5)))
    assert results == [10, 20, 30, 40, 50]


async def test_class_backend_holding_a_handle_from_its_init_args(serve: Serve) -> None:
    class Pipeline:
        def __init__(self, handle: ServeHandle) -> None:
            self.handle = handle

        async def __call__(self, text: str) -> str:
            return await self.handle.remote(text) + "!"

    def upper(text: str) -> str:
        return text.upper()

    inner = await deploy(serve, "upper", upper)
    pipeline = await deploy(serve, "pipeline", Pipeline, inner)
    assert await pipeline.remote("hi") == "HI!"


# -- the same path as HTTP ----------------------------------------------------------------------


async def test_overload_is_shared_by_http_and_handles(
    serve: Serve, http: httpx.AsyncClient, gate: Gate
) -> None:
    async def busy(request: Any) -> str:
        label = request.query_params.get("label") if isinstance(request, Request) else request
        return str(await gate.pass_through(label))

    handle = await deploy(
        serve,
        "busy",
        busy,
        config={"max_concurrent_queries": 1, "max_queued_queries": 1},
        route="/busy",
    )
    over_http = asyncio.create_task(http.get("/busy", params={"label": "http"}))
    await gate.until_inside(1)  # the HTTP request holds the only slot
    queued = handle.remote("handle")
    await until_queued(serve, "busy", 1)  # the handle call waits in the backend's queue
    with pytest.raises(Overloaded):
        await asyncio.wait_for(handle.remote("rejected"), 5)
    rejected = await asyncio.wait_for(http.get("/busy", params={"label": "rejected"}), 5)
    assert rejected.status_code == 503
    assert "Retry-After" in rejected.headers
    gate.release.set()
    assert (await over_http).text == "http"
    assert await queued == "handle"
    assert gate.entries == ["http", "handle"]


# -- cancellation and deadlines -----------------------------------------------------------------


async def test_cancelled_caller_removes_its_queued_request(serve: Serve, gate: Gate) -> None:
    handle = await deploy(
        serve, "x", gated(gate), config={"max_concurrent_queries": 1, "max_queued_queries": 1}
    )
    first = handle.remote(1)
    await gate.until_inside(1)

    async def caller() -> Any:
        return await handle.remote(2)

    waiting = asyncio.create_task(caller())
    await until_queued(serve, "x", 1)
    # The queue (bound 1) is full: proof that request 2 is queued, not lost or running.
    with pytest.raises(Overloaded):
        await asyncio.wait_for(handle.remote("probe"), 5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # Its place in the queue is free again.
    third = handle.remote(3)
    await until_queued(serve, "x", 1)
    assert not third.done()
    gate.release.set()
    assert await first == 1
    assert await asyncio.wait_for(third, 5) == 3
    assert gate.entries == [1, 3]  # request 2 never ran


async def test_cancelling_the_returned_awaitable_removes_the_request(
    serve: Serve, gate: Gate
) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    first = handle.remote(1)
    await gate.until_inside(1)
    second = handle.remote(2)
    await until_queued(serve, "x", 1)
    second.cancel()
    await until_queued(serve, "x", 0)  # it left the queue
    gate.release.set()
    assert await first == 1
    assert await handle.remote(3) == 3
    assert second.cancelled()
    assert gate.entries == [1, 3]


@pytest.mark.parametrize("how", ["get_handle", "options"])
async def test_deadline_passes_while_queued(serve: Serve, gate: Gate, how: str) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    first = handle.remote(1)
    await gate.until_inside(1)
    if how == "get_handle":
        late = serve.get_handle("x", relative_slo_ms=30)
    else:
        late = handle.options(relative_slo_ms=30)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await asyncio.wait_for(late.remote(2), 10)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ServeError)
    assert time.monotonic() - started >= 0.02  # it failed at its deadline, not before
    gate.release.set()
    assert await first == 1
    assert gate.entries == [1]  # the late request never ran
    assert await late.remote(3) == 3  # a deadline that is met: the call runs normally


async def test_absolute_deadline_in_the_past_never_runs(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate))
    gate.release.set()
    past = handle.options(absolute_slo_ms=time.time() * 1000 - 1000)
    with pytest.raises(DeadlineExceeded):
        await past.remote(1)
    future = handle.options(absolute_slo_ms=time.time() * 1000 + 60_000)
    assert await future.remote(2) == 2
    assert gate.entries == [2]


async def test_queued_requests_are_served_earliest_deadline_first(serve: Serve, gate: Gate) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})
    first = handle.remote("first")
    await gate.until_inside(1)
    no_deadline = handle.remote("no deadline")
    late = handle.options(relative_slo_ms=60_000).remote("late")
    soon = handle.options(relative_slo_ms=30_000).remote("soon")
    await until_queued(serve, "x", 3)
    gate.release.set()
    await asyncio.gather(first, no_deadline, late, soon)
    assert gate.entries == ["first", "soon", "late", "no deadline"]


async def test_handle_of_a_closed_instance_raises() -> None:
    async with Serve(http_options={"location": "NoServer"}) as serve:
        handle = await deploy(serve, "x", echo_args)
        assert await handle.remote(1) == ((1,), {})
    with pytest.raises(ServeError):
        await handle.remote(2)
    with pytest.raises(ServeError):
        serve.get_handle("x")


async def test_handle_options_reject_bad_values(serve: Serve) -> None:
    handle = await deploy(serve, "x", echo_args)
    with pytest.raises(TypeError, match="relative_slo_ms"):
        handle.options(relative_slo_ms="soon")
    with pytest.raises(ValueError, match="relative_slo_ms"):
        handle.options(relative_slo_ms=-5)
    with pytest.raises(TypeError, match="method_name"):
        handle.options(method_name=3)
    with pytest.raises(TypeError, match="relative_slo_ms"):
        serve.get_handle("x", relative_slo_ms="soon")
    assert await handle.remote(1) == ((1,), {})


async def test_0_8_style_python_request_without_body(serve: Serve) -> None:
    async def reader(request: Any, **kwargs: Any) -> Any:
        return await request.body(), await request.json(), kwargs

    handle = await deploy(serve, "r", reader)
    assert await handle.remote(mode="fast") == (None, None, {"mode": "fast"})


async def test_a_handler_changing_its_query_params_changes_nothing_outside(serve: Serve) -> None:
    async def meddler(request: Any) -> dict[str, Any]:
        seen = dict(request.query_params)
        request.query_params["n"] = "changed"
        request.query_params["added"] = True
        return seen

    handle = await deploy(serve, "meddler", meddler)
    mine = {"n": 1}
    assert await handle.remote(**mine) == {"n": 1}
    assert mine == {"n": 1}
    # Each call gets its own params: nothing of an earlier call, or of a concurrent one, shows.
    got = await asyncio.gather(handle.remote(), handle.remote(n=2), handle.remote())
    assert got == [{}, {"n": 2}, {}]


async def test_remote_outside_an_event_loop_is_a_clear_error(serve: Serve) -> None:
    handle = await deploy(serve, "noop", lambda request: "ok")

    def from_a_plain_thread() -> Any:
        return handle.remote()

    with pytest.raises(ServeError, match="running event loop"):
        await asyncio.to_thread(from_a_plain_thread)
    assert await handle.remote() == "ok"


async def test_caller_cancelling_a_running_async_request_cancels_the_handler(
    serve: Serve, gate: Gate
) -> None:
    handle = await deploy(serve, "x", gated(gate), config={"max_concurrent_queries": 1})

    async def caller() -> Any:
        return await handle.remote(1)

    task = asyncio.create_task(caller())
    await gate.until_inside(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: gate.inside == 0, "the handler left the gate")
    assert gate.cancelled == [1]
    # The slot was given back.
    gate.release.set()
    assert await asyncio.wait_for(handle.remote(2), 5) == 2


async def test_handle_to_a_deleted_endpoint(serve: Serve) -> None:
    handle = await deploy(serve, "x", echo_args)
    await serve.delete_endpoint("x")
    with pytest.raises(EndpointNotFound, match="'x'"):
        await handle.remote(1)


async def test_call_pending_at_shutdown_fails_with_a_serve_error() -> None:
    serve = Serve(http_options={"location": "NoServer"})
    await serve.start()
    probe = await deploy(serve, "probe", echo_args)
    handle = serve.get_handle("never_created", missing_ok=True)

    async def caller() -> Any:
        return await handle.remote(1)

    task = asyncio.create_task(caller())
    # A call sent later is answered by now: the first one had every chance to fail at once.
    assert await probe.remote(2) == ((2,), {})
    assert not task.done()
    await serve.aclose()
    # The caller was not cancelled: it must not see a CancelledError it cannot tell from its own.
    with pytest.raises(ServeError):
        await task
