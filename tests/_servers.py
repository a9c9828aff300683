"""A real uvicorn server for an ASGI app, inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from _sample_backends import HANG_GUARD_S, wait_until


@contextlib.asynccontextmanager
async def run_uvicorn(app: Any, startup_timeout_s: float = HANG_GUARD_S) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) on 127.0.0.1 and a free port; yield its URL.

    ``startup_timeout_s`` bounds the app's lifespan startup (a deployment that trains models
    takes longer on a busy machine)."""
    # port=0: the kernel picks a free port at bind time, so no other process can take it first.
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    # ``started`` is set once the lifespan startup has run and the socket listens.
    await wait_until(lambda: server.started or task.done(), "uvicorn started", startup_timeout_s)
    if not server.started:
        await task  # raises what went wrong at startup, if anything did
        raise AssertionError("uvicorn stopped before it was ready")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
