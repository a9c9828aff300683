"""The sync facade: ``Client`` runs an instance on a background event-loop thread for scripts.

Every method blocks until the work is done on the instance's loop. Calling one from that loop's own
thread (from inside an async backend, say) would deadlock, so it raises a clear error instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from ._concurrency import new_event_loop
from .config import BackendConfig, HTTPOptions
from .context import current_replica
from .exceptions import ServeError, ServeShutdown
from .handle import ServeHandle
from .serve import Serve

__all__ = ["Client", "RayServeSyncHandle", "SyncServeHandle"]

T = TypeVar("T")


class _LoopThread:
    """A daemon thread running one event loop until stopped."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def is_current(self) -> bool:
        """Whether the calling thread is this loop's thread."""
        return threading.get_ident() == self._thread.ident

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it is done."""
        if self.is_current:
            coro.close()
            raise ServeError(
                "A blocking aioserve call was made from the instance's own event loop thread "
                "(from an async backend?); it would deadlock. Use the async API there: "
                "serve.get_handle(name, sync=False) and await its remote() calls."
            )
        if self.loop.is_closed():
            coro.close()
            raise ServeShutdown("This aioserve instance has been shut down.")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop thread (reads race with nothing there)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def stop(self) -> None:
        """Stop the loop and wait for the thread to end."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.is_current:
            self._thread.join(timeout=30)


class SyncServeHandle:
    """A handle for plain threads: ``handle.remote(x)`` returns a ``concurrent.futures.Future``."""

    __slots__ = ("_handle",)

    def __init__(self, handle: ServeHandle) -> None:
        self._handle = handle

    @property
    def endpoint_name(self) -> str:
        """The endpoint this handle calls."""
        return self._handle.endpoint_name

    def remote(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Send a request; ``.result()`` on the returned future waits for its result."""
        if self._handle.on_own_loop():
            raise ServeError(
                "A sync handle was used on the instance's own event loop thread (from an async "
                "backend?); waiting on its result there would deadlock. Use an async handle: "
                "serve.get_handle(name, sync=False), then await handle.remote(...)."
            )
        return self._handle.remote_threadsafe(*args, **kwargs)

    def options(self, **options: Any) -> SyncServeHandle:
        """A new handle with these options (see ``ServeHandle.options``); this one is unchanged."""
        return SyncServeHandle(self._handle.options(**options))

    def __getattr__(self, name: str) -> SyncServeHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return SyncServeHandle(getattr(self._handle, name))

    def __repr__(self) -> str:
        return repr(self._handle).replace("ServeHandle", "SyncServeHandle", 1)

    def __reduce__(self) -> Any:
        raise TypeError("A handle belongs to one process and cannot be pickled.")


RayServeSyncHandle = SyncServeHandle


class Client:
    """A running instance driven from synchronous code; every method blocks until done."""

    def __init__(self, serve: Serve, loop_thread: _LoopThread, *, detached: bool = False) -> None:
        self._serve = serve
        self._thread = loop_thread
        self.detached = detached

    @classmethod
    def start(
        cls,
        http_options: HTTPOptions | Mapping[str, Any] | None = None,
        *,
        detached: bool = False,
        **serve_options: Any,
    ) -> Client:
        """Start a new instance on its own loop thread and return its client."""
        serve = Serve(http_options, **serve_options)
        thread = _LoopThread("aioserve-loop")
        try:
            thread.run(serve.start())
        except BaseException:
            thread.stop()
            raise
        return cls(serve, thread, detached=detached)

    def __repr__(self) -> str:
        return f"<Client {self._serve!r}{' detached' if self.detached else ''}>"

    @property
    def serve(self) -> Serve:
        """The async core this client drives."""
        return self._serve

    @property
    def url(self) -> str | None:
        """The base URL of the HTTP server, or None without one."""
        return self._serve.url

    @property
    def http_port(self) -> int | None:
        """The port the HTTP server listens on."""
        return self._serve.http_port

    @property
    def running(self) -> bool:
        """Whether the instance is running."""
        return self._serve.state.value == "running"

    def shutdown(self) -> None:
        """Stop the instance: drain, close the server, stop the loop thread. Idempotent."""
        ctx = current_replica()
        if ctx is not None and ctx.instance is self._serve:
            # It would wait for its own request to drain (or deadlock on the loop thread).
            raise ServeError(
                "An aioserve instance cannot be shut down from inside one of its own backends."
            )
        if not self._thread.loop.is_closed():
            self._thread.run(self._serve.aclose())
        self._thread.stop()

    # -- backends -------------------------------------------------------------------------------

    def create_backend(
        self, backend_tag: Any, func_or_class: Any = None, *init_args: Any, **options: Any
    ) -> None:
        """See :meth:`Serve.create_backend`."""
        self._thread.run(
            self._serve.create_backend(backend_tag, func_or_class, *init_args, **options)
        )

    def list_backends(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Serve.list_backends`."""
        return self._thread.call(self._serve.list_backends)

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        """See :meth:`Serve.get_backend_config`."""
        return self._thread.call(lambda: self._serve.get_backend_config(backend_tag))

    def update_backend_config(
        self, backend_tag: str, config_options: BackendConfig | Mapping[str, Any]
    ) -> None:
        """See :meth:`Serve.update_backend_config`."""
        self._thread.run(self._serve.update_backend_config(backend_tag, config_options))

    set_backend_config = update_backend_config

    def delete_backend(self, backend_tag: str, force: bool = False) -> None:
        """See :meth:`Serve.delete_backend`."""
        self._thread.run(self._serve.delete_backend(backend_tag, force))

    # -- endpoints ------------------------------------------------------------------------------

    def create_endpoint(
        self,
        endpoint_name: Any,
        backend: Any = None,
        *,
        route: Any = None,
        methods: Iterable[str] | str = ("GET",),
    ) -> None:
        """See :meth:`Serve.create_endpoint`."""
        self._thread.run(
            self._serve.create_endpoint(endpoint_name, backend, route=route, methods=methods)
        )

    def list_endpoints(self) -> dict[str, dict[str, Any]]:
        """See :meth:`Serve.list_endpoints`."""
        return self._thread.call(self._serve.list_endpoints)

    def delete_endpoint(self, endpoint: str) -> None:
        """See :meth:`Serve.delete_endpoint`."""
        self._thread.run(self._serve.delete_endpoint(endpoint))

    def set_traffic(self, endpoint_name: str, traffic_policy_dictionary: Any) -> None:
        """See :meth:`Serve.set_traffic`."""
        self._thread.run(self._serve.set_traffic(endpoint_name, traffic_policy_dictionary))

    split = set_traffic

    def link(self, endpoint_name: str, backend_tag: str) -> None:
        """See :meth:`Serve.link`."""
        self._thread.run(self._serve.link(endpoint_name, backend_tag))

    def shadow_traffic(self, endpoint_name: str, backend_tag: str, proportion: Any) -> None:
        """See :meth:`Serve.shadow_traffic`."""
        self._thread.run(self._serve.shadow_traffic(endpoint_name, backend_tag, proportion))

    def stat(
        self,
        percentiles: Sequence[float] = (50, 90, 95),
        agg_windows_seconds: Sequence[int] = (10, 60, 300, 600, 3600),
    ) -> dict[str, Any]:
        """See :meth:`Serve.stat`."""
        return self._thread.call(lambda: self._serve.stat(percentiles, agg_windows_seconds))

    # -- handles --------------------------------------------------------------------------------

    def get_handle(
        self,
        endpoint_name: str,
        missing_ok: bool = False,
        sync: bool = True,
        *,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
    ) -> SyncServeHandle | ServeHandle:
        """A sync handle (default) or, with ``sync=False``, an async one usable from any loop."""
        # A read of one dict entry: safe from any thread, including the loop's own.
        handle = self._serve.get_handle(
            endpoint_name,
            missing_ok,
            relative_slo_ms=relative_slo_ms,
            absolute_slo_ms=absolute_slo_ms,
        )
        return SyncServeHandle(handle) if sync else handle
