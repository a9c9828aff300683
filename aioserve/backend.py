"""A backend: its replicas' slots, the requests waiting for one, scaling and draining.

The backend alone counts slots. Each replica is driven through the
:class:`~aioserve._types.Runner` seam and never learns about slots::

    call() --a slot free?--> runner.call(call) in the caller's own task     (no queue, no hop)
           --all full-----> wait in the one deadline queue (earliest deadline first)
                            until a finished call hands its slot over directly

:meth:`Backend._run` takes the slot back in its own ``finally`` around the runner's call (for a
stream: when the stream ends; for work the runner cannot interrupt: when that work is done). A
freed slot goes straight to the next waiter, so a newcomer never overtakes the queue. Batching
methods gather their calls in a :class:`~aioserve.batching.BatchQueue`, which takes a slot for each
batch it forms; it does not queue a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ._concurrency import TaskOwner
from ._streams import HeldStream
from ._types import Call, Lifecycle, Runner, Stream
from ._waitqueue import WaitQueue
from .batching import BatchQueue
from .callable import UserCallable
from .config import BackendConfig, BackendInfo
from .context import call_var
from .exceptions import ConfigTypeError, DeadlineExceeded, ServeShutdown
from .metrics import BackendStatistics, Metrics

__all__ = ["Backend"]

logger = logging.getLogger(__name__)

# Reading an enum member costs about 50 ns on 3.11; the request path compares with this instead.
_RUNNING = Lifecycle.RUNNING

RunnerFactory = Callable[[str, UserCallable], Runner]
"""Makes the runner of a new replica from the backend's tag and callable."""


class _Replica:
    """The backend's record of one replica: its runner and the slots taken on it."""

    __slots__ = ("batching", "idle", "in_flight", "limit", "routed", "runner", "tag")

    def __init__(self, runner: Runner, limit: int) -> None:
        self.runner = runner
        self.tag = runner.replica_tag
        self.limit = limit
        self.in_flight = 0
        self.routed = True  # False once taken out of routing (scaled down, or the backend stops)
        self.idle = asyncio.Event()
        self.batching: set[str | None] = set()  # methods with a batch running here: one each

    def __repr__(self) -> str:
        return f"<replica {self.tag} in_flight={self.in_flight}/{self.limit}>"


class Backend:
    """One backend: a user callable, its config, its replicas and its waiting requests."""

    def __init__(
        self,
        tag: str,
        user_callable: UserCallable,
        config: BackendConfig,
        *,
        runner_factory: RunnerFactory,
        metrics: Metrics | None = None,
    ) -> None:
        user_callable.check_config(tag, config)
        self.tag = tag
        self.callable = user_callable
        self.config = config
        self.metrics = metrics
        self.state = Lifecycle.STARTING
        self.replicas: list[_Replica] = []
        self._new_runner = runner_factory
        self._waiting: WaitQueue[None] = WaitQueue(
            max_len=config.max_queued_queries,
            overloaded=self._overloaded_message,
            expired=self._expired_message,
        )
        self._waiting.on_change = self._check_drained
        self._batch_queues: dict[str | None, BatchQueue[Any, Any]] = {}
        self._retiring = TaskOwner(f"backend {tag!r} drains")
        self._streams = TaskOwner(f"backend {tag!r} stream closes")
        self._draining: set[_Replica] = set()  # out of routing, still finishing calls
        self._drained: asyncio.Event | None = None
        self._rotation = 0  # where the next replica search starts (see _acquire)
        self._batching = user_callable.batches_with(config)

    def __repr__(self) -> str:
        return (
            f"<Backend {self.tag!r} {self.state.value} replicas={len(self.replicas)} "
            f"waiting={len(self._waiting)}>"
        )

    def _overloaded_message(self, waiting: int, limit: int) -> str:
        return (
            f"Backend {self.tag!r} is overloaded: {waiting} request(s) already wait for a replica "
            f"(max_queued_queries={limit}). Retry later."
        )

    def _expired_message(self) -> str:
        return (
            f"The request's deadline passed while it waited for a replica of backend {self.tag!r}."
        )

    # -- configuration and state ----------------------------------------------------------------

    @property
    def max_concurrent_queries(self) -> int:
        """The per-replica concurrency limit in force."""
        return self.config.resolved_max_concurrent_queries(is_async=self.callable.is_async)

    def resolved_config(self) -> BackendConfig:
        """The config with ``max_concurrent_queries`` resolved, as get_backend_config reports it."""
        return self.config.with_resolved_concurrency(is_async=self.callable.is_async)

    def info(self) -> BackendInfo:
        """The dict list_backends shows for this backend (its keys are attributes too)."""
        out = BackendInfo(
            {
                "accepts_batches": self._batching,
                "num_replicas": self.config.num_replicas,
                "max_batch_size": self.config.max_batch_size,
            }
        )
        out.update(self.resolved_config().to_dict())
        return out

    def _num_queued(self) -> int:
        return len(self._waiting) + sum(q.queued for q in self._batch_queues.values())

    @property
    def load(self) -> int:
        """Requests running or waiting here (the PowerOfTwo policy compares this)."""
        return sum(r.in_flight for r in self.replicas) + self._num_queued()

    def statistics(self) -> BackendStatistics:
        """A snapshot of this backend's queue and replicas."""
        return BackendStatistics(
            tag=self.tag,
            num_replicas=len(self.replicas),
            num_queued=self._num_queued(),
            in_flight={r.tag: r.in_flight for r in self.replicas},
        )

    @property
    def idle(self) -> bool:
        """No request waits or runs, on routed replicas or on ones still draining."""
        return (
            not len(self._waiting)
            and not any(r.in_flight for r in self.replicas)
            and not any(r.in_flight for r in self._draining)
            and not any(q.queued for q in self._batch_queues.values())
        )

    async def wait_idle(self) -> None:
        """Wait until :attr:`idle` (checked again whenever a call ends)."""
        self._drained = asyncio.Event()
        self._check_drained()
        await self._drained.wait()

    def _check_drained(self) -> None:
        if self._drained is not None and self.idle:
            self._drained.set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def _start_replicas(self, count: int, config: BackendConfig) -> list[_Replica]:
        limit = config.resolved_max_concurrent_queries(is_async=self.callable.is_async)
        replicas = [
            _Replica(self._new_runner(self.tag, self.callable), limit) for _ in range(count)
        ]
        # Concurrently: two constructors that wait on each other must both be able to finish.
        try:
            results = await asyncio.gather(
                *(r.runner.start(config.user_config) for r in replicas), return_exceptions=True
            )
        except BaseException:  # cancelled: stop what was made
            await asyncio.gather(*(r.runner.aclose() for r in replicas))
            raise
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(r.runner.aclose() for r in replicas))
            raise errors[0]
        return replicas

    async def start(self) -> None:
        """Start ``num_replicas`` replicas; on any failure, stop them all and raise."""
        self.replicas = await self._start_replicas(self.config.num_replicas, self.config)
        self.state = Lifecycle.RUNNING

    async def update(self, new: BackendConfig, *, reconfigure: bool) -> None:
        """Apply a validated config to the live backend; returns once it is in force.

        Nothing is in force until every step has worked: a failure (or a cancelled caller) stops
        the replicas it added and puts the old ``user_config`` back where the new one was taken.
        """
        self.callable.check_config(self.tag, new)
        old = self.config
        added: list[_Replica] = []
        changed: list[_Replica] = []
        try:
            grow = new.num_replicas - len(self.replicas)
            if grow > 0:
                added = await self._start_replicas(grow, new)
            if reconfigure and new.user_config is not None:
                results = await asyncio.gather(
                    *(r.runner.reconfigure(new.user_config) for r in self.replicas),
                    return_exceptions=True,
                )
                changed = [r for r, e in zip(self.replicas, results, strict=True) if e is None]
                errors = [e for e in results if isinstance(e, BaseException)]
                if errors:
                    raise errors[0]
        except BaseException:
            await asyncio.gather(*(r.runner.aclose() for r in added))
            if changed and old.user_config is not None:
                await asyncio.gather(
                    *(r.runner.reconfigure(old.user_config) for r in changed),
                    return_exceptions=True,
                )
            raise
        self.config = new
        self._batching = self.callable.batches_with(new)
        self._waiting.max_len = new.max_queued_queries
        limit = self.max_concurrent_queries
        replicas = self.replicas + added
        for replica in replicas:
            replica.limit = limit
        for replica in replicas[new.num_replicas :]:
            self._retire(replica)
        self.replicas = replicas[: new.num_replicas]
        for queue in self._batch_queues.values():
            queue.configure(
                max_batch_size=new.max_batch_size or 1,
                batch_wait_timeout_s=new.batch_wait_timeout,
                batch_wait_policy=new.batch_wait_policy,
                max_queued=new.max_queued_queries,
            )
        self._grant_free_slots()

    def _retire(self, replica: _Replica) -> None:
        """Take a replica out of routing; it drains, then stops, in a task of its own."""
        replica.routed = False
        self._draining.add(replica)
        if not replica.in_flight:
            replica.idle.set()
        self._retiring.spawn(self._drain_replica(replica), name=f"retire {replica.tag}")

    async def _drain_replica(self, replica: _Replica) -> None:
        timeout = self.config.graceful_shutdown_timeout_s
        try:
            await asyncio.wait_for(replica.idle.wait(), timeout=timeout)
        except TimeoutError:
            logger.warning(
                "Replica %s still had %d request(s) after %.1f s of draining; cancelling them.",
                replica.tag,
                replica.in_flight,
                timeout,
            )
        finally:
            replica.runner.kill()
            await replica.runner.aclose()
            self._draining.discard(replica)
            self._check_drained()

    async def aclose(self, *, force: bool = False) -> None:
        """Stop admitting; drain queued and running work (unless ``force``); stop. Idempotent."""
        if self.state in (Lifecycle.DRAINING, Lifecycle.STOPPED):
            return
        self.state = Lifecycle.DRAINING
        timeout = self.config.graceful_shutdown_timeout_s
        queues = list(self._batch_queues.values())
        if not force:
            results = await asyncio.gather(
                asyncio.wait_for(self.wait_idle(), timeout),
                *(q.aclose(drain_timeout_s=timeout) for q in queues),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
                    raise result
        self._waiting.fail_all(
            ServeShutdown(f"Backend {self.tag!r} stopped before the request could start.")
        )
        for queue in queues:
            await queue.aclose()
        for replica in self.replicas:
            replica.routed = False
            replica.runner.kill()
        await self._retiring.aclose()
        await self._streams.join()
        await asyncio.gather(*(r.runner.aclose() for r in self.replicas))
        self.state = Lifecycle.STOPPED

    # -- the request path -----------------------------------------------------------------------

    async def call(self, call: Call) -> Any:
        """Run one request on a replica of this backend and return its result."""
        if self.state is not _RUNNING:
            raise ServeShutdown(f"Backend {self.tag!r} is shutting down; it takes no new requests.")
        deadline = call.deadline
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            raise DeadlineExceeded(
                f"The request's deadline passed before backend {self.tag!r} could start it."
            )
        if self._batching and self.callable.method_accepts_batches(call.method):
            return await self._call_batched(call)
        replica = None if len(self._waiting) else self._acquire()
        if replica is None:
            replica = await self._wait(call)
        # In this coroutine, not a helper: one frame less for every request.
        try:
            result = await replica.runner.call(call)
        except BaseException:
            self._settle(replica, call, None)
            raise
        return self._settle(replica, call, result)

    def _settle(self, replica: _Replica, call: Call, result: Any) -> Any:
        """The runner's call is over: give the slot back, or keep it while a stream is open or
        while work the caller left goes on; return the result (a stream wrapped to hold it)."""
        if call.lingering is not None:
            self._release_after(replica, call.lingering)
        elif isinstance(result, Stream):
            return self._hold(replica, result)
        else:
            self._release(replica)
        return result

    def _hold(self, replica: _Replica, stream: Stream) -> HeldStream:
        """``stream``, giving ``replica``'s slot back once it is closed."""
        release = functools.partial(self._release, replica)
        return HeldStream(stream, release, asyncio.get_running_loop(), self._streams)

    def _release_after(self, replica: _Replica, work: asyncio.Future[Any]) -> None:
        """The caller left while work goes on (a sync handler on its thread): the slot comes
        back when the work is done."""
        loop = asyncio.get_running_loop()
        work.add_done_callback(
            lambda _: _call_soon(loop, functools.partial(self._release, replica))
        )

    def _acquire(self) -> _Replica | None:
        """Take a slot on the least-loaded routed replica with one free, or return None.

        Among equally loaded replicas the choice rotates: the search starts one replica further
        on each time, and the first of the least loaded from there wins, so every replica serves
        under light load too (a search always starting at the first would send it all there).
        """
        replicas = self.replicas
        count = len(replicas)
        if count == 1:  # the common case: no search, no rotation
            replica = replicas[0]
            if replica.in_flight < replica.limit:
                replica.in_flight += 1
                return replica
            return None
        if not count:
            return None
        start = self._rotation = (self._rotation + 1) % count
        best: _Replica | None = None
        best_load = 1 << 62
        for i in range(start, start + count):
            replica = replicas[i % count]
            n = replica.in_flight
            if n < best_load and n < replica.limit:
                best, best_load = replica, n
                if n == 0:
                    break
        if best is not None:
            best.in_flight += 1
        return best

    async def _wait(self, call: Call) -> _Replica:
        """Queue until a slot is handed over; the returned replica's slot is already taken."""
        waiting = self._waiting
        waiting.check_room()
        if call.on_wait is not None:
            call.on_wait()
        loop = asyncio.get_running_loop()
        waiter = waiting.put(loop, None, call.deadline)
        future: asyncio.Future[_Replica] = waiter.future
        try:
            replica = await future
        except asyncio.CancelledError:
            if waiting.withdraw(waiter):
                self._check_drained()
            elif future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # handed a slot just as the caller gave up
            raise
        if self.metrics is not None:
            self.metrics.observe_queue_wait(
                self.tag, call.method or "__call__", loop.time() - waiter.arrival
            )
        return replica

    def _waiting_first(self, method: str | None) -> bool:
        """Whether a request waiting for a slot came first (by deadline, then arrival) to the
        oldest item queued for a batch of ``method``."""
        head = self._waiting.head()
        if head is None:
            return False
        queue = self._batch_queues.get(method)
        first = queue.head_key() if queue is not None else None
        return first is None or (head.deadline, head.arrival) <= first

    def _batch_first(self) -> bool:
        """Whether an item queued for a batch came before every request waiting for a slot."""
        head = self._waiting.head()
        if head is None:
            return True
        key = (head.deadline, head.arrival)
        for queue in self._batch_queues.values():
            first = queue.head_key()
            if first is not None and first < key:
                return True
        return False

    def _release(self, replica: _Replica) -> None:
        """A call on ``replica`` is over: pass its slot to a waiter, or free it."""
        waiting = self._waiting
        if (
            len(waiting)
            and replica.routed
            and replica.in_flight <= replica.limit
            and not (self._batch_queues and self._batch_first())
        ):
            waiter = waiting.pop(asyncio.get_running_loop().time())
            if waiter is not None:
                waiter.future.set_result(replica)
                return
        replica.in_flight -= 1
        if replica.in_flight == 0 and not replica.routed:
            replica.idle.set()
        if self._batch_queues:
            for queue in self._batch_queues.values():
                queue.wake()
        if self._drained is not None:
            self._check_drained()

    def _grant_free_slots(self) -> None:
        """Capacity grew: hand the new free slots to waiting requests and batch queues."""
        now = asyncio.get_running_loop().time()
        while len(self._waiting):
            replica = self._acquire()
            if replica is None:
                break
            waiter = self._waiting.pop(now)
            if waiter is None:
                self._release(replica)
                break
            waiter.future.set_result(replica)
        for queue in self._batch_queues.values():
            queue.wake()

    # -- batching -------------------------------------------------------------------------------

    async def _call_batched(self, call: Call) -> Any:
        if call.kwargs or len(call.args) != 1:
            raise ConfigTypeError(
                f"Calls to the batching backend {self.tag!r} take exactly one positional "
                f"argument, got {len(call.args)} positional and keyword argument(s) "
                f"{sorted(call.kwargs)!r}."
            )
        method = call.method
        queue = self._batch_queues.get(method)
        if queue is None:
            queue = self._batch_queues[method] = BatchQueue(
                functools.partial(self._run_batch, method),
                max_batch_size=self.config.max_batch_size or 1,
                batch_wait_timeout_s=self.config.batch_wait_timeout,
                batch_wait_policy=self.config.batch_wait_policy,
                max_queued=self.config.max_queued_queries,
                name=self.tag,
                acquire=functools.partial(self._acquire_for_batch, method),
                give_back=functools.partial(self._give_back_batch_slot, method),
            )
            if self.metrics is not None:
                label = method or "__call__"
                queue.on_batch = functools.partial(self.metrics.observe_batch, self.tag, label)
                queue.on_wait = functools.partial(self.metrics.observe_queue_wait, self.tag, label)
        if call.prefetch is not None and not self.callable.is_async:
            await call.prefetch()  # a sync batch handler reads bodies with get_data()
        if call.on_wait is not None:
            call.on_wait()
        return await queue.submit(call.args[0], call.deadline)

    def _acquire_for_batch(self, method: str | None) -> _Replica | None:
        """A slot for a batch of ``method``: on a replica running no batch of it (a replica
        takes one batch of a method at a time), after every request waiting for a slot."""
        if self.state is Lifecycle.STOPPED or self._waiting_first(method):
            return None
        best: _Replica | None = None
        best_load = 1 << 62
        for replica in self.replicas:
            n = replica.in_flight
            if n < best_load and n < replica.limit and method not in replica.batching:
                best, best_load = replica, n
        if best is not None:
            best.in_flight += 1
            best.batching.add(method)
        return best

    def _give_back_batch_slot(self, method: str | None, replica: _Replica) -> None:
        replica.batching.discard(method)
        self._release(replica)

    async def _run_batch(self, method: str | None, items: Sequence[Any], replica: _Replica) -> Any:
        # A batch serves several requests: it runs as none of them (its task inherited the
        # context of whichever request started the batch queue's worker).
        call_var.set(None)
        try:
            call = Call(self.tag, (list(items),), None, method)
            try:
                result = await replica.runner.call(call)
            except BaseException:
                self._settle(replica, call, None)
                raise
            return self._settle(replica, call, result)
        finally:
            replica.batching.discard(method)
            self._batch_queues[method].wake()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    # A closed loop has nothing left to release the slot to.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)
