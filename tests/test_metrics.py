"""Tests for aioserve.metrics: ``/-/metrics`` (API.md §4, §7) and ``stat()`` (API.md §7).

The exposition tests send real traffic (over the ``served`` fixture's uvicorn, in process through
the ``http`` fixture, and through handles) and read ``/-/metrics`` back with prometheus-client's own
parser. The ``stat()`` figures are checked twice: through ``Serve`` with handlers that take a known
minimum time, and on :class:`aioserve.metrics.Metrics` directly with a fake clock, where latencies
and the passing of time are exact. Tests synchronise on events and state, never on sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import pathlib
import re
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import prometheus_client
import pytest
from _sample_backends import Gate, until_queued
from prometheus_client.parser import text_string_to_metric_families

import aioserve
from aioserve import Serve
from aioserve.metrics import Metrics
from aioserve.router import MAX_SHADOWS_IN_FLIGHT

WAIT_S = 10.0  # turns a hang into a failure; never reached when things work

# stat() percentiles come from log-spaced buckets; the module promises figures within 5 %.
REL_ERROR = 0.05

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One parsed ``/-/metrics`` answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, Labels], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        """The value of one sample, or None if it is not exposed."""
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str) -> dict[Labels, float]:
        """Every sample called ``name``, by its labels."""
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """The ``(le, cumulative count)`` pairs of one histogram, in bucket order."""
        out = []
        for (n, sample_labels), v in self.samples.items():
            found = dict(sample_labels)
            le = found.pop("le", None)
            if n == f"{name}_bucket" and le is not None and found == labels:
                out.append((float(le), v))
        return sorted(out)


async def scrape(client: httpx.AsyncClient, base: str = "") -> Scrape:
    response = await client.get(f"{base}/-/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain")
    assert "version=0.0.4" in content_type  # the Prometheus text exposition format
    return Scrape(response.text)


def labels_of(scraped: Scrape, name: str, key: str) -> set[str]:
    return {dict(labels)[key] for labels in scraped.labelled(name)}


async def deploy(
    s: Serve,
    name: str,
    func_or_class: Any,
    *,
    route: str | None = "",
    config: dict[str, Any] | None = None,
) -> None:
    """A backend and an endpoint of the same name, at ``/{name}`` unless told otherwise."""
    await s.create_backend(name, func_or_class, config=config)
    await s.create_endpoint(name, backend=name, route=f"/{name}" if route == "" else route)


async def split_endpoint(s: Serve, endpoint: str, route: str | None) -> None:
    """An endpoint split 50/50 over two backends that answer with their own tag."""

    async def answer_a(*args: Any) -> str:
        return "a"

    async def answer_b(*args: Any) -> str:
        return "b"

    await s.create_backend("a", answer_a)
    await s.create_backend("b", answer_b)
    await s.create_endpoint(endpoint, backend="a", route=route)
    await s.set_traffic(endpoint, {"a": 0.5, "b": 0.5})


# -- requests and errors per endpoint and backend ------------------------------------------------


async def test_requests_total_matches_the_answers_of_a_split_over_http_and_handles(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await split_endpoint(serve, "split", "/split")
    answers: collections.Counter[str] = collections.Counter()
    for response in await asyncio.gather(*(http.get("/split") for _ in range(40))):
        assert response.status_code == 200
        answers[response.text] += 1
    handle = serve.get_handle("split")
    answers.update(await asyncio.gather(*(handle.remote() for _ in range(30))))

    assert sum(answers.values()) == 70
    assert answers["a"] > 0 and answers["b"] > 0  # both backends really served
    scraped = await scrape(http)
    assert scraped.value("aioserve_requests_total", endpoint="split", backend="a") == answers["a"]
    assert scraped.value("aioserve_requests_total", endpoint="split", backend="b") == answers["b"]
    assert scraped.value("aioserve_errors_total", endpoint="split", backend="a") == 0
    assert scraped.value("aioserve_errors_total", endpoint="split", backend="b") == 0
    # Every family carries the labels API.md §7 names.
    for labels in scraped.labelled("aioserve_requests_total"):
        assert {k for k, _ in labels} == {"endpoint", "backend"}


async def test_metrics_over_real_uvicorn(served: Serve) -> None:
    await split_endpoint(served, "split", "/split")
    await deploy(served, "other", lambda request: "o")
    assert served.url is not None
    answers: collections.Counter[str] = collections.Counter()
    async with httpx.AsyncClient(base_url=served.url, timeout=WAIT_S) as client:
        for _ in range(20):
            response = await client.get("/split")
            assert response.status_code == 200
            answers[response.text] += 1
        for _ in range(3):
            assert (await client.get("/other")).text == "o"
        scraped = await scrape(client)

    assert answers["a"] + answers["b"] == 20
    assert answers["a"] > 0 and answers["b"] > 0
    assert scraped.value("aioserve_requests_total", endpoint="split", backend="a") == answers["a"]
    assert scraped.value("aioserve_requests_total", endpoint="split", backend="b") == answers["b"]
    assert scraped.value("aioserve_requests_total", endpoint="other", backend="other") == 3
    # The scrape itself is a system route, not an endpoint request.
    assert labels_of(scraped, "aioserve_requests_total", "endpoint") == {"split", "other"}
    assert scraped.value("aioserve_replicas", backend="other") == 1


async def test_errors_total_counts_handler_exceptions_overloads_and_deadlines(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    def boom(*args: Any) -> str:
        raise ValueError("boom")

    await deploy(serve, "boom", boom)
    assert (await http.get("/boom")).status_code == 500
    assert (await http.get("/boom")).status_code == 500
    with pytest.raises(ValueError, match="boom"):
        await serve.get_handle("boom").remote()

    gate = Gate()

    async def held(*args: Any) -> str:
        await gate.pass_through("x")
        return "ok"

    await deploy(serve, "held", held, config={"max_concurrent_queries": 1, "max_queued_queries": 1})
    first = asyncio.ensure_future(http.get("/held"))
    await gate.until_inside(1)
    second = serve.get_handle("held").remote()  # waits: the one slot is taken
    await until_queued(serve, "held", 1)
    assert serve.stat(agg_windows_seconds=[10])["backends"]["held"]["queue_depth"] == 1
    overloaded = await http.get("/held")  # the queue is full: fails fast
    assert overloaded.status_code == 503
    late = serve.get_handle("held", absolute_slo_ms=1.0)  # a deadline long passed
    with pytest.raises(TimeoutError):
        await late.remote()
    gate.release.set()
    assert (await asyncio.wait_for(first, WAIT_S)).text == "ok"
    assert await asyncio.wait_for(second, WAIT_S) == "ok"

    scraped = await scrape(http)
    assert scraped.value("aioserve_requests_total", endpoint="boom", backend="boom") == 3
    assert scraped.value("aioserve_errors_total", endpoint="boom", backend="boom") == 3
    assert scraped.value("aioserve_requests_total", endpoint="held", backend="held") == 4
    assert scraped.value("aioserve_errors_total", endpoint="held", backend="held") == 2
    stats = serve.stat(agg_windows_seconds=[10])
    assert stats["endpoints"]["boom"]["num_errors"] == 3
    assert stats["backends"]["held"]["num_errors_10_window"] == 2
    assert stats["backends"]["held"]["num_requests_10_window"] == 4


# -- histograms ----------------------------------------------------------------------------------


async def test_latency_histogram_is_consistent_and_sees_the_processing_time(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    processing_s = 0.03

    async def slow(*args: Any) -> str:
        await asyncio.sleep(processing_s)  # the work itself takes this long: the known latency
        return "done"

    async def fast(*args: Any) -> str:
        return "done"

    await deploy(serve, "slow", slow)
    await deploy(serve, "fast", fast)
    responses = await asyncio.gather(*(http.get("/slow") for _ in range(5)))
    assert [r.text for r in responses] == ["done"] * 5
    assert (
        await asyncio.gather(*(serve.get_handle("fast").remote() for _ in range(7))) == ["done"] * 7
    )

    scraped = await scrape(http)
    name = "aioserve_request_latency_seconds"
    for endpoint, n in (("slow", 5), ("fast", 7)):
        labels = {"endpoint": endpoint, "backend": endpoint}
        buckets = scraped.buckets(name, **labels)
        assert buckets[-1][0] == math.inf
        counts = [c for _, c in buckets]
        assert counts == sorted(counts)  # cumulative
        assert counts[-1] == n
        assert scraped.value(f"{name}_count", **labels) == n
        total = scraped.value(f"{name}_sum", **labels)
        assert total is not None and total > 0
        assert scraped.value("aioserve_requests_total", **labels) == n
    # No slow request can fall in a bucket below its processing time; their sum shows it too.
    slow_buckets = dict(scraped.buckets(name, endpoint="slow", backend="slow"))
    assert slow_buckets[0.025] == 0
    slow_sum = scraped.value(f"{name}_sum", endpoint="slow", backend="slow")
    assert slow_sum is not None and slow_sum >= 5 * processing_s * 0.99


async def test_queue_wait_is_observed_only_for_requests_that_waited(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    gate = Gate()

    async def held(item: Any) -> Any:
        if item == "hold":
            return await gate.pass_through(item)
        return item

    await deploy(serve, "q", held, route=None, config={"max_concurrent_queries": 1})
    handle = serve.get_handle("q")
    for i in range(6):  # one after the other: each finds the replica free
        assert await handle.remote(i) == i
    scraped = await scrape(http)
    # Six requests that found a free replica: none of them waited, so nothing is observed.
    assert scraped.value("aioserve_requests_total", endpoint="q", backend="q") == 6
    assert not scraped.value("aioserve_queue_wait_seconds_count", backend="q", method="__call__")

    holder = handle.remote("hold")
    await gate.until_inside(1)
    waiters = [handle.remote(i) for i in range(2)]  # the only slot is taken: both wait
    await until_queued(serve, "q", 2)
    gate.release.set()
    assert await asyncio.wait_for(holder, WAIT_S) == "hold"
    assert await asyncio.wait_for(asyncio.gather(*waiters), WAIT_S) == [0, 1]

    scraped = await scrape(http)
    assert scraped.value("aioserve_queue_wait_seconds_count", backend="q", method="__call__") == 2
    wait_sum = scraped.value("aioserve_queue_wait_seconds_sum", backend="q", method="__call__")
    assert wait_sum is not None and wait_sum > 0
    counts = [
        c for _, c in scraped.buckets("aioserve_queue_wait_seconds", backend="q", method="__call__")
    ]
    assert counts == sorted(counts) and counts[-1] == 2


async def test_batch_size_histogram_sees_a_batch_of_four(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    @aioserve.accept_batch
    async def double(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    # A long wait: the batch goes as soon as it is full, so four calls make one batch of four.
    await deploy(
        serve,
        "double",
        double,
        route=None,
        config={"max_batch_size": 4, "batch_wait_timeout": WAIT_S},
    )
    handle = serve.get_handle("double")
    assert await asyncio.gather(*(handle.remote(i) for i in range(4))) == [0, 2, 4, 6]

    scraped = await scrape(http)
    assert scraped.value("aioserve_batch_size_count", backend="double", method="__call__") == 1
    assert scraped.value("aioserve_batch_size_sum", backend="double", method="__call__") == 4
    buckets = dict(scraped.buckets("aioserve_batch_size", backend="double", method="__call__"))
    assert buckets[2.0] == 0
    assert buckets[4.0] == 1
    assert scraped.value("aioserve_requests_total", endpoint="double", backend="double") == 4


# -- gauges --------------------------------------------------------------------------------------


async def test_queue_depth_and_in_flight_while_a_replica_is_held(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    gate = Gate()

    async def held(item: Any) -> Any:
        return await gate.pass_through(item)

    await deploy(serve, "held", held, route=None, config={"max_concurrent_queries": 1})
    handle = serve.get_handle("held")
    running = handle.remote("first")
    await gate.until_inside(1)
    waiting = [handle.remote(i) for i in range(3)]
    await until_queued(serve, "held", 3)

    scraped = await scrape(http)
    assert scraped.value("aioserve_queue_depth", backend="held") == 3
    in_flight = scraped.labelled("aioserve_replica_in_flight")
    assert len(in_flight) == 1
    (labels, value), *_ = in_flight.items()
    assert dict(labels)["backend"] == "held"
    assert dict(labels)["replica"].startswith("held#")
    assert value == 1
    stats = serve.stat(agg_windows_seconds=[10])["backends"]["held"]
    assert stats["queue_depth"] == 3
    assert stats["in_flight"] == 1

    gate.release.set()
    assert await asyncio.wait_for(asyncio.gather(running, *waiting), WAIT_S) == ["first", 0, 1, 2]
    scraped = await scrape(http)
    assert scraped.value("aioserve_queue_depth", backend="held") == 0
    assert set(scraped.labelled("aioserve_replica_in_flight").values()) == {0}


async def test_in_flight_is_per_replica(serve: Serve, http: httpx.AsyncClient) -> None:
    gate = Gate()

    async def held(item: Any) -> Any:
        return await gate.pass_through(item)

    await deploy(
        serve, "pair", held, route=None, config={"num_replicas": 2, "max_concurrent_queries": 1}
    )
    handle = serve.get_handle("pair")
    calls = [handle.remote(i) for i in range(2)]
    await gate.until_inside(2)

    scraped = await scrape(http)
    in_flight = scraped.labelled("aioserve_replica_in_flight")
    replicas = {dict(labels)["replica"] for labels in in_flight}
    assert len(replicas) == 2
    assert all(re.fullmatch(r"pair#\S+", tag) for tag in replicas)
    assert sorted(in_flight.values()) == [1, 1]  # one request on each replica
    assert scraped.value("aioserve_queue_depth", backend="pair") == 0

    gate.release.set()
    assert await asyncio.wait_for(asyncio.gather(*calls), WAIT_S) == [0, 1]
    scraped = await scrape(http)
    assert sorted(scraped.labelled("aioserve_replica_in_flight").values()) == [0, 0]


async def test_replicas_gauge_follows_update_backend_config(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    await deploy(serve, "r", lambda request: "r", config={"num_replicas": 3})
    await deploy(serve, "single", lambda request: "s")
    scraped = await scrape(http)
    assert scraped.value("aioserve_replicas", backend="r") == 3
    assert scraped.value("aioserve_replicas", backend="single") == 1
    assert len(labels_of(scraped, "aioserve_replica_in_flight", "replica")) == 4

    await serve.update_backend_config("r", {"num_replicas": 1})
    scraped = await scrape(http)
    assert scraped.value("aioserve_replicas", backend="r") == 1
    assert scraped.value("aioserve_replicas", backend="single") == 1

    await serve.update_backend_config("r", {"num_replicas": 2})
    scraped = await scrape(http)
    assert scraped.value("aioserve_replicas", backend="r") == 2
    replicas_of_r = {
        dict(labels)["replica"]
        for labels in scraped.labelled("aioserve_replica_in_flight")
        if dict(labels)["backend"] == "r"
    }
    assert len(replicas_of_r) == 2
    assert serve.stat(agg_windows_seconds=[10])["backends"]["r"]["num_replicas"] == 2

    await serve.delete_endpoint("r")
    await serve.delete_backend("r")
    scraped = await scrape(http)
    assert scraped.value("aioserve_replicas", backend="r") is None
    assert scraped.value("aioserve_replicas", backend="single") == 1


async def test_shadows_dropped_total_counts_copies_past_the_in_flight_bound(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    release = asyncio.Event()

    async def primary(item: Any) -> Any:
        return item

    async def shadow(item: Any) -> None:
        await release.wait()  # every shadow copy stays in flight until released

    await deploy(serve, "main", primary, route=None)
    await serve.create_backend(
        "shadow", shadow, config={"max_concurrent_queries": 100, "max_queued_queries": None}
    )
    scraped = await scrape(http)
    assert scraped.value("aioserve_shadows_dropped_total") == 0

    await serve.shadow_traffic("main", "shadow", 1.0)
    handle = serve.get_handle("main")
    extra = 5
    n = MAX_SHADOWS_IN_FLIGHT + extra
    try:
        assert await asyncio.gather(*(handle.remote(i) for i in range(n))) == list(range(n))
        scraped = await scrape(http)
        assert scraped.value("aioserve_shadows_dropped_total") == extra
    finally:
        release.set()  # the held copies finish, so shutdown need not wait out a drain


# -- instances -----------------------------------------------------------------------------------


async def test_two_instances_in_one_process_keep_separate_metrics() -> None:
    async with (
        Serve(http_options={"location": "NoServer"}) as one,
        Serve(http_options={"location": "NoServer"}) as two,
    ):
        # The same names in both: only separate registries keep them apart.
        for s, answer in ((one, "one"), (two, "two")):
            await deploy(s, "ep", lambda request, answer=answer: answer)
        await deploy(two, "only_two", lambda request: "2", config={"num_replicas": 2})
        for _ in range(3):
            assert await one.get_handle("ep").remote() == "one"
        for _ in range(5):
            assert await two.get_handle("ep").remote() == "two"

        scraped = {}
        for name, s in (("one", one), ("two", two)):
            transport = httpx.ASGITransport(app=s.asgi_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                scraped[name] = await scrape(client)

    assert one.metrics.registry is not two.metrics.registry
    assert scraped["one"].value("aioserve_requests_total", endpoint="ep", backend="ep") == 3
    assert scraped["two"].value("aioserve_requests_total", endpoint="ep", backend="ep") == 5
    assert labels_of(scraped["one"], "aioserve_replicas", "backend") == {"ep"}
    assert labels_of(scraped["two"], "aioserve_replicas", "backend") == {"ep", "only_two"}
    assert scraped["two"].value("aioserve_replicas", backend="only_two") == 2
    # Nothing lands in prometheus-client's process-wide default registry either.
    assert b"aioserve_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# -- stat() through Serve ------------------------------------------------------------------------


def expected_keys(percentiles: list[Any], windows: list[int]) -> set[str]:
    keys = {"num_requests", "num_errors"}
    for w in windows:
        keys |= {f"num_requests_{w}_window", f"num_errors_{w}_window"}
        keys |= {f"latency_ms_{p}th_perc_{w}_window" for p in percentiles}
    return keys


async def test_stat_has_the_08_shape_for_the_given_percentiles_and_windows(serve: Serve) -> None:
    await deploy(serve, "echo", lambda request: "e", route=None)
    assert await serve.get_handle("echo").remote() == "e"

    default = serve.stat()
    assert set(default) >= {"endpoints", "backends"}
    assert set(default["endpoints"]) == {"echo"}
    assert set(default["backends"]) == {"echo"}
    keys = expected_keys([50, 90, 95], [10, 60, 300, 600, 3600])
    assert set(default["endpoints"]["echo"]) == keys
    assert set(default["backends"]["echo"]) >= keys

    custom = serve.stat(percentiles=[99, 99.9], agg_windows_seconds=[5, 30])
    keys = expected_keys(["99", "99.9"], [5, 30])
    assert set(custom["endpoints"]["echo"]) == keys
    assert set(custom["backends"]["echo"]) >= keys
    assert not any("_50th_" in key for key in custom["backends"]["echo"])
    assert custom["endpoints"]["echo"]["num_requests_5_window"] == 1


async def test_stat_values_after_known_latencies(serve: Serve) -> None:
    slow_s = 0.2

    async def slow(*args: Any) -> str:
        await asyncio.sleep(slow_s)  # the work takes at least this long: the known latency
        return "slow"

    async def fast(*args: Any) -> str:
        return "fast"

    await serve.create_backend("slow", slow)
    await serve.create_backend("fast", fast)
    await serve.create_endpoint("mixed", backend="fast")
    await serve.set_traffic("mixed", {"slow": 0.5, "fast": 0.5})
    answers = collections.Counter(
        await asyncio.gather(*(serve.get_handle("mixed").remote() for _ in range(20)))
    )
    assert answers["slow"] > 0 and answers["fast"] > 0

    stats = serve.stat(percentiles=[50, 95], agg_windows_seconds=[10, 60])
    slow_stats, fast_stats = stats["backends"]["slow"], stats["backends"]["fast"]
    assert slow_stats["num_requests"] == slow_stats["num_requests_10_window"] == answers["slow"]
    assert fast_stats["num_requests_60_window"] == answers["fast"]
    assert stats["endpoints"]["mixed"]["num_requests_10_window"] == 20
    assert stats["endpoints"]["mixed"]["num_errors_10_window"] == 0
    for key in ("latency_ms_50th_perc_10_window", "latency_ms_95th_perc_60_window"):
        assert slow_stats[key] >= slow_s * 1000 * (1 - REL_ERROR)
        assert slow_stats[key] < 10_000  # milliseconds, not microseconds
        assert fast_stats[key] < slow_stats["latency_ms_50th_perc_10_window"]
    # The endpoint mixes both: its 95th percentile is a slow request.
    mixed = stats["endpoints"]["mixed"]
    assert mixed["latency_ms_95th_perc_10_window"] >= slow_s * 1000 * (1 - REL_ERROR)


async def test_stat_refuses_windows_longer_than_gc_window_seconds() -> None:
    async with Serve(http_options={"location": "NoServer"}, gc_window_seconds=60) as s:
        assert "backends" in s.stat(agg_windows_seconds=[10, 60])
        with pytest.raises(ValueError, match="gc_window_seconds"):
            s.stat(agg_windows_seconds=[10, 61])
        with pytest.raises(ValueError, match="gc_window_seconds"):
            s.stat()  # the default windows go up to 3600 s


# -- stat() on Metrics with a fake clock ---------------------------------------------------------


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def within(value: float | None, expected_ms: float) -> bool:
    return value is not None and abs(value - expected_ms) <= expected_ms * REL_ERROR


def test_percentiles_are_within_the_documented_bucket_error() -> None:
    clock = FakeClock()
    metrics = Metrics(gc_window_seconds=600, clock=clock)
    series = metrics.series("ep", "be")
    for ms in range(1, 101):  # 1 ms .. 100 ms, one each
        series.observe(ms / 1000.0, False)
    stats = metrics.stat(percentiles=[10, 50, 90, 99], agg_windows_seconds=[60])
    figures = stats["backends"]["be"]
    assert figures["num_requests_60_window"] == 100
    for pct in (10, 50, 90, 99):
        assert within(figures[f"latency_ms_{pct}th_perc_60_window"], pct), pct
    assert stats["endpoints"]["ep"] == {
        k: v for k, v in figures.items() if k in stats["endpoints"]["ep"]
    }

    mixed = Metrics(clock=clock)
    series = mixed.series("ep", "be")
    for _ in range(90):
        series.observe(0.010, False)
    for _ in range(10):
        series.observe(0.100, True)
    figures = mixed.stat(percentiles=[50, 90, 95], agg_windows_seconds=[10])["endpoints"]["ep"]
    assert within(figures["latency_ms_50th_perc_10_window"], 10)
    assert within(figures["latency_ms_90th_perc_10_window"], 10)
    assert within(figures["latency_ms_95th_perc_10_window"], 100)
    assert figures["num_requests_10_window"] == 100
    assert figures["num_errors_10_window"] == 10
    assert figures["num_errors"] == 10


def test_stat_aggregates_endpoints_and_backends_across_series() -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    for endpoint, backend, n, latency_s in (
        ("e1", "b1", 3, 0.001),
        ("e1", "b2", 2, 0.002),
        ("e2", "b2", 5, 0.050),
    ):
        series = metrics.series(endpoint, backend)
        for _ in range(n):
            series.observe(latency_s, False)
    stats = metrics.stat(percentiles=[50, 95], agg_windows_seconds=[10])
    assert {k: v["num_requests_10_window"] for k, v in stats["endpoints"].items()} == {
        "e1": 5,
        "e2": 5,
    }
    assert {k: v["num_requests"] for k, v in stats["backends"].items()} == {"b1": 3, "b2": 7}
    assert within(stats["endpoints"]["e1"]["latency_ms_50th_perc_10_window"], 1)
    assert within(stats["endpoints"]["e1"]["latency_ms_95th_perc_10_window"], 2)
    assert within(stats["backends"]["b2"]["latency_ms_50th_perc_10_window"], 50)
    assert within(stats["backends"]["b2"]["latency_ms_95th_perc_10_window"], 50)


def test_windows_exclude_seconds_older_than_the_window() -> None:
    clock = FakeClock(1000.0)
    metrics = Metrics(gc_window_seconds=120, clock=clock)
    series = metrics.series("ep", "be")
    for _ in range(5):
        series.observe(0.010, False)
    clock.now += 30
    for _ in range(3):
        series.observe(0.100, True)
    clock.now += 9  # the fast requests are 39 s old, the slow ones 9 s

    stats = metrics.stat(percentiles=[50], agg_windows_seconds=[10, 60])["endpoints"]["ep"]
    assert stats["num_requests_10_window"] == 3
    assert stats["num_errors_10_window"] == 3
    assert within(stats["latency_ms_50th_perc_10_window"], 100)
    assert stats["num_requests_60_window"] == 8
    assert within(stats["latency_ms_50th_perc_60_window"], 10)
    assert stats["num_requests"] == 8  # the totals never expire

    clock.now += 2  # now 11 s: out of the 10 s window, still in the 60 s one
    stats = metrics.stat(percentiles=[50], agg_windows_seconds=[10, 60])["endpoints"]["ep"]
    assert stats["num_requests_10_window"] == 0
    assert stats["num_errors_10_window"] == 0
    assert stats["num_requests_60_window"] == 8

    clock.now += 200  # everything is older than any window
    stats = metrics.stat(percentiles=[50], agg_windows_seconds=[120])["endpoints"]["ep"]
    assert stats["num_requests_120_window"] == 0
    assert stats["num_requests"] == 8


@pytest.mark.parametrize("windows", [[3601], [10, 7200]])
def test_metrics_refuse_windows_longer_than_gc_window_seconds(windows: list[int]) -> None:
    with pytest.raises(ValueError, match="gc_window_seconds"):
        Metrics(gc_window_seconds=3600).stat(agg_windows_seconds=windows)


@pytest.mark.parametrize("bad", [[0], [-5], [101], [150.0], [math.nan], [50, 0]])
def test_stat_rejects_percentiles_out_of_range(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="percentiles"):
        Metrics().stat(percentiles=bad, agg_windows_seconds=[10])


@pytest.mark.parametrize("bad", [[], "50", 50, ["50"], [True], [None]])
def test_stat_rejects_percentiles_of_the_wrong_kind(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="percentiles"):
        Metrics().stat(percentiles=bad, agg_windows_seconds=[10])


@pytest.mark.parametrize("bad", [[0], [-10], [10, 0], [1.5], ["10"], [True], [], "10", 10, None])
def test_stat_rejects_bad_windows(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="agg_windows_seconds"):
        Metrics().stat(percentiles=[50], agg_windows_seconds=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "60", True, None])
def test_gc_window_seconds_is_validated(bad: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="gc_window_seconds"):
        Metrics(gc_window_seconds=bad)
    with pytest.raises((TypeError, ValueError), match="gc_window_seconds"):
        Serve(http_options={"location": "NoServer"}, gc_window_seconds=bad)


@contextlib.contextmanager
def package_memory() -> Iterator[Callable[[], int]]:
    """Trace the memory that aioserve's own code allocates (whatever else runs meanwhile); yields
    a function returning the bytes of it held now."""
    package = tracemalloc.Filter(True, str(pathlib.Path(aioserve.__file__).parent / "*"))

    def held() -> int:
        traces = tracemalloc.take_snapshot().filter_traces([package])
        return sum(stat.size for stat in traces.statistics("filename"))

    tracemalloc.start()
    try:
        yield held
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_however_long_it_runs() -> None:
    gc_window = 20
    clock = FakeClock(0.0)
    metrics = Metrics(gc_window_seconds=gc_window, clock=clock)
    series = metrics.series("ep", "be")
    held_after: list[int] = []
    with package_memory() as held:
        for _ in range(10):  # 10 x gc_window_seconds, four requests a second
            for _ in range(gc_window * 4):
                for _ in range(4):
                    series.observe(0.005, False)
                clock.now += 0.25
            held_after.append(held())
    # What a full window of seconds takes is held after the first; it does not grow after that.
    # (Were old seconds kept, each further window would add as much again.)
    assert held_after[-1] - held_after[1] < held_after[0] / 2, held_after
    # The answers are still right after the old seconds were dropped.
    clock.now -= 0.25  # back to the second of the last observations
    figures = metrics.stat(percentiles=[50], agg_windows_seconds=[gc_window])["endpoints"]["ep"]
    assert figures["num_requests"] == 10 * gc_window * 16
    assert figures[f"num_requests_{gc_window}_window"] == gc_window * 16
    assert within(figures[f"latency_ms_50th_perc_{gc_window}_window"], 5)


def latency_buckets(metrics: Metrics) -> dict[str, float]:
    """The cumulative counts of the latency histogram, read back from the exposition text."""
    text = metrics.exposition().decode()
    return {
        sample.labels["le"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "aioserve_request_latency_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }


def test_latency_buckets_are_exact_at_and_just_past_each_bound() -> None:
    # Latencies are bucketed in bulk on a finer table; a value on a bound must still count as
    # "le" that bound, and the smallest value above it in the next bucket.
    metrics = Metrics(clock=FakeClock())
    series = metrics.series("ep", "be")
    bounds = aioserve.metrics.LATENCY_BUCKETS_S
    for bound in bounds:
        series.observe(bound, False)
        series.observe(math.nextafter(bound, math.inf), False)
    buckets = latency_buckets(metrics)
    for i, bound in enumerate(bounds):
        # Every bound below and this one; every value just past a lower bound.
        assert buckets[repr(float(bound))] == 2 * i + 1, bound
    assert buckets["+Inf"] == 2 * len(bounds)


def test_a_new_second_separates_observations_not_yet_read() -> None:
    # Nothing reads the figures between the two bursts: the first burst is still unsorted when
    # the second begins, and must stay in its own second.
    clock = FakeClock(1000.2)
    metrics = Metrics(clock=clock)
    series = metrics.series("ep", "be")
    for _ in range(1000):
        series.observe(0.001, False)
    clock.now = 1001.1
    for _ in range(7):
        series.observe(0.200, True)
    clock.now = 1010.5  # the 10 s window holds seconds 1001 .. 1010, not 1000
    figures = metrics.stat(percentiles=[50], agg_windows_seconds=[10, 60])["endpoints"]["ep"]
    assert figures["num_requests_10_window"] == 7
    assert figures["num_errors_10_window"] == 7
    assert within(figures["latency_ms_50th_perc_10_window"], 200)
    assert figures["num_requests_60_window"] == 1007
    assert within(figures["latency_ms_50th_perc_60_window"], 1)
    assert figures["num_requests"] == 1007
    assert figures["num_errors"] == 7


def test_a_burst_within_one_second_keeps_few_latencies_unsorted() -> None:
    metrics = Metrics(clock=FakeClock())
    series = metrics.series("ep", "be")
    with package_memory() as held:
        for _ in range(10_000):
            series.observe(0.002, False)
        burst_held = held()
    # Nothing has read the figures yet: keeping every latency of the burst until then would hold
    # a list of 10,000 of them.
    assert burst_held < sys.getsizeof([0.002] * 10_000) / 4, burst_held
    assert series.num_requests == 10_000
    assert latency_buckets(metrics)["0.0025"] == 10_000


# -- the sync facade -----------------------------------------------------------------------------


def test_stat_through_the_sync_facade(client: aioserve.Client) -> None:
    client.create_backend("echo", lambda request: "e")
    client.create_endpoint("echo", backend="echo", route="/echo")
    handle = client.get_handle("echo")
    assert [handle.remote().result(WAIT_S) for _ in range(3)] == ["e"] * 3
    assert client.url is not None
    with httpx.Client(base_url=client.url, timeout=WAIT_S) as http_client:
        for _ in range(2):
            assert http_client.get("/echo").text == "e"
        metrics = http_client.get("/-/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    scraped = Scrape(metrics.text)
    assert scraped.value("aioserve_requests_total", endpoint="echo", backend="echo") == 5

    for stats in (
        client.stat(percentiles=[50], agg_windows_seconds=[10]),
        aioserve.stat(percentiles=[50], agg_windows_seconds=[10]),
    ):
        assert stats["endpoints"]["echo"]["num_requests_10_window"] == 5
        assert stats["backends"]["echo"]["num_requests"] == 5
        assert stats["endpoints"]["echo"]["latency_ms_50th_perc_10_window"] > 0
    assert set(aioserve.stat()["endpoints"]["echo"]) == expected_keys(
        [50, 90, 95], [10, 60, 300, 600, 3600]
    )
