"""Tests for aioserve.exposition: a snapshot of the exported families renders the same text as
the instance's own ``/-/metrics``, survives JSON, and adds up the way Prometheus expects of the
workers of one server (counters and histograms summed, gauges only from running workers)."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aioserve.exposition import Snapshot
from aioserve.metrics import BackendStatistics, Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def busy_metrics(requests: int = 10, queued: int = 3) -> Metrics:
    """Metrics with every family holding samples."""
    clock = FakeClock()
    metrics = Metrics(
        clock=clock,
        gauges=lambda: [BackendStatistics("model", 2, queued, {"model#a": 1, "model#b": 2})],
    )
    for i in range(requests):
        clock.now += 0.1
        metrics.series("predict", "model").observe(0.002 * (i + 1), error=i % 5 == 0)
    metrics.observe_queue_wait("model", "__call__", 0.03)
    metrics.observe_batch("model", "__call__", 4)
    metrics.num_shadows_dropped = 2
    return metrics


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    families = list(text_string_to_metric_families(text.decode()))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"a family is exposed twice: {names}"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def test_a_snapshot_renders_what_the_instance_exposes() -> None:
    metrics = busy_metrics()
    text = metrics.snapshot().render()
    assert text == metrics.exposition()
    found = samples(text)
    labels = frozenset({("endpoint", "predict"), ("backend", "model")})
    assert found[("aioserve_requests_total", labels)] == 10
    assert found[("aioserve_errors_total", labels)] == 2
    assert found[("aioserve_request_latency_seconds_count", labels)] == 10
    replica = frozenset({("backend", "model"), ("replica", "model#b")})
    assert found[("aioserve_replica_in_flight", replica)] == 2
    # One process: no count of workers.
    assert not any(name == "aioserve_workers" for name, _ in found)


def test_a_snapshot_survives_json() -> None:
    snapshot = busy_metrics().snapshot()
    again = Snapshot.from_json(json.loads(json.dumps(snapshot.to_json())))
    assert again == snapshot
    assert again.render() == snapshot.render()


def test_snapshots_add_up_counters_histograms_and_running_workers_gauges() -> None:
    one = busy_metrics(requests=10, queued=3).snapshot()
    two = busy_metrics(requests=4, queued=5).snapshot()
    exited = busy_metrics(requests=6, queued=7).snapshot()
    total = Snapshot()
    total.add(one)
    total.add(two)
    total.add(exited, gauges=False)
    total.num_workers = 2
    found = samples(total.render())
    labels = frozenset({("endpoint", "predict"), ("backend", "model")})
    assert found[("aioserve_requests_total", labels)] == 20
    assert found[("aioserve_errors_total", labels)] == 2 + 1 + 2
    assert found[("aioserve_request_latency_seconds_count", labels)] == 20
    # Requests took 2 ms, 4 ms, ...: the first of each of the three, at most 2.5 ms.
    assert found[("aioserve_request_latency_seconds_bucket", labels | {("le", "0.0025")})] == 3
    assert found[("aioserve_shadows_dropped_total", frozenset())] == 6
    # Gauges: the two running workers only.
    assert found[("aioserve_queue_depth", frozenset({("backend", "model")}))] == 3 + 5
    assert found[("aioserve_replicas", frozenset({("backend", "model")}))] == 4
    assert found[("aioserve_workers", frozenset())] == 2
    # Adding copied the values: the parts are unchanged.
    assert samples(one.render())[("aioserve_requests_total", labels)] == 10


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ({"aioserve_requests": [[["only-endpoint"], 1]]}, "do not fit 'aioserve_requests'"),
        ({"aioserve_requests": [[["e", "b"], "many"]]}, "does not fit counter"),
        ({"aioserve_requests": [[["e", "b"], True]]}, "does not fit counter"),
        ({"aioserve_batch_size": [[["b", "m"], [1, 2, 3]]]}, "does not fit histogram"),
    ],
)
def test_a_document_of_the_wrong_shape_is_refused(
    document: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        Snapshot.from_json(document)


def test_families_a_document_has_and_this_version_does_not_are_left_out() -> None:
    snapshot = Snapshot.from_json(
        {"aioserve_requests": [[["e", "b"], 3]], "aioserve_from_the_future": [[[], 1]]}
    )
    assert (
        samples(snapshot.render())[
            ("aioserve_requests_total", frozenset({("endpoint", "e"), ("backend", "b")}))
        ]
        == 3
    )
