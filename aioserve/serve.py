"""``Serve``: the async core. It composes router, backends, HTTP app and server.

Mutating calls are coroutines and run one at a time (a control-plane lock); reads are plain calls.
Every mutating call validates everything first, so a call that raises changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from ._concurrency import TaskOwner
from ._importer import import_attr
from ._types import Lifecycle
from .backend import Backend
from .callable import UserCallable
from .calloptions import HandleOptions, check_http_method
from .config import BackendConfig, HTTPOptions
from .context import install_log_context
from .exceptions import (
    BackendInUse,
    BackendNotFound,
    ConfigError,
    ConfigTypeError,
    ServeError,
    ServeShutdown,
    StoreError,
)
from .handle import ServeHandle
from .http import HTTPApp
from .metrics import CONTENT_TYPE, BackendStatistics, Metrics
from .policy import RoutePolicy, TrafficTable, make_chooser, validate_shadow_proportion
from .policy import validate_traffic as _validate_traffic
from .router import Endpoint, Router, check_route
from .runners import InProcessRunner
from .servers import Server, bind, make_server
from .state import BackendRecord, ControlState, check_storable
from .store import AsyncStateStore

__all__ = ["Serve"]

logger = logging.getLogger(__name__)


class Serve:
    """An aioserve instance: backends, endpoints, a router, an ASGI app and (optionally) a server.

    Use it as an async context manager::

        async with Serve(http_options={"port": 8000}) as s:
            await s.create_backend("echo", echo)
            await s.create_endpoint("echo", backend="echo", route="/echo")

    ``legacy_requests=True`` is the switch for unmodified Ray 1.x apps: every handle call to this
    instance's backends arrives as one Python-side request, as 1.x delivered it.
    ``handle.remote(data, **kwargs)`` gives the handler a request whose ``await request.body()``
    and ``await request.json()`` return ``data`` and whose ``query_params`` are ``kwargs`` (a
    batching backend gets a list of such requests, so keyword-only calls batch too). A Starlette
    request passed alone is forwarded unchanged; more than one positional argument is a
    ``TypeError``. HTTP requests are unaffected. Off by default: handlers get exactly the given
    arguments (the Ray 2 convention).
    """

    def __init__(
        self,
        http_options: HTTPOptions | Mapping[str, Any] | None = None,
        *,
        queueing_policy: RoutePolicy | str = RoutePolicy.Random,
        policy_kwargs: Mapping[str, object] | None = None,
        debug: bool = False,
        seed: int | None = None,
        gc_window_seconds: int = 3600,
        access_log: bool = False,
        kv_store_path: str | os.PathLike[str] | None = None,
        legacy_requests: bool = False,
    ) -> None:
        self.http_options = HTTPOptions.coerce(http_options)
        policy = RoutePolicy.parse(queueing_policy)
        rng = random.Random(seed)
        # Validate the policy's arguments now rather than at the first set_traffic.
        make_chooser(policy, TrafficTable({"_": 1.0}), rng=rng, policy_kwargs=policy_kwargs)
        self._backends: dict[str, Backend] = {}
        self.metrics = Metrics(
            gc_window_seconds=gc_window_seconds,
            gauges=lambda: [b.statistics() for b in list(self._backends.values())],
        )
        self._router = Router(
            self._backends,
            policy=policy,
            policy_kwargs=policy_kwargs,
            rng=rng,
            metrics=self.metrics,
        )
        self._router.legacy_requests = bool(legacy_requests)
        self._http = HTTPApp(
            self._router, debug=debug, access_log=access_log, options=self.http_options
        )
        self._http.system_routes["/-/metrics"] = self._metrics_route
        self.asgi_app: Any = self._http
        for middleware in reversed(self.http_options.middlewares):
            cls, args, kwargs = middleware
            self.asgi_app = cls(self.asgi_app, *args, **kwargs)
        self.http_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None  # the thread its loop runs on
        self._lock = asyncio.Lock()
        self._handles = TaskOwner("handle calls")
        self._background = TaskOwner("aioserve server")
        self._deletions = TaskOwner("backend deletions")
        self._servers: list[Server] = []
        self.system_port: int | None = None  # the port system routes are served on, if apart
        self._ready_wanted = True
        self._shared_socket = False  # serving on a socket bound elsewhere (start(sock=...))
        self._closed: asyncio.Future[None] | None = None
        # Persistence: the records of what was created, checkpointed after every change.
        self._store = AsyncStateStore(kv_store_path) if kv_store_path is not None else None
        self._records: dict[str, BackendRecord] = {}
        self._restoring = False

    def __repr__(self) -> str:
        where = self.url or "no server"
        return (
            f"<Serve {self.state.value} {where} backends={len(self._backends)} "
            f"endpoints={len(self._router.endpoints)}>"
        )

    @property
    def url(self) -> str | None:
        """The base URL of this instance's own HTTP server, or None without one.

        ``root_path`` is not part of it: as in uvicorn, it names the prefix a proxy in front strips,
        so the server itself answers at the bare routes.
        """
        if self.http_port is None or self.http_options.host is None:
            return None
        host = self.http_options.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    @property
    def state(self) -> Lifecycle:
        """Where the instance is in its lifecycle (the router's admission flag)."""
        return self._router.state

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this instance runs on (set by start)."""
        if self._loop is None:
            raise ServeError("This aioserve instance has not been started yet.")
        return self._loop

    @property
    def loop_thread(self) -> int | None:
        """The ident of the thread its loop runs on (set by start)."""
        return self._loop_thread

    @property
    def router(self) -> Router:
        """The router (endpoint table and traffic)."""
        return self._router

    @property
    def access_log(self) -> bool:
        """Whether one line per HTTP request goes to the ``aioserve.access`` logger (see
        :mod:`aioserve.accesslog`); settable, e.g. by ``aioserve run``, which turns it on."""
        return self._http.access_log

    @access_log.setter
    def access_log(self, on: bool) -> None:
        self._http.access_log = bool(on)

    @property
    def debug(self) -> bool:
        """Whether a 500 response's body carries the traceback (keep it off on a server that
        untrusted clients reach)."""
        return self._http.debug

    @debug.setter
    def debug(self, on: bool) -> None:
        self._http.debug = bool(on)

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Serve:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(
        self,
        *,
        sock: socket.socket | None = None,
        before_serving: Callable[[Serve], Awaitable[None]] | None = None,
    ) -> None:
        """Start the instance on the running loop (and its HTTP server, unless NoServer).

        ``sock``: serve on this bound socket instead of binding ``host:port`` (a supervisor that
        restarts the process keeps it open in between); the instance closes its own copy, and
        stops accepting on it as soon as it starts shutting down.
        ``before_serving``: built on the running instance before its server accepts a
        connection (with ``sock``, connections made meanwhile wait in its backlog, so a client
        never sees a deployment half built); if it raises, the instance closes.
        """
        if self.state is Lifecycle.RUNNING:
            return
        if self.state is not Lifecycle.STARTING:
            raise ServeShutdown("This aioserve instance has been shut down; make a new one.")
        # A corrupt or foreign state file fails here, before anything binds or starts.
        snapshot = None
        if self._store is not None:
            try:
                snapshot = await self._store.load()
            except BaseException:
                await self._store.aclose()
                raise
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        install_log_context()
        if self.http_options.serves and before_serving is None:
            try:
                await self._start_server(sock)
            except BaseException:
                await self.aclose()
                raise
        self._http.loop = self._loop
        self._router.state = Lifecycle.RUNNING
        try:
            if snapshot is not None:
                await self._restore(snapshot)
            if before_serving is not None:
                await before_serving(self)
                if self.http_options.serves:
                    server_sock, sock = sock, None  # the server owns it from here on
                    await self._start_server(server_sock)
        except BaseException:
            if before_serving is not None and sock is not None:
                sock.close()  # never handed to a server
            await self.aclose()
            raise
        self._router.ready = self._ready_wanted

    @property
    def ready(self) -> bool:
        """Whether a readiness probe (``GET /-/ready``) sends traffic here: running, not
        draining, and not held back with :meth:`set_ready`."""
        return self.state is Lifecycle.RUNNING and self._router.ready

    def set_ready(self, ready: bool) -> None:
        """Hold readiness back (False) while a deployment is still being built, and give it
        (True) once it is in place. Called before :meth:`start`, False keeps the instance
        unready after it starts; otherwise it is ready once started (and its state restored).
        Draining always makes it unready."""
        self._ready_wanted = bool(ready)
        if self.state is Lifecycle.RUNNING:
            self._router.ready = self._ready_wanted

    def begin_shutdown(self) -> None:
        """Stop admitting new requests now (HTTP 503; readiness false), as :meth:`aclose` does
        first; for a signal handler that must not wait. Idempotent."""
        if self.state is Lifecycle.RUNNING:
            self._router.state = Lifecycle.DRAINING
            self._http.begin_shutdown()
            if self._shared_socket:
                # Another process takes over the socket (a reload): leave new connections to
                # it rather than answer them 503 while this one drains.
                for server in self._servers:
                    server.stop_accepting()

    async def _restore(self, snapshot: ControlState) -> None:
        """Recreate the checkpointed backends and endpoints (without re-saving each step)."""
        self._restoring = True
        try:
            await snapshot.apply(self)
        finally:
            self._restoring = False
        logger.info(
            "Restored %d backend(s) and %d endpoint(s) from the state file.",
            len(snapshot.backends),
            len(snapshot.endpoints),
        )

    async def _checkpoint(self) -> None:
        """Save the control state (under the lock, after every successful change), on the
        store's own thread: a slow or locked file delays this control call, never a request.

        A failed save raises :class:`StoreError` (logged); the change stays in force, and the
        next successful save writes the whole state again.
        """
        if self._store is None or self._restoring:
            return
        state = ControlState.capture(self._records.values(), self.list_endpoints())
        try:
            await self._store.save(state)
        except StoreError:
            logger.exception("The control state could not be saved; the change stays in force.")
            raise

    async def _start_server(self, sock: socket.socket | None) -> None:
        opts = self.http_options
        assert opts.host is not None  # serves is False without a host
        if sock is None:
            sock = bind(opts.host, opts.port)
        else:
            self._shared_socket = True
        system_sock = None
        if opts.system_port is not None and opts.system_routes:
            try:
                system_sock = bind(opts.host, opts.system_port)
            except BaseException:
                sock.close()
                raise
        port = sock.getsockname()[1]
        try:
            server = make_server(self.asgi_app, sock, opts)  # closes sock if it raises
        except BaseException:
            if system_sock is not None:
                system_sock.close()
            raise
        await server.start(self._background)
        self.http_port = port  # only once it serves: a failed start leaves url None
        self._servers.append(server)
        if system_sock is not None:
            system = make_server(self._http.system_app, system_sock, opts)
            await system.start(self._background)
            self.system_port = system_sock.getsockname()[1]
            self._servers.append(system)

    async def aclose(self, *, drain_timeout_s: float | None = None) -> None:
        """Shut down: stop admitting, drain, stop what is left, stop the server. Idempotent.

        In order: new HTTP requests get 503 and new top-level handle calls ``ServeShutdown``
        (calls made by requests in flight are still served, so those requests can finish); the
        backends drain for up to the longest ``graceful_shutdown_timeout_s`` (or
        ``drain_timeout_s`` when given: ``aioserve run --timeout-graceful-shutdown``); whatever
        still runs
        then is stopped, so its callers get ``ReplicaStopped`` (HTTP 503) at once, even a sync
        handler stuck in its thread (the thread is a daemon and cannot hold the process); then
        the server stops (open responses get uvicorn's 5 s). So shutdown takes at most the
        graceful timeout plus a few seconds, whatever the handlers do.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            self.begin_shutdown()
            async with self._lock:  # a control call under way finishes first
                await self._drain(drain_timeout_s)
                await asyncio.gather(*(b.aclose(force=True) for b in list(self._backends.values())))
                await asyncio.gather(*(server.stop() for server in self._servers))
                await self._deletions.join()
            await self._handles.aclose()
            await self._router.aclose()
            await self._http.aclose()
            await self._background.aclose()
            if self._store is not None:
                await self._store.aclose()
        finally:
            self._router.state = Lifecycle.STOPPED
            self._closed.set_result(None)

    async def _drain(self, timeout_s: float | None = None) -> None:
        """Wait until no backend has work, for up to ``timeout_s``, by default the longest
        graceful_shutdown_timeout_s."""
        backends = list(self._backends.values())
        if all(b.idle for b in backends):
            return
        timeout = (
            max((b.config.graceful_shutdown_timeout_s for b in backends), default=0.0)
            if timeout_s is None
            else timeout_s
        )
        logger.info(
            "Draining %d request(s) for up to %.1f s.", sum(b.load for b in backends), timeout
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # All idle at once: a request finishing on one backend may have just called another.
        while not all(b.idle for b in backends):
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning(
                    "%d request(s) were still running after %.1f s of draining; stopping them.",
                    sum(b.load for b in backends),
                    timeout,
                )
                return
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(b.wait_idle() for b in backends)), remaining
                )
            except TimeoutError:
                continue

    def _check_running(self) -> None:
        if self.state is not Lifecycle.RUNNING:
            if self.state is Lifecycle.STARTING:
                raise ServeError(
                    "This aioserve instance is not started; use 'async with Serve(...)' or "
                    "'await serve.start()' first."
                )
            raise ServeShutdown("This aioserve instance has been shut down.")

    # -- backends -------------------------------------------------------------------------------

    async def create_backend(
        self,
        backend_tag: Any,
        func_or_class: Any = None,
        *init_args: Any,
        config: BackendConfig | Mapping[str, Any] | None = None,
        ray_actor_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Create a backend from a function, a class (with ``init_args``) or an import path.

        ``ray_actor_options`` is accepted for compatibility and has no effect in one process.
        """
        if not isinstance(backend_tag, str) or not backend_tag:
            raise ConfigTypeError(f"backend_tag must be a non-empty str, got {backend_tag!r}.")
        if func_or_class is None:
            raise ConfigTypeError(
                f"create_backend({backend_tag!r}) needs a function, a class or an import path."
            )
        if ray_actor_options is not None and not isinstance(ray_actor_options, Mapping):
            raise ConfigTypeError(
                f"ray_actor_options must be a dict, got {type(ray_actor_options).__name__}."
            )
        cfg = BackendConfig.coerce(config)
        target = func_or_class
        if isinstance(target, str):
            # Importing runs the user's module code: never on the event loop.
            target = await asyncio.to_thread(import_attr, target)
        try:
            user_callable = UserCallable(
                target, tuple(init_args), from_import_path=isinstance(func_or_class, str)
            )
        except ConfigTypeError as exc:
            if not isinstance(func_or_class, str):
                raise
            raise ConfigTypeError(
                f"The import path {func_or_class!r} does not name a function or a class: {exc}"
            ) from exc
        # With persistence on, what cannot be stored is refused now, before anything starts.
        record = (
            BackendRecord.of(backend_tag, func_or_class, init_args, cfg)
            if self._store is not None
            else None
        )
        async with self._lock:
            self._check_running()
            if backend_tag in self._backends:
                raise ConfigError(
                    f"Backend {backend_tag!r} already exists. Delete it first or pick another tag."
                )
            backend = Backend(
                backend_tag,
                user_callable,
                cfg,
                runner_factory=self._new_runner,
                metrics=self.metrics,
            )
            await backend.start()
            self._backends[backend_tag] = backend
            if record is not None:
                self._records[backend_tag] = record
                await self._checkpoint()

    def _new_runner(self, backend_tag: str, user_callable: UserCallable) -> InProcessRunner:
        return InProcessRunner(backend_tag, user_callable, instance=self)

    def _backend(self, tag: str) -> Backend:
        backend = self._backends.get(tag)
        if backend is None:
            known = ", ".join(repr(t) for t in sorted(self._backends)) or "none"
            raise BackendNotFound(f"No backend tagged {tag!r}. Known backends: {known}.")
        return backend

    def list_backends(self) -> dict[str, dict[str, Any]]:
        """``{tag: {"accepts_batches", "num_replicas", "max_batch_size", ...config}}``."""
        return {tag: backend.info() for tag, backend in self._backends.items()}

    def backend_statistics(self, backend_tag: str) -> BackendStatistics:
        """A snapshot of a backend: replicas, requests queued, calls in flight per replica."""
        return self._backend(backend_tag).statistics()

    def get_backend_config(self, backend_tag: str) -> BackendConfig:
        """A copy of the backend's config (``max_concurrent_queries`` resolved)."""
        return self._backend(backend_tag).resolved_config()

    async def update_backend_config(
        self, backend_tag: str, config_options: BackendConfig | Mapping[str, Any]
    ) -> None:
        """Change a live backend's config; returns once the change is in force.

        Only the fields the caller gave change: a dict's keys, or the fields set explicitly on a
        ``BackendConfig`` (given to its constructor or assigned since, as in 1.x).
        """
        async with self._lock:
            self._check_running()
            backend = self._backend(backend_tag)
            new = backend.config.updated(config_options)
            if isinstance(config_options, BackendConfig):
                reconfigure = "user_config" in config_options.fields_set
            else:
                reconfigure = "user_config" in config_options
            record = self._records.get(backend_tag)
            if record is not None:
                check_storable(new.user_config, f"The user_config of backend {backend_tag!r}")
            await backend.update(new, reconfigure=reconfigure)
            if record is not None:
                record.config = new.to_dict()
                await self._checkpoint()

    async def delete_backend(self, backend_tag: str, force: bool = False) -> None:
        """Delete a backend no endpoint uses: drain its work (or cancel it, with ``force``)."""
        async with self._lock:
            self._check_running()
            backend = self._backends.get(backend_tag)
            if backend is None:
                return
            users = self._router.users_of(backend_tag)
            if users:
                raise BackendInUse(
                    f"Backend {backend_tag!r} cannot be deleted: endpoint(s) "
                    f"{', '.join(map(repr, users))} send traffic or shadow copies to it. "
                    f"Change their traffic or delete them first."
                )
            del self._backends[backend_tag]
            self._records.pop(backend_tag, None)
            await self._checkpoint()
        # The drain belongs to the instance: a caller that stops waiting does not stop it.
        await asyncio.shield(self._deletions.spawn(backend.aclose(force=force)))

    # -- endpoints ------------------------------------------------------------------------------

    async def create_endpoint(
        self,
        endpoint_name: Any,
        backend: Any = None,
        *,
        route: Any = None,
        methods: Iterable[str] | str = ("GET",),
    ) -> None:
        """Create an endpoint: with ``backend`` it gets all traffic, with ``route`` it is served
        over HTTP."""
        if not isinstance(endpoint_name, str) or not endpoint_name:
            raise ConfigTypeError(f"endpoint_name must be a non-empty str, got {endpoint_name!r}.")
        if backend is not None and not isinstance(backend, str):
            raise ConfigTypeError(
                f"backend must be a backend tag (str) or None, got {type(backend).__name__}."
            )
        if route is not None and (not isinstance(route, str) or not route.startswith("/")):
            raise ConfigTypeError(f"route must be None or a str starting with '/', got {route!r}.")
        if route is not None:
            check_route(route)
        clean_methods = _methods(methods)
        async with self._lock:
            self._check_running()
            if backend is not None:
                self._backend(backend)
            endpoint = Endpoint(endpoint_name, route, clean_methods)
            if backend is not None:
                self._router.set_traffic(endpoint, {backend: 1.0})
            self._router.add_endpoint(endpoint)
            await self._checkpoint()

    def list_endpoints(self) -> dict[str, dict[str, Any]]:
        """``{name: {"route", "methods", "traffic", "shadows"}}``."""
        return {name: ep.info() for name, ep in self._router.endpoints.items()}

    async def delete_endpoint(self, endpoint: str) -> None:
        """Delete an endpoint (a missing one is a no-op); its backends stay."""
        async with self._lock:
            self._check_running()
            if self._router.remove_endpoint(endpoint) is not None:
                await self._checkpoint()

    def _endpoint(self, name: str) -> Endpoint:
        endpoint = self._router.endpoints.get(name)
        if endpoint is None:
            raise self._router.not_found(name)
        return endpoint

    async def set_traffic(self, endpoint_name: str, traffic_policy_dictionary: Any) -> None:
        """Split an endpoint's traffic over backends by weight (weights sum to 1)."""
        async with self._lock:
            self._check_running()
            endpoint = self._endpoint(endpoint_name)
            traffic = _validate_traffic(traffic_policy_dictionary, self._backends)
            self._router.set_traffic(endpoint, traffic)
            await self._checkpoint()

    async def shadow_traffic(self, endpoint_name: str, backend_tag: str, proportion: Any) -> None:
        """Copy ``proportion`` of an endpoint's requests to a backend; 0 removes the shadow."""
        async with self._lock:
            self._check_running()
            endpoint = self._endpoint(endpoint_name)
            self._backend(backend_tag)
            value = validate_shadow_proportion(proportion)
            if value:
                self._router.check_shadow(endpoint, backend_tag)
            shadows = dict(endpoint.shadows)
            if value == 0:
                shadows.pop(backend_tag, None)
            else:
                shadows[backend_tag] = value
            # Replace, never mutate: the request path iterates the dict without a lock.
            endpoint.shadows = shadows
            await self._checkpoint()

    # -- metrics --------------------------------------------------------------------------------

    def stat(
        self,
        percentiles: Sequence[float] = (50, 90, 95),
        agg_windows_seconds: Sequence[int] = (10, 60, 300, 600, 3600),
    ) -> dict[str, Any]:
        """Counts and latency percentiles per endpoint and backend over each window (0.8 shape).

        Windows longer than ``gc_window_seconds`` are refused: older data is not kept. The
        figures are this instance's: under ``aioserve run --workers`` each worker process's own.
        """
        return self.metrics.stat(percentiles, agg_windows_seconds)

    async def _metrics_route(self, request: Any) -> Any:
        return self._http.plain_response(200, await self.metrics.scrape(), CONTENT_TYPE)

    # -- handles --------------------------------------------------------------------------------

    def get_handle(
        self,
        endpoint_name: str,
        missing_ok: bool = False,
        *,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        method_name: str | None = None,
        shard_key: str | None = None,
    ) -> ServeHandle:
        """An async handle to an endpoint (``KeyError`` if unknown, unless ``missing_ok``).

        With ``missing_ok`` a call waits for the endpoint to exist: until the call's deadline
        (``relative_slo_ms``/``absolute_slo_ms``), or at most
        :data:`~aioserve.router.MISSING_ENDPOINT_WAIT_S` (30 s); then it fails with
        :class:`EndpointNotFound`. One warning per endpoint name is logged while calls wait.
        """
        self._check_running()
        if not missing_ok and endpoint_name not in self._router.endpoints:
            raise self._router.not_found(endpoint_name)
        options = HandleOptions(
            method_name=method_name,
            shard_key=shard_key,
            relative_slo_ms=relative_slo_ms,
            absolute_slo_ms=absolute_slo_ms,
            missing_ok=missing_ok,
        )
        return ServeHandle(
            self._router,
            endpoint_name,
            loop=self.loop,
            loop_thread=self._loop_thread,
            owner=self._handles,
            options=options,
        )


def _methods(methods: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = [methods]
    try:
        items = list(methods)
    except TypeError:
        raise ConfigTypeError(f"methods must be a list of str, got {methods!r}.") from None
    if not items or not all(isinstance(m, str) and m for m in items):
        raise ConfigTypeError(f"methods must be a non-empty list of str, got {methods!r}.")
    return tuple(dict.fromkeys(check_http_method(m) for m in items))
