"""Replicas: one instance of a backend's callable and the rules for calling it.

:class:`UserCallable` analyses what the user gave ``create_backend`` once per backend (function or
class, sync or async, batching or not, how each call shape binds to the signature); :class:`Replica`
is one running instance of it. Async user code runs in the caller's own task; sync user code runs on
the replica's own thread (one call at a time, like an actor), never on the event loop.

A replica does not choose what it runs: its backend takes a slot (``in_flight += 1``) and hands it
to :meth:`Replica.call`, which gives it back through the backend's ``release`` callback when the
work is really over (for a sync call that was cancelled, only once its thread has finished).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from ._concurrency import ReplicaThread, current_task
from ._importer import import_attr
from .batching import BatchQueue, accepts_batches, queue_owner
from .exceptions import (
    BackendError,
    ConfigError,
    ConfigTypeError,
    MethodNotFound,
    ReplicaStopped,
    ServeError,
)
from .request import call_var, current_replica, python_request, replica_var

__all__ = [
    "Replica",
    "ReplicaContext",
    "ReplicaState",
    "UserCallable",
    "get_replica_context",
    "replica_var",
]

logger = logging.getLogger(__name__)


class ReplicaState(enum.Enum):
    """Lifecycle of a replica (and of a backend)."""

    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What user code can learn about the replica it runs in (``serve.get_replica_context()``)."""

    backend_tag: str
    replica_tag: str
    servable_object: Any = dataclasses.field(default=None, compare=False, repr=False)
    # The aioserve instance the replica belongs to (used by ``serve.connect()`` inside a backend).
    instance: Any = dataclasses.field(default=None, compare=False, repr=False)


def _outside_requests(context: ReplicaContext) -> None:
    # In a copied context for a replica's constructor: its own replica, and no request (it may
    # have been created from inside one, by a handler calling create_backend).
    call_var.set(None)
    replica_var.set(context)


def get_replica_context() -> ReplicaContext:
    """The context of the replica running the current call; raises outside of one."""
    ctx = current_replica()
    if ctx is None:
        raise ServeError(
            "get_replica_context() was called outside of a backend replica; "
            "it only works inside a backend's constructor, handler or reconfigure()."
        )
    assert isinstance(ctx, ReplicaContext)  # only replicas set the variable
    return ctx


class _Kind(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    ASYNC_GEN = "async generator"


def _kind_of(fn: Callable[..., Any]) -> _Kind:
    if inspect.isasyncgenfunction(fn):
        return _Kind.ASYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return _Kind.ASYNC
    return _Kind.SYNC


class _Mode(enum.IntEnum):
    AS_GIVEN = 0  # call with exactly the handle's arguments
    REQUEST_FIRST = 1  # 0.8 style: a request object, then the arguments
    REQUEST_ONLY = 2  # 1.x style: only a request, built from the arguments


# Reading an enum member costs about 50 ns on 3.11; the request path compares with these instead.
_SYNC = _Kind.SYNC
_ASYNC_GEN = _Kind.ASYNC_GEN
_REQUEST_FIRST = _Mode.REQUEST_FIRST

_PLACEHOLDER = object()
_NO_KWARGS: dict[str, Any] = {}  # never mutated: only ever unpacked with **


class UserCallable:
    """A backend's function or class, analysed once and shared by all its replicas."""

    def __init__(self, target: Any, init_args: tuple[Any, ...] = ()) -> None:
        if isinstance(target, str):
            target = import_attr(target)
        if inspect.isclass(target):
            self.is_class = True
            call = getattr(target, "__call__", None)  # noqa: B004
            # A class without __call__ is allowed: it is reached through method names only.
            self.kind = _kind_of(call) if call is not None else _Kind.SYNC
        elif callable(target):
            if not (inspect.isroutine(target) or isinstance(target, functools.partial)):
                cls = type(target).__name__
                raise ConfigTypeError(
                    f"create_backend takes a function, a class or an import path, got an "
                    f"instance of {cls}. Pass the class itself and its constructor arguments "
                    f"instead: create_backend(tag, {cls}, *init_args)."
                )
            if init_args:
                raise ConfigTypeError(
                    f"Constructor arguments {init_args!r} were given with the function "
                    f"{getattr(target, '__name__', target)!r}; they only apply to a class."
                )
            self.is_class = False
            self.kind = _kind_of(target)
        else:
            raise ConfigTypeError(
                f"create_backend takes a function, a class or an import path string, got "
                f"{target!r} of type {type(target).__name__}."
            )
        self.target = target
        self.init_args = init_args
        self.name = getattr(target, "__qualname__", repr(target))
        # A class batches if it, or any of its callable methods, is marked @accept_batch; which
        # calls take lists is then decided per method (method_accepts_batches).
        self.accepts_batches = accepts_batches(target) or (
            self.is_class
            and any(
                accepts_batches(getattr(target, name, None))
                for name in dir(target)
                if name == "__call__" or not name.startswith("_")
            )
        )
        self.has_reconfigure = self.is_class and callable(getattr(target, "reconfigure", None))
        self.uses_batch_decorator = _uses_batch_decorator(target)
        self._modes: dict[tuple[Any, ...], _Mode] = {}
        self._method_batches: dict[str | None, bool] = {}

    @property
    def is_async(self) -> bool:
        """Whether the main entry point (the function, or the class's ``__call__``) is async."""
        return self.kind is not _Kind.SYNC

    def method_accepts_batches(self, method: str | None) -> bool:
        """Whether calls to ``method`` (None: the default entry point) take lists."""
        cached = self._method_batches.get(method)
        if cached is None:
            if not self.is_class:
                cached = self.accepts_batches
            else:
                # The class's mark covers every method; otherwise the method's own mark decides.
                name = "__call__" if method is None else method
                cached = accepts_batches(self.target) or accepts_batches(
                    getattr(self.target, name, None)
                )
            self._method_batches[method] = cached
        return cached

    def construct(self) -> Any:
        """Build one instance (runs on a replica thread, never on the loop)."""
        if not self.is_class:
            return self.target
        return self.target(*self.init_args)

    def mode_for(
        self,
        key: tuple[Any, ...],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kw: Mapping[str, Any],
    ) -> _Mode:
        """How a call of this shape binds to ``fn``; decided once per shape, then cached."""
        mode = self._modes.get(key)
        if mode is None:
            mode = self._modes[key] = _decide_mode(fn, args, kw)
        return mode

    def __repr__(self) -> str:
        what = "class" if self.is_class else "function"
        return f"<UserCallable {what} {self.name} {self.kind.value}>"


def _uses_batch_decorator(target: Any) -> bool:
    if hasattr(target, "__serve_batch_params__"):
        return True
    if inspect.isclass(target):
        return any(
            hasattr(getattr(target, name, None), "__serve_batch_params__") for name in dir(target)
        )
    return False


def _decide_mode(fn: Callable[..., Any], args: tuple[Any, ...], kw: Mapping[str, Any]) -> _Mode:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call as given
        return _Mode.AS_GIVEN
    for mode, leading in ((_Mode.AS_GIVEN, ()), (_Mode.REQUEST_FIRST, (_PLACEHOLDER,))):
        try:
            sig.bind(*leading, *args, **kw)
        except TypeError:
            continue
        return mode
    if len(args) <= 1:
        try:
            sig.bind(_PLACEHOLDER)
        except TypeError:
            pass
        else:
            return _Mode.REQUEST_ONLY
    name = getattr(fn, "__qualname__", repr(fn))
    raise ConfigTypeError(
        f"{name}{sig} cannot be called with {len(args)} positional argument(s) and keyword "
        f"argument(s) {sorted(kw)!r}, nor with a request object in front of them."
    )


def _adapt(
    mode: _Mode, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if mode is _REQUEST_FIRST:
        return (python_request(None, kwargs), *args), kwargs
    return (python_request(args[0] if args else None, kwargs),), _NO_KWARGS


class Replica:
    """One running instance of a backend's callable, with its concurrency limit."""

    def __init__(
        self,
        backend_tag: str,
        user_callable: UserCallable,
        *,
        max_concurrent_queries: int,
        release: Callable[[Replica], None],
        instance: Any = None,
    ) -> None:
        self.backend_tag = backend_tag
        self.replica_tag = f"{backend_tag}#{secrets.token_hex(3)}"
        self.callable = user_callable
        self._uses_batch_decorator = user_callable.uses_batch_decorator
        self.max_concurrent_queries = max_concurrent_queries
        self.in_flight = 0
        self.state = ReplicaState.STARTING
        self.idle = asyncio.Event()
        self._release = release
        self._instance_of_serve = instance
        self._thread = ReplicaThread(f"aioserve-{self.replica_tag}")
        self._obj: Any = None
        # method -> (bound callable, kind, {number of positional args: call mode})
        self._methods: dict[str | None, tuple[Callable[..., Any], _Kind, dict[int, _Mode]]] = {}
        self._running: set[asyncio.Task[Any]] = set()
        self._batch_queues: list[BatchQueue[Any, Any]] = []
        self._killed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it started on
        self.context = ReplicaContext(backend_tag, self.replica_tag, None, instance)

    def __repr__(self) -> str:
        return (
            f"<Replica {self.replica_tag} {self.state.value} in_flight={self.in_flight}"
            f"/{self.max_concurrent_queries}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, user_config: Any = None) -> None:
        """Construct the instance on the replica's thread, then apply ``user_config``."""
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
        if user_config is not None:
            await self.reconfigure(user_config)
        self.state = ReplicaState.RUNNING

    async def reconfigure(self, user_config: Any) -> None:
        """Call the instance's ``reconfigure(user_config)`` (on its thread if it is sync)."""
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
            if _kind_of(method) is _Kind.SYNC:
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

    def kill(self) -> None:
        """Cancel the async calls running now; they fail with :class:`ReplicaStopped`."""
        self._killed = True
        for task in list(self._running):
            task.cancel()

    async def aclose(self) -> None:
        """Stop: close the batch queues user code made, drop queued thread calls. Idempotent."""
        if self.state is ReplicaState.STOPPED:
            return
        self.state = ReplicaState.STOPPED
        queues, self._batch_queues = self._batch_queues, []
        for queue in queues:
            await queue.aclose()
        self._thread.shutdown()

    # -- calls ----------------------------------------------------------------------------------

    def _resolve(self, method: str | None) -> tuple[Callable[..., Any], _Kind, dict[int, _Mode]]:
        entry = self._methods.get(method)
        if entry is not None:
            return entry
        if not self.callable.is_class:
            if method not in (None, "__call__"):
                raise MethodNotFound(
                    f"Backend {self.backend_tag!r} is the function {self.callable.name}; "
                    f"it has no method {method!r}."
                )
            fn = self._obj
        else:
            name = method or "__call__"
            if name.startswith("_") and name != "__call__":
                raise MethodNotFound(
                    f"Method {name!r} of backend {self.backend_tag!r} is private and cannot "
                    "be called."
                )
            fn = getattr(self._obj, name, None)
            if fn is None or not callable(fn):
                public = sorted(
                    n
                    for n in dir(self._obj)
                    if not n.startswith("_") and callable(getattr(self._obj, n, None))
                )
                raise MethodNotFound(
                    f"Backend {self.backend_tag!r} ({self.callable.name}) has no method "
                    f"{name!r}. Its public methods: {', '.join(public) or 'none'}."
                )
        entry = self._methods[method] = (fn, _kind_of(fn), {})
        return entry

    def _enter(self) -> contextvars.Token[Any] | None:
        """Make this replica the one serving the current call.

        The call's own CallContext records it (an attribute write); only code serving no request
        takes the context variable, and gets the token to reset it with.
        """
        call = call_var.get()
        if call is not None:
            call.replica = self.context
            return None
        return replica_var.set(self.context)

    def _owning(self, queue: BatchQueue[Any, Any]) -> None:
        self._batch_queues.append(queue)

    async def call(self, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one call on this replica. The caller holds one of its slots; this gives it back."""
        try:
            fn, kind, by_nargs = self._methods.get(method) or self._resolve(method)
            mode: _Mode | None
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
                args, kwargs = _adapt(mode, args, kwargs)
        except BaseException:
            self._release(self)
            raise
        if kind is _SYNC:
            return await self._call_sync(fn, args, kwargs)
        if kind is _ASYNC_GEN:
            return self._stream(fn(*args, **kwargs))
        task = current_task(self._loop)
        assert task is not None  # always called from a task: we are in a coroutine
        self._running.add(task)
        token = self._enter()
        owner_token = queue_owner.set(self._owning) if self._uses_batch_decorator else None
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            if self._killed and task.uncancel() == 0:
                raise ReplicaStopped(
                    f"Replica {self.replica_tag} was stopped while serving the request."
                ) from None
            raise
        finally:
            if owner_token is not None:
                queue_owner.reset(owner_token)
            if token is not None:
                replica_var.reset(token)
            self._running.discard(task)
            self._release(self)

    async def _call_sync(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        ctx = contextvars.copy_context()
        ctx.run(self._enter)  # a variable it sets stays in the thread's copy
        try:
            future = self._thread.submit(ctx, fn, *args, **kwargs)
        except RuntimeError:  # the executor is shut down: the replica, or the interpreter, stops
            self._release(self)
            raise ReplicaStopped(
                f"Replica {self.replica_tag} is stopped; it cannot run the request."
            ) from None
        release_later = False
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancelled() and self._killed:
                raise ReplicaStopped(
                    f"Replica {self.replica_tag} was stopped before it ran the request."
                ) from None
            if not future.done():
                # The thread may be running it: the slot stays taken until the thread is done.
                release_later = True
                loop = asyncio.get_running_loop()
                future.add_done_callback(lambda _: _call_soon(loop, self._release, self))
            raise
        finally:
            if not release_later:
                self._release(self)

    async def _stream(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """An async generator handler's items, produced inside the replica: its slot stays
        taken and ``get_replica_context()`` works until the stream ends or is closed."""
        try:
            while True:
                token = self._enter()
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                finally:
                    if token is not None:
                        replica_var.reset(token)
                yield item
        finally:
            try:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._release(self)


def _call_soon(
    loop: asyncio.AbstractEventLoop, fn: Callable[[Replica], None], arg: Replica
) -> None:
    # A closed loop has nothing left to release the slot to.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, arg)
