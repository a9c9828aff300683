"""End-to-end tests of batching through the public Serve API (API.md §4 deadlines, §6 batching).

Both forms: the legacy ``@serve.accept_batch`` callable with ``max_batch_size`` /
``batch_wait_timeout`` in the backend config, and the ``@serve.batch`` decorator; called by
handles, over HTTP in process (ASGITransport) and over the real uvicorn server. The unit tests of
the batch queue itself are in test_batching.py.

Tests synchronise on the :class:`Device` (who is inside a batch, held at its gate), on the
:class:`Probe` (which HTTP requests entered the app) and on ``Serve.backend_statistics`` (how many
requests wait in the batch queue). Where a test must show that something does NOT happen, it
first waits for the state that shows the requests got as far as they would (queued, say); the few
waits on the clock are about a batch wait timeout or a deadline and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from _sample_backends import until_queued, wait_until
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import aioserve
from aioserve import BatchError, DeadlineExceeded, Serve, ServeError, ServeHandle

LONG = 3600.0  # a batch wait timeout no test may reach
WAIT_S = 5.0  # how long a test waits for something that must happen promptly


def label(item: Any) -> str:
    """What a request is called in the records: ``?x=`` for HTTP, the argument for handles."""
    if isinstance(item, Request):
        return item.query_params["x"]
    return str(item)


class Signal:
    """Something tests can wait on until a predicate over its state holds."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


class Device(Signal):
    """The user code of a batching backend: records each batch it runs, can be held at a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.replica_tags: list[str | None] = []
        self.inside = 0
        self.max_inside = 0
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def items(self) -> list[str]:
        return [item for batch in self.batches for item in batch]

    async def run(self, items: list[Any], prefix: str = "done") -> list[str]:
        if not isinstance(items, list):
            raise AssertionError(f"a batch handler got {items!r} instead of a list")
        labels = [label(item) for item in items]
        self.batches.append(labels)
        try:
            self.replica_tags.append(aioserve.get_replica_context().replica_tag)
        except ServeError:
            self.replica_tags.append(None)
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        self.notify()
        try:
            await self._open.wait()
        finally:
            self.inside -= 1
            self.notify()
        return [f"{prefix} {name}" for name in labels]


@pytest.fixture
async def device(serve: Serve) -> AsyncIterator[Device]:
    """Depends on ``serve`` so that it is released before the instance drains on teardown."""
    d = Device()
    yield d
    d.release()


class Probe(Signal):
    """Counts the HTTP requests that entered the app and the disconnects the app read."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = 0
        self.disconnects = 0


class ProbeMiddleware:
    """Pure ASGI middleware reporting to a :class:`Probe`."""

    def __init__(self, app: ASGIApp, probe: Probe) -> None:
        self.app = app
        self.probe = probe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        probe = self.probe

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                probe.disconnects += 1
                probe.notify()
            return message

        probe.entered += 1
        probe.notify()
        await self.app(scope, watched_receive, send)


@contextlib.asynccontextmanager
async def probed_client(instance: Serve, probe: Probe) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=ProbeMiddleware(instance.asgi_app, probe))
    async with httpx.AsyncClient(transport=transport, base_url="http://aioserve") as client:
        yield client


async def deploy(
    instance: Serve,
    tag: str,
    target: Any,
    *,
    config: Any = None,
    route: str | None = None,
) -> ServeHandle:
    """Create a backend and an endpoint of the same name; return a handle to it."""
    await instance.create_backend(tag, target, config=config)
    await instance.create_endpoint(tag, backend=tag, route=route)
    return instance.get_handle(tag)


# -- the callables under test ------------------------------------------------------------------


def legacy_function(device: Device) -> Any:
    @aioserve.accept_batch
    async def handler(items: list[Any]) -> list[str]:
        return await device.run(items)

    return handler


def legacy_class(device: Device) -> Any:
    class Model:
        """``__call__`` and ``predict`` take lists; ``describe`` takes one request."""

        @aioserve.accept_batch
        async def __call__(self, items: list[Any]) -> list[str]:
            return await device.run(items)

        @aioserve.accept_batch
        async def predict(self, items: list[Any]) -> list[str]:
            return await device.run(items, prefix="predicted")

        async def describe(self, item: Any) -> str:
            return f"single {label(item)}"

    return Model


def class_marked_batching(device: Device) -> Any:
    @aioserve.accept_batch
    class AllBatched:
        """Marked as a whole: every method takes lists (one sync, one async)."""

        async def __call__(self, items: list[Any]) -> list[str]:
            return await device.run(items)

        def count(self, items: list[Any]) -> list[str]:
            if not isinstance(items, list):
                raise AssertionError(f"count got {items!r} instead of a list")
            return [f"{label(item)} of {len(items)}" for item in items]

    return AllBatched


def faulty(device: Device) -> Any:
    """A batch handler that answers wrongly when one of its items asks it to."""

    @aioserve.accept_batch
    async def handler(items: list[Any]) -> Any:
        results = await device.run(items)
        names = [label(item) for item in items]
        if "short" in names:
            return results[:-1]
        if "not-a-list" in names:
            return "oops"
        if "raise" in names:
            raise ValueError("the device failed")
        return results

    return handler


def send(handle: ServeHandle, *items: str) -> list[asyncio.Future[Any]]:
    """Send ``items`` through ``handle`` one after the other, as separate requests."""
    return [handle.remote(item) for item in items]


# -- forming batches (legacy form) -------------------------------------------------------------


async def test_a_full_batch_goes_out_at_once_and_the_third_call_waits_for_a_partner(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 2, "batch_wait_timeout": 10, "batch_wait_policy": "fixed"},
    )
    first, second, third = send(handle, "a", "b", "c")
    async with asyncio.timeout(WAIT_S):  # a full batch must not wait for the 10 s timeout
        assert await asyncio.gather(first, second) == ["done a", "done b"]
    await until_queued(serve, "dev", 1)
    assert device.batches == [["a", "b"]]
    assert not third.done()  # alone in a batch of 2, it waits for a partner or the timeout
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(third, handle.remote("d")) == ["done c", "done d"]
    assert device.batches == [["a", "b"], ["c", "d"]]


async def test_a_partial_batch_goes_out_when_the_wait_timeout_passes(
    serve: Serve, device: Device
) -> None:
    timeout_s = 0.2  # real time: this test is about the batch wait timeout
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={
            "max_batch_size": 2,
            "batch_wait_timeout": timeout_s,
            "batch_wait_policy": "fixed",
        },
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    first, second, third = send(handle, "a", "b", "c")
    assert await asyncio.gather(first, second) == ["done a", "done b"]
    assert not third.done()
    async with asyncio.timeout(WAIT_S):
        assert await third == "done c"
    # The timer counts from the arrival of the oldest queued request ("c", sent at `started`).
    assert loop.time() - started >= timeout_s * 0.95
    assert device.batches == [["a", "b"], ["c"]]


async def test_size_three_with_a_long_timeout_keeps_two_calls_until_a_third(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(
        serve, "dev", legacy_class(device), config={"max_batch_size": 3, "batch_wait_timeout": LONG}
    )
    waiting = send(handle, "a", "b")
    await until_queued(serve, "dev", 2)
    assert device.batches == []
    assert not any(future.done() for future in waiting)
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(*waiting, handle.remote("c")) == ["done a", "done b", "done c"]
    assert device.batches == [["a", "b", "c"]]


@pytest.mark.parametrize("timeout_s", [0.0, LONG], ids=["timeout-0", "long-timeout"])
async def test_size_one_answers_at_once(serve: Serve, device: Device, timeout_s: float) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 1, "batch_wait_timeout": timeout_s},
    )
    async with asyncio.timeout(WAIT_S):
        assert await handle.remote("a") == "done a"
        assert await asyncio.gather(handle.remote("b"), handle.remote("c")) == [
            "done b",
            "done c",
        ]
    assert sorted(map(len, device.batches)) == [1, 1, 1]


async def test_timeout_zero_does_not_wait_for_a_fuller_batch(serve: Serve, device: Device) -> None:
    handle = await deploy(
        serve, "dev", legacy_function(device), config={"max_batch_size": 8, "batch_wait_timeout": 0}
    )
    async with asyncio.timeout(WAIT_S):
        assert await handle.remote("alone") == "done alone"
    assert device.batches == [["alone"]]


@pytest.mark.parametrize("timeout_s", [0.0, 0.05], ids=["timeout-0", "timeout-50ms"])
async def test_requests_that_arrive_while_the_replica_is_busy_form_one_batch(
    serve: Serve, device: Device, timeout_s: float
) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 32, "batch_wait_timeout": timeout_s},
    )
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    names = [f"r{i}" for i in range(10)]
    waiting = []
    for name in names:  # one at a time: a scheduler that cuts batches early has every chance
        waiting += send(handle, name)
        await until_queued(serve, "dev", len(waiting))
    assert len(device.batches) == 1  # nothing is cut into tiny batches while the replica is busy
    device.release()
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(first, *waiting) == [f"done {n}" for n in ["first", *names]]
    assert device.batches == [["first"], names]


async def test_several_replicas_each_take_a_batch(serve: Serve, device: Device) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"num_replicas": 2, "max_batch_size": 2, "batch_wait_timeout": 0},
    )
    device.hold()
    running = [handle.remote(name) for name in "abcd"]
    await device.until(lambda: device.inside == 2)  # two batches in flight at once
    assert sorted(map(len, device.batches)) == [2, 2]
    assert sorted(device.items) == ["a", "b", "c", "d"]
    assert len(set(device.replica_tags)) == 2  # one on each replica
    later = send(handle, "e")
    await until_queued(serve, "dev", 1)
    later += send(handle, "f")
    await until_queued(serve, "dev", 2)
    assert len(device.batches) == 2  # both replicas busy: "e" and "f" wait to go together
    device.release()
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(*running, *later) == [f"done {n}" for n in "abcdef"]
    assert device.batches[2:] == [["e", "f"]]
    assert device.max_inside == 2


# -- the legacy forms: function, class __call__, methods, marked class --------------------------


@aioserve.accept_batch
def sync_batch_handler(items: list[Any]) -> list[str]:
    return [f"sync {label(item)} of {len(items)}" for item in items]


async def test_a_sync_legacy_function_gets_lists_from_handle_callers(serve: Serve) -> None:
    handle = await deploy(
        serve, "sync", sync_batch_handler, config={"max_batch_size": 3, "batch_wait_timeout": LONG}
    )
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(*(handle.remote(n) for n in "abc"))
    assert results == ["sync a of 3", "sync b of 3", "sync c of 3"]


async def test_legacy_backends_are_listed_as_accepting_batches(
    serve: Serve, device: Device
) -> None:
    config = {"max_batch_size": 4}
    await serve.create_backend("function", legacy_function(device), config=config)
    await serve.create_backend("class", legacy_class(device), config=config)
    await serve.create_backend("marked-class", class_marked_batching(device), config=config)
    await serve.create_backend("sync", sync_batch_handler, config=config)
    listed = serve.list_backends()
    for tag in ("function", "class", "marked-class", "sync"):
        assert listed[tag]["accepts_batches"] is True, tag
        assert listed[tag]["max_batch_size"] == 4, tag


async def test_a_method_takes_lists_by_handle_method_name_and_by_http_header(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    handle = await deploy(
        serve,
        "model",
        legacy_class(device),
        config={"max_batch_size": 2, "batch_wait_timeout": LONG},
        route="/model",
    )
    predict = handle.options(method_name="predict")
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(predict.remote("a"), handle.predict.remote("b")) == [
            "predicted a",
            "predicted b",
        ]
        header = {"X-Serve-Call-Method": "predict"}
        responses = await asyncio.gather(
            *(http.get("/model", params={"x": n}, headers=header) for n in "cd")
        )
        assert [(r.status_code, r.text) for r in responses] == [
            (200, "predicted c"),
            (200, "predicted d"),
        ]
        # A method that is not marked takes its one request as it is, unbatched.
        assert await handle.options(method_name="describe").remote("e") == "single e"
        response = await http.get(
            "/model", params={"x": "f"}, headers={"X-Serve-Call-Method": "describe"}
        )
        assert (response.status_code, response.text) == (200, "single f")
        # __call__ keeps its own queue: one call waits for its partner.
        assert await asyncio.gather(handle.remote("g"), handle.remote("h")) == ["done g", "done h"]
    assert device.batches == [["a", "b"], ["c", "d"], ["g", "h"]]


async def test_a_class_marked_with_accept_batch_takes_lists_in_every_method(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    handle = await deploy(
        serve,
        "all",
        class_marked_batching(device),
        config={"max_batch_size": 2, "batch_wait_timeout": LONG},
        route="/all",
    )
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(handle.remote("a"), handle.remote("b")) == ["done a", "done b"]
        count = handle.options(method_name="count")
        assert await asyncio.gather(count.remote("c"), count.remote("d")) == ["c of 2", "d of 2"]
        header = {"X-Serve-Call-Method": "count"}
        responses = await asyncio.gather(
            *(http.get("/all", params={"x": n}, headers=header) for n in "ef")
        )
    assert [r.text for r in responses] == ["e of 2", "f of 2"]
    assert device.batches == [["a", "b"]]


async def test_http_callers_are_batched_as_requests(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 3, "batch_wait_timeout": LONG},
        route="/dev",
    )
    async with asyncio.timeout(WAIT_S):
        responses = await asyncio.gather(*(http.get("/dev", params={"x": n}) for n in "abc"))
    assert [(r.status_code, r.text) for r in responses] == [
        (200, "done a"),
        (200, "done b"),
        (200, "done c"),
    ]
    assert len(device.batches) == 1
    assert sorted(device.batches[0]) == ["a", "b", "c"]


async def test_http_callers_are_batched_over_real_uvicorn(served: Serve) -> None:
    device = Device()
    try:
        await deploy(
            served,
            "dev",
            legacy_function(device),
            # A fixed wait: the three requests reach the server one by one, and the adaptive
            # policy would send a lone first one at once.
            config={"max_batch_size": 3, "batch_wait_timeout": LONG, "batch_wait_policy": "fixed"},
            route="/dev",
        )
        assert served.url is not None
        async with httpx.AsyncClient(base_url=served.url) as client, asyncio.timeout(WAIT_S):
            responses = await asyncio.gather(*(client.get("/dev", params={"x": n}) for n in "abc"))
        assert [(r.status_code, r.text) for r in responses] == [
            (200, "done a"),
            (200, "done b"),
            (200, "done c"),
        ]
        assert [sorted(batch) for batch in device.batches] == [["a", "b", "c"]]
    finally:
        device.release()


async def test_a_legacy_batching_backend_takes_one_positional_argument(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 2})
    with pytest.raises(TypeError, match="exactly one positional argument"):
        await handle.remote("a", "b")
    with pytest.raises(TypeError, match="exactly one positional argument"):
        await handle.remote(x="a")
    assert device.batches == []


# -- config validation and updates -------------------------------------------------------------


async def plain_handler(item: Any) -> str:
    return f"plain {label(item)}"


async def test_max_batch_size_above_one_needs_a_batching_callable(serve: Serve) -> None:
    with pytest.raises(ValueError, match="accept_batch"):
        await serve.create_backend("plain", plain_handler, config={"max_batch_size": 2})
    assert "plain" not in serve.list_backends()
    # Nothing was registered: the tag is free, and max_batch_size=1 needs no marker.
    handle = await deploy(serve, "plain", plain_handler, config={"max_batch_size": 1})
    assert await handle.remote("a") == "plain a"
    with pytest.raises(ValueError, match="accept_batch"):
        await serve.update_backend_config("plain", {"max_batch_size": 4})
    assert serve.get_backend_config("plain").max_batch_size == 1
    assert await handle.remote("b") == "plain b"


async def test_a_new_max_batch_size_applies_from_the_next_batch(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(
        serve, "dev", legacy_function(device), config={"max_batch_size": 2, "batch_wait_timeout": 0}
    )
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    names = [str(i) for i in range(6)]
    waiting = send(handle, *names)
    await until_queued(serve, "dev", len(names))
    await serve.update_backend_config("dev", {"max_batch_size": 4})
    assert serve.list_backends()["dev"]["max_batch_size"] == 4
    device.release()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(first, *waiting)
    assert device.batches == [["first"], ["0", "1", "2", "3"], ["4", "5"]]


async def test_a_shorter_batch_wait_timeout_releases_a_waiting_batch(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 3, "batch_wait_timeout": LONG, "batch_wait_policy": "fixed"},
    )
    (waiting,) = send(handle, "a")
    await until_queued(serve, "dev", 1)
    # A later request finds the first still waiting: it did not go out alone.
    (waiting_too,) = send(handle, "b")
    await until_queued(serve, "dev", 2)
    assert not waiting.done()
    await serve.update_backend_config("dev", {"batch_wait_timeout": 0})
    async with asyncio.timeout(WAIT_S):
        assert await waiting == "done a"
        assert await waiting_too == "done b"
    assert device.batches == [["a", "b"]]


# -- wrong results -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("short", BatchError, "must return a list of 3"),
        ("not-a-list", BatchError, "must return a list of 3"),
        ("raise", ValueError, "the device failed"),
    ],
)
async def test_a_wrong_batch_result_fails_every_request_of_the_batch_and_serving_goes_on(
    serve: Serve, device: Device, bad: str, error: type[Exception], match: str
) -> None:
    handle = await deploy(
        serve, "dev", faulty(device), config={"max_batch_size": 3, "batch_wait_timeout": LONG}
    )
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(
            *(handle.remote(n) for n in (bad, "a", "b")), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, error), result
            assert re.search(match, str(result)), result
        # The replica goes on serving: the next batch works.
        assert await asyncio.gather(*(handle.remote(n) for n in "cde")) == [
            "done c",
            "done d",
            "done e",
        ]
    assert device.batches == [[bad, "a", "b"], ["c", "d", "e"]]


@pytest.mark.parametrize(
    ("bad", "text"),
    [("short", "BatchError: "), ("raise", "ValueError: the device failed")],
)
async def test_a_wrong_batch_result_gives_every_http_caller_a_500(
    serve: Serve, device: Device, http: httpx.AsyncClient, bad: str, text: str
) -> None:
    await deploy(
        serve,
        "dev",
        faulty(device),
        config={"max_batch_size": 2, "batch_wait_timeout": LONG},
        route="/dev",
    )
    async with asyncio.timeout(WAIT_S):
        responses = await asyncio.gather(*(http.get("/dev", params={"x": n}) for n in (bad, "a")))
        assert [r.status_code for r in responses] == [500, 500]
        assert all(r.text.startswith(text) for r in responses), [r.text for r in responses]
        responses = await asyncio.gather(*(http.get("/dev", params={"x": n}) for n in "bc"))
    assert [(r.status_code, r.text) for r in responses] == [(200, "done b"), (200, "done c")]


# -- deadlines ---------------------------------------------------------------------------------


async def test_queued_requests_run_earliest_deadline_first_ties_in_arrival_order(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 1})
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    # (ms from now, how it is given); None is no deadline: last, in arrival order. The two
    # 3000 ms deadlines are both relative, so the one that arrives first is due first.
    requests: list[tuple[float | None, str]] = [
        (5000, "options"),
        (None, ""),
        (1000, "get_handle"),
        (9000, "absolute"),
        (3000, "options"),
        (None, ""),
        (3000, "get_handle"),
        (7000, "absolute"),
        (2000, "options"),
        (8000, "get_handle"),
    ]
    order = list(range(len(requests)))
    random.Random(7).shuffle(order)  # arrival order unrelated to the deadlines
    futures: dict[int, asyncio.Future[Any]] = {}
    for i in order:
        slo, how = requests[i]
        if slo is None:
            caller = handle
        elif how == "get_handle":
            caller = serve.get_handle("dev", relative_slo_ms=slo)
        elif how == "absolute":
            caller = handle.options(absolute_slo_ms=time.time() * 1000 + slo)
        else:
            caller = handle.options(relative_slo_ms=slo)
        futures[i] = caller.remote(f"r{i}")
    await until_queued(serve, "dev", len(requests))
    assert device.items == ["first"]
    device.release()
    async with asyncio.timeout(WAIT_S):
        await asyncio.gather(first, *futures.values())
    rank = {
        i: (float("inf") if slo is None else slo, order.index(i))
        for i, (slo, _) in enumerate(requests)
    }
    expected = [f"r{i}" for i in sorted(rank, key=rank.__getitem__)]
    assert device.items == ["first", *expected]


async def test_a_deadline_that_passes_in_the_queue_fails_and_never_runs(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 4})
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    late = handle.options(relative_slo_ms=100).remote("late")  # real time: about the deadline
    kept = handle.remote("kept")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(DeadlineExceeded):
            await late
    assert not kept.done()
    device.release()
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(first, kept) == ["done first", "done kept"]
    assert device.batches == [["first"], ["kept"]]


async def test_a_deadline_already_passed_fails_at_once_and_never_runs(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 4})
    with pytest.raises(DeadlineExceeded):
        await handle.options(absolute_slo_ms=time.time() * 1000 - 1000).remote("past")
    with pytest.raises(DeadlineExceeded):
        await handle.options(relative_slo_ms=0).remote("now")
    with pytest.raises(DeadlineExceeded):
        await serve.get_handle("dev", relative_slo_ms=0).remote("now too")
    assert await handle.options(relative_slo_ms=60_000).remote("later") == "done later"
    assert device.batches == [["later"]]


async def test_http_deadline_query_params_give_504_and_never_run(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 4}, route="/dev")
    handle = serve.get_handle("dev")
    past = time.time() * 1000 - 1000
    response = await http.get("/dev", params={"x": "past", "absolute_slo_ms": past})
    assert response.status_code == 504
    assert "DeadlineExceeded" in response.text
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    # Real time: the request waits behind the held replica until its 100 ms deadline passes.
    async with asyncio.timeout(WAIT_S):
        response = await http.get("/dev", params={"x": "late", "relative_slo_ms": 100})
    assert response.status_code == 504
    device.release()
    async with asyncio.timeout(WAIT_S):
        assert await first == "done first"
        response = await http.get("/dev", params={"x": "kept", "relative_slo_ms": 60_000})
    assert (response.status_code, response.text) == (200, "done kept")
    assert device.items == ["first", "kept"]


async def test_http_deadline_query_params_order_the_queue(serve: Serve, device: Device) -> None:
    await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 1}, route="/dev")
    handle = serve.get_handle("dev")
    probe = Probe()
    slos = {"d": 40_000, "a": 10_000, "c": 30_000, "e": None, "b": 20_000}
    async with probed_client(serve, probe) as client:
        device.hold()
        first = handle.remote("first")
        await device.until(lambda: device.inside == 1)
        requests = []
        for name, slo in slos.items():
            params: dict[str, Any] = {"x": name}
            if slo is not None:
                params["relative_slo_ms"] = slo
            requests.append(asyncio.create_task(client.get("/dev", params=params)))
        await probe.until(lambda: probe.entered == len(slos))
        await until_queued(serve, "dev", len(slos))
        device.release()
        async with asyncio.timeout(WAIT_S):
            responses = await asyncio.gather(*requests)
            await first
    assert [r.status_code for r in responses] == [200] * len(slos)
    assert device.items == ["first", "a", "b", "c", "d", "e"]


# -- callers that go away ----------------------------------------------------------------------


async def test_a_cancelled_handle_caller_leaves_the_queue_and_never_runs(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(serve, "dev", legacy_function(device), config={"max_batch_size": 4})
    device.hold()
    first = handle.remote("first")
    await device.until(lambda: device.inside == 1)
    gone, kept = send(handle, "gone", "kept")
    await until_queued(serve, "dev", 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await until_queued(serve, "dev", 1)  # it left the queue
    device.release()
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(first, kept) == ["done first", "done kept"]
    assert device.batches == [["first"], ["kept"]]


async def test_a_cancelled_caller_does_not_count_towards_a_waiting_batch(
    serve: Serve, device: Device
) -> None:
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 2, "batch_wait_timeout": LONG, "batch_wait_policy": "fixed"},
    )
    (gone,) = send(handle, "gone")
    await until_queued(serve, "dev", 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await until_queued(serve, "dev", 0)  # it left the queue
    (waiting,) = send(handle, "a")
    await until_queued(serve, "dev", 1)
    assert not waiting.done()  # "gone" left: "a" is alone and still waits for a partner
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(waiting, handle.remote("b")) == ["done a", "done b"]
    assert device.batches == [["a", "b"]]


async def test_an_http_client_that_disconnects_while_queued_is_never_run() -> None:
    probe = Probe()
    device = Device()
    options = {"host": "127.0.0.1", "port": 0, "middlewares": [Middleware(ProbeMiddleware, probe)]}
    async with Serve(http_options=options) as instance:
        try:
            handle = await deploy(
                instance, "dev", legacy_function(device), config={"max_batch_size": 4}, route="/dev"
            )
            device.hold()
            first = handle.remote("first")
            await device.until(lambda: device.inside == 1)
            assert instance.http_port is not None
            _reader, writer = await asyncio.open_connection("127.0.0.1", instance.http_port)
            writer.write(b"GET /dev?x=gone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await probe.until(lambda: probe.entered == 1)
            await until_queued(instance, "dev", 1)
            writer.close()
            await writer.wait_closed()
            # The app can only learn of the disconnect by reading http.disconnect from receive().
            await wait_until(
                lambda: instance.backend_statistics("dev").num_queued == 0,
                "the request of the client that went away left the queue",
            )
            kept = handle.remote("kept")
            await until_queued(instance, "dev", 1)
            device.release()
            async with asyncio.timeout(WAIT_S):
                assert await asyncio.gather(first, kept) == ["done first", "done kept"]
            assert "gone" not in device.items, (
                f"the handler ran for a client that had disconnected while its request was "
                f"queued (batches {device.batches}; the app read http.disconnect "
                f"{probe.disconnects} time(s))"
            )
            assert device.batches == [["first"], ["kept"]]
        finally:
            device.release()


@pytest.mark.parametrize("first_request", ["unbatched", "expired"])
async def test_a_finished_http_request_never_cancels_its_callers_later_handle_calls(
    serve: Serve, device: Device, http: httpx.AsyncClient, first_request: str
) -> None:
    # ASGITransport (like any host that runs the app in its own task) runs the app in the
    # caller's task: nothing a finished request leaves behind may act on that task afterwards.
    handle = await deploy(
        serve,
        "dev",
        legacy_function(device),
        config={"max_batch_size": 2, "batch_wait_timeout": LONG},
        route="/dev",
    )
    await deploy(serve, "plain", plain_handler, route="/plain")
    async with asyncio.timeout(WAIT_S):
        # In this very task, a request that never waited in a queue.
        if first_request == "unbatched":
            response = await http.get("/plain", params={"x": "a"})
            assert (response.status_code, response.text) == (200, "plain a")
        else:
            response = await http.get("/dev", params={"x": "a", "relative_slo_ms": 0})
            assert response.status_code == 504
        # Then handle calls that wait in the batch queue for each other.
        assert await asyncio.gather(handle.remote("b"), handle.remote("c")) == ["done b", "done c"]
    assert device.batches == [["b", "c"]]


# -- the @serve.batch decorator ----------------------------------------------------------------


def modern_function(device: Device, max_batch_size: int, timeout_s: float) -> Any:
    @aioserve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=timeout_s)
    async def handler(items: list[Any]) -> list[str]:
        return await device.run(items)

    return handler


def modern_class(device: Device) -> Any:
    class Model:
        @aioserve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
        async def __call__(self, items: list[Any]) -> list[str]:
            return await device.run(items)

        @aioserve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
        async def predict(self, items: list[Any]) -> list[str]:
            return await device.run(items, prefix="predicted")

    return Model


async def test_a_batch_decorated_function_backend_batches_handle_and_http_callers(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    handle = await deploy(serve, "f", modern_function(device, 3, LONG), route="/f")
    waiting = send(handle, "a", "b")
    # Both calls run on the replica, in the function's own batch queue.
    await wait_until(lambda: serve.backend_statistics("f").num_running == 2, "both calls running")
    assert device.batches == []
    assert not any(future.done() for future in waiting)
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(*waiting, handle.remote("c")) == ["done a", "done b", "done c"]
        responses = await asyncio.gather(*(http.get("/f", params={"x": n}) for n in "def"))
    assert [(r.status_code, r.text) for r in responses] == [
        (200, "done d"),
        (200, "done e"),
        (200, "done f"),
    ]
    assert device.batches[0] == ["a", "b", "c"]
    assert [sorted(batch) for batch in device.batches[1:]] == [["d", "e", "f"]]


async def test_batch_decorated_methods_of_a_class_backend(
    serve: Serve, device: Device, http: httpx.AsyncClient
) -> None:
    handle = await deploy(serve, "model", modern_class(device), route="/model")
    predict = handle.options(method_name="predict")
    async with asyncio.timeout(WAIT_S):
        assert await asyncio.gather(handle.remote("a"), handle.remote("b")) == ["done a", "done b"]
        assert await asyncio.gather(*(predict.remote(n) for n in "cde")) == [
            "predicted c",
            "predicted d",
            "predicted e",
        ]
        header = {"X-Serve-Call-Method": "predict"}
        responses = await asyncio.gather(
            *(http.get("/model", params={"x": n}, headers=header) for n in "fgh")
        )
        assert [r.text for r in responses] == ["predicted f", "predicted g", "predicted h"]
        responses = await asyncio.gather(*(http.get("/model", params={"x": n}) for n in "ij"))
        assert [r.text for r in responses] == ["done i", "done j"]
    assert [sorted(batch) for batch in device.batches] == [
        ["a", "b"],
        ["c", "d", "e"],
        ["f", "g", "h"],
        ["i", "j"],
    ]


async def test_a_bare_batch_decorator_makes_a_working_backend(serve: Serve) -> None:
    @aioserve.batch
    async def sizes(items: list[Any]) -> list[str]:
        return [f"{item} of {len(items)}" for item in items]

    handle = await deploy(serve, "sizes", sizes)
    async with asyncio.timeout(WAIT_S):
        assert await handle.remote("a") == "a of 1"  # timeout 0: no waiting for a partner


async def test_a_wrong_result_from_a_batch_decorated_backend_fails_the_whole_batch(
    serve: Serve, device: Device
) -> None:
    @aioserve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def handler(items: list[Any]) -> list[str]:
        results = await device.run(items)
        return results[:-1] if "short" in items else results

    handle = await deploy(serve, "f", handler)
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(
            handle.remote("short"), handle.remote("a"), return_exceptions=True
        )
        assert all(isinstance(r, BatchError) for r in results), results
        assert await asyncio.gather(handle.remote("b"), handle.remote("c")) == ["done b", "done c"]
    assert device.batches == [["short", "a"], ["b", "c"]]


async def test_batch_decorator_validation_errors(serve: Serve) -> None:
    def generator(items: list[Any]) -> Any:
        yield items

    with pytest.raises(TypeError, match="async def or def"):
        aioserve.batch(generator)
    with pytest.raises(TypeError, match="async def or def"):
        aioserve.batch(max_batch_size=2)(generator)
    with pytest.raises(ValueError, match="batch_wait_policy"):
        aioserve.batch(batch_wait_policy="eager")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_batch_size"):
        aioserve.batch(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        aioserve.batch(batch_wait_timeout_s=-1)

    @aioserve.batch(max_batch_size=2)
    async def echo(items: list[Any]) -> list[Any]:
        return items

    handle = await deploy(serve, "echo", echo)
    with pytest.raises(TypeError):  # a batched callable takes exactly one positional argument
        await handle.remote("a", "b")
    assert await handle.remote("a") == "a"


async def test_a_batch_runs_as_none_of_its_requests(serve: Serve, http: httpx.AsyncClient) -> None:
    # The queue's worker starts in the first request's context; later batches must not be
    # answered, logged or watched as that request.
    @aioserve.accept_batch
    async def ids(requests: list[Any]) -> list[Any]:
        return [str(aioserve.context.request_id) for _ in requests]

    await deploy(serve, "ids", ids, config={"max_batch_size": 4}, route="/ids")
    for request_id in ("first", "second"):
        response = await http.get("/ids", headers={"X-Request-ID": request_id})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == request_id
        assert response.text == "None"
