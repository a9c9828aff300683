"""Handles: in-process callers of an endpoint.

``handle.remote(*args, **kwargs)`` starts the request at once (it is already on its way when
``remote`` returns) and gives back an awaitable; the request takes the same path as an HTTP request:
traffic split, shadows, shard key, replica choice, batching. ``options()`` returns a new handle and
never changes the one it was called on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from ._concurrency import TaskOwner, current_task, spawn_threadsafe
from .exceptions import ConfigError, ConfigTypeError, ServeError, ServeShutdown
from .request import CallContext, call_var

if TYPE_CHECKING:
    from .router import Router

__all__ = ["HandleOptions", "RayServeHandle", "ServeHandle", "deadline_from"]

_UNSET: Any = object()
_get_ident = threading.get_ident


def check_slo(name: str, value: object) -> float | None:
    """Validate a deadline option (milliseconds): a finite number, >= 0 when relative."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(f"{name} must be a number of milliseconds or None, got {value!r}.")
    if not math.isfinite(value) or (name == "relative_slo_ms" and value < 0):
        raise ConfigError(f"{name} must be a finite number of milliseconds >= 0, got {value!r}.")
    return float(value)


def deadline_from(
    loop: asyncio.AbstractEventLoop, relative_slo_ms: float | None, absolute_slo_ms: float | None
) -> float | None:
    """The request deadline in ``loop.time()`` seconds, or None.

    ``relative_slo_ms`` counts from now; ``absolute_slo_ms`` is wall-clock time in milliseconds
    since the epoch (as in Ray 0.8). With both, the earlier wins.
    """
    deadline = None
    if relative_slo_ms is not None:
        deadline = loop.time() + relative_slo_ms / 1000.0
    if absolute_slo_ms is not None:
        absolute = loop.time() + (absolute_slo_ms / 1000.0 - time.time())
        deadline = absolute if deadline is None else min(deadline, absolute)
    return deadline


class HandleOptions:
    """The per-handle call options; immutable, shared by handles made from each other."""

    __slots__ = ("absolute_slo_ms", "method_name", "missing_ok", "relative_slo_ms", "shard_key")

    def __init__(
        self,
        method_name: str | None = None,
        shard_key: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        missing_ok: bool = False,
    ) -> None:
        if method_name is not None and not isinstance(method_name, str):
            raise ConfigTypeError(f"method_name must be a str or None, got {method_name!r}.")
        if shard_key is not None and not isinstance(shard_key, str | int | bytes):
            raise ConfigTypeError(f"shard_key must be a str or None, got {shard_key!r}.")
        self.method_name = method_name
        self.shard_key = None if shard_key is None else str(shard_key)
        self.relative_slo_ms = check_slo("relative_slo_ms", relative_slo_ms)
        self.absolute_slo_ms = check_slo("absolute_slo_ms", absolute_slo_ms)
        self.missing_ok = bool(missing_ok)

    def replace(self, **changes: Any) -> HandleOptions:
        """A copy with the given options changed."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update({k: v for k, v in changes.items() if v is not _UNSET})
        return HandleOptions(**fields)

    def describe(self) -> str:
        """The options that are set, for repr."""
        parts = [
            f"{name}={getattr(self, name)!r}"
            for name in ("method_name", "shard_key", "relative_slo_ms", "absolute_slo_ms")
            if getattr(self, name) is not None
        ]
        return (" " + " ".join(parts)) if parts else ""


class ServeHandle:
    """An async handle to an endpoint: ``await handle.remote(x)``.

    ``remote`` may be called from the instance's own event loop or from another running loop; the
    request runs on the instance's loop either way.
    """

    __slots__ = (
        "_by_method",
        "_endpoint",
        "_loop",
        "_loop_thread",
        "_options",
        "_owner",
        "_router",
    )

    def __init__(
        self,
        router: Router,
        endpoint: str,
        *,
        loop: asyncio.AbstractEventLoop,
        owner: TaskOwner,
        options: HandleOptions | None = None,
        loop_thread: int | None = None,
    ) -> None:
        self._router = router
        self._endpoint = endpoint
        self._loop = loop
        # The thread ``loop`` runs on (an instance stays on the loop and thread it started on).
        self._loop_thread = loop_thread
        self._owner = owner
        self._options = options or HandleOptions()
        self._by_method: dict[str, ServeHandle] = {}

    @property
    def endpoint_name(self) -> str:
        """The endpoint this handle calls."""
        return self._endpoint

    def options(
        self,
        *,
        method_name: str | None = _UNSET,
        shard_key: str | None = _UNSET,
        relative_slo_ms: float | None = _UNSET,
        absolute_slo_ms: float | None = _UNSET,
    ) -> ServeHandle:
        """A new handle with these options; this one is unchanged."""
        return self._with(
            self._options.replace(
                method_name=method_name,
                shard_key=shard_key,
                relative_slo_ms=relative_slo_ms,
                absolute_slo_ms=absolute_slo_ms,
            )
        )

    def _with(self, options: HandleOptions) -> ServeHandle:
        return type(self)(
            self._router,
            self._endpoint,
            loop=self._loop,
            owner=self._owner,
            options=options,
            loop_thread=self._loop_thread,
        )

    def __getattr__(self, name: str) -> ServeHandle:
        # ``handle.predict.remote(x)`` is ``handle.options(method_name="predict").remote(x)``.
        if name.startswith("_"):
            raise AttributeError(name)
        handle = self._by_method.get(name)
        if handle is None:  # made once per name: ``handle.predict.remote`` is on the hot path
            handle = self._by_method[name] = self.options(method_name=name)
        return handle

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self._endpoint!r}{self._options.describe()})"

    def __reduce__(self) -> Any:
        raise TypeError("A handle belongs to one process and cannot be pickled.")

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # This task's own context: a handle call is never "web"; nested calls keep the request id.
        parent = call_var.get()
        call_var.set(CallContext(self._endpoint, False, None, parent))
        opts = self._options
        router = self._router
        try:
            if not router.admitting and parent is None:
                raise ServeShutdown(
                    "The aioserve instance is shutting down; it takes no new requests."
                )
            deadline = None
            if opts.relative_slo_ms is not None or opts.absolute_slo_ms is not None:
                deadline = deadline_from(self._loop, opts.relative_slo_ms, opts.absolute_slo_ms)
            endpoint = router.endpoints.get(self._endpoint)
            if endpoint is None:
                if not opts.missing_ok:
                    raise router.not_found(self._endpoint)
                endpoint = await router.wait_for_endpoint(self._endpoint)
            return await router.call_endpoint(
                endpoint, opts.method_name, args, kwargs, opts.shard_key, deadline
            )
        except asyncio.CancelledError:
            if self._owner.closed:
                # Cancelled by the instance's shutdown, not by the caller: say so.
                raise ServeShutdown(
                    "The aioserve instance was shut down before the call finished."
                ) from None
            raise
        finally:
            self._owner.discard(current_task(self._loop))

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Send a request; returns an awaitable of its result. The request starts at once."""
        loop = self._loop
        if _get_ident() == self._loop_thread and loop.is_running():
            # On the instance's own loop, known without asking asyncio, whose get_running_loop()
            # makes a system call on 3.11 (one loop runs per thread, so this is that loop).
            return self._owner.spawn(self._call(args, kwargs), self_removing=True, loop=loop)
        coro = self._call(args, kwargs)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise ServeError(
                "ServeHandle.remote() needs a running event loop. From plain threads use the "
                "sync handle: serve.get_handle(name) (sync=True is the default there)."
            ) from None
        if running is self._loop:
            return self._owner.spawn(coro, self_removing=True, loop=running)
        return asyncio.wrap_future(spawn_threadsafe(self._owner, self._loop, coro), loop=running)

    def on_own_loop(self) -> bool:
        """Whether the caller runs on the instance's own event loop."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def remote_threadsafe(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Send a request from any thread; returns a ``concurrent.futures.Future``."""
        return spawn_threadsafe(self._owner, self._loop, self._call(args, kwargs))


RayServeHandle = ServeHandle
