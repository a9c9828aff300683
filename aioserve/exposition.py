"""What ``GET /-/metrics`` exports: the table of metric families, a :class:`Snapshot` of their
values, and its Prometheus text.

A snapshot is plain data (numbers and lists of numbers keyed by label values), so snapshots of
several processes can be added up (:meth:`Snapshot.add`) and stored as JSON: that is how the
workers of ``aioserve run --workers N`` give one scrape the whole server's figures (see
:mod:`aioserve.workermetrics`). A histogram's value is its per-bucket counts (not cumulative, the
last one above every bound) followed by the sum of the observed values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeAlias

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["FAMILIES", "Family", "Snapshot"]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

Labels: TypeAlias = tuple[str, ...]
# A counter's or a gauge's number, or a histogram's [count per bucket..., sum].
Value: TypeAlias = float | list[float]


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """One exported metric family (its name without the ``_total`` a counter gets)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    documentation: str
    labels: Labels = ()
    bounds: tuple[float, ...] = ()  # a histogram's bucket bounds

    def metric(self, samples: Mapping[Labels, Value]) -> Metric:
        """The prometheus-client family holding ``samples``."""
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
            for labels, value in samples.items():
                if isinstance(value, list):
                    histogram.add_metric(list(labels), _cumulative(self.bounds, value), value[-1])
            return histogram
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        metric = cls(self.name, self.documentation, labels=self.labels)
        for labels, value in samples.items():
            if not isinstance(value, list):
                metric.add_metric(list(labels), value)
        return metric


REQUESTS = Family(
    "aioserve_requests",
    "counter",
    "Requests answered, per endpoint and backend.",
    ("endpoint", "backend"),
)
ERRORS = Family(
    "aioserve_errors",
    "counter",
    "Requests that failed, per endpoint and backend.",
    ("endpoint", "backend"),
)
LATENCY = Family(
    "aioserve_request_latency_seconds",
    "histogram",
    "Time from routing a request to its result, queueing included.",
    ("endpoint", "backend"),
    LATENCY_BUCKETS_S,
)
QUEUE_WAIT = Family(
    "aioserve_queue_wait_seconds",
    "histogram",
    "Time requests spent waiting for a replica (those that had to) or for their batch.",
    ("backend", "method"),
    LATENCY_BUCKETS_S,
)
BATCH_SIZE = Family(
    "aioserve_batch_size",
    "histogram",
    "Requests per batch, per batch queue (config-driven or @serve.batch).",
    ("backend", "method"),
    BATCH_BUCKETS,
)
QUEUE_DEPTH = Family(
    "aioserve_queue_depth", "gauge", "Requests waiting for a replica.", ("backend",)
)
REPLICAS = Family("aioserve_replicas", "gauge", "Replicas serving a backend.", ("backend",))
IN_FLIGHT = Family(
    "aioserve_replica_in_flight",
    "gauge",
    "Requests running on (or assigned to) a replica.",
    ("backend", "replica"),
)
SHADOWS_DROPPED = Family(
    "aioserve_shadows_dropped",
    "counter",
    "Shadow copies dropped because too many were in flight.",
)
# Only under --workers: how many worker processes a scrape's figures come from.
WORKERS = Family(
    "aioserve_workers",
    "gauge",
    "Worker processes running (aioserve run --workers); the other families sum their figures.",
)

# In exposition order.
FAMILIES: tuple[Family, ...] = (
    REQUESTS,
    ERRORS,
    LATENCY,
    QUEUE_WAIT,
    BATCH_SIZE,
    QUEUE_DEPTH,
    REPLICAS,
    IN_FLIGHT,
    SHADOWS_DROPPED,
)
_BY_NAME = {family.name: family for family in FAMILIES}


class Snapshot:
    """The values of every family at one moment, by family name and then by label values.

    ``num_workers`` is None for one process; a snapshot summed over the workers of a server
    sets it, and its text then has the ``aioserve_workers`` gauge too.
    """

    __slots__ = ("num_workers", "values")

    def __init__(self) -> None:
        self.values: dict[str, dict[Labels, Value]] = {family.name: {} for family in FAMILIES}
        self.num_workers: int | None = None

    def __repr__(self) -> str:
        size = sum(len(samples) for samples in self.values.values())
        return f"<Snapshot samples={size} num_workers={self.num_workers}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return self.values == other.values and self.num_workers == other.num_workers

    __hash__ = None  # type: ignore[assignment]

    def add(self, other: Snapshot, *, gauges: bool = True) -> None:
        """Add ``other``'s counts to these; its gauges too unless ``gauges`` is false (the
        figures of a process that has exited: what it counted stays, what it held is gone)."""
        for name, samples in other.values.items():
            if not gauges and _BY_NAME[name].kind == "gauge":
                continue
            mine = self.values[name]
            for labels, value in samples.items():
                old = mine.get(labels)
                if isinstance(value, list):
                    # Both lists, of one length: from_json checked the shape against the family.
                    mine[labels] = value[:] if old is None else _add_lists(old, value)
                else:
                    mine[labels] = value if old is None else _add_numbers(old, value)

    # -- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form, read back by :meth:`from_json`."""
        return {
            name: [[list(labels), value] for labels, value in samples.items()]
            for name, samples in self.values.items()
            if samples
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """A snapshot from :meth:`to_json`'s form; ``ValueError`` if it does not have that shape
        (families it does not know are left out)."""
        snapshot = cls()
        for name, samples in data.items():
            family = _BY_NAME.get(name)
            if family is None:
                continue
            values = snapshot.values[name]
            for sample in samples:
                labels, value = sample
                if len(labels) != len(family.labels) or not all(isinstance(v, str) for v in labels):
                    raise ValueError(f"Labels {labels!r} do not fit {name!r}{family.labels!r}.")
                values[tuple(labels)] = _check_value(family, value)
        return snapshot

    # -- Prometheus text ------------------------------------------------------------------------

    def metrics(self) -> Iterator[Metric]:
        """The families with their samples, as a prometheus-client collector yields them."""
        for family in FAMILIES:
            yield family.metric(self.values[family.name])
        if self.num_workers is not None:
            yield WORKERS.metric({(): self.num_workers})

    def render(self) -> bytes:
        """The Prometheus text exposition of this snapshot."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return self._snapshot.metrics()


def _add_lists(old: Value, value: list[float]) -> list[float]:
    if not isinstance(old, list):
        raise TypeError(f"Cannot add the histogram {value!r} to the number {old!r}.")
    return [a + b for a, b in zip(old, value, strict=True)]


def _add_numbers(old: Value, value: float) -> float:
    if isinstance(old, list):
        raise TypeError(f"Cannot add the number {value!r} to the histogram {old!r}.")
    return old + value


def _check_value(family: Family, value: Any) -> Value:
    if family.kind == "histogram":
        if (
            isinstance(value, list)
            and len(value) == len(family.bounds) + 2
            and all(_is_number(v) for v in value)
        ):
            return value
    elif _is_number(value):
        return value  # type: ignore[no-any-return]
    raise ValueError(f"Value {value!r} does not fit {family.kind} {family.name!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cumulative(bounds: tuple[float, ...], value: list[float]) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` label, cumulative count) from per-bucket counts."""
    out: list[tuple[str, float]] = []
    running: float = 0
    for bound, n in zip(bounds, value, strict=False):
        running += n
        out.append((repr(float(bound)), running))
    out.append(("+Inf", running + value[len(bounds)]))
    return out
