"""Module-level functions acting on the current instance, as ``from ray import serve`` scripts use.

``start()`` makes a new instance current; ``init()`` (the 0.8 name) returns the running one if there
is one. Inside a backend, the functions act on the instance that backend runs in.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .client import Client, SyncServeHandle
from .config import BackendConfig, HTTPOptions
from .context import current_replica
from .exceptions import ConfigError, ConfigTypeError, ServeError
from .handle import ServeHandle
from .policy import RoutePolicy

__all__ = [
    "connect",
    "create_backend",
    "create_endpoint",
    "delete_backend",
    "delete_endpoint",
    "get_backend_config",
    "get_handle",
    "init",
    "link",
    "list_backends",
    "list_endpoints",
    "route",
    "set_backend_config",
    "set_traffic",
    "shadow_traffic",
    "shutdown",
    "split",
    "start",
    "stat",
    "update_backend_config",
]

_lock = threading.RLock()
_clients: list[Client] = []  # running instances started here, the current one last


def start(
    detached: bool = False,
    http_options: HTTPOptions | Mapping[str, Any] | None = None,
    *,
    queueing_policy: RoutePolicy | str = RoutePolicy.Random,
    policy_kwargs: Mapping[str, object] | None = None,
    debug: bool = False,
    gc_window_seconds: int = 3600,
    kv_store_path: str | None = None,
) -> Client:
    """Start a new instance (event loop + HTTP server in a background thread) and make it current.

    Non-detached instances are shut down at interpreter exit; ``detached=True`` ones live until
    ``shutdown()`` or the end of the process. With ``kv_store_path`` the control state is
    checkpointed in that SQLite file after every change and restored from it here.
    """
    client = Client.start(
        http_options,
        detached=detached,
        queueing_policy=queueing_policy,
        policy_kwargs=policy_kwargs,
        debug=debug,
        gc_window_seconds=gc_window_seconds,
        kv_store_path=kv_store_path,
    )
    with _lock:
        _clients.append(client)
    return client


def init(
    kv_store_connector: Any = None,
    kv_store_path: str | None = None,
    blocking: bool = False,
    start_server: bool = True,
    http_host: str | None = None,
    http_port: int = 8000,
    ray_init_kwargs: Mapping[str, Any] | None = None,
    gc_window_seconds: int = 3600,
    queueing_policy: RoutePolicy | str = RoutePolicy.Random,
    policy_kwargs: Mapping[str, object] | None = None,
    *,
    http_options: HTTPOptions | Mapping[str, Any] | None = None,
) -> Client:
    """The 0.8 entry point: return the running instance, or start one.

    ``blocking`` and ``ray_init_kwargs`` are accepted and have no effect here: the server is ready
    when ``init`` returns, and there is no cluster to initialise. ``http_host=""`` means every
    interface (``0.0.0.0``); None means 127.0.0.1. ``kv_store_connector`` (a custom table factory
    in 0.8) is not supported: use ``kv_store_path``.
    """
    if kv_store_connector is not None:
        raise ConfigError(
            "kv_store_connector is not supported; pass kv_store_path (an SQLite file) instead."
        )
    with _lock:
        for client in reversed(_clients):
            if client.running:
                return client
    if http_options is None:
        host = (
            ("0.0.0.0" if http_host == "" else http_host or "127.0.0.1") if start_server else None
        )
        http_options = {"host": host, "port": http_port}
    return start(
        http_options=http_options,
        queueing_policy=queueing_policy,
        policy_kwargs=policy_kwargs,
        gc_window_seconds=gc_window_seconds,
        kv_store_path=kv_store_path,
    )


def connect() -> Client:
    """The running instance: inside a backend, the one it runs in; else the current one."""
    ctx = current_replica()
    with _lock:
        _clients[:] = [c for c in _clients if c.running]
        if ctx is not None:
            for client in _clients:
                if client.serve is ctx.instance:
                    return client
        for client in reversed(_clients):
            if client.running:
                return client
    raise ServeError("No aioserve instance is running in this process; call serve.start() first.")


def shutdown() -> None:
    """Shut down the current instance (a no-op when none is running)."""
    try:
        client = connect()
    except ServeError:
        return
    client.shutdown()  # raises, changing nothing, when called from inside the instance
    with _lock:
        if client in _clients:
            _clients.remove(client)


def _shutdown_at_exit() -> None:
    with _lock:
        clients = [c for c in _clients if not c.detached]
    for client in clients:
        # The interpreter is exiting; there is nobody left to tell of a failure.
        with contextlib.suppress(Exception):
            client.shutdown()


# Shut down while the thread executors still work: Python stops them (concurrent.futures' own
# threading-atexit hook) before plain atexit handlers run, and a drain that cannot run queued sync
# calls would wait out its whole timeout. Hooks registered here run in reverse order, so before
# the executors' one, which was registered when concurrent.futures was imported.
_register_early = getattr(threading, "_register_atexit", None)
if _register_early is not None:
    _register_early(_shutdown_at_exit)
else:  # pragma: no cover - CPython has had threading._register_atexit since 3.9
    atexit.register(_shutdown_at_exit)


def create_backend(
    backend_tag: Any, func_or_class: Any = None, *init_args: Any, **options: Any
) -> None:
    """Create a backend on the current instance (see ``Serve.create_backend``)."""
    connect().create_backend(backend_tag, func_or_class, *init_args, **options)


def list_backends() -> dict[str, dict[str, Any]]:
    """The current instance's backends (see ``Serve.list_backends``)."""
    return connect().list_backends()


def get_backend_config(backend_tag: str) -> BackendConfig:
    """A copy of a backend's config (see ``Serve.get_backend_config``)."""
    return connect().get_backend_config(backend_tag)


def update_backend_config(
    backend_tag: str, config_options: BackendConfig | Mapping[str, Any]
) -> None:
    """Change a live backend's config (see ``Serve.update_backend_config``)."""
    connect().update_backend_config(backend_tag, config_options)


set_backend_config = update_backend_config


def delete_backend(backend_tag: str, force: bool = False) -> None:
    """Delete a backend (see ``Serve.delete_backend``)."""
    connect().delete_backend(backend_tag, force)


def create_endpoint(
    endpoint_name: Any,
    backend: Any = None,
    *,
    route: Any = None,
    methods: Iterable[str] | str = ("GET",),
) -> None:
    """Create an endpoint (see ``Serve.create_endpoint``)."""
    connect().create_endpoint(endpoint_name, backend, route=route, methods=methods)


def list_endpoints() -> dict[str, dict[str, Any]]:
    """The current instance's endpoints (see ``Serve.list_endpoints``)."""
    return connect().list_endpoints()


def delete_endpoint(endpoint: str) -> None:
    """Delete an endpoint (see ``Serve.delete_endpoint``)."""
    connect().delete_endpoint(endpoint)


def set_traffic(endpoint_name: str, traffic_policy_dictionary: Any) -> None:
    """Split an endpoint's traffic (see ``Serve.set_traffic``)."""
    connect().set_traffic(endpoint_name, traffic_policy_dictionary)


split = set_traffic


def link(endpoint_name: str, backend_tag: str) -> None:
    """Send all of an endpoint's traffic to one backend."""
    connect().link(endpoint_name, backend_tag)


def shadow_traffic(endpoint_name: str, backend_tag: str, proportion: Any) -> None:
    """Copy a proportion of an endpoint's traffic to a backend."""
    connect().shadow_traffic(endpoint_name, backend_tag, proportion)


def stat(
    percentiles: Sequence[float] = (50, 90, 95),
    agg_windows_seconds: Sequence[int] = (10, 60, 300, 600, 3600),
) -> dict[str, Any]:
    """Counts and latency percentiles of the current instance (see ``Serve.stat``)."""
    return connect().stat(percentiles, agg_windows_seconds)


def route(
    url_route: str | None = None, *, methods: Iterable[str] | str = ("GET",)
) -> Callable[[Any], SyncServeHandle]:
    """0.8's decorator: make a backend and an endpoint named after the function, return a handle.

    ``@serve.route("/hello") def hello(request): ...`` leaves ``hello`` bound to a sync handle.
    """

    def decorator(func_or_class: Any) -> SyncServeHandle:
        name = getattr(func_or_class, "__name__", None)
        if not isinstance(name, str):
            raise ConfigTypeError(
                f"@serve.route needs a function or a class, got {func_or_class!r}."
            )
        client = connect()
        client.create_backend(name, func_or_class)
        try:
            client.create_endpoint(name, backend=name, route=url_route, methods=methods)
        except BaseException:
            client.delete_backend(name)
            raise
        handle = client.get_handle(name)
        assert isinstance(handle, SyncServeHandle)  # sync=True is the default
        return handle

    return decorator


def get_handle(
    endpoint_name: str,
    missing_ok: bool = False,
    sync: bool = True,
    *,
    relative_slo_ms: float | None = None,
    absolute_slo_ms: float | None = None,
) -> SyncServeHandle | ServeHandle:
    """A handle to an endpoint of the current instance (sync by default)."""
    return connect().get_handle(
        endpoint_name,
        missing_ok,
        sync,
        relative_slo_ms=relative_slo_ms,
        absolute_slo_ms=absolute_slo_ms,
    )
