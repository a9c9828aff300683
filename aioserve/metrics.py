"""Metrics: request counts, errors, latency histograms, queue waits and batch sizes.

The request path only bumps plain counters (everything runs on the instance's one event loop, so no
locks); at scrape time they are copied into a :class:`~aioserve.exposition.Snapshot`, which
prometheus-client turns into the exposition format through a collector on a registry of the
instance's own, so two instances in a process never mix. Under ``aioserve run --workers`` the
snapshots of all the workers are summed (:mod:`aioserve.workermetrics`). ``stat()`` answers the
0.8 question ("percentiles over the last N seconds") from per-second histograms kept for at most
``gc_window_seconds``: memory stays bounded however long the process runs.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from .exceptions import ConfigError, ConfigTypeError
from .exposition import (
    BATCH_BUCKETS,
    BATCH_SIZE,
    ERRORS,
    IN_FLIGHT,
    LATENCY,
    LATENCY_BUCKETS_S,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    REPLICAS,
    REQUESTS,
    SHADOWS_DROPPED,
    Snapshot,
)

__all__ = ["CONTENT_TYPE", "BackendStatistics", "Metrics", "Series"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# stat() percentiles come from log-spaced buckets 5 % wide: close enough for latency figures.
_RATIO = 1.05
_INV_LOG_RATIO = 1.0 / math.log(_RATIO)
_MIN_S = 1e-6
_MAX_S = 1e5  # longer latencies (over a day) count in the top bucket


def _log_bucket(value_s: float) -> int:
    return int(math.log(max(value_s, _MIN_S) / _MIN_S) * _INV_LOG_RATIO)


def _log_bucket_value(index: int) -> float:
    return float(_MIN_S * _RATIO ** (index + 0.5))


def _fine_table() -> tuple[list[float], list[int], list[int]]:
    """Bucket bounds fine enough for both views of a latency, and the map from each to the two.

    The bounds are the log buckets' edges and the Prometheus bounds together. A latency is
    placed with one ``bisect`` on them (at fold time, in bulk); its fine bucket then tells its
    Prometheus bucket exactly (every Prometheus bound is a fine bound) and its log bucket (no log
    edge falls inside a fine bucket).
    """
    edges = {_MIN_S * _RATIO**k for k in range(1, _log_bucket(_MAX_S) + 1)}
    fine = sorted(edges | set(LATENCY_BUCKETS_S))
    prom_of = [bisect.bisect_left(LATENCY_BUCKETS_S, bound) for bound in fine]
    prom_of.append(len(LATENCY_BUCKETS_S))  # above the last bound: +Inf
    lows = [0.0, *fine[:-1]]
    log_of = [
        _log_bucket(math.sqrt(max(low, _MIN_S) * high))
        for low, high in zip(lows, fine, strict=True)
    ]
    log_of.append(_log_bucket(fine[-1] * _RATIO))
    return fine, prom_of, log_of


_FINE_BOUNDS, _PROM_OF, _LOG_OF = _fine_table()
_fine_index = functools.partial(bisect.bisect_left, _FINE_BOUNDS)
# Latencies wait in a list of at most this many before they are sorted into buckets.
_FOLD_EVERY = 256


class _Histogram:
    """Cumulative-at-scrape Prometheus histogram: counts per bucket, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def value(self) -> list[float]:
        """Its value in a :class:`~aioserve.exposition.Snapshot`: the counts, then the sum."""
        return [*self.counts, self.total]


# A second of a series: (second, {log bucket: count}, [requests, errors]).
_Slot = tuple[int, dict[int, int], list[int]]


class _Windows:
    """Per-second sparse latency histograms for the last ``horizon_s`` seconds."""

    __slots__ = ("_slots", "horizon_s")

    def __init__(self, horizon_s: int) -> None:
        self.horizon_s = horizon_s
        # (second, {log bucket: count}, [requests, errors]); at most horizon_s + 1 entries.
        self._slots: collections.deque[_Slot] = collections.deque(maxlen=horizon_s + 1)

    def open(self, now_s: int) -> _Slot:
        """The slot of second ``now_s``, the newest: made if it is not there yet."""
        slots = self._slots
        if not slots or slots[-1][0] != now_s:
            slots.append((now_s, {}, [0, 0]))
        return slots[-1]

    def window(self, now_s: int, window_s: int) -> tuple[dict[int, int], int, int]:
        merged: dict[int, int] = {}
        requests = errors = 0
        for second, hist, counts in reversed(self._slots):
            if second <= now_s - window_s:
                break
            for index, n in hist.items():
                merged[index] = merged.get(index, 0) + n
            requests += counts[0]
            errors += counts[1]
        return merged, requests, errors


def _percentile(hist: dict[int, int], total: int, pct: float) -> float | None:
    if total == 0:
        return None
    rank = max(1, math.ceil(total * pct / 100.0))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return _log_bucket_value(index)
    return _log_bucket_value(max(hist))  # pragma: no cover - rank <= total always stops above


class Series:
    """The figures of one (endpoint, backend) pair; ``observe`` runs once per request.

    ``observe`` only appends the latency to a short list; the list is sorted into the buckets in
    bulk when it is full, when a new second starts, and before anything reads the figures
    (:meth:`flush`). Per request that is an append instead of two bucket searches.
    """

    __slots__ = (
        "_clock",
        "_pending",
        "_second_end",
        "_slot",
        "_windows",
        "backend",
        "endpoint",
        "latency",
        "num_errors",
    )

    def __init__(
        self, endpoint: str, backend: str, horizon_s: int, clock: Callable[[], float]
    ) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.num_errors = 0
        self.latency = _Histogram(LATENCY_BUCKETS_S)
        self._windows = _Windows(horizon_s)
        self._clock = clock
        self._pending: list[float] = []  # latencies of the current second not yet bucketed
        self._slot: _Slot = (0, {}, [0, 0])  # the current second's slot
        self._second_end = -math.inf  # where the current second ends, on the metrics clock

    @property
    def num_requests(self) -> int:
        """Requests answered (successfully or not)."""
        return self.latency.count + len(self._pending)

    def observe(self, latency_s: float, error: bool, now_s: float | None = None) -> None:
        """Count one request that took ``latency_s`` seconds and ended at ``now_s`` (the metrics
        clock; the router passes the time it already read, saving a clock call)."""
        if now_s is None:
            now_s = self._clock()
        if now_s >= self._second_end:
            self._open_second(now_s)
        pending = self._pending
        pending.append(latency_s)
        if len(pending) >= _FOLD_EVERY:
            self.flush()
        if error:
            self.num_errors += 1
            self._slot[2][1] += 1

    def _open_second(self, now_s: float) -> None:
        self.flush()
        second = int(now_s)
        self._slot = self._windows.open(second)
        self._second_end = second + 1

    def flush(self) -> None:
        """Sort the latencies observed since the last flush into the buckets."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        latency = self.latency
        latency.total += math.fsum(pending)
        latency.count += len(pending)
        prom_counts = latency.counts
        _, hist, counts = self._slot
        counts[0] += len(pending)
        for index, n in collections.Counter(map(_fine_index, pending)).items():
            prom_counts[_PROM_OF[index]] += n
            log_index = _LOG_OF[index]
            hist[log_index] = hist.get(log_index, 0) + n


@dataclasses.dataclass(frozen=True, slots=True)
class BackendStatistics:
    """A snapshot of one backend (``Serve.backend_statistics``; the gauges read it too).

    ``num_queued`` counts requests waiting for a replica or for a batch; ``in_flight`` maps each
    replica in routing to the calls it runs now.
    """

    tag: str
    num_replicas: int
    num_queued: int
    in_flight: dict[str, int]

    @property
    def num_running(self) -> int:
        """Calls running on the backend's routed replicas."""
        return sum(self.in_flight.values())


class Metrics:
    """One instance's metrics: the request path writes them, ``/-/metrics`` and ``stat()`` read."""

    def __init__(
        self,
        *,
        gc_window_seconds: int = 3600,
        clock: Callable[[], float] = time.perf_counter,
        gauges: Callable[[], Iterable[BackendStatistics]] | None = None,
    ) -> None:
        if isinstance(gc_window_seconds, bool) or not isinstance(gc_window_seconds, int):
            raise ConfigTypeError(
                f"gc_window_seconds must be an int number of seconds, got {gc_window_seconds!r}."
            )
        if gc_window_seconds < 1:
            raise ConfigError(f"gc_window_seconds must be >= 1, got {gc_window_seconds!r}.")
        self.gc_window_seconds = gc_window_seconds
        self.gauges = gauges
        self.num_shadows_dropped = 0
        self._clock = clock
        self._series: dict[tuple[str, str], Series] = {}
        # Keyed by (backend, method): the method a request called, or the batched method.
        self._queue_wait: dict[tuple[str, str], _Histogram] = {}
        self._batch_size: dict[tuple[str, str], _Histogram] = {}
        # Set under --workers (aioserve.workermetrics): the whole server's snapshot.
        self.aggregate: Callable[[], Awaitable[Snapshot]] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def __repr__(self) -> str:
        return f"<Metrics series={len(self._series)} gc_window_seconds={self.gc_window_seconds}>"

    def series(self, endpoint: str, backend: str) -> Series:
        """The series of one (endpoint, backend) pair (made on first use; callers cache it)."""
        key = (endpoint, backend)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = Series(
                endpoint, backend, self.gc_window_seconds, self._clock
            )
        return series

    def observe_queue_wait(self, backend: str, method: str, wait_s: float) -> None:
        """A request to ``method`` of ``backend`` waited ``wait_s`` seconds for a replica, or in
        the batch queue of ``method``, until its batch was dispatched."""
        key = (backend, method)
        hist = self._queue_wait.get(key)
        if hist is None:
            hist = self._queue_wait[key] = _Histogram(LATENCY_BUCKETS_S)
        hist.observe(wait_s)

    def observe_batch(self, backend: str, method: str, size: int) -> None:
        """The batch queue of ``method`` of ``backend`` dispatched a batch of ``size`` requests
        (``method`` is ``"__call__"`` for the default entry point)."""
        key = (backend, method)
        hist = self._batch_size.get(key)
        if hist is None:
            hist = self._batch_size[key] = _Histogram(BATCH_BUCKETS)
        hist.observe(size)

    def snapshot(self) -> Snapshot:
        """The values of every exported family now (the gauges read ``gauges``)."""
        snapshot = Snapshot()
        values = snapshot.values
        requests = values[REQUESTS.name]
        errors = values[ERRORS.name]
        latency = values[LATENCY.name]
        for series in list(self._series.values()):
            series.flush()
            key = (series.endpoint, series.backend)
            requests[key] = series.num_requests
            errors[key] = series.num_errors
            latency[key] = series.latency.value()
        queue_wait = values[QUEUE_WAIT.name]
        for key, hist in list(self._queue_wait.items()):
            queue_wait[key] = hist.value()
        batch_size = values[BATCH_SIZE.name]
        for key, hist in list(self._batch_size.items()):
            batch_size[key] = hist.value()
        depth = values[QUEUE_DEPTH.name]
        replicas = values[REPLICAS.name]
        in_flight = values[IN_FLIGHT.name]
        for gauge in self.gauges() if self.gauges is not None else ():
            depth[(gauge.tag,)] = gauge.num_queued
            replicas[(gauge.tag,)] = gauge.num_replicas
            for replica_tag, n in gauge.in_flight.items():
                in_flight[(gauge.tag, replica_tag)] = n
        values[SHADOWS_DROPPED.name][()] = self.num_shadows_dropped
        return snapshot

    def exposition(self) -> bytes:
        """This instance's figures in the Prometheus text format."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """What ``GET /-/metrics`` answers: :meth:`exposition`, or with :attr:`aggregate` set
        (each worker of ``aioserve run --workers``) the whole server's figures."""
        if self.aggregate is None:
            return self.exposition()
        return (await self.aggregate()).render()

    # -- stat() ---------------------------------------------------------------------------------

    def stat(
        self,
        percentiles: Sequence[float] = (50, 90, 95),
        agg_windows_seconds: Sequence[int] = (10, 60, 300, 600, 3600),
    ) -> dict[str, Any]:
        """Counts and latency percentiles per endpoint and per backend over each window.

        Keys follow the 0.8 shape: ``latency_ms_{p}th_perc_{window}_window``, plus
        ``num_requests_{window}_window`` and ``num_errors_{window}_window`` and the totals.
        These are this instance's figures only: under ``aioserve run --workers`` each worker
        process answers with its own (``/-/metrics`` is the one that sums the workers).
        """
        percentiles = _check_percentiles(percentiles)
        windows = self._check_windows(agg_windows_seconds)
        now_s = int(self._clock())
        by_endpoint: dict[str, list[Series]] = {}
        by_backend: dict[str, list[Series]] = {}
        for series in self._series.values():
            series.flush()
            by_endpoint.setdefault(series.endpoint, []).append(series)
            by_backend.setdefault(series.backend, []).append(series)
        out: dict[str, Any] = {
            "endpoints": {
                name: _summarise(group, now_s, percentiles, windows)
                for name, group in sorted(by_endpoint.items())
            },
            "backends": {
                tag: _summarise(group, now_s, percentiles, windows)
                for tag, group in sorted(by_backend.items())
            },
        }
        for gauge in self.gauges() if self.gauges is not None else ():
            entry = out["backends"].setdefault(
                gauge.tag, _summarise([], now_s, percentiles, windows)
            )
            entry["queue_depth"] = gauge.num_queued
            entry["num_replicas"] = gauge.num_replicas
            entry["in_flight"] = sum(gauge.in_flight.values())
        return out

    def _check_windows(self, windows: Sequence[int]) -> list[int]:
        if isinstance(windows, str | bytes) or not isinstance(windows, Sequence) or not windows:
            raise ConfigTypeError(
                f"agg_windows_seconds must be a non-empty list of ints, got {windows!r}."
            )
        for window in windows:
            if isinstance(window, bool) or not isinstance(window, int) or window < 1:
                raise ConfigError(
                    f"agg_windows_seconds must hold ints >= 1, got {window!r} in {windows!r}."
                )
            if window > self.gc_window_seconds:
                raise ConfigError(
                    f"Aggregation window {window} s is longer than gc_window_seconds="
                    f"{self.gc_window_seconds}: data that old is not kept. Start the instance "
                    f"with a larger gc_window_seconds."
                )
        return list(windows)


def _check_percentiles(percentiles: Sequence[float]) -> list[float]:
    if (
        isinstance(percentiles, str | bytes)
        or not isinstance(percentiles, Sequence)
        or not percentiles
    ):
        raise ConfigTypeError(
            f"percentiles must be a non-empty list of numbers, got {percentiles!r}."
        )
    for pct in percentiles:
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
            raise ConfigError(
                f"percentiles must be numbers in (0, 100], got {pct!r} in {percentiles!r}."
            )
    return list(percentiles)


def _pct_label(pct: float) -> str:
    return str(int(pct)) if float(pct).is_integer() else str(pct)


def _summarise(
    group: list[Series], now_s: int, percentiles: list[float], windows: list[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "num_requests": sum(s.num_requests for s in group),
        "num_errors": sum(s.num_errors for s in group),
    }
    for window in windows:
        merged: dict[int, int] = {}
        requests = errors = 0
        for series in group:
            hist, n, e = series._windows.window(now_s, window)
            for index, count in hist.items():
                merged[index] = merged.get(index, 0) + count
            requests += n
            errors += e
        out[f"num_requests_{window}_window"] = requests
        out[f"num_errors_{window}_window"] = errors
        for pct in percentiles:
            value = _percentile(merged, requests, pct)
            out[f"latency_ms_{_pct_label(pct)}th_perc_{window}_window"] = (
                None if value is None else round(value * 1000.0, 3)
            )
    return out


class _Collector:
    """Builds the metric families from a :class:`Metrics` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.snapshot().metrics()
