"""A backend: its replicas, the queue of requests waiting for one, scaling and draining.

The request path through a backend is::

    call() --free slot?--> replica.call() in the caller's own task        (fast path, no queue)
           --all full----> wait in the bounded queue (earliest deadline first)
                           until release() hands a slot over directly      (no re-scan, no hop)

A replica's slots are counted in ``replica.in_flight`` against its ``max_concurrent_queries``.
When a call ends, :meth:`Backend._release` passes its slot straight to the next waiter, so a freed
slot is never grabbed by a newcomer ahead of the queue. Batching callables go through one
:class:`~aioserve.batching.BatchQueue` per method instead; a replica takes one batch at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._concurrency import TaskOwner
from .batching import BatchQueue
from .config import BackendConfig
from .exceptions import (
    ConfigError,
    ConfigTypeError,
    DeadlineExceeded,
    Overloaded,
    ServeShutdown,
)
from .metrics import BackendStatistics, Metrics
from .replica import Replica, ReplicaState, UserCallable
from .request import call_var

__all__ = ["Backend", "validate_backend_config"]

logger = logging.getLogger(__name__)

_INF = math.inf
# Reading an enum member costs about 50 ns on 3.11; the request path compares with this instead.
_RUNNING = ReplicaState.RUNNING


def _about_to_wait() -> None:
    # The HTTP edge starts watching for a client that goes away only once its request waits.
    call = call_var.get()
    if call is not None and call.waiting_hook is not None:
        call.waiting_hook()


def validate_backend_config(tag: str, user_callable: UserCallable, config: BackendConfig) -> None:
    """Check the rules that need both the config and the callable."""
    if (config.max_batch_size or 1) > 1 and not user_callable.accepts_batches:
        raise ConfigError(
            f"Backend {tag!r}: max_batch_size={config.max_batch_size!r} needs a callable that "
            f"accepts batches; mark {user_callable.name} with @serve.accept_batch."
        )
    if config.user_config is not None and not user_callable.has_reconfigure:
        raise ConfigError(
            f"Backend {tag!r}: user_config needs a class with a reconfigure(user_config) "
            f"method; {user_callable.name} has none."
        )


class Backend:
    """One backend: a user callable, its config, its replicas and its waiting requests."""

    def __init__(
        self,
        tag: str,
        user_callable: UserCallable,
        config: BackendConfig,
        *,
        instance: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        validate_backend_config(tag, user_callable, config)
        self.metrics = metrics
        self.tag = tag
        self.callable = user_callable
        self.config = config
        self.state = ReplicaState.STARTING
        self.replicas: list[Replica] = []
        self._instance = instance
        self._queue: list[list[Any]] = []  # heap of [deadline, seq, future]
        self._num_waiting = 0
        self._seq = itertools.count()
        self._batch_queues: dict[str | None, BatchQueue[Any, Any]] = {}
        self._retiring = TaskOwner(f"backend {tag!r} drains")
        self._retiring_replicas: set[Replica] = set()  # out of routing, still draining
        self._drained: asyncio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"<Backend {self.tag!r} {self.state.value} replicas={len(self.replicas)} "
            f"waiting={self._num_waiting}>"
        )

    # -- configuration --------------------------------------------------------------------------

    @property
    def max_concurrent_queries(self) -> int:
        """The per-replica concurrency limit in force."""
        return self.config.resolved_max_concurrent_queries(is_async=self.callable.is_async)

    def resolved_config(self) -> BackendConfig:
        """The config with ``max_concurrent_queries`` resolved, as get_backend_config reports it."""
        return dataclasses.replace(self.config, max_concurrent_queries=self.max_concurrent_queries)

    def info(self) -> dict[str, Any]:
        """The plain dict list_backends shows for this backend."""
        out: dict[str, Any] = {
            "accepts_batches": self.callable.accepts_batches,
            "num_replicas": self.config.num_replicas,
            "max_batch_size": self.config.max_batch_size,
        }
        out.update(self.resolved_config().to_dict())
        return out

    @property
    def load(self) -> int:
        """Requests running or waiting here (the PowerOfTwo policy compares this)."""
        running = sum(r.in_flight for r in self.replicas)
        batched = sum(q.queued for q in self._batch_queues.values())
        return running + self._num_waiting + batched

    def statistics(self) -> BackendStatistics:
        """A snapshot of this backend's queue and replicas."""
        queued = self._num_waiting + sum(q.queued for q in self._batch_queues.values())
        return BackendStatistics(
            tag=self.tag,
            num_replicas=len(self.replicas),
            num_queued=queued,
            in_flight={r.replica_tag: r.in_flight for r in self.replicas},
        )

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a free replica slot."""
        return self._num_waiting

    # -- lifecycle ------------------------------------------------------------------------------

    def _new_replica(self, config: BackendConfig) -> Replica:
        # Batches take one slot each; the batch queue bounds how many run (one per replica).
        return Replica(
            self.tag,
            self.callable,
            max_concurrent_queries=config.resolved_max_concurrent_queries(
                is_async=self.callable.is_async
            ),
            release=self._release,
            instance=self._instance,
        )

    async def _start_replicas(self, replicas: Sequence[Replica], user_config: Any) -> None:
        # Concurrently: two constructors that wait on each other must both be able to finish.
        results = await asyncio.gather(
            *(r.start(user_config) for r in replicas), return_exceptions=True
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await asyncio.gather(*(r.aclose() for r in replicas))
            raise errors[0]

    async def start(self) -> None:
        """Start ``num_replicas`` replicas; on any failure, stop them all and raise."""
        replicas = [self._new_replica(self.config) for _ in range(self.config.num_replicas)]
        await self._start_replicas(replicas, self.config.user_config)
        self.replicas = replicas
        self.state = ReplicaState.RUNNING

    async def update(self, new: BackendConfig, *, reconfigure: bool) -> None:
        """Apply a validated config to the live backend; returns once it is in force."""
        validate_backend_config(self.tag, self.callable, new)
        old = self.config
        grow = new.num_replicas - len(self.replicas)
        # Nothing is in force until every step has worked: the config is assigned at the end,
        # and a failure (or a cancelled caller) undoes the steps taken.
        added = [self._new_replica(new) for _ in range(max(grow, 0))]
        changed: list[Replica] = []
        try:
            if added:
                await self._start_replicas(added, new.user_config)
            if reconfigure and new.user_config is not None:
                results = await asyncio.gather(
                    *(r.reconfigure(new.user_config) for r in self.replicas),
                    return_exceptions=True,
                )
                changed = [r for r, e in zip(self.replicas, results, strict=True) if e is None]
                errors = [e for e in results if isinstance(e, BaseException)]
                if errors:
                    raise errors[0]
        except BaseException:
            await asyncio.gather(*(r.aclose() for r in added))
            if changed and old.user_config is not None:
                # Put the old user_config back on the replicas that took the new one.
                await asyncio.gather(
                    *(r.reconfigure(old.user_config) for r in changed), return_exceptions=True
                )
            raise
        self.config = new
        limit = self.max_concurrent_queries
        replicas = self.replicas + added
        for replica in replicas:
            replica.max_concurrent_queries = limit
        if len(replicas) > new.num_replicas:
            replicas, removed = replicas[: new.num_replicas], replicas[new.num_replicas :]
            for replica in removed:
                replica.state = ReplicaState.DRAINING
                self._retiring_replicas.add(replica)
                self._retiring.spawn(self._retire(replica), name=f"retire {replica.replica_tag}")
        self.replicas = replicas
        for queue in self._batch_queues.values():
            queue.configure(
                max_batch_size=new.max_batch_size or 1,
                batch_wait_timeout_s=new.batch_wait_timeout,
                max_concurrent_batches=len(replicas),
                max_queued=new.max_queued_queries,
            )
        self._dispatch_waiters()

    async def _retire(self, replica: Replica) -> None:
        """Drain a replica taken out of routing, then stop it (also when cancelled)."""
        try:
            if replica.in_flight:
                await asyncio.wait_for(
                    replica.idle.wait(), timeout=self.config.graceful_shutdown_timeout_s
                )
        except TimeoutError:
            logger.warning(
                "Replica %s still had %d request(s) after %.1f s of draining; cancelling them.",
                replica.replica_tag,
                replica.in_flight,
                self.config.graceful_shutdown_timeout_s,
            )
        finally:
            replica.kill()
            await replica.aclose()
            self._retiring_replicas.discard(replica)

    async def aclose(self, *, force: bool = False) -> None:
        """Stop admitting; drain queued and running work (unless ``force``); stop. Idempotent."""
        if self.state in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            return
        self.state = ReplicaState.DRAINING
        timeout = self.config.graceful_shutdown_timeout_s
        queues = list(self._batch_queues.values())
        if not force:
            self._drained = asyncio.Event()
            self._check_drained()
            results = await asyncio.gather(
                asyncio.wait_for(self._drained.wait(), timeout),
                *(q.aclose(drain_timeout_s=timeout) for q in queues),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, TimeoutError):
                    raise result
        self._fail_waiters(
            ServeShutdown(f"Backend {self.tag!r} stopped before the request could start.")
        )
        for queue in queues:
            await queue.aclose()
        for replica in self.replicas:
            replica.state = ReplicaState.DRAINING
            replica.kill()
        await self._retiring.aclose()
        await asyncio.gather(*(r.aclose() for r in self.replicas))
        self.state = ReplicaState.STOPPED

    # -- the request path -----------------------------------------------------------------------

    async def call(
        self,
        method: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> Any:
        """Run one request on a replica of this backend and return its result."""
        if self.state is not _RUNNING:
            raise ServeShutdown(f"Backend {self.tag!r} is shutting down; it takes no new requests.")
        if deadline is not None and deadline <= asyncio.get_running_loop().time():
            raise DeadlineExceeded(
                f"The request's deadline passed before backend {self.tag!r} could start it."
            )
        if self.callable.accepts_batches and self.callable.method_accepts_batches(method):
            return await self._call_batched(method, args, kwargs, deadline)
        replica = None if self._num_waiting else self._try_acquire()
        if replica is None:
            replica = await self._wait(deadline, bounded=True)
        return await replica.call(method, args, kwargs)

    def _try_acquire(self) -> Replica | None:
        best: Replica | None = None
        best_load = 1 << 62
        for replica in self.replicas:
            n = replica.in_flight
            if n < best_load and n < replica.max_concurrent_queries:
                best, best_load = replica, n
                if n == 0:
                    break
        if best is not None:
            best.in_flight += 1
        return best

    async def _wait(self, deadline: float | None, *, bounded: bool) -> Replica:
        """Queue until a slot is handed over; the returned replica's slot is already taken."""
        limit = self.config.max_queued_queries
        if bounded and limit is not None and self._num_waiting >= limit:
            raise Overloaded(
                f"Backend {self.tag!r} is overloaded: {self._num_waiting} request(s) already wait "
                f"for a replica (max_queued_queries={limit}). Retry later."
            )
        _about_to_wait()
        loop = asyncio.get_running_loop()
        queue = self._queue
        if len(queue) > 64 and len(queue) > 2 * self._num_waiting:
            # Withdrawn entries are removed lazily; compact once they dominate.
            queue[:] = [e for e in queue if not e[2].done()]
            heapq.heapify(queue)
        future: asyncio.Future[Replica] = loop.create_future()
        entry = [_INF if deadline is None else deadline, next(self._seq), future]
        # The timer first: if it cannot be made, nothing has been queued yet.
        timer = None if deadline is None else loop.call_at(deadline, self._expire, entry)
        heapq.heappush(queue, entry)
        self._num_waiting += 1
        started = loop.time()
        try:
            replica = await future
            if self.metrics is not None:
                self.metrics.observe_queue_wait(self.tag, loop.time() - started)
            return replica
        except asyncio.CancelledError:
            if future.cancelled():
                self._num_waiting -= 1
                if self._drained is not None:
                    self._check_drained()
            elif future.exception() is None:
                self._release(future.result())
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, entry: list[Any]) -> None:
        future: asyncio.Future[Replica] = entry[2]
        if not future.done():
            self._num_waiting -= 1
            future.set_exception(
                DeadlineExceeded(
                    f"The request's deadline passed while it waited for a replica of backend "
                    f"{self.tag!r}."
                )
            )
            if self._drained is not None:
                self._check_drained()

    def _hand_off(self, replica: Replica) -> bool:
        """Give ``replica``'s slot, already counted, to the next live waiter."""
        queue = self._queue
        now = -_INF
        while queue:
            deadline, _, future = heapq.heappop(queue)
            if future.done():
                continue
            self._num_waiting -= 1
            if deadline != _INF:
                if now == -_INF:
                    now = asyncio.get_running_loop().time()
                if deadline <= now:
                    future.set_exception(
                        DeadlineExceeded(
                            f"The request's deadline passed while it waited for a replica of "
                            f"backend {self.tag!r}."
                        )
                    )
                    continue
            future.set_result(replica)
            return True
        return False

    def _release(self, replica: Replica) -> None:
        """A call on ``replica`` is over: pass its slot to a waiter, or free it."""
        if (
            self._num_waiting
            and replica.state is _RUNNING
            and replica.in_flight <= replica.max_concurrent_queries
            and self._hand_off(replica)
        ):
            return
        replica.in_flight -= 1
        if replica.in_flight == 0 and replica.state is not _RUNNING:
            replica.idle.set()
        if self._drained is not None:
            self._check_drained()

    def _dispatch_waiters(self) -> None:
        """Capacity grew: hand the new free slots to waiting requests."""
        while self._num_waiting:
            replica = self._try_acquire()
            if replica is None:
                return
            if not self._hand_off(replica):
                replica.in_flight -= 1
                return

    def _fail_waiters(self, exc: BaseException) -> None:
        queue, self._queue = self._queue, []
        for _, _, future in queue:
            if not future.done():
                future.set_exception(exc)
                # Waiters already cancelled count themselves out when their task resumes.
                self._num_waiting -= 1

    def _check_drained(self) -> None:
        if self._drained is not None and self.idle:
            self._drained.set()

    @property
    def idle(self) -> bool:
        """No request waits for a slot or runs, on routed replicas or on ones still draining.

        Batch queues drain on their own (``BatchQueue.aclose``); their dispatches hold slots.
        """
        return (
            not self._num_waiting
            and not any(r.in_flight for r in self.replicas)
            and not any(r.in_flight for r in self._retiring_replicas)
        )

    async def wait_idle(self) -> None:
        """Wait until :attr:`idle` (checked again whenever a call ends)."""
        self._drained = asyncio.Event()
        self._check_drained()
        await self._drained.wait()

    # -- batching -------------------------------------------------------------------------------

    async def _call_batched(
        self,
        method: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
    ) -> Any:
        if kwargs or len(args) != 1:
            raise ConfigTypeError(
                f"Calls to the batching backend {self.tag!r} take exactly one positional "
                f"argument, got {len(args)} positional and keyword argument(s) {sorted(kwargs)!r}."
            )
        queue = self._batch_queues.get(method)
        if queue is None:
            queue = self._batch_queues[method] = BatchQueue(
                self._batch_dispatcher(method),
                max_batch_size=self.config.max_batch_size or 1,
                batch_wait_timeout_s=self.config.batch_wait_timeout,
                max_concurrent_batches=len(self.replicas),
                max_queued=self.config.max_queued_queries,
                name=self.tag,
            )
            if self.metrics is not None:
                queue.on_batch = functools.partial(self.metrics.observe_batch, self.tag)
        _about_to_wait()
        return await queue.submit(args[0], deadline)

    def _batch_dispatcher(self, method: str | None) -> Callable[[list[Any]], Awaitable[Any]]:
        async def dispatch(items: list[Any]) -> Any:
            # A batch serves several requests: it runs as none of them (its task inherited the
            # context of whichever request happened to start the queue's worker).
            call_var.set(None)
            replica = self._try_acquire() or await self._wait(None, bounded=False)
            return await replica.call(method, (items,), {})

        return dispatch
