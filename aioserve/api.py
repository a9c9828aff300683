"""Module-level functions acting on the current instance, as ``from ray import serve`` scripts use.

``start()`` makes a new instance current; ``init()`` (the 0.8 name) returns the running one if there
is one. Inside a backend, the functions act on the instance that backend runs in.

Each control function is the ``Client`` method of the same name (itself the core's), called on
``connect()``: the same parameters, defaults and docstring, written once in ``Serve``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

from .client import Client, SyncServeHandle, forwarding, present_as
from .config import HTTPOptions
from .context import current_replica
from .exceptions import ConfigError, ConfigTypeError, ServeError
from .policy import RoutePolicy
from .serve import Serve

__all__ = [
    "backend_statistics",
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

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.RLock()
_clients: list[Client] = []  # running instances started here, the current one last


_LEGACY_HTTP_ARGS = {"http_host": "host", "http_port": "port", "http_middlewares": "middlewares"}


@forwarding(Client.start)
def start(
    detached: bool = False,
    http_options: HTTPOptions | Mapping[str, Any] | None = None,
    **serve_options: Any,
) -> Client:
    """Start a new instance (event loop + HTTP server in a background thread) and make it current.

    Every option of the :class:`Serve` constructor is accepted (``access_log``, ``seed``, ...).
    Non-detached instances are shut down at interpreter exit; ``detached=True`` ones live until
    ``shutdown()`` or the end of the process. With ``kv_store_path`` the control state is
    checkpointed in that SQLite file after every change and restored from it here.

    The Ray 1.0-1.2 arguments ``http_host``, ``http_port`` and ``http_middlewares`` are accepted
    with a ``DeprecationWarning``; given together with ``http_options`` they are a ``ValueError``
    (as in 1.2).
    """
    legacy = {
        field: serve_options.pop(name)
        for name, field in _LEGACY_HTTP_ARGS.items()
        if name in serve_options
    }
    if legacy:
        if http_options is not None:
            raise ConfigError(
                "You cannot specify both `http_options` and any of the `http_host`, `http_port`, "
                "and `http_middlewares` arguments. `http_options` is preferred."
            )
        warnings.warn(
            "`http_host`, `http_port`, `http_middlewares` are deprecated. Please use "
            "serve.start(http_options={'host': ..., 'port': ..., 'middlewares': ...}) instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        if "middlewares" in legacy:
            legacy["middlewares"] = tuple(legacy["middlewares"] or ())
        http_options = legacy
    client = Client.start(http_options, detached=detached, **serve_options)
    with _lock:
        _clients.append(client)
    return client


@forwarding(start)
def init(
    kv_store_connector: Any = None,
    kv_store_path: str | os.PathLike[str] | None = None,
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
    **serve_options: Any,
) -> Client:
    """The 0.8 entry point: return the running instance, or start one.

    ``blocking`` and ``ray_init_kwargs`` are accepted and have no effect here: the server is ready
    when ``init`` returns, and there is no cluster to initialise. ``http_host=""`` means every
    interface (``0.0.0.0``); None means 127.0.0.1. ``kv_store_connector`` (a custom table factory
    in 0.8) is not supported: use ``kv_store_path``. The other options are ``start``'s.
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
        **serve_options,
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
            if isinstance(ctx.instance, Serve):
                # An instance run as the core (async with Serve, aioserve run): its own.
                return Client.attach(ctx.instance)
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


def _on_current(method: Callable[Concatenate[Client, P], T]) -> Callable[P, T]:
    """The module-level function for a ``Client`` method: the method, called on ``connect()``."""

    def function(*args: P.args, **kwargs: P.kwargs) -> T:
        return method(connect(), *args, **kwargs)

    present_as(function, method, qualname=method.__name__, bound=True)
    return function


create_backend = _on_current(Client.create_backend)
list_backends = _on_current(Client.list_backends)
get_backend_config = _on_current(Client.get_backend_config)
backend_statistics = _on_current(Client.backend_statistics)
update_backend_config = _on_current(Client.update_backend_config)
set_backend_config = update_backend_config
delete_backend = _on_current(Client.delete_backend)

create_endpoint = _on_current(Client.create_endpoint)
list_endpoints = _on_current(Client.list_endpoints)
delete_endpoint = _on_current(Client.delete_endpoint)
set_traffic = _on_current(Client.set_traffic)
split = set_traffic
link = _on_current(Client.link)
shadow_traffic = _on_current(Client.shadow_traffic)

stat = _on_current(Client.stat)
get_handle = _on_current(Client.get_handle)


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
