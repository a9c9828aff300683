"""The batching decorators: :func:`accept_batch` (the legacy marker a backend reads) and
:func:`batch` (Ray 1.3's ``@serve.batch``, which builds a :class:`~aioserve.batchqueue.BatchQueue`
per instance, or per function and event loop, on first call).

A batched function may be ``async def`` (its batches run on the event loop) or a plain ``def``
(its batches run off the loop: on the replica's thread when :data:`sync_batch_runner` says so, as
it does inside a replica, else in the loop's default thread pool). Either way callers ``await``
the decorated callable with one item.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import MethodType
from typing import Any, NamedTuple, Protocol, TypeVar, overload

from .batchqueue import BatchQueue, BatchQueueStats
from .config import WaitPolicy, check_int, check_seconds, check_wait_policy
from .exceptions import ConfigTypeError

__all__ = [
    "BatchQueue",
    "BatchQueueStats",
    "accept_batch",
    "accepts_batches",
    "batch",
    "queue_owner",
    "sync_batch_runner",
]

T = TypeVar("T")
R = TypeVar("R")
S = TypeVar("S")
F = TypeVar("F")

_ACCEPT_BATCH_ATTR = "__serve_accept_batch__"
_BATCH_PARAMS_ATTR = "__serve_batch_params__"


def accept_batch(obj: F) -> F:
    """Mark a function, a method or a class as taking a list of requests (legacy API).

    A backend whose callable is marked gets lists when its config sets ``max_batch_size``; a
    marked class takes lists in every method. Returns ``obj`` unchanged.
    """
    target = obj.__func__ if isinstance(obj, MethodType) else obj
    try:
        setattr(target, _ACCEPT_BATCH_ATTR, True)
    except (AttributeError, TypeError) as exc:
        raise ConfigTypeError(
            f"@accept_batch can only mark a function, a method or a class, got {obj!r}."
        ) from exc
    return obj


def _is_marked(obj: object) -> bool:
    # getattr_static: never trigger a user __getattr__ (a Mock would answer anything).
    return inspect.getattr_static(obj, _ACCEPT_BATCH_ATTR, False) is True


def accepts_batches(obj: object) -> bool:
    """Return True if ``obj`` was marked with :func:`accept_batch`.

    A function or class is checked itself (a subclass of a marked class counts), an instance by
    its class, and a bound method by its function or by the class it is bound to.
    """
    if isinstance(obj, MethodType):
        owner = obj.__self__
        owner_class = owner if isinstance(owner, type) else type(owner)
        return _is_marked(obj.__func__) or _is_marked(owner_class)
    return _is_marked(obj)


queue_owner: contextvars.ContextVar[Callable[[BatchQueue[Any, Any]], None] | None] = (
    contextvars.ContextVar("aioserve_batch_queue_owner", default=None)
)
"""Who owns the queues that :func:`batch` creates lazily in this context.

When set, it is called with every new queue, so the owner (the replica running user code) can
close them when it stops. Function queues are kept per event loop and per owner.
"""

SyncRunner = Callable[[Callable[[], Any]], Awaitable[Any]]

sync_batch_runner: contextvars.ContextVar[SyncRunner | None] = contextvars.ContextVar(
    "aioserve_sync_batch_runner", default=None
)
"""Where the batches of a sync (``def``) batched function run, for queues created in this context.

When set, it is called with a function of no arguments (the batch) and returns an awaitable of its
result; a replica sets it to run the batch on its own thread. When unset, batches run in the
event loop's default thread pool (:func:`asyncio.to_thread`). Never on the event loop.
"""


class _BatchDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[[list[T]], Awaitable[Sequence[R]]], /
    ) -> Callable[[T], Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(
        self, func: Callable[[S, list[T]], Awaitable[Sequence[R]]], /
    ) -> Callable[[S, T], Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(
        self, func: Callable[[list[T]], Sequence[R]], /
    ) -> Callable[[T], Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(
        self, func: Callable[[S, list[T]], Sequence[R]], /
    ) -> Callable[[S, T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: Callable[[list[T]], Awaitable[Sequence[R]]], /
) -> Callable[[T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: Callable[[S, list[T]], Awaitable[Sequence[R]]], /
) -> Callable[[S, T], Coroutine[Any, Any, R]]: ...


@overload
def batch(func: Callable[[list[T]], Sequence[R]], /) -> Callable[[T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: Callable[[S, list[T]], Sequence[R]], /
) -> Callable[[S, T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: None = None,
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.0,
    batch_wait_policy: WaitPolicy = "adaptive",
) -> _BatchDecorator: ...


def batch(
    func: Callable[..., Any] | None = None,
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.0,
    batch_wait_policy: WaitPolicy = "adaptive",
) -> Any:
    """Batch calls to a function or method (Ray 1.3's ``@serve.batch``), ``async def`` or not.

    The decorated callable is awaited with one item and returns that item's result; the wrapped
    function receives a list of items and must return a list of results of the same length::

        class Model:
            @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
            def predict(self, inputs: list[list[float]]) -> list[int]:
                return self.model.predict(inputs).tolist()  # on the replica's thread

            async def __call__(self, request):
                return await self.predict((await request.json())["pixels"])

    A sync function's batches run off the event loop (see :data:`sync_batch_runner`). A handler
    reaches a batched method by awaiting it, so the handler is ``async def``: a sync handler runs
    one call at a time on the replica's thread and would have nothing to batch.

    ``batch_wait_timeout_s`` bounds how long a batch waits for more items; with the default
    ``batch_wait_policy="adaptive"`` a batch that waiting cannot be expected to grow goes out at
    once, and ``"fixed"`` always waits until the batch is full or the timeout has passed (see
    :mod:`aioserve.batchqueue`). A method gets one queue per instance; a function one per event
    loop (and per :data:`queue_owner`). Usable bare (``@batch``) or with keyword arguments.
    """
    given: object = max_batch_size
    if isinstance(given, float) and given.is_integer():
        given = int(given)  # 1.3 took a whole-number float
    size = check_int("max_batch_size", given)
    timeout = check_seconds("batch_wait_timeout_s", batch_wait_timeout_s)
    settings = _Settings(size, timeout, check_wait_policy("batch_wait_policy", batch_wait_policy))
    if func is None:
        return functools.partial(_make_batched, settings=settings)
    return _make_batched(func, settings=settings)


def _positional_arity(func: Callable[..., Any]) -> int | None:
    """1 for a function taking the list, 2 for a method; None when only a call can tell."""
    parameters = inspect.signature(func).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = sum(1 for p in parameters if p.kind in positional and p.default is p.empty)
    if required not in (1, 2):
        raise ConfigTypeError(
            f"@serve.batch needs a function that takes the list of items (after self, for a "
            f"method), got {func!r} with signature {inspect.signature(func)}."
        )
    return required


class _Settings(NamedTuple):
    max_batch_size: int
    batch_wait_timeout_s: float
    batch_wait_policy: WaitPolicy


def _off_the_loop(func: Callable[..., Sequence[Any]]) -> Callable[..., Awaitable[Sequence[Any]]]:
    """The dispatch of a sync batch function: each batch runs where :data:`sync_batch_runner`
    (read when the queue is made) says, or in the default thread pool."""
    run: SyncRunner = sync_batch_runner.get() or asyncio.to_thread

    async def dispatch(items: list[Any]) -> Sequence[Any]:
        result: Sequence[Any] = await run(functools.partial(func, items))
        return result

    return dispatch


def _make_batched(
    func: Callable[..., Any], *, settings: _Settings
) -> Callable[..., Coroutine[Any, Any, Any]]:
    is_async = inspect.iscoroutinefunction(func)
    if not is_async and (
        not (inspect.isroutine(func) or isinstance(func, functools.partial))
        or inspect.isgeneratorfunction(func)
        or inspect.isasyncgenfunction(func)
    ):
        hint = (
            " Pass the settings as keywords: @serve.batch(max_batch_size=...)."
            if not callable(func)
            else ""
        )
        raise ConfigTypeError(
            f"@serve.batch can only be used on functions and methods that return a list "
            f"(async def or def), got {func!r}.{hint}"
        )
    arity = _positional_arity(func)
    name = getattr(func, "__qualname__", repr(func))
    attr = f"_aioserve_batch_queue:{name}"
    # Per loop, then per owner: replicas sharing a loop must not share (and close) one queue.
    function_queues: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[object, BatchQueue[Any, Any]]
    ] = weakref.WeakKeyDictionary()

    def new_queue(handler: Callable[[list[Any]], Any]) -> BatchQueue[Any, Any]:
        queue: BatchQueue[Any, Any] = BatchQueue(
            handler if is_async else _off_the_loop(handler),
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            batch_wait_policy=settings.batch_wait_policy,
            name=name,
        )
        owner = queue_owner.get()
        if owner is not None:
            owner(queue)
        return queue

    def function_queue() -> BatchQueue[Any, Any]:
        by_owner = function_queues.setdefault(asyncio.get_running_loop(), {})
        for key in [key for key, queue in by_owner.items() if queue.closed]:
            del by_owner[key]
        owner = queue_owner.get()
        queue = by_owner.get(owner)
        if queue is None:
            queue = by_owner[owner] = new_queue(func)
        return queue

    def method_queue(instance: object) -> BatchQueue[Any, Any]:
        try:
            namespace = vars(instance)
        except TypeError:
            raise ConfigTypeError(
                f"@serve.batch method {name} keeps its queue in the instance's __dict__, "
                f"but {type(instance).__name__!r} instances have none (__slots__?)."
            ) from None
        queue: BatchQueue[Any, Any] | None = namespace.get(attr)
        if queue is None or queue.closed:
            queue = new_queue(functools.partial(func, instance))
            if isinstance(instance, type):
                setattr(instance, attr, queue)  # a classmethod: class namespaces are read-only
            else:
                namespace[attr] = queue
        return queue

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) not in (1, 2) or (arity is not None and len(args) != arity):
            raise ConfigTypeError(
                f"{name} is batched with @serve.batch: call it with exactly one item, got "
                f"{max(len(args) - (arity == 2), 0)} positional and {len(kwargs)} keyword "
                "arguments."
            )
        queue = method_queue(args[0]) if len(args) == 2 else function_queue()
        return await queue.submit(args[-1])

    wrapper.__dict__[_BATCH_PARAMS_ATTR] = (settings.max_batch_size, settings.batch_wait_timeout_s)
    return wrapper
