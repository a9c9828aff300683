"""A state file locked by another program stalls the control call that must checkpoint it, never
the requests being served: Serve's checkpoints run SQLite off the event loop (AsyncStateStore)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from aioserve import Serve
from aioserve.store import StateStore


async def test_a_locked_state_file_stalls_the_control_call_not_the_requests(
    tmp_path: Path, sqlite_lock: Any
) -> None:
    path = tmp_path / "state.db"
    loop = asyncio.get_running_loop()
    async with Serve(http_options={"location": "NoServer"}, kv_store_path=path) as serve:
        await serve.create_backend("greeter", "_sample_backends:Greeter", "hi")
        await serve.create_endpoint("greet", "greeter", route="/greet")
        transport = httpx.ASGITransport(app=serve.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://aioserve") as http:
            with sqlite_lock(path):
                control = asyncio.ensure_future(
                    serve.create_endpoint("other", "greeter", route="/other")
                )
                started = loop.time()
                # The checkpoint waits for the lock (up to the store's 10 s busy timeout) while
                # the loop runs on: this wait ends by its own timeout, promptly.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(control), 0.5)
                assert loop.time() - started < 5
                for _ in range(20):
                    sent = loop.time()
                    response = await http.get("/greet")
                    assert response.status_code == 200
                    assert response.text.startswith("hi ")
                    assert loop.time() - sent < 1.0
                assert not control.done()  # still waiting for the lock
            await control  # the lock is gone: the checkpoint goes through
            assert (await http.get("/other")).status_code == 200
        assert list(serve.list_endpoints()) == ["greet", "other"]
    with StateStore(path) as store:
        state = store.load()
    assert state is not None
    assert list(state.endpoints) == ["greet", "other"]
