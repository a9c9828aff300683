"""Shared fixtures: an in-process instance, one behind real uvicorn, and the sync facade."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

import aioserve
from aioserve import Serve


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """An instance with no server of its own; reach it over HTTP with the ``http`` fixture."""
    async with Serve(http_options={"location": "NoServer"}, seed=0) as instance:
        yield instance


@pytest.fixture
async def http(serve: Serve) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client speaking to ``serve.asgi_app`` in process (ASGITransport)."""
    transport = httpx.ASGITransport(app=serve.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://aioserve") as client:
        yield client


@pytest.fixture
async def served() -> AsyncIterator[Serve]:
    """An instance behind a real uvicorn server on 127.0.0.1 and a free port (``served.url``)."""
    async with Serve(http_options={"host": "127.0.0.1", "port": 0}, seed=0) as instance:
        yield instance


@pytest.fixture
def client() -> Iterator[aioserve.Client]:
    """The sync facade: ``serve.start()`` on a free port, made current, shut down afterwards."""
    instance = aioserve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        yield instance
    finally:
        instance.shutdown()
