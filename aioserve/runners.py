"""Runners: how a replica's code runs. :class:`InProcessRunner` runs it in this process.

A runner implements the :class:`~aioserve._types.Runner` Protocol (see its docstring for what a
new runner must provide). The in-process runner builds the user's object on the replica's own
thread and then runs

* sync handlers on that thread, one call at a time, like an actor (never on the event loop);
* async handlers in the caller's own task (no hop);
* generators, sync or async, as a :class:`~aioserve._types.Stream`: each item is produced inside
  the replica (a sync generator on its thread), and the backend keeps the slot until it ends;
* for a class decorated with ``@serve.ingress``, calls of method ``ASGI_METHOD``: the class's
  FastAPI app, in the caller's task, with the class's ``def`` routes on the replica's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from types import GeneratorType
from typing import Any

from ._concurrency import ReplicaThread, current_task
from ._types import ASGI_METHOD, Call, Receive, Scope, Send, Stream
from .batching import BatchQueue, queue_owner, sync_batch_runner
from .callable import Kind, UserCallable, adapt, bind_method, kind_of
from .context import ReplicaContext, call_var, replica_var
from .exceptions import BackendError, ConfigError, ReplicaStopped
from .ingress import replica_thread
from .metrics import Metrics

__all__ = ["InProcessRunner"]

logger = logging.getLogger(__name__)

# Reading an enum member costs about 50 ns on 3.11; the request path compares with these instead.
_SYNC = Kind.SYNC
_ASYNC = Kind.ASYNC
_ASYNC_GEN = Kind.ASYNC_GEN
_SYNC_GEN = Kind.SYNC_GEN
_DONE = object()  # what a sync generator's next step returns when it is exhausted


def _outside_requests(context: ReplicaContext) -> None:
    # In a copied context for a replica's constructor: its own replica, and no request (it may
    # have been created from inside one, by a handler calling create_backend).
    call_var.set(None)
    replica_var.set(context)


def _next_or_done(items: Iterator[Any]) -> Any:
    return next(items, _DONE)


class InProcessRunner:
    """One replica of a backend, as an object in this process. See the module docstring."""

    def __init__(self, backend_tag: str, user_callable: UserCallable, instance: Any = None) -> None:
        self.backend_tag = backend_tag
        self.replica_tag = f"{backend_tag}#{secrets.token_hex(3)}"
        self.callable = user_callable
        self._uses_batch_decorator = user_callable.uses_batch_decorator
        self._thread = ReplicaThread(f"aioserve-{self.replica_tag}")
        self._obj: Any = None
        # method -> (bound handler, kind, {number of positional args: call mode})
        self._methods: dict[str | None, tuple[Callable[..., Any], Kind, dict[int, Any]]] = {}
        self._running: set[asyncio.Task[Any]] = set()
        # Callers waiting for a sync call on the replica's thread (kill() lets them go).
        self._waiting_on_thread: set[asyncio.Future[Any]] = set()
        self._batch_queues: list[BatchQueue[Any, Any]] = []
        self._killed = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it started on
        self.context = ReplicaContext(backend_tag, self.replica_tag, None, instance)
        # The instance's metrics, where @serve.batch queues made in this replica are measured.
        metrics = getattr(instance, "metrics", None)
        self._metrics = metrics if isinstance(metrics, Metrics) else None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "killed" if self._killed else "live"
        return f"<InProcessRunner {self.replica_tag} {state} running={len(self._running)}>"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, user_config: Any = None) -> None:
        """Construct the object on the replica's thread, then apply ``user_config``."""
        self._loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        ctx.run(_outside_requests, self.context)
        try:
            self._obj = await asyncio.wrap_future(self._thread.submit(ctx, self.callable.construct))
        except Exception as exc:
            raise BackendError(
                f"The constructor of backend {self.backend_tag!r} ({self.callable.name}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.context = dataclasses.replace(self.context, servable_object=self._obj)
        app = self.callable.ingress
        if app is not None:
            self._methods[ASGI_METHOD] = (self._asgi_handler(app), _ASYNC, {})
        if user_config is not None:
            await self.reconfigure(user_config)

    async def reconfigure(self, user_config: Any) -> None:
        """Call the object's ``reconfigure(user_config)`` (on its thread if it is sync)."""
        method = getattr(self._obj, "reconfigure", None)
        if method is None:
            raise ConfigError(
                f"Backend {self.backend_tag!r} was given a user_config, but "
                f"{self.callable.name} has no reconfigure(user_config) method."
            )
        # This replica's own code, not part of a request that may have asked for the change.
        call_token = call_var.set(None)
        token = replica_var.set(self.context)
        try:
            if kind_of(method) is _SYNC:
                await self._thread.run(method, user_config)
            else:
                await method(user_config)
        except Exception as exc:
            raise BackendError(
                f"reconfigure() of backend {self.backend_tag!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            replica_var.reset(token)
            call_var.reset(call_token)

    @property
    def killed(self) -> bool:
        """Whether :meth:`kill` has been called."""
        return self._killed

    def check_alive(self) -> None:
        """Raise :class:`ReplicaStopped` once :meth:`kill` has been called."""
        if self._killed:
            raise ReplicaStopped(f"Replica {self.replica_tag} was stopped during the stream.")

    def kill(self) -> None:
        """Stop serving at once: the async calls running now are cancelled, and the callers
        waiting on the replica's thread (running or queued there) stop waiting; all of them fail
        with :class:`ReplicaStopped`.

        A thread cannot be killed: a sync handler that is running goes on until it returns, on its
        own; its result is discarded and the replica's thread ends after it. Calls queued behind it
        never run. The thread is a daemon, so one stuck for good never keeps the process alive.
        """
        self._killed = True
        for task in list(self._running):
            task.cancel()
        for waiter in list(self._waiting_on_thread):
            waiter.cancel()  # also cancels the thread's future if it has not started yet

    async def aclose(self) -> None:
        """Stop: close the batch queues user code made, drop queued thread calls. Idempotent."""
        if self._closed:
            return
        self._closed = True
        queues, self._batch_queues = self._batch_queues, []
        for queue in queues:
            await queue.aclose()
        self._thread.shutdown()

    # -- calls ----------------------------------------------------------------------------------

    def _resolve(self, method: str | None) -> tuple[Callable[..., Any], Kind, dict[int, Any]]:
        entry = self._methods.get(method)
        if entry is None:
            fn = bind_method(self._obj, method, self.callable, self.backend_tag)
            entry = self._methods[method] = (fn, kind_of(fn), {})
        return entry

    def _enter(self) -> contextvars.Token[Any] | None:
        """Make this replica the one serving the current code.

        The request's own Call records it (an attribute write); only code serving no request
        takes the context variable, and gets the token to reset it with.
        """
        call = call_var.get()
        if call is not None:
            call.replica = self.context
            return None
        return replica_var.set(self.context)

    def _owning(self, queue: BatchQueue[Any, Any]) -> None:
        self._batch_queues.append(queue)
        if self._metrics is not None:
            # The queue's name is the batched function's qualified name; its last part labels it.
            method = queue.name.rpartition(".")[2]
            queue.on_batch = functools.partial(
                self._metrics.observe_batch, self.backend_tag, method
            )
            queue.on_wait = functools.partial(
                self._metrics.observe_queue_wait, self.backend_tag, method
            )

    async def _run_sync_batch(self, batch: Callable[[], Any]) -> Any:
        """Run a sync ``@serve.batch`` function's batch on this replica's thread, as the
        replica's own code (a batch serves several requests, so it runs as none of them)."""
        ctx = contextvars.copy_context()
        ctx.run(_outside_requests, self.context)
        return await asyncio.wrap_future(self._submit(ctx, batch))

    async def call(self, call: Call) -> Any:
        """Run one call; a generator handler's items come back as a :class:`Stream`."""
        method = call.method
        args = call.args
        kwargs = call.kwargs
        fn, kind, by_nargs = self._methods.get(method) or self._resolve(method)
        mode: Any
        if kwargs:
            key: tuple[Any, ...] = (method, len(args), tuple(kwargs))
            mode = self.callable.mode_for(key, fn, args, kwargs)
        else:
            # The common shape (positional arguments only) skips building a key.
            mode = by_nargs.get(len(args))
            if mode is None:
                key = (method, len(args))
                mode = by_nargs[len(args)] = self.callable.mode_for(key, fn, args, kwargs)
        if mode:
            args, kwargs = adapt(mode, args, kwargs, call.http)
        if kind is _ASYNC:
            # Inline, not a helper coroutine: this is the hot path (one frame less per call).
            task = current_task(self._loop)
            assert task is not None  # always called from a task: we are in a coroutine
            self._running.add(task)
            token = self._enter()
            owner_token = runner_token = None
            if self._uses_batch_decorator:
                owner_token = queue_owner.set(self._owning)
                runner_token = sync_batch_runner.set(self._run_sync_batch)
            try:
                result = await fn(*args, **kwargs)
            except asyncio.CancelledError:
                if self._killed and task.uncancel() == 0:
                    raise ReplicaStopped(
                        f"Replica {self.replica_tag} was stopped while serving the request."
                    ) from None
                raise
            finally:
                if owner_token is not None and runner_token is not None:
                    sync_batch_runner.reset(runner_token)
                    queue_owner.reset(owner_token)
                if token is not None:
                    replica_var.reset(token)
                self._running.discard(task)
            if type(result) is GeneratorType:  # an async handler that returned a sync generator
                return _ThreadStream(self, result)
            return result
        if kind is _ASYNC_GEN:
            return _AsyncStream(self, fn(*args, **kwargs))
        if call.prefetch is not None:
            await call.prefetch()  # sync code reads the body with request.get_data()
        result = await self._call_sync(call, fn, args, kwargs)
        if kind is _SYNC_GEN or inspect.isgenerator(result):
            return _ThreadStream(self, result)
        return result

    def _asgi_handler(self, app: Any) -> Callable[[Scope, Receive, Send], Any]:
        """The handler of ASGI_METHOD calls: the ingress app, with this replica's thread for
        the class's ``def`` routes."""
        run_route = self._run_route

        async def serve_asgi(scope: Scope, receive: Receive, send: Send) -> None:
            token = replica_thread.set(run_route)
            try:
                await app(scope, receive, send)
            finally:
                replica_thread.reset(token)

        return serve_asgi

    async def _run_route(self, work: Callable[[], Any]) -> Any:
        """Run a sync route function of an ingress app on this replica's thread, as the
        request it serves."""
        return await self._call_sync(call_var.get(), work, (), {})

    async def _call_sync(
        self,
        call: Call | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        ctx = contextvars.copy_context()
        ctx.run(self._enter)  # a variable it sets stays in the thread's copy
        future = self._submit(ctx, fn, *args, **kwargs)
        try:
            return await self._wait_thread(future)
        except (asyncio.CancelledError, ReplicaStopped):
            if not future.done() and call is not None:
                # The thread may be running it: the slot stays taken until the thread is done.
                call.lingering = asyncio.wrap_future(future)
            raise

    async def _wait_thread(self, future: concurrent.futures.Future[Any]) -> Any:
        """Wait for work on the replica's thread; :meth:`kill` lets the waiter go at once."""
        waiter = asyncio.wrap_future(future)
        self._waiting_on_thread.add(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            task = current_task(self._loop)
            if self._killed and (task is None or not task.cancelling()):
                # kill() let go of the call (the caller itself was not cancelled): the caller
                # learns at once; a thread stuck in the handler is left to finish on its own.
                raise ReplicaStopped(
                    f"Replica {self.replica_tag} was stopped while serving the request."
                ) from None
            raise
        finally:
            self._waiting_on_thread.discard(waiter)

    def _submit(
        self, ctx: contextvars.Context, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        try:
            return self._thread.submit(ctx, fn, *args, **kwargs)
        except RuntimeError:  # the executor is shut down: the replica, or the interpreter, stops
            raise ReplicaStopped(
                f"Replica {self.replica_tag} is stopped; it cannot run the request."
            ) from None


class _AsyncStream(Stream):
    """An async generator handler's items, each produced as the replica's own code."""

    __slots__ = ("_items", "_runner")

    def __init__(self, runner: InProcessRunner, items: AsyncIterator[Any]) -> None:
        self._runner = runner
        self._items = items

    async def __anext__(self) -> Any:
        runner = self._runner
        runner.check_alive()
        task = current_task(runner._loop)
        assert task is not None  # always called from a task: we are in a coroutine
        runner._running.add(task)  # kill() cancels a step under way
        token = runner._enter()
        try:
            return await anext(self._items)
        except asyncio.CancelledError:
            if runner.killed and task.uncancel() == 0:
                raise ReplicaStopped(
                    f"Replica {runner.replica_tag} was stopped during the stream."
                ) from None
            raise
        finally:
            if token is not None:
                replica_var.reset(token)
            runner._running.discard(task)

    async def aclose(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            await aclose()


class _ThreadStream(Stream):
    """A sync generator's items, each produced on the replica's thread (never on the loop)."""

    __slots__ = ("_ctx", "_items", "_runner")

    def __init__(self, runner: InProcessRunner, items: Iterator[Any]) -> None:
        self._runner = runner
        self._items = items
        self._ctx = contextvars.copy_context()
        self._ctx.run(runner._enter)

    async def __anext__(self) -> Any:
        future = self._runner._submit(self._ctx, _next_or_done, self._items)
        item = await self._runner._wait_thread(future)
        if item is _DONE:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        close = getattr(self._items, "close", None)
        # A stopped replica's thread may be stuck in the generator: leave it to that thread.
        if close is not None and not self._runner._killed:
            with contextlib.suppress(ReplicaStopped):  # the replica is gone, its thread with it
                await asyncio.wrap_future(self._runner._submit(self._ctx, close))
