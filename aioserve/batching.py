"""The batching decorators: :func:`accept_batch` (the legacy marker a backend reads) and
:func:`batch` (Ray 1.3's ``@serve.batch``, which builds a :class:`~aioserve.batchqueue.BatchQueue`
per instance, or per function and event loop, on first call).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import MethodType
from typing import Any, Protocol, TypeVar, overload

from .batchqueue import BatchQueue, BatchQueueStats
from .config import check_int, check_seconds
from .exceptions import ConfigTypeError

__all__ = [
    "BatchQueue",
    "BatchQueueStats",
    "accept_batch",
    "accepts_batches",
    "batch",
    "queue_owner",
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
def batch(
    func: Callable[[list[T]], Awaitable[Sequence[R]]], /
) -> Callable[[T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: Callable[[S, list[T]], Awaitable[Sequence[R]]], /
) -> Callable[[S, T], Coroutine[Any, Any, R]]: ...


@overload
def batch(
    func: None = None, /, *, max_batch_size: int = 10, batch_wait_timeout_s: float = 0.0
) -> _BatchDecorator: ...


def batch(
    func: Callable[..., Any] | None = None,
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.0,
) -> Any:
    """Batch calls to an ``async def`` function or method (Ray 1.3's ``@serve.batch``).

    The decorated callable is called with one item and returns that item's result; the wrapped
    function receives a list of items and must return a list of results of the same length::

        class Model:
            @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
            async def predict(self, inputs: list[str]) -> list[str]: ...

        result = await model.predict("one input")

    A method gets one queue per instance; a function one per event loop (and per
    :data:`queue_owner`). Usable bare (``@batch``) or with keyword arguments.
    """
    given: object = max_batch_size
    if isinstance(given, float) and given.is_integer():
        given = int(given)  # 1.3 took a whole-number float
    size = check_int("max_batch_size", given)
    timeout = check_seconds("batch_wait_timeout_s", batch_wait_timeout_s)
    if func is None:
        return functools.partial(_make_batched, max_batch_size=size, batch_wait_timeout_s=timeout)
    return _make_batched(func, max_batch_size=size, batch_wait_timeout_s=timeout)


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


def _make_batched(
    func: Callable[..., Any], *, max_batch_size: int, batch_wait_timeout_s: float
) -> Callable[..., Coroutine[Any, Any, Any]]:
    if not inspect.iscoroutinefunction(func):
        hint = (
            ""
            if callable(func)
            else " Pass the settings as keywords: @serve.batch(max_batch_size=...)."
        )
        raise ConfigTypeError(
            f"Functions decorated with @serve.batch must be 'async def', got {func!r}.{hint}"
        )
    arity = _positional_arity(func)
    name = getattr(func, "__qualname__", repr(func))
    attr = f"_aioserve_batch_queue:{name}"
    # Per loop, then per owner: replicas sharing a loop must not share (and close) one queue.
    function_queues: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[object, BatchQueue[Any, Any]]
    ] = weakref.WeakKeyDictionary()

    def new_queue(
        dispatch: Callable[[list[Any]], Awaitable[Sequence[Any]]],
    ) -> BatchQueue[Any, Any]:
        queue: BatchQueue[Any, Any] = BatchQueue(
            dispatch,
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
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

    wrapper.__dict__[_BATCH_PARAMS_ATTR] = (max_batch_size, batch_wait_timeout_s)
    return wrapper
