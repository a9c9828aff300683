"""Whole-server metrics under ``aioserve run --workers N`` (aioserve.workermetrics).

In process: several :class:`WorkerMetrics` on one directory stand for the workers of a server
(each its own :class:`Metrics`), which shows how slots, sums, exited workers and replacements
behave exactly. Then the real thing: ``aioserve run --workers 2`` in a subprocess (uvicorn, then
granian), requests over new connections so both workers serve some, and scrapes of
``/-/metrics``, each answered by whichever worker the kernel picks, that must all give the
whole server's count. Waits are bounded polls of visible state, never sleeps.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from _processes import Running, _free_port, until
from _sample_backends import wait_until
from prometheus_client.parser import text_string_to_metric_families

from aioserve.exposition import Snapshot
from aioserve.metrics import BackendStatistics, Metrics
from aioserve.workermetrics import WorkerMetrics, shared_directory

WAIT_S = 20.0  # turns a hang into a failure; never reached when things work


class Worker:
    """The metrics of one pretend worker: requests to ``/predict`` and a queue-depth gauge."""

    def __init__(self) -> None:
        self.queued = 0
        self.metrics = Metrics(
            gauges=lambda: [BackendStatistics("model", 1, self.queued, {})],
        )
        self.shared: WorkerMetrics | None = None

    def serve(self, n: int) -> None:
        series = self.metrics.series("predict", "model")
        for _ in range(n):
            series.observe(0.001, error=False)

    async def open(self, directory: Path, interval_s: float = 60.0) -> WorkerMetrics:
        self.shared = await WorkerMetrics.open(self.metrics, directory, interval_s=interval_s)
        return self.shared


def figures(snapshot: Snapshot) -> tuple[float, float, int | None]:
    """(requests to /predict, queue depth, workers) of a scrape's snapshot."""
    requests = snapshot.values["aioserve_requests"].get(("predict", "model"), 0)
    depth = snapshot.values["aioserve_queue_depth"].get(("model",), 0)
    assert not isinstance(requests, list) and not isinstance(depth, list)
    return requests, depth, snapshot.num_workers


async def scrape(worker: Worker) -> tuple[float, float, int | None]:
    """What ``/-/metrics`` on this worker would say, parsed back from its text."""
    text = (await worker.metrics.scrape()).decode()
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    requests = found.get(
        ("aioserve_requests_total", (("backend", "model"), ("endpoint", "predict"))), 0
    )
    workers = found.get(("aioserve_workers", ()))
    return (
        requests,
        found.get(("aioserve_queue_depth", (("backend", "model"),)), 0),
        (None if workers is None else int(workers)),
    )


@pytest.fixture
async def directory() -> AsyncIterator[Path]:
    with shared_directory() as path:
        yield path
    assert not path.exists(), "the run's directory outlived it"


@pytest.fixture
async def workers(directory: Path) -> AsyncIterator[list[Worker]]:
    made = [Worker() for _ in range(3)]
    try:
        yield made
    finally:
        for worker in made:
            if worker.shared is not None:
                await worker.shared.aclose()


# -- in process ----------------------------------------------------------------------------------


async def test_a_scrape_on_any_worker_sums_every_worker(
    directory: Path, workers: list[Worker]
) -> None:
    a, b, _ = workers
    assert (await a.open(directory)).slot == 0
    assert (await b.open(directory)).slot == 1
    a.serve(3)
    a.queued = 2
    b.serve(4)
    b.queued = 5
    # Whichever answers, the scrape publishes its own figures first: the other one's next
    # scrape has them.
    assert await scrape(a) == (3, 2, 2)  # b has published nothing since it opened
    assert await scrape(b) == (7, 7, 2)
    assert await scrape(a) == (7, 7, 2)
    # One process alone: its own figures, and no count of workers.
    c = workers[2]
    c.serve(1)
    assert await scrape(c) == (1, 0, None)


async def test_other_workers_figures_arrive_within_the_publish_interval(
    directory: Path, workers: list[Worker]
) -> None:
    a, b, _ = workers
    await a.open(directory)
    await b.open(directory, interval_s=0.05)
    b.serve(6)
    deadline = time.monotonic() + WAIT_S
    while (await scrape(a))[0] != 6:
        assert time.monotonic() < deadline, "b's requests never reached a's scrape"


async def test_an_exited_workers_counts_stay_and_its_gauges_go(
    directory: Path, workers: list[Worker]
) -> None:
    a, b, c = workers
    await a.open(directory)
    shared_b = await b.open(directory)
    b.serve(5)
    b.queued = 9
    await shared_b.aclose()  # publishes what it counted, then gives its slot back
    await shared_b.aclose()  # idempotent
    assert await scrape(a) == (5, 0, 1)
    # A replacement takes the free slot and starts from the counts left in it: the sum never
    # goes back, so rate() sees no reset.
    assert (await c.open(directory)).slot == 1
    c.serve(2)
    assert await scrape(c) == (7, 0, 2)
    assert await scrape(a) == (7, 0, 2)
    # Once closed, the instance answers for itself again.
    assert b.metrics.aggregate is None
    assert await scrape(b) == (5, 9, None)


async def test_an_unreadable_file_is_left_out_with_a_warning(
    directory: Path, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    a = workers[0]
    await a.open(directory)
    a.serve(2)
    (directory / "slot-7.json").write_text('{"format": "something else"}')
    with caplog.at_level(logging.WARNING, logger="aioserve.workermetrics"):
        assert await scrape(a) == (2, 0, 1)
    assert "Left out the metrics file" in caplog.text
    assert "slot-7.json" in caplog.text


async def test_a_worker_that_cannot_publish_says_so_once_and_keeps_serving(
    directory: Path, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    a = workers[0]
    with caplog.at_level(logging.DEBUG, logger="aioserve.workermetrics"):
        await a.open(directory, interval_s=0.001)
        shutil.rmtree(directory)
        a.serve(1)

        def complaints() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "Could not publish" in r.getMessage()]

        await wait_until(lambda: len(complaints()) >= 3, "three failed publishes")
        assert [r.levelno for r in complaints()[:3]] == [
            logging.WARNING,
            logging.DEBUG,
            logging.DEBUG,
        ]
        a.serve(1)
        assert a.shared is not None
        await a.shared.aclose()
    assert "Could not publish the final metrics" in caplog.text
    # The worker's own figures are intact.
    assert await scrape(a) == (2, 0, None)


# -- aioserve run --workers 2 ----------------------------------------------------------------------


def scrape_server(url: str) -> dict[str, float]:
    """``/-/metrics`` of a running server (a new connection: either worker answers): the
    requests per endpoint, and ``workers``. The text must parse, each family once."""
    response = httpx.get(f"{url}/-/metrics")
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"a family is exposed twice: {names}"
    out: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "aioserve_requests_total":
                out[sample.labels["endpoint"]] = sample.value
            elif sample.name == "aioserve_workers":
                out["workers"] = sample.value
    return out


def serve_from_both(url: str, at_least: int) -> collections.Counter[int]:
    """GET /pid, a new connection each time, until both workers have answered (and at least
    ``at_least`` requests were sent): the answers per worker pid."""
    pids: collections.Counter[int] = collections.Counter()
    while len(pids) < 2 or pids.total() < at_least:
        assert pids.total() < 500, f"one worker answered every request: {pids}"
        pids[httpx.get(f"{url}/pid").json()["pid"]] += 1
    return pids


def until_counted(url: str, expected: int, seen: list[float]) -> None:
    """Scrape until /pid's count is ``expected`` (other workers' figures may be up to
    PUBLISH_INTERVAL_S old), keeping every value seen in ``seen``."""

    def counted() -> bool:
        seen.append(scrape_server(url).get("pid", 0))
        return seen[-1] == expected

    until(
        counted,
        lambda: (
            f"aioserve_requests_total{{endpoint='pid'}} == {expected}; the last scrapes "
            f"said {seen[-5:]}"
        ),
    )


def test_metrics_of_two_workers_sum_to_every_request(
    run: Callable[..., Running], server_name: str
) -> None:
    port = _free_port()
    server = run(
        "examples.deployment:setup",
        *("--workers", "2", "--port", str(port), "--server", server_name),
    )
    url = server.url()
    pids = serve_from_both(url, at_least=40)
    total = pids.total()
    seen: list[float] = []
    until_counted(url, total, seen)
    assert seen == sorted(seen), f"the count went down between scrapes: {seen}"
    # Every scrape from now on, whichever worker answers it, has every request.
    for _ in range(20):
        figures = scrape_server(url)
        assert figures == {"pid": total, "workers": 2}, pids
    assert server.stop(signal.SIGTERM) == 0


def test_a_replaced_worker_takes_over_its_predecessors_counts(
    run: Callable[..., Running],
) -> None:
    port = _free_port()
    server = run("examples.deployment:setup", "--workers", "2", "--port", str(port))
    url = server.url()
    pids = serve_from_both(url, at_least=20)
    seen: list[float] = []
    until_counted(url, pids.total(), seen)
    # Every worker's figures are published now; kill one outright (no final publish), and
    # uvicorn starts another in its place.
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    answered = pids.total()
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, "no worker replaced the killed one"
        try:
            pid = httpx.get(f"{url}/pid").json()["pid"]
        except httpx.TransportError:
            continue  # the dead worker's connection; it answered nothing
        answered += 1
        if pid not in pids:
            break
    until_counted(url, answered, seen)
    assert seen == sorted(seen), f"the count went down between scrapes: {seen}"
    until(lambda: scrape_server(url).get("workers") == 2, "two workers counted again")
    assert scrape_server(url)["pid"] == answered
    assert server.stop(signal.SIGTERM) == 0
