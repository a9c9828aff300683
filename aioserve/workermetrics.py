"""Whole-server metrics under ``aioserve run --workers N``.

Each worker process has its own ``Serve`` and :class:`~aioserve.metrics.Metrics`, and a scrape
of ``/-/metrics`` lands on one of them. So that one scrape gives the whole server's figures, the
workers share a directory that the parent process makes for the run and removes at exit
(:func:`shared_directory`):

- At start a worker claims a *slot*: the lowest ``K`` whose lock file ``slot-K.lock`` no running
  process holds (an exclusive ``flock``, which the kernel releases when the process ends, however
  it ends). Slots are small numbers: ``0 .. N-1``, and ``N`` only while a rolling restart
  (uvicorn's on SIGHUP) runs a worker's replacement beside it.
- The worker publishes its :class:`~aioserve.exposition.Snapshot` to ``slot-K.json`` (written
  aside, then renamed over: readers always see a whole file) every :data:`PUBLISH_INTERVAL_S` when
  its figures changed, before answering a scrape, and when it stops.
- The worker answering a scrape sums its own figures, as of now, with the other slots' files.

The sums are what one process would show: the same families and labels, no worker label.
Counters and histograms include the workers that have exited (their files stay until the run
ends; a worker killed outright loses what it counted since it last published), and a worker
that takes over an exited one's slot (uvicorn replaces a worker that dies) starts from that
slot's counts, so no counter goes backwards and ``rate()`` sees no reset. Gauges (queue depth,
replicas, requests in flight) are summed over running workers only, and ``aioserve_workers``
says how many that is. Another worker's figures are at most :data:`PUBLISH_INTERVAL_S` old (give
or take how long its event loop takes to get to it); as every scrape publishes the answering
worker's figures first, two scrapes in a row never see a counter go down, whichever workers
answer them.

Nothing here runs on the request path: requests only touch the worker's own
:class:`~aioserve.metrics.Metrics`; files are read and written on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._concurrency import TaskOwner
from .exceptions import ServeError
from .exposition import Snapshot
from .metrics import Metrics

__all__ = ["PUBLISH_INTERVAL_S", "WorkerMetrics", "shared_directory"]

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 1.0
_FORMAT = "aioserve-worker-metrics/1"
_MAX_SLOTS = 1024  # more processes at once than any server runs


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """In the parent process: a new directory for the run's workers, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="aioserve-metrics-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class WorkerMetrics:
    """One worker's share of the run's metrics directory (see the module docstring).

    ``await WorkerMetrics.open(metrics, directory)`` claims a slot, publishes, and makes
    ``metrics.scrape()`` answer for the whole server; :meth:`aclose` publishes a last time and
    gives the slot back.
    """

    def __init__(
        self, metrics: Metrics, directory: Path, *, interval_s: float = PUBLISH_INTERVAL_S
    ) -> None:
        self.metrics = metrics
        self.directory = directory
        self.interval_s = interval_s
        self.slot: int | None = None
        self._fd: int | None = None
        self._baseline = Snapshot()  # what earlier holders of the slot counted
        self._published: bytes | None = None
        # Keeps snapshots and their writes in order: a file never goes back to older figures.
        self._lock = asyncio.Lock()
        self._tasks = TaskOwner("worker metrics")
        self._failures = 0

    def __repr__(self) -> str:
        return f"<WorkerMetrics slot={self.slot} directory={str(self.directory)!r}>"

    @classmethod
    async def open(
        cls, metrics: Metrics, directory: Path, *, interval_s: float = PUBLISH_INTERVAL_S
    ) -> WorkerMetrics:
        """Claim a slot in ``directory`` and start publishing ``metrics`` there."""
        self = cls(metrics, directory, interval_s=interval_s)
        await asyncio.to_thread(self._claim)
        try:
            await self._publish()
        except BaseException:
            self._release()
            raise
        metrics.aggregate = self.gather
        self._tasks.spawn(self._publish_every(), name="aioserve worker metrics")
        return self

    async def aclose(self) -> None:
        """Publish the final figures and give the slot back. Idempotent."""
        if self._fd is None:
            return
        await self._tasks.aclose()
        if self.metrics.aggregate == self.gather:
            self.metrics.aggregate = None
        try:
            await self._publish()
        except OSError as exc:
            logger.warning("Could not publish the final metrics to %s: %s", self.directory, exc)
        finally:
            self._release()

    async def gather(self) -> Snapshot:
        """Publish this worker's figures, then sum them with every other slot's."""
        async with self._lock:
            own = self.metrics.snapshot()
            return await asyncio.to_thread(self._write_and_read, own)

    # -- on the event loop -------------------------------------------------------------------

    async def _publish(self) -> None:
        async with self._lock:
            own = self.metrics.snapshot()
            await asyncio.to_thread(self._write, own)

    async def _publish_every(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._publish()
            except OSError as exc:
                # Said once; the next scrape would show stale figures of this worker.
                self._failures += 1
                log = logger.warning if self._failures == 1 else logger.debug
                log("Could not publish this worker's metrics to %s: %s", self.directory, exc)

    # -- on a thread ---------------------------------------------------------------------------

    def _claim(self) -> None:
        import fcntl

        for slot in range(_MAX_SLOTS):
            fd = os.open(self._path(slot, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd, self.slot = fd, slot
            previous = self._read(slot)
            if previous is not None:
                self._baseline.add(previous, gauges=False)
            return
        raise ServeError(
            f"All {_MAX_SLOTS} metrics slots in {str(self.directory)!r} are held by running "
            f"processes; stop some workers."
        )

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _write(self, own: Snapshot) -> Snapshot:
        """Write this slot's file (unless nothing changed) and return its figures."""
        mine = Snapshot()
        mine.add(self._baseline)
        mine.add(own)
        document = {"format": _FORMAT, "pid": os.getpid(), "families": mine.to_json()}
        data = json.dumps(document, separators=(",", ":")).encode()
        if data != self._published:
            assert self.slot is not None
            path = self._path(self.slot, "json")
            aside = path.with_suffix(".tmp")
            aside.write_bytes(data)
            aside.replace(path)
            self._published = data
        return mine

    def _write_and_read(self, own: Snapshot) -> Snapshot:
        total = self._write(own)
        num_workers = 1
        for path in sorted(self.directory.glob("slot-*.json")):
            number = path.stem.removeprefix("slot-")
            if not number.isdigit() or int(number) == self.slot:
                continue
            slot = int(number)
            other = self._read(slot)
            if other is None:
                continue
            running = self._held(slot)
            num_workers += running
            total.add(other, gauges=running)
        total.num_workers = num_workers
        return total

    def _read(self, slot: int) -> Snapshot | None:
        path = self._path(slot, "json")
        try:
            document: Any = json.loads(path.read_bytes())
            if not isinstance(document, dict) or document.get("format") != _FORMAT:
                raise ValueError(f"not a {_FORMAT!r} document")
            return Snapshot.from_json(document["families"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("Left out the metrics file %s, which cannot be read: %s", path, exc)
            return None

    def _held(self, slot: int) -> bool:
        """Whether a running process holds ``slot`` (a probe: take the lock and give it back)."""
        import fcntl

        try:
            fd = os.open(self._path(slot, "lock"), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _path(self, slot: int, suffix: str) -> Path:
        return self.directory / f"slot-{slot}.{suffix}"
