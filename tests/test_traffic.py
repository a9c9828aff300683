"""Tests of traffic and live reconfiguration (API.md §2 updates and deletion, §3 traffic):
weighted splits, shard keys, the 0.8 route policies, shadow traffic, validation that changes
nothing, replica choice across endpoints, config updates on live backends, graceful and forced
deletion, and a load test that reconfigures everything while 2,000 requests are answered."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from _sample_backends import HANG_GUARD_S, Gate, until_queued, wait_until
from starlette.requests import Request

from aioserve import (
    Overloaded,
    ReplicaStopped,
    RoutePolicy,
    Serve,
    ServeError,
    ServeHandle,
    get_replica_context,
)

NO_SERVER = {"location": "NoServer"}


# -- helpers ---------------------------------------------------------------------------------------


async def whoami(*args: Any) -> str:
    """A backend that answers with its own backend tag, whatever it is called with."""
    return get_replica_context().backend_tag


async def quiesce() -> None:
    """Let the loop turn until every other task has finished (shadow copies included)."""
    me = asyncio.current_task()
    async with asyncio.timeout(HANG_GUARD_S):
        while others := {t for t in asyncio.all_tasks() if t is not me and not t.done()}:
            await asyncio.wait(others)


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    """How far a Binomial(n, p) count may stray from n * p before the test calls it wrong."""
    return sigmas * math.sqrt(n * p * (1 - p)) + 1


async def backends(serve: Serve, *tags: str, target: Any = whoami) -> None:
    for tag in tags:
        await serve.create_backend(tag, target)


@pytest.fixture
async def gate(serve: Serve) -> AsyncIterator[Gate]:
    """Depends on ``serve`` so that it is opened before the instance drains on teardown."""
    g = Gate()
    yield g
    g.release.set()


# -- weighted split --------------------------------------------------------------------------------

WEIGHTS = {"a": 0.2, "b": 0.3, "c": 0.5}


async def test_split_shares_match_the_weights_over_handle_calls() -> None:
    n = 6000
    async with Serve(http_options=NO_SERVER, seed=2024) as serve:
        await backends(serve, *WEIGHTS)
        await serve.create_endpoint("ep", backend="a")
        await serve.set_traffic("ep", WEIGHTS)
        handle = serve.get_handle("ep")
        counts = Counter(await asyncio.gather(*(handle.remote() for _ in range(n))))
    assert set(counts) == set(WEIGHTS)
    for tag, weight in WEIGHTS.items():
        assert abs(counts[tag] - n * weight) <= binomial_bound(n, weight), counts


async def test_split_shares_over_http(serve: Serve, http: httpx.AsyncClient) -> None:
    n = 600
    await backends(serve, "a", "b")
    await serve.create_endpoint("ep", backend="a", route="/ep")
    await serve.set_traffic("ep", {"a": 0.25, "b": 0.75})
    responses = await asyncio.gather(*(http.get("/ep") for _ in range(n)))
    assert {r.status_code for r in responses} == {200}
    counts = Counter(r.text for r in responses)
    assert abs(counts["a"] - n * 0.25) <= binomial_bound(n, 0.25), counts
    assert counts["a"] + counts["b"] == n


async def test_the_same_seed_gives_the_same_choices() -> None:
    async def sequence(seed: int) -> list[str]:
        async with Serve(http_options=NO_SERVER, seed=seed) as serve:
            await backends(serve, *WEIGHTS)
            await serve.create_endpoint("ep", backend="a")
            await serve.set_traffic("ep", WEIGHTS)
            handle = serve.get_handle("ep")
            return [await handle.remote() for _ in range(200)]

    first = await sequence(11)
    assert await sequence(11) == first
    assert await sequence(12) != first  # the seed really drives the choice


async def test_a_zero_weight_backend_gets_nothing_and_is_listed(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await backends(serve, "a", "b")
    await serve.create_endpoint("ep", backend="a", route="/ep")
    await serve.set_traffic("ep", {"a": 0.0, "b": 1.0})
    assert serve.list_endpoints()["ep"]["traffic"] == {"a": 0.0, "b": 1.0}
    handle = serve.get_handle("ep")
    assert set(await asyncio.gather(*(handle.remote() for _ in range(300)))) == {"b"}
    responses = await asyncio.gather(*(http.get("/ep") for _ in range(50)))
    assert {r.text for r in responses} == {"b"}


async def test_split_and_link_are_set_traffic(serve: Serve) -> None:
    await backends(serve, "a", "b")
    await serve.create_endpoint("ep")
    await serve.set_traffic("ep", {"b": 1.0})
    assert serve.list_endpoints()["ep"]["traffic"] == {"b": 1.0}
    assert await serve.get_handle("ep").remote() == "b"
    await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
    assert serve.list_endpoints()["ep"]["traffic"] == {"a": 0.5, "b": 0.5}
    await serve.set_traffic("ep", {"a": 1.0})
    assert serve.list_endpoints()["ep"]["traffic"] == {"a": 1.0}
    handle = serve.get_handle("ep")
    assert set(await asyncio.gather(*(handle.remote() for _ in range(100)))) == {"a"}


async def test_weights_within_1e_8_of_one_are_accepted(serve: Serve) -> None:
    await backends(serve, "a", "b", "c")
    await serve.create_endpoint("ep", backend="a")
    thirds = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    await serve.set_traffic("ep", thirds)
    assert serve.list_endpoints()["ep"]["traffic"] == thirds
    await serve.set_traffic("ep", {"a": 0.5, "b": 0.5 + 5e-9})
    assert set(serve.list_endpoints()["ep"]["traffic"]) == {"a", "b"}


async def test_an_endpoint_without_traffic_fails_clearly_until_linked(serve: Serve) -> None:
    await backends(serve, "a")
    await serve.create_endpoint("pending")
    handle = serve.get_handle("pending")
    with pytest.raises(ServeError, match="pending"):
        await handle.remote()
    await serve.set_traffic("pending", {"a": 1.0})
    assert await handle.remote() == "a"


# -- shard keys ------------------------------------------------------------------------------------

KEYS = [f"user-{i}" for i in range(200)]


async def test_shard_key_option_maps_a_key_to_one_backend(serve: Serve) -> None:
    await backends(serve, "a", "b")
    await serve.create_endpoint("ep", backend="a")
    await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
    handle = serve.get_handle("ep")
    unkeyed = handle.options()

    async def route_of(key: str) -> str:
        seen = {await handle.options(shard_key=key).remote() for _ in range(3)}
        await unkeyed.remote()  # unkeyed traffic in between moves nothing
        assert len(seen) == 1, (key, seen)
        return seen.pop()

    mapping = {key: await route_of(key) for key in KEYS}
    # Keys spread over the backends by weight, not all to one.
    n_a = sum(1 for tag in mapping.values() if tag == "a")
    assert abs(n_a - len(KEYS) / 2) <= binomial_bound(len(KEYS), 0.5), n_a

    # The same dict set again is an unchanged traffic dict: every key stays where it was.
    await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
    assert {key: await route_of(key) for key in KEYS} == mapping
    # get_handle(shard_key=...) is the same option.
    for key in KEYS[:20]:
        assert await serve.get_handle("ep", shard_key=key).remote() == mapping[key]


async def test_shard_key_header_maps_like_the_option(serve: Serve, http: httpx.AsyncClient) -> None:
    await backends(serve, "a", "b", "c")
    await serve.create_endpoint("ep", backend="a", route="/ep")
    await serve.set_traffic("ep", {"a": 0.3, "b": 0.3, "c": 0.4})
    handle = serve.get_handle("ep")
    by_option = {key: await handle.options(shard_key=key).remote() for key in KEYS}
    assert set(by_option.values()) == {"a", "b", "c"}
    for key in KEYS:
        answers = {
            (await http.get("/ep", headers={"X-Serve-Shard-Key": key})).text for _ in range(2)
        }
        assert answers == {by_option[key]}, key


@pytest.mark.parametrize("policy", list(RoutePolicy))
async def test_shard_keys_are_stable_under_every_policy(policy: RoutePolicy) -> None:
    async with Serve(http_options=NO_SERVER, queueing_policy=policy, seed=5) as serve:
        await backends(serve, "a", "b")
        await serve.create_endpoint("ep", backend="a")
        await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
        handle = serve.get_handle("ep")
        first = {key: await handle.options(shard_key=key).remote() for key in KEYS[:50]}
        await asyncio.gather(*(handle.remote() for _ in range(37)))  # move the policy's state
        again = {key: await handle.options(shard_key=key).remote() for key in KEYS[:50]}
    assert again == first
    assert set(first.values()) == {"a", "b"}


# -- the 0.8 route policies ------------------------------------------------------------------------


async def test_round_robin_rotates_exactly_over_handles_and_http() -> None:
    async with Serve(http_options=NO_SERVER, queueing_policy=RoutePolicy.RoundRobin) as serve:
        await backends(serve, "a", "b", "c")
        await serve.create_endpoint("ep", backend="a", route="/ep")
        await serve.set_traffic("ep", {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
        handle = serve.get_handle("ep")
        transport = httpx.ASGITransport(app=serve.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            order: list[str] = []
            for i in range(30):  # handles and HTTP share the one rotation
                if i % 2:
                    order.append((await http.get("/ep")).text)
                else:
                    order.append(await handle.remote())
    assert sorted(order[:3]) == ["a", "b", "c"]
    assert order == order[:3] * 10


async def test_round_robin_follows_the_weights_exactly() -> None:
    async with Serve(http_options=NO_SERVER, queueing_policy="round_robin") as serve:
        await backends(serve, "a", "b")
        await serve.create_endpoint("ep", backend="a")
        await serve.set_traffic("ep", {"a": 0.25, "b": 0.75})
        handle = serve.get_handle("ep")
        order = [await handle.remote() for _ in range(400)]
    for end in range(4, 401, 4):
        assert order[:end].count("a") == end // 4, (end, order[:end])
    assert max(len(list(run)) for tag, run in itertools.groupby(order) if tag == "b") <= 3


@pytest.mark.parametrize(("packing_num", "tags"), [(3, "ab"), (2, "abc"), (5, "ab")])
async def test_fixed_packing_sends_runs_of_packing_num(packing_num: int, tags: str) -> None:
    async with Serve(
        http_options=NO_SERVER,
        queueing_policy=RoutePolicy.FixedPacking,
        policy_kwargs={"packing_num": packing_num},
    ) as serve:
        await backends(serve, *tags)
        await serve.create_endpoint("ep", backend="a")
        await serve.set_traffic("ep", dict.fromkeys(tags, 1 / len(tags)))
        handle = serve.get_handle("ep")
        order = [await handle.remote() for _ in range(packing_num * len(tags) * 4)]
    runs = [(tag, len(list(run))) for tag, run in itertools.groupby(order)]
    assert all(length == packing_num for _, length in runs), runs
    # Every backend takes its turn, in a fixed rotation.
    rotation = [tag for tag, _ in runs[: len(tags)]]
    assert sorted(rotation) == sorted(tags)
    assert [tag for tag, _ in runs] == rotation * 4


async def power_of_two_picks(policy: RoutePolicy) -> Counter[str]:
    """Hold 'busy' with 3 requests, split 50/50 with 'idle', send 200 serial requests."""
    async with Serve(http_options=NO_SERVER, queueing_policy=policy, seed=3) as serve:
        gate = Gate()

        async def handler(x: str) -> str:
            if x == "hold":
                await gate.pass_through(x)
            return get_replica_context().backend_tag

        try:
            await backends(serve, "busy", "idle", target=handler)
            await serve.create_endpoint("ep", backend="busy")
            handle = serve.get_handle("ep")
            holds = [handle.remote("hold") for _ in range(3)]
            await gate.until_inside(3)
            await serve.set_traffic("ep", {"busy": 0.5, "idle": 0.5})
            picks = Counter([await handle.remote("x") for _ in range(200)])
            gate.release.set()
            assert await asyncio.gather(*holds) == ["busy"] * 3
            return picks
        finally:
            gate.release.set()


async def test_power_of_two_prefers_the_less_loaded_backend() -> None:
    assert await power_of_two_picks(RoutePolicy.PowerOfTwo) == Counter({"idle": 200})
    # The control: the random policy ignores load and sends about half to the busy backend.
    random_picks = await power_of_two_picks(RoutePolicy.Random)
    assert abs(random_picks["busy"] - 100) <= binomial_bound(200, 0.5), random_picks


async def test_power_of_two_uses_both_backends_when_idle() -> None:
    async with Serve(http_options=NO_SERVER, queueing_policy="power_of_two", seed=1) as serve:
        await backends(serve, "a", "b")
        await serve.create_endpoint("ep", backend="a")
        await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
        handle = serve.get_handle("ep")
        picks = Counter([await handle.remote() for _ in range(400)])
    assert abs(picks["a"] - 200) <= binomial_bound(400, 0.5), picks


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"queueing_policy": "least_loaded"}, ValueError),
        ({"queueing_policy": 3}, TypeError),
        ({"queueing_policy": "fixed_packing", "policy_kwargs": {"packing_num": 0}}, ValueError),
        ({"queueing_policy": "fixed_packing", "policy_kwargs": {"packing_num": "2"}}, TypeError),
        ({"queueing_policy": "round_robin", "policy_kwargs": {"packing_num": 2}}, ValueError),
    ],
)
def test_bad_policies_are_rejected_at_construction(
    kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Serve(http_options=NO_SERVER, **kwargs)


# -- validation leaves everything as it was --------------------------------------------------------

Call = Callable[[Serve], Awaitable[Any]]

BAD_CALLS: list[tuple[str, Call, type[Exception]]] = [
    ("set_traffic unknown endpoint", lambda s: s.set_traffic("ghost", {"a": 1.0}), ValueError),
    ("set_traffic unknown backend", lambda s: s.set_traffic("ep", {"ghost": 1.0}), ValueError),
    (
        "set_traffic unknown backend after a good one",
        lambda s: s.set_traffic("ep", {"b": 0.5, "ghost": 0.5}),
        ValueError,
    ),
    ("set_traffic negative", lambda s: s.set_traffic("ep", {"a": -0.5, "b": 1.5}), ValueError),
    ("set_traffic sum < 1", lambda s: s.set_traffic("ep", {"a": 0.5, "b": 0.4}), ValueError),
    ("set_traffic sum > 1", lambda s: s.set_traffic("ep", {"a": 0.5, "b": 0.6}), ValueError),
    (
        "set_traffic sum off by 1e-7",
        lambda s: s.set_traffic("ep", {"a": 0.5, "b": 0.5 + 1e-7}),
        ValueError,
    ),
    ("set_traffic all zero", lambda s: s.set_traffic("ep", {"a": 0.0, "b": 0.0}), ValueError),
    ("set_traffic empty", lambda s: s.set_traffic("ep", {}), ValueError),
    ("set_traffic nan", lambda s: s.set_traffic("ep", {"a": math.nan}), ValueError),
    ("set_traffic not a dict", lambda s: s.set_traffic("ep", "b"), TypeError),
    ("set_traffic str weight", lambda s: s.set_traffic("ep", {"b": "1"}), TypeError),
    (
        "set_traffic unknown endpoint, one backend",
        lambda s: s.set_traffic("ghost", {"b": 1.0}),
        ValueError,
    ),
    (
        "set_traffic unknown backend, two",
        lambda s: s.set_traffic("ep", {"ghost": 0.5, "b": 0.5}),
        ValueError,
    ),
    ("set_traffic bad sum", lambda s: s.set_traffic("ep", {"a": 0.7, "b": 0.7}), ValueError),
    ("set_traffic negative", lambda s: s.set_traffic("ep", {"a": 1.25, "b": -0.25}), ValueError),
    ("shadow unknown endpoint", lambda s: s.shadow_traffic("ghost", "b", 0.5), ValueError),
    ("shadow unknown backend", lambda s: s.shadow_traffic("ep", "ghost", 0.5), ValueError),
    ("shadow proportion > 1", lambda s: s.shadow_traffic("ep", "b", 1.5), ValueError),
    ("shadow proportion < 0", lambda s: s.shadow_traffic("ep", "b", -0.1), ValueError),
    ("shadow proportion nan", lambda s: s.shadow_traffic("ep", "b", math.nan), ValueError),
    ("shadow proportion str", lambda s: s.shadow_traffic("ep", "b", "0.5"), TypeError),
    ("shadow proportion None", lambda s: s.shadow_traffic("ep", "b", None), TypeError),
    ("create_endpoint backend not str", lambda s: s.create_endpoint("new", 42), TypeError),
    (
        "create_endpoint route without /",
        lambda s: s.create_endpoint("new", backend="a", route="new"),
        TypeError,
    ),
    ("create_endpoint duplicate name", lambda s: s.create_endpoint("ep", backend="b"), ValueError),
    (
        "create_endpoint duplicate route",
        lambda s: s.create_endpoint("new", backend="b", route="/ep"),
        ValueError,
    ),
    (
        "create_endpoint unknown backend",
        lambda s: s.create_endpoint("new", backend="ghost", route="/new"),
        ValueError,
    ),
]


@pytest.mark.parametrize(
    ("call", "error"),
    [(call, error) for _, call, error in BAD_CALLS],
    ids=[n for n, *_ in BAD_CALLS],
)
async def test_a_rejected_change_leaves_endpoints_and_traffic_unchanged(
    serve: Serve, http: httpx.AsyncClient, call: Call, error: type[Exception]
) -> None:
    await backends(serve, "a", "b", "s")
    await serve.create_endpoint("ep", backend="a", route="/ep")
    await serve.shadow_traffic("ep", "s", 1.0)
    before = serve.list_endpoints()
    routes = (await http.get("/-/routes")).json()
    with pytest.raises(error):
        await call(serve)
    assert serve.list_endpoints() == before
    assert (await http.get("/-/routes")).json() == routes
    # The old traffic is still the one in force.
    handle = serve.get_handle("ep")
    assert set(await asyncio.gather(*(handle.remote() for _ in range(50)))) == {"a"}
    assert (await http.get("/ep")).text == "a"


async def test_delete_backend_in_use_by_traffic_or_shadow_is_refused(serve: Serve) -> None:
    await backends(serve, "a", "b", "s")
    await serve.create_endpoint("ep", backend="a")
    await serve.set_traffic("ep", {"a": 0.5, "b": 0.5})
    await serve.shadow_traffic("ep", "s", 0.5)
    before = serve.list_endpoints()
    for tag in ("a", "b", "s"):
        with pytest.raises(ValueError, match="'ep'"):
            await serve.delete_backend(tag)
    assert serve.list_endpoints() == before
    assert set(serve.list_backends()) == {"a", "b", "s"}
    # Once neither traffic nor a shadow names it, it can go.
    await serve.shadow_traffic("ep", "s", 0)
    await serve.delete_backend("s")
    assert set(serve.list_backends()) == {"a", "b"}


# -- shadow traffic --------------------------------------------------------------------------------


@pytest.mark.parametrize("proportion", [1.0, 0.5, 0.1])
async def test_shadow_receives_its_proportion_of_requests(serve: Serve, proportion: float) -> None:
    n = 2000
    copies: list[int] = []

    async def primary(i: int) -> tuple[str, int]:
        return "primary", i

    async def shadow(i: int) -> str:
        copies.append(i)
        return "shadow answers are discarded"

    await serve.create_backend("primary", primary)
    await serve.create_backend("shadow", shadow)
    await serve.create_endpoint("ep", backend="primary")
    await serve.shadow_traffic("ep", "shadow", proportion)
    assert serve.list_endpoints()["ep"]["shadows"] == {"shadow": proportion}
    handle = serve.get_handle("ep")
    answers: list[Any] = []
    for start in range(0, n, 100):  # bursts of 100 concurrent calls, as callers would send
        answers += await asyncio.gather(*(handle.remote(i) for i in range(start, start + 100)))
    assert answers == [("primary", i) for i in range(n)]
    await quiesce()
    assert len(copies) == len(set(copies))  # at most one copy per request
    assert set(copies) <= set(range(n))
    if proportion == 1.0:
        assert sorted(copies) == list(range(n))
    else:
        assert abs(len(copies) - n * proportion) <= binomial_bound(n, proportion), len(copies)

    # Proportion 0 removes the shadow.
    await serve.shadow_traffic("ep", "shadow", 0)
    assert serve.list_endpoints()["ep"]["shadows"] == {}
    seen = len(copies)
    await asyncio.gather(*(handle.remote(i) for i in range(200)))
    await quiesce()
    assert len(copies) == seen


async def test_http_requests_are_shadowed_too(serve: Serve, http: httpx.AsyncClient) -> None:
    copies: list[str] = []

    async def primary(request: Request) -> str:
        return (await request.body()).decode()

    async def shadow(request: Request) -> None:
        copies.append(request.headers["x-id"])

    await serve.create_backend("primary", primary)
    await serve.create_backend("shadow", shadow)
    await serve.create_endpoint("ep", backend="primary", route="/ep", methods=["POST"])
    await serve.shadow_traffic("ep", "shadow", 1.0)
    responses = await asyncio.gather(
        *(http.post("/ep", content=f"body-{i}", headers={"x-id": str(i)}) for i in range(50))
    )
    assert [r.text for r in responses] == [f"body-{i}" for i in range(50)]
    await quiesce()
    assert sorted(copies, key=int) == [str(i) for i in range(50)]


@pytest.mark.parametrize("read", ["body", "stream"])
async def test_a_shadow_reading_the_body_does_not_steal_it_from_the_primary(
    served: Serve, read: str
) -> None:
    """The primary waits behind a busy replica, so its shadow copy reads the body first."""
    gate = Gate()
    shadow_bodies: list[bytes] = []

    async def primary(request: Request) -> str:
        body = await request.body()
        if body == b"hold":
            await gate.pass_through(body)
        return body.decode()

    async def shadow(request: Request) -> None:
        if read == "body":
            shadow_bodies.append(await request.body())
        else:
            shadow_bodies.append(b"".join([chunk async for chunk in request.stream()]))

    try:
        await served.create_backend("primary", primary, config={"max_concurrent_queries": 1})
        await served.create_backend("shadow", shadow)
        await served.create_endpoint("ep", backend="primary", route="/ep", methods=["POST"])
        async with httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as client:
            held = asyncio.create_task(client.post("/ep", content=b"hold"))
            await gate.until_inside(1)
            await served.shadow_traffic("ep", "shadow", 1.0)
            queued = [
                asyncio.create_task(client.post("/ep", content=f"body-{i}".encode()))
                for i in range(5)
            ]
            await wait_until(lambda: len(shadow_bodies) == 5, "every shadow read its body")
            gate.release.set()
            assert (await held).text == "hold"
            answers = [await response for response in queued]
    finally:
        gate.release.set()
    assert [(r.status_code, r.text) for r in answers] == [(200, f"body-{i}") for i in range(5)]
    assert sorted(shadow_bodies) == sorted(f"body-{i}".encode() for i in range(5))


async def test_keep_alive_responses_are_not_held_back_by_nagle(served: Serve) -> None:
    """Sequential requests on one keep-alive connection to the real server answer at once.

    uvicorn writes a response's head and body separately; unless the server's sockets have
    TCP_NODELAY, the body waits for the client's delayed ACK: about 40 ms per request.
    """
    await served.create_backend("a", whoami)
    await served.create_endpoint("a", backend="a", route="/a")
    latencies = []
    async with httpx.AsyncClient(base_url=served.url, timeout=HANG_GUARD_S) as client:
        assert (await client.get("/a")).text == "a"  # connect
        for _ in range(21):
            started = time.perf_counter()
            assert (await client.get("/a")).text == "a"
            latencies.append(time.perf_counter() - started)
    # The delayed-ACK stall is a timer of at least 40 ms on every request, so the median tells
    # the two apart even on a loaded machine, where a local request still takes about 1 ms.
    median = statistics.median(latencies)
    assert median < 0.02, f"median keep-alive request took {median * 1000:.1f} ms"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_hanging_shadow_never_delays_the_primary(
    serve: Serve, http: httpx.AsyncClient, kind: str
) -> None:
    n = 400
    never = asyncio.Event()  # set only at the end of the test
    never_thread = threading.Event()
    entered: list[int] = []

    async def primary(x: Any) -> Any:
        return x if not isinstance(x, Request) else "http"

    async def hang_async(x: Any) -> None:
        entered.append(1)
        await never.wait()

    def hang_sync(x: Any) -> None:
        entered.append(1)
        never_thread.wait(timeout=30)

    await serve.create_backend("primary", primary)
    await serve.create_backend(
        "hang",
        hang_async if kind == "async" else hang_sync,
        config={"max_concurrent_queries": 4, "max_queued_queries": 50},
    )
    await serve.create_endpoint("ep", backend="primary", route="/ep")
    handle = serve.get_handle("ep")
    try:
        # Per-call latency without a shadow, then with a shadow that never answers.
        baseline = [await timed(handle.remote(i)) for i in range(n)]
        await serve.shadow_traffic("ep", "hang", 1.0)
        shadowed = []
        for i in range(n):
            started = time.perf_counter()
            answer = await asyncio.wait_for(handle.remote(i), HANG_GUARD_S)
            shadowed.append(time.perf_counter() - started)
            assert answer == i
        concurrent = await asyncio.wait_for(
            asyncio.gather(*(handle.remote(i) for i in range(n))), HANG_GUARD_S
        )
        assert concurrent == list(range(n))
        responses = await asyncio.wait_for(
            asyncio.gather(*(http.get("/ep") for _ in range(50))), HANG_GUARD_S
        )
        assert [(r.status_code, r.text) for r in responses] == [(200, "http")] * 50
        # The shadow really was sent, and is still hanging: nobody waited for it.
        await wait_until(lambda: len(entered) >= 1, "a shadow copy reached the hanging backend")
        assert not never.is_set() and not never_thread.is_set()
        # Untouched latency: a copy costs a task spawn, never a wait for the shadow.
        assert median(shadowed) <= 5 * median(baseline) + 0.001, (
            median(shadowed),
            median(baseline),
        )
        assert max(shadowed) < 0.5
    finally:
        never.set()
        never_thread.set()


async def timed(awaitable: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await awaitable
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_raising_shadow_is_invisible_to_callers(
    serve: Serve, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    n = 500
    raised: list[Any] = []

    async def primary(x: Any) -> Any:
        return "http" if isinstance(x, Request) else x

    async def boom_async(x: Any) -> None:
        raised.append(x)
        raise ValueError("shadow failure")

    def boom_sync(x: Any) -> None:
        raised.append(x)
        raise ValueError("shadow failure")

    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    try:
        await serve.create_backend("primary", primary)
        await serve.create_backend("boom", boom_async if kind == "async" else boom_sync)
        await serve.create_endpoint("ep", backend="primary", route="/ep")
        await serve.shadow_traffic("ep", "boom", 1.0)
        handle = serve.get_handle("ep")
        with caplog.at_level(logging.WARNING):
            assert await asyncio.gather(*(handle.remote(i) for i in range(n))) == list(range(n))
            assert [await handle.remote(i) for i in range(50)] == list(range(50))
            responses = await asyncio.gather(*(http.get("/ep") for _ in range(50)))
            assert [(r.status_code, r.text) for r in responses] == [(200, "http")] * 50
            await quiesce()
            gc.collect()  # "exception was never retrieved" is reported when a task is collected
            await quiesce()
    finally:
        loop.set_exception_handler(previous)
    assert len(raised) == n + 100  # every copy really ran and raised
    assert loop_errors == []
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- replica choice --------------------------------------------------------------------------------


async def test_concurrency_limit_and_queue_are_per_backend_across_endpoints(
    serve: Serve, http: httpx.AsyncClient, gate: Gate
) -> None:
    """Two endpoints send traffic to one backend: its limits count requests from both."""

    async def handler(x: Any) -> Any:
        label = x.query_params["label"] if isinstance(x, Request) else x
        return await gate.pass_through(label)

    await serve.create_backend(
        "shared", handler, config={"max_concurrent_queries": 2, "max_queued_queries": 1}
    )
    await serve.create_endpoint("one", backend="shared")
    await serve.create_endpoint("two", backend="shared", route="/two")
    one, two = serve.get_handle("one"), serve.get_handle("two")
    first = one.remote("one")
    second = asyncio.create_task(http.get("/two", params={"label": "two-http"}))
    await gate.until_inside(2)
    queued = two.remote("two")
    await until_queued(serve, "shared", 1)
    assert gate.inside == 2  # the limit is the replica's, not each endpoint's
    with pytest.raises(Overloaded):
        await asyncio.wait_for(one.remote("rejected"), HANG_GUARD_S)
    rejected = await asyncio.wait_for(http.get("/two", params={"label": "no"}), HANG_GUARD_S)
    assert rejected.status_code == 503
    gate.release.set()
    assert await first == "one"
    assert (await second).text == "two-http"
    assert await queued == "two"
    assert sorted(map(str, gate.entries)) == ["one", "two", "two-http"]


async def test_least_loaded_replica_under_its_limit_is_chosen(serve: Serve, gate: Gate) -> None:
    async def handler(x: Any) -> Any:
        return await gate.pass_through((get_replica_context().replica_tag, x))

    await serve.create_backend(
        "x", handler, config={"num_replicas": 3, "max_concurrent_queries": 2}
    )
    await serve.create_endpoint("x", backend="x")
    handle = serve.get_handle("x")
    refs = [handle.remote(i) for i in range(7)]
    await gate.until_inside(6)
    await until_queued(serve, "x", 1)
    # Six spread two per replica (never three on one); the seventh waits for a free slot.
    per_replica = Counter(tag for tag, _ in gate.entries)
    assert sorted(per_replica.values()) == [2, 2, 2]
    assert gate.inside == 6
    gate.release.set()
    assert [x for _, x in await asyncio.gather(*refs)] == list(range(7))


# -- live config updates ---------------------------------------------------------------------------


class Recorder:
    """Records its constructions and reconfigures; answers (replica tag, user_config)."""

    def __init__(self, log: list[tuple[str, str, Any]], gate: Gate) -> None:
        self.tag = get_replica_context().replica_tag
        self.log = log
        self.gate = gate
        self.config: Any = None
        log.append(("init", self.tag, None))

    def reconfigure(self, config: Any) -> None:
        self.config = config
        self.log.append(("reconfigure", self.tag, config))

    async def __call__(self, hold: bool = False) -> tuple[str, Any]:
        if hold:
            await self.gate.pass_through(self.tag)
        return self.tag, self.config


async def replica_views(handle: ServeHandle, gate: Gate, n: int) -> set[tuple[str, Any]]:
    """(replica tag, user_config) of ``n`` calls held at once: one per slot of every replica."""
    refs = [handle.remote(True) for _ in range(n)]
    await gate.until_inside(n)
    gate.release.set()
    results = await asyncio.gather(*refs)
    gate.release.clear()
    return {(tag, str(config)) for tag, config in results}


async def test_updates_never_restart_untouched_replicas(serve: Serve, gate: Gate) -> None:
    log: list[tuple[str, str, Any]] = []
    await serve.create_backend(
        "x", Recorder, log, gate, config={"user_config": 1, "max_concurrent_queries": 1}
    )
    await serve.create_endpoint("x", backend="x")
    handle = serve.get_handle("x")
    original = log[0][1]

    # Scale up: new replicas get the current user_config; the original one is kept as it is.
    await serve.update_backend_config("x", {"num_replicas": 3})
    inits = [tag for what, tag, _ in log if what == "init"]
    assert len(inits) == 3 and inits[0] == original
    assert ("reconfigure", original, 1) in log and log.count(("reconfigure", original, 1)) == 1
    for tag in inits[1:]:
        assert log.index(("init", tag, None)) < log.index(("reconfigure", tag, 1))
    assert await replica_views(handle, gate, 3) == {(tag, "1") for tag in inits}

    # user_config: reconfigure on every replica, nothing restarted.
    del log[:]
    await serve.update_backend_config("x", {"user_config": 2})
    assert sorted(log) == sorted(("reconfigure", tag, 2) for tag in inits)
    assert await replica_views(handle, gate, 3) == {(tag, "2") for tag in inits}

    # max_concurrent_queries: in force at once, nothing restarted or reconfigured.
    del log[:]
    await serve.update_backend_config("x", {"max_concurrent_queries": 2})
    assert log == []
    assert serve.get_backend_config("x").max_concurrent_queries == 2
    assert await replica_views(handle, gate, 6) == {(tag, "2") for tag in inits}

    # Scale down: the survivor is one of the running replicas, not a new one.
    await serve.update_backend_config("x", {"num_replicas": 1})
    assert log == []
    views = await replica_views(handle, gate, 2)
    assert len(views) == 1
    assert next(iter(views))[0] in inits
    assert serve.list_backends()["x"]["num_replicas"] == 1


async def test_scale_down_drains_then_cancels_after_the_graceful_timeout(
    serve: Serve, gate: Gate
) -> None:
    async def handler(x: Any) -> Any:
        return await gate.pass_through((get_replica_context().replica_tag, x))

    await serve.create_backend(
        "x",
        handler,
        config={
            "num_replicas": 2,
            "max_concurrent_queries": 1,
            "graceful_shutdown_timeout_s": 0.05,
        },
    )
    await serve.create_endpoint("x", backend="x")
    handle = serve.get_handle("x")
    refs = [handle.remote(i) for i in range(2)]
    await gate.until_inside(2)
    await serve.update_backend_config("x", {"num_replicas": 1})
    # The removed replica's request is cancelled once the drain timeout is over...
    done, pending = await asyncio.wait(refs, timeout=HANG_GUARD_S, return_when="FIRST_COMPLETED")
    assert len(done) == 1 and len(pending) == 1
    with pytest.raises(ReplicaStopped):
        await done.pop()
    assert len(gate.cancelled) == 1
    # ...while the kept replica's request runs on, and new requests go to the kept replica.
    later = handle.remote("later")
    gate.release.set()
    kept_tag, _ = await pending.pop()
    assert (await later) == (kept_tag, "later")


async def test_scale_down_drains_running_requests_within_the_timeout(
    serve: Serve, gate: Gate
) -> None:
    async def handler(x: Any) -> Any:
        return await gate.pass_through((get_replica_context().replica_tag, x))

    await serve.create_backend(
        "x", handler, config={"num_replicas": 3, "max_concurrent_queries": 1}
    )
    await serve.create_endpoint("x", backend="x")
    handle = serve.get_handle("x")
    refs = [handle.remote(i) for i in range(5)]  # three run, two wait
    await gate.until_inside(3)
    await serve.update_backend_config("x", {"num_replicas": 1})
    # One replica left in routing, busy; the two waiting requests still wait.
    await wait_until(
        lambda: serve.backend_statistics("x").num_replicas == 1, "one replica in routing"
    )
    await until_queued(serve, "x", 2)
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(*refs), HANG_GUARD_S)
    assert [x for _, x in results] == list(range(5))
    assert gate.cancelled == []
    assert len({tag for tag, _ in results[3:]}) == 1  # the queued ones ran on the kept replica


# -- delete_backend after moving traffic away ------------------------------------------------------


async def test_graceful_delete_completes_requests_running_and_queued(
    serve: Serve, gate: Gate
) -> None:
    async def old(x: Any) -> Any:
        return "old", await gate.pass_through(x)

    async def new(x: Any) -> Any:
        return "new", x

    await serve.create_backend("old", old, config={"max_concurrent_queries": 1})
    await serve.create_backend("new", new)
    await serve.create_endpoint("ep", backend="old")
    handle = serve.get_handle("ep")
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = [handle.remote(f"queued-{i}") for i in range(3)]
    await until_queued(serve, "old", 3)
    await serve.set_traffic("ep", {"new": 1.0})
    assert await handle.remote("after") == ("new", "after")
    deleting = asyncio.create_task(serve.delete_backend("old"))
    await wait_until(lambda: "old" not in serve.list_backends(), "the deletion has begun")
    assert not deleting.done()  # it waits for the work it holds
    assert "old" not in serve.list_backends()
    gate.release.set()
    assert await running == ("old", "running")
    assert await asyncio.gather(*queued) == [("old", f"queued-{i}") for i in range(3)]
    await asyncio.wait_for(deleting, HANG_GUARD_S)
    assert gate.entries == ["running", "queued-0", "queued-1", "queued-2"]
    assert gate.cancelled == []


async def test_force_delete_cancels_requests_running_and_queued(serve: Serve, gate: Gate) -> None:
    async def old(x: Any) -> Any:
        return await gate.pass_through(x)

    await serve.create_backend("old", old, config={"max_concurrent_queries": 1})
    await serve.create_backend("new", whoami)
    await serve.create_endpoint("ep", backend="old")
    handle = serve.get_handle("ep")
    running = handle.remote("running")
    await gate.until_inside(1)
    queued = [handle.remote(f"queued-{i}") for i in range(3)]
    await until_queued(serve, "old", 3)
    await serve.set_traffic("ep", {"new": 1.0})
    await asyncio.wait_for(serve.delete_backend("old", force=True), HANG_GUARD_S)
    with pytest.raises(ReplicaStopped):
        await running
    for ref in queued:
        with pytest.raises(ServeError):
            await ref
    assert gate.entries == ["running"]  # the queued ones never ran
    assert gate.cancelled == ["running"]
    assert await handle.remote("after") == "new"
    assert set(serve.list_backends()) == {"new"}


# -- everything at once, under load ----------------------------------------------------------------


def echo(gate: Gate) -> Callable[[Any], Awaitable[dict[str, str]]]:
    """A backend answering with the request id and who answered; it waits at ``gate``."""

    async def handler(item: Any) -> dict[str, str]:
        request_id = item.query_params["id"] if isinstance(item, Request) else item
        for _ in range(5):  # suspend for a few loop turns: requests overlap on each replica
            await asyncio.sleep(0)
        await gate.pass_through(request_id)  # no wait while the gate is open
        ctx = get_replica_context()
        return {"id": request_id, "backend": ctx.backend_tag, "replica": ctx.replica_tag}

    return handler


async def test_no_request_is_lost_or_doubled_while_scaling_and_flipping_traffic(
    served: Serve,
) -> None:
    callers, per_caller = 8, 250  # 2,000 requests; each caller alternates handle and HTTP
    total = callers * per_caller
    gate = Gate()
    gate.release.set()
    config = {"max_concurrent_queries": 2}  # 4 replicas hold the 8 callers' requests at once
    await served.create_backend("blue", echo(gate), config=config)
    await served.create_backend("green", echo(gate), config=config)
    await served.create_endpoint("echo", backend="blue", route="/echo")
    handle = served.get_handle("echo")

    # (after this many finished requests, what to change, whether to make the change while all
    # 8 callers' requests are held inside the 4 replicas in use: scaling 4 -> 1 drains 6 of them)
    steps: list[tuple[int, str, Any, bool]] = [
        (150, "scale", ("blue", 4), False),
        (300, "traffic", {"green": 1.0}, True),
        (450, "scale", ("green", 4), False),
        (600, "scale", ("green", 1), True),
        (750, "traffic", {"blue": 1.0}, False),
        (900, "scale", ("blue", 1), True),
        (1050, "traffic", {"blue": 0.5, "green": 0.5}, False),
        (1200, "traffic", {"green": 1.0}, False),
        (1350, "scale", ("blue", 4), False),
        (1500, "traffic", {"blue": 1.0}, False),
        (1650, "scale", ("blue", 1), True),
        (1800, "traffic", {"green": 1.0}, False),
    ]
    # Phase p: the first p steps are in force. The backends each phase's traffic may choose:
    routable = [{"blue"}]
    for _, kind, arg, _ in steps:
        routable.append(set(arg) if kind == "traffic" else routable[-1])

    sent: list[str] = []
    answers: list[tuple[int, int, dict[str, str]]] = []  # (phase sent, phase answered, answer)
    errors: list[tuple[str, str]] = []
    paths_by_phase: dict[int, set[str]] = {}
    done_at: list[int] = []  # requests finished when each step was in force
    finished = 0
    progress = asyncio.Condition()

    async def one_request(path: str, request_id: str, client: httpx.AsyncClient) -> None:
        nonlocal finished
        sent.append(request_id)
        sent_phase = len(done_at)
        try:
            if path == "handle":
                answer = await handle.remote(request_id)
            else:
                response = await client.get("/echo", params={"id": request_id})
                if response.status_code != 200:
                    raise AssertionError(f"HTTP {response.status_code}: {response.text}")
                answer = response.json()
            answers.append((sent_phase, len(done_at), answer))
        except Exception as exc:
            errors.append((request_id, repr(exc)))
        paths_by_phase.setdefault(len(done_at), set()).add(path)
        finished += 1
        async with progress:
            progress.notify_all()

    async def caller(k: int, client: httpx.AsyncClient) -> None:
        for i in range(per_caller):
            path = ("handle", "http")[(i + k) % 2]
            await one_request(path, f"{path}-{k}-{i}", client)

    async def reconfigure() -> None:
        for threshold, kind, arg, hold in steps:
            async with progress:
                await progress.wait_for(lambda: finished >= threshold)  # noqa: B023
            if hold:
                gate.release.clear()
                await gate.until_inside(callers)
            if kind == "scale":
                await served.update_backend_config(arg[0], {"num_replicas": arg[1]})
            else:
                await served.set_traffic("echo", arg)
            done_at.append(finished)
            gate.release.set()

    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    try:
        async with (
            httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as client,
            asyncio.timeout(45),
        ):
            tasks = [asyncio.create_task(reconfigure())]
            tasks += [asyncio.create_task(caller(k, client)) for k in range(callers)]
            await asyncio.gather(*tasks)
    finally:
        gate.release.set()

    assert errors == []
    ids = [answer["id"] for _, _, answer in answers]
    assert len(sent) == total == len(set(sent))
    assert [i for i, count in Counter(ids).items() if count > 1] == []  # none answered twice
    assert set(ids) == set(sent)  # none lost
    assert Counter(gate.entries) == Counter(sent)  # and each ran exactly once
    for sent_phase, answered_phase, answer in answers:
        # Routed by a traffic dict in force at some moment between sending and answering.
        allowed = set().union(*routable[sent_phase : answered_phase + 1])
        assert answer["backend"] in allowed, (sent_phase, answered_phase, answer)
        assert answer["replica"].startswith(answer["backend"] + "#"), answer
    assert gate.cancelled == []
    # Every step ran while requests were still being answered, through handles and HTTP alike.
    assert len(done_at) == len(steps) and done_at[-1] < total, done_at
    assert paths_by_phase == {phase: {"handle", "http"} for phase in range(len(steps) + 1)}
    assert served.list_backends()["blue"]["num_replicas"] == 1
    assert served.list_backends()["green"]["num_replicas"] == 1
    # Scaling took effect: every replica started answered (4 at once while held); no more.
    blue = {a["replica"] for _, _, a in answers if a["backend"] == "blue"}
    green = {a["replica"] for _, _, a in answers if a["backend"] == "green"}
    assert len(blue) == 1 + 3 + 3, blue
    assert len(green) == 1 + 3, green
