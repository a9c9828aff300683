"""Shared fixtures: an in-process instance, one behind a real server, and the sync facade.

Every test that takes ``served`` (or ``server_name``) runs once per HTTP server: uvicorn and
granian (the ``aioserve[granian]`` extra, part of ``dev``: without it those tests fail, not skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _processes import Running
from _sample_backends import Gate

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


SERVERS = ("uvicorn", "granian")


@pytest.fixture(params=SERVERS)
def server_name(request: pytest.FixtureRequest) -> str:
    """The HTTP server a real-server test runs on (``http_options["server"]``): each in turn."""
    name: str = request.param
    return name


@pytest.fixture
async def served(server_name: str) -> AsyncIterator[Serve]:
    """An instance behind a real server (uvicorn, then granian) on 127.0.0.1 and a free port
    (``served.url``)."""
    options = {"host": "127.0.0.1", "port": 0, "server": server_name}
    async with Serve(http_options=options, seed=0) as instance:
        yield instance


@pytest.fixture
def client() -> Iterator[aioserve.Client]:
    """The sync facade: ``serve.start()`` on a free port, made current, shut down afterwards."""
    instance = aioserve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        yield instance
    finally:
        instance.shutdown()


@pytest.fixture
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail a test that leaves an unretrieved future exception or a destroyed pending task.

    Opt-in per module (``pytestmark``): the collection it runs costs tens of ms per test."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    gc.collect()
    loop.set_exception_handler(None)
    assert errors == []


def shutdown_all() -> None:
    """Stop whatever facade instance is current, so a test starts (and ends) with none running."""
    for _ in range(100):
        try:
            aioserve.connect()
        except aioserve.ServeError:
            return
        aioserve.shutdown()
    raise AssertionError("serve.shutdown() did not stop the current instance")


@pytest.fixture
def no_instance_left() -> Iterator[None]:
    """For tests of the module-level functions: no current instance before or after."""
    shutdown_all()
    yield
    shutdown_all()


@pytest.fixture
async def gate(serve: Serve) -> AsyncIterator[Gate]:
    """Depends on ``serve`` so that it is opened before the instance drains on teardown."""
    g = Gate()
    yield g
    g.release.set()


@pytest.fixture
def sqlite_lock() -> Callable[[str | os.PathLike[str]], contextlib.AbstractContextManager[None]]:
    """``with sqlite_lock(path):`` holds an exclusive lock on an SQLite file meanwhile."""
    return _sqlite_locked


@contextlib.contextmanager
def _sqlite_locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the SQLite file at ``path`` from a plain thread (another
    connection, as another program would) until the block ends."""
    locked = threading.Event()
    release = threading.Event()
    failure: list[BaseException] = []

    def hold() -> None:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                conn.execute("BEGIN EXCLUSIVE")
                locked.set()
                release.wait()
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except BaseException as exc:
            failure.append(exc)
            locked.set()

    thread = threading.Thread(target=hold, name="sqlite lock holder")
    thread.start()
    try:
        assert locked.wait(10.0), "the lock holder did not start"
        if failure:
            raise failure[0]
        yield
    finally:
        release.set()
        thread.join()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start ``python -m aioserve run ARGS`` (``extra_path=`` adds to its PYTHONPATH); every
    process started is killed, with its workers, when the test ends."""
    started: list[Running] = []

    def start(*args: str, extra_path: Path | None = None) -> Running:
        running = Running(list(args), tmp_path / f"stderr-{len(started)}.txt", extra_path)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.close()
