"""Handles: in-process callers of an endpoint.

``handle.remote(*args, **kwargs)`` starts the request at once (it is already on its way when
``remote`` returns) and gives back an awaitable; the request takes the same path as an HTTP request:
traffic split, shadows, shard key, replica choice, batching. ``options()`` returns a new handle and
never changes the one it was called on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ._concurrency import TaskOwner, current_task, spawn_threadsafe
from ._types import Call
from .callable import legacy_request
from .calloptions import UNSET, HandleOptions, deadline_from
from .context import call_var
from .exceptions import ServeError, ServeShutdown

if TYPE_CHECKING:
    from .router import Router

__all__ = ["RayServeHandle", "ServeFuture", "ServeHandle"]

T = TypeVar("T")


_get_ident = threading.get_ident


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
        method_name: str | None = UNSET,
        shard_key: str | None = UNSET,
        relative_slo_ms: float | None = UNSET,
        absolute_slo_ms: float | None = UNSET,
        http_method: str | None = UNSET,
        http_headers: Mapping[str, str] | None = UNSET,
    ) -> ServeHandle:
        """A new handle with these options; this one is unchanged.

        ``http_method`` and ``http_headers`` (Ray 1.2) are seen by a legacy handler that gets a
        Python-side request (``request.method``, ``request.headers``).
        """
        return self._with(
            self._options.replace(
                method_name=method_name,
                shard_key=shard_key,
                relative_slo_ms=relative_slo_ms,
                absolute_slo_ms=absolute_slo_ms,
                http_method=http_method,
                http_headers=http_headers,
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
        opts = self._options
        deadline = None
        if opts.relative_slo_ms is not None or opts.absolute_slo_ms is not None:
            deadline = deadline_from(self._loop, opts.relative_slo_ms, opts.absolute_slo_ms)
        router = self._router
        http = opts.http
        if router.legacy_requests:
            args = legacy_request(args, kwargs, http)
            kwargs = {}
        # Positional arguments: cheaper than keywords on the hot path. Order as in Call.__init__:
        # endpoint, args, kwargs, method, shard_key, deadline, request_id, web, parent.
        call = Call(
            self._endpoint,
            args,
            kwargs,
            opts.method_name,
            opts.shard_key,
            deadline,
            None,
            False,
            call_var.get(),
        )
        if http is not None:
            call.http = http
        call_var.set(call)
        try:
            if opts.missing_ok and self._endpoint not in router.endpoints:
                await router.wait_for_endpoint(self._endpoint, deadline)
            return await router.enter(call)
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

    def remote_threadsafe(self, *args: Any, **kwargs: Any) -> ServeFuture[Any]:
        """Send a request from any thread; returns a :class:`ServeFuture` (a
        ``concurrent.futures.Future`` that can also be awaited)."""
        future: ServeFuture[Any] = ServeFuture(self._loop_thread)
        return spawn_threadsafe(self._owner, self._loop, self._call(args, kwargs), future)  # type: ignore[return-value]


class ServeFuture(concurrent.futures.Future[T]):
    """The result of a sync handle's ``remote()``: a ``concurrent.futures.Future`` (``.result()``
    in plain threads, ``ray.get`` style) that can also be awaited in async code, on the
    instance's own loop or any other, as 1.x code does inside async backends
    (``await serve.get_handle("m").remote(x)``).

    ``.result()`` on the instance's own loop thread, before the result is there, would deadlock:
    it raises :class:`ServeError` saying to ``await`` instead.
    """

    def __init__(self, loop_thread: int | None = None) -> None:
        super().__init__()
        self._loop_thread = loop_thread

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()

    def result(self, timeout: float | None = None) -> T:
        """The result, waiting up to ``timeout`` seconds (``concurrent.futures`` semantics)."""
        if not self.done() and _get_ident() == self._loop_thread:
            raise ServeError(
                "The result of a sync handle call was waited for with .result() on the aioserve "
                "instance's own event loop thread (in an async backend?); that would deadlock. "
                "Use 'await handle.remote(...)' there instead."
            )
        return super().result(timeout)


RayServeHandle = ServeHandle
