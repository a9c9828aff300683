"""The async core's own rules: lifecycle, argument errors, URLs, and restoring shadows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

import aioserve
from aioserve import Serve


def echo(request: Any) -> str:
    return "echo"


async def test_calls_before_start_say_to_start_first() -> None:
    s = Serve(http_options={"location": "NoServer"})
    with pytest.raises(aioserve.ServeError, match="not started"):
        await s.create_backend("x", echo)
    with pytest.raises(aioserve.ServeError, match="not started"):
        s.get_handle("x", missing_ok=True)


async def test_start_is_idempotent_and_a_closed_instance_cannot_restart() -> None:
    s = Serve(http_options={"location": "NoServer"})
    await s.start()
    await s.start()  # already running: nothing happens
    await s.create_backend("x", echo)
    await s.aclose()
    await s.aclose()  # idempotent
    assert s.state.value == "stopped"
    with pytest.raises(aioserve.ServeShutdown, match="make a new one"):
        await s.start()
    with pytest.raises(aioserve.ServeShutdown):
        await s.create_backend("y", echo)


async def test_concurrent_acloses_both_wait_for_the_end() -> None:
    s = Serve(http_options={"location": "NoServer"})
    await s.start()
    await asyncio.gather(s.aclose(), s.aclose())
    assert s.state.value == "stopped"


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda s: s.create_backend("", echo), TypeError, "non-empty str"),
        (lambda s: s.create_backend(3, echo), TypeError, "non-empty str"),
        (lambda s: s.create_backend("x"), TypeError, "needs a function"),
        (lambda s: s.create_backend("x", echo, ray_actor_options=3), TypeError, "dict"),
        (lambda s: s.create_endpoint("", backend=None), TypeError, "non-empty str"),
        (lambda s: s.create_endpoint("e", route="/a/{x:nope}"), ValueError, "not a valid path"),
        (lambda s: s.create_endpoint("e", methods=3), TypeError, "list of str"),
        (lambda s: s.create_endpoint("e", methods=[]), TypeError, "non-empty list"),
    ],
)
async def test_bad_arguments_are_refused_and_change_nothing(
    serve: Serve, call: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        await call(serve)
    assert serve.list_backends() == {}
    assert serve.list_endpoints() == {}


async def test_a_single_method_string_is_accepted(serve: Serve, http: httpx.AsyncClient) -> None:
    await serve.create_backend("x", echo)
    await serve.create_endpoint("x", backend="x", route="/x", methods="post")
    assert serve.list_endpoints()["x"]["methods"] == ["POST"]
    assert (await http.post("/x")).text == "echo"


async def test_ipv6_server_url_is_bracketed(server_name: str) -> None:
    try:
        s = Serve(http_options={"host": "::1", "port": 0, "server": server_name})
        await s.start()
    except aioserve.BindError:
        pytest.skip("IPv6 loopback is not available on this machine")
    try:
        assert s.url == f"http://[::1]:{s.http_port}"
        await s.create_backend("x", echo)
        await s.create_endpoint("x", backend="x", route="/x")
        async with httpx.AsyncClient(base_url=s.url) as client:
            assert (await client.get("/x")).text == "echo"
    finally:
        await s.aclose()


async def test_no_server_means_no_url() -> None:
    async with Serve(http_options={"host": None}) as s:
        assert s.url is None and s.http_port is None


async def test_shadows_and_splits_are_restored_from_the_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Serve(http_options={"location": "NoServer"}, kv_store_path=path) as first:
        await first.create_backend("a", "_sample_backends:shout")
        await first.create_backend("b", "_sample_backends:shout")
        await first.create_endpoint("e", route="/e")
        await first.set_traffic("e", {"a": 0.25, "b": 0.75})
        await first.shadow_traffic("e", "b", 0.5)
        before = first.list_endpoints()
    async with Serve(http_options={"location": "NoServer"}, kv_store_path=path) as second:
        assert second.list_endpoints() == before
        assert json.loads(json.dumps(second.list_endpoints()))["e"]["shadows"] == {"b": 0.5}


async def test_a_state_file_that_cannot_be_restored_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with Serve(http_options={"location": "NoServer"}, kv_store_path=path) as first:
        await first.create_backend("a", "_sample_backends:Greeter", "hi")
    # The stored init args no longer fit the class: restoring fails, and the start with it.
    from aioserve.store import StateStore

    store = StateStore(path)
    snapshot = store.load()
    assert snapshot is not None
    snapshot.backends["a"].init_args = ["too", "many", "args"]
    store.save(snapshot)
    store.close()
    second = Serve(http_options={"location": "NoServer"}, kv_store_path=path)
    with pytest.raises(aioserve.BackendError):
        await second.start()
    assert second.state.value == "stopped"
