"""The HTTP servers (``http_options["server"]``): what differs between uvicorn and granian, and the
error when granian is asked for but not installed. What they share runs on both through the
``served`` fixture in the other test modules."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, wait_until

import aioserve
from aioserve import Serve, servers
from aioserve._concurrency import TaskOwner


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_an_unknown_server_is_a_config_error() -> None:
    with pytest.raises(aioserve.ConfigError, match="must be one of 'uvicorn', 'granian'"):
        aioserve.HTTPOptions(server="hypercorn")  # type: ignore[arg-type]


async def test_granian_not_installed_fails_at_start_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "granian", None)  # import granian raises ImportError
    s = Serve(http_options={"host": "127.0.0.1", "port": 0, "server": "granian"})
    with pytest.raises(aioserve.ConfigError) as info:
        await s.start()
    assert "pip install 'aioserve[granian]'" in str(info.value)
    assert s.url is None
    await s.aclose()


async def test_granian_not_installed_leaves_the_port_free(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setitem(sys.modules, "granian", None)
    s = Serve(http_options={"host": "127.0.0.1", "port": port, "server": "granian"})
    with pytest.raises(aioserve.ConfigError):
        await s.start()
    await s.aclose()
    assert _port_is_free(port)


async def test_granian_serves_a_bound_socket_and_releases_it_on_stop() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    sock = servers.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = servers.make_server(app, sock, aioserve.HTTPOptions(server="granian"))
    assert repr(server) == f"<GranianServer ('127.0.0.1', {port})>"
    owner = TaskOwner("test")
    await server.start(owner)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{port}/x")).text == "/x"
    await server.stop()
    await server.stop()  # idempotent
    await owner.aclose()
    assert repr(server) == "<GranianServer closed>"
    assert _port_is_free(port)


def test_the_sync_facade_serves_on_granian() -> None:
    client = aioserve.start(http_options={"host": "127.0.0.1", "port": 0, "server": "granian"})
    try:
        client.create_backend("echo", lambda request: request.query_params["x"])
        client.create_endpoint("echo", backend="echo", route="/echo")
        assert client.url is not None
        assert httpx.get(f"{client.url}/echo", params={"x": "granian"}).text == "granian"
        handle = client.get_handle("echo")
        assert handle.remote(x="handle").result(HANG_GUARD_S) is not None
    finally:
        client.shutdown()


async def test_granian_cuts_off_a_response_that_never_ends_after_the_graceful_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Shutdown is bounded: a stream still open when granian stops is cancelled after
    ``GRACEFUL_SHUTDOWN_S`` (uvicorn has its ``timeout_graceful_shutdown``)."""
    monkeypatch.setattr(servers, "GRACEFUL_SHUTDOWN_S", 0.2)
    started = asyncio.Event()

    async def forever(request: Any) -> AsyncIterator[bytes]:
        started.set()
        while True:
            yield b"tick\n"
            await asyncio.sleep(0.01)

    s = Serve(http_options={"host": "127.0.0.1", "port": 0, "server": "granian"})
    await s.start()
    await s.create_backend("forever", forever, config={"graceful_shutdown_timeout_s": 0.1})
    await s.create_endpoint("forever", backend="forever", route="/forever")
    assert s.url is not None
    async with (
        httpx.AsyncClient(base_url=s.url, timeout=HANG_GUARD_S) as client,
        client.stream("GET", "/forever") as response,
    ):
        assert response.status_code == 200
        await wait_until(started.is_set, "the stream runs")
        began = time.monotonic()
        await asyncio.wait_for(s.aclose(), HANG_GUARD_S)
        assert time.monotonic() - began < 3.0
