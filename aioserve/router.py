"""The router: the one endpoint table, the route index, the admission flag, and ``enter(call)``.

HTTP requests and handle calls both come in through :meth:`Router.enter`, so both get the same
admission rule, traffic split, shadows, shard keys, metrics, replica choice and batching. The HTTP
app matches paths against the router's route index (:meth:`Router.match`) and keeps no table of
its own. The backends belong to the ``Serve`` instance and are shared with the router.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from collections.abc import Mapping
from typing import Any

from starlette.convertors import Convertor
from starlette.routing import compile_path

from ._concurrency import TaskOwner
from ._types import Call, Lifecycle
from .backend import Backend
from .context import call_var
from .exceptions import ConfigError, EndpointNotFound, NoTraffic, RouteConflict, ServeShutdown
from .metrics import Metrics, Series
from .policy import Chooser, RoutePolicy, TrafficTable, make_chooser

__all__ = [
    "MAX_SHADOWS_IN_FLIGHT",
    "MISSING_ENDPOINT_WAIT_S",
    "Endpoint",
    "Router",
    "check_route",
]

logger = logging.getLogger(__name__)

# Shadow copies beyond this many in flight are dropped rather than queued without bound.
MAX_SHADOWS_IN_FLIGHT = 1000
# Reading an enum member costs about 50 ns on 3.11; the request path compares with this instead.
_RUNNING = Lifecycle.RUNNING
SYSTEM_PREFIX = "/-/"
# How long a call through a missing_ok handle waits for its endpoint when it has no deadline.
MISSING_ENDPOINT_WAIT_S = 30.0


def check_route(route: str) -> None:
    """Raise :class:`ConfigError` if ``route`` is not a Starlette path or is reserved (``/-/``)."""
    if route == "/-" or route.startswith(SYSTEM_PREFIX):
        raise ConfigError(
            f"Route {route!r} is under /-/, which is reserved for aioserve's own routes "
            f"(/-/routes, /-/healthz, /-/metrics). Pick another route."
        )
    try:
        compile_path(route)
    except (AssertionError, ValueError) as exc:
        raise ConfigError(f"Route {route!r} is not a valid path: {exc}") from None


@dataclasses.dataclass(eq=False)
class Endpoint:
    """A public name with an optional HTTP route, and where its traffic goes."""

    name: str
    route: str | None
    methods: tuple[str, ...]
    table: TrafficTable | None = None
    chooser: Chooser | None = None
    shadows: dict[str, float] = dataclasses.field(default_factory=dict)
    # Metric series by backend tag, so the request path does one small dict lookup.
    series: dict[str, Series] = dataclasses.field(default_factory=dict, repr=False)
    # The HTTP methods the route answers (HEAD with GET), and a compiled pattern for a route
    # with parameters.
    http_methods: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)
    regex: re.Pattern[str] | None = dataclasses.field(default=None, repr=False)
    convertors: dict[str, Convertor[Any]] = dataclasses.field(default_factory=dict, repr=False)
    # Whether its traffic goes to @serve.ingress backends: then the route is a prefix, and each
    # request under it goes to the backend's app as an ASGI connection.
    ingress: bool = dataclasses.field(default=False, repr=False)

    def info(self) -> dict[str, Any]:
        """The plain dict list_endpoints shows."""
        return {
            "route": self.route,
            "methods": list(self.methods),
            "traffic": dict(self.table.traffic) if self.table is not None else {},
            "shadows": dict(self.shadows),
        }


class Router:
    """Sends each request of an endpoint to one of its backends."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        policy: RoutePolicy = RoutePolicy.Random,
        policy_kwargs: Mapping[str, object] | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.policy = policy
        self.policy_kwargs = dict(policy_kwargs or {})
        self.rng = rng or random.Random()
        self.metrics = metrics or Metrics()
        # The one admission flag: only RUNNING admits new requests; calls made by requests in
        # flight (nested handle calls) still get in while the instance drains.
        self.state = Lifecycle.STARTING
        # Readiness as a probe sees it (``/-/ready``): the owner sets it once what it must
        # deploy is in place; it counts only while the state is RUNNING.
        self.ready = False
        self._backends = backends
        self._static: dict[str, Endpoint] = {}
        self._dynamic: list[Endpoint] = []
        # Routes of ingress endpoints, as prefixes, longest first (tried after the others).
        self._prefixes: list[tuple[str, Endpoint]] = []
        self._shadows = TaskOwner("shadow copies")
        self._endpoint_waiters: dict[str, list[asyncio.Future[Endpoint]]] = {}
        self._warned_missing: set[str] = set()
        # The 1.x switch: handle calls arrive as one Python-side request (see Serve).
        self.legacy_requests = False

    def __repr__(self) -> str:
        return (
            f"<Router {self.state.value} endpoints={len(self.endpoints)} policy={self.policy.name}>"
        )

    # -- the endpoint table and its route index -------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> None:
        """Register ``endpoint`` (and its route); :class:`RouteConflict` if either is taken."""
        if endpoint.name in self.endpoints:
            raise RouteConflict(f"Endpoint {endpoint.name!r} already exists.")
        route = endpoint.route
        if route is not None:
            for other in self.endpoints.values():
                if other.route == route:
                    raise RouteConflict(
                        f"Route {route!r} is already served by endpoint {other.name!r}."
                    )
            check_route(route)
            methods = set(endpoint.methods)
            if "GET" in methods:
                methods.add("HEAD")
            endpoint.http_methods = frozenset(methods)
            if "{" in route:
                endpoint.regex, _, endpoint.convertors = compile_path(route)
                self._dynamic.append(endpoint)
            else:
                self._static[route] = endpoint
        self.endpoints[endpoint.name] = endpoint
        self._index_prefixes()
        for future in self._endpoint_waiters.pop(endpoint.name, []):
            if not future.done():
                future.set_result(endpoint)

    def remove_endpoint(self, name: str) -> Endpoint | None:
        """Unregister an endpoint and its route; returns it, or None if there was none."""
        endpoint = self.endpoints.pop(name, None)
        if endpoint is not None and endpoint.route is not None:
            if endpoint.regex is None:
                self._static.pop(endpoint.route, None)
            else:
                self._dynamic = [e for e in self._dynamic if e is not endpoint]
            self._index_prefixes()
        return endpoint

    def _index_prefixes(self) -> None:
        prefixes = [
            (endpoint.route.rstrip("/"), endpoint)
            for endpoint in self.endpoints.values()
            if endpoint.ingress and endpoint.route is not None
        ]
        self._prefixes = sorted(prefixes, key=lambda item: len(item[0]), reverse=True)

    def match(self, path: str) -> tuple[Endpoint | None, dict[str, Any] | None]:
        """The endpoint whose route matches ``path``, and the converted path parameters (None
        for a route without parameters)."""
        endpoint = self._static.get(path)
        if endpoint is not None:
            return endpoint, None
        for endpoint in self._dynamic:
            assert endpoint.regex is not None  # only routes with parameters are listed here
            m = endpoint.regex.match(path)
            if m is not None:
                convertors = endpoint.convertors
                return endpoint, {k: convertors[k].convert(v) for k, v in m.groupdict().items()}
        for prefix, endpoint in self._prefixes:
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return endpoint, None
        return None, None

    def set_traffic(self, endpoint: Endpoint, traffic: Mapping[str, float]) -> None:
        """Install a validated traffic dict (a new chooser: policy state starts afresh).

        :class:`ConfigError`, and nothing changes, if the dict mixes ``@serve.ingress`` backends
        with others, or sends an endpoint with shadows or a route with parameters to ingress
        backends.
        """
        ingress = self._ingress_traffic(endpoint, traffic)
        table = TrafficTable(traffic)
        endpoint.chooser = make_chooser(
            self.policy,
            table,
            rng=self.rng,
            load=self._backend_load,
            policy_kwargs=self.policy_kwargs,
        )
        endpoint.table = table
        if ingress is not endpoint.ingress:
            endpoint.ingress = ingress
            self._index_prefixes()

    def is_ingress(self, backend_tag: str) -> bool:
        """Whether the backend serves a class decorated with ``@serve.ingress``."""
        backend = self._backends.get(backend_tag)
        return backend is not None and backend.callable.ingress is not None

    def check_shadow(self, endpoint: Endpoint, backend_tag: str) -> None:
        """:class:`ConfigError` if ``backend_tag`` cannot shadow ``endpoint``: requests to or from
        ``@serve.ingress`` backends cannot be copied."""
        if endpoint.ingress or self.is_ingress(backend_tag):
            raise ConfigError(
                f"Cannot shadow endpoint {endpoint.name!r} to backend {backend_tag!r}: requests "
                f"to or from @serve.ingress backends cannot be copied (their body is streamed to "
                f"the app)."
            )

    def _ingress_traffic(self, endpoint: Endpoint, traffic: Mapping[str, float]) -> bool:
        ingress = sorted(tag for tag in traffic if self.is_ingress(tag))
        if not ingress:
            return False
        others = sorted(tag for tag in traffic if tag not in ingress)
        if others:
            raise ConfigError(
                f"Endpoint {endpoint.name!r}: traffic cannot mix @serve.ingress backends "
                f"({', '.join(map(repr, ingress))}) with other backends "
                f"({', '.join(map(repr, others))}): an ingress backend serves every path under "
                f"the route, the others serve the route itself. Use one kind per endpoint."
            )
        if endpoint.shadows:
            raise ConfigError(
                f"Endpoint {endpoint.name!r} has shadow backends, and requests to "
                f"@serve.ingress backends cannot be copied (their body is streamed to the app). "
                f"Remove the shadows first."
            )
        route = endpoint.route
        if route is not None:
            prefix = route.rstrip("/")
            for prefix_taken, other in self._prefixes:
                if other is not endpoint and prefix_taken == prefix:
                    raise ConfigError(
                        f"Endpoint {endpoint.name!r}: its route {route!r} is the same prefix as "
                        f"the route {other.route!r} of endpoint {other.name!r}, also served by "
                        f"@serve.ingress backends. Give it another route."
                    )
        if route is not None and "{" in route:
            raise ConfigError(
                f"Endpoint {endpoint.name!r}: the route {endpoint.route!r} has parameters, and "
                f"the route of an endpoint served by @serve.ingress backends is a prefix. Give "
                f"it a plain route; the app's own routes take the parameters."
            )
        return True

    def _backend_load(self, tag: str) -> int:
        backend = self._backends.get(tag)
        return backend.load if backend is not None else 0

    def users_of(self, backend_tag: str) -> list[str]:
        """Names of the endpoints whose traffic or shadows use ``backend_tag``."""
        return sorted(
            ep.name
            for ep in self.endpoints.values()
            if backend_tag in ep.shadows
            or (ep.table is not None and backend_tag in ep.table.traffic)
        )

    async def wait_for_endpoint(self, name: str, deadline: float | None = None) -> Endpoint:
        """Wait until an endpoint called ``name`` exists: until ``deadline`` (``loop.time()``
        seconds), or at most :data:`MISSING_ENDPOINT_WAIT_S`; then :class:`EndpointNotFound`.

        A warning is logged once per name when calls start waiting for it.
        """
        endpoint = self.endpoints.get(name)
        if endpoint is not None:
            return endpoint
        loop = asyncio.get_running_loop()
        timeout = MISSING_ENDPOINT_WAIT_S if deadline is None else max(deadline - loop.time(), 0)
        future: asyncio.Future[Endpoint] = loop.create_future()
        waiters = self._endpoint_waiters.get(name)
        if waiters is None:
            waiters = self._endpoint_waiters[name] = []
            if name not in self._warned_missing:
                self._warned_missing.add(name)
                logger.warning(
                    "A call through a missing_ok handle waits for endpoint %r, which does not "
                    "exist yet; it fails with EndpointNotFound after %.1f s.",
                    name,
                    timeout,
                )
        waiters.append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise EndpointNotFound(
                f"No endpoint named {name!r} appeared within {timeout:.1f} s of waiting "
                f"(missing_ok handle). Create it, or give the call a longer deadline."
            ) from None
        finally:
            if future in waiters:
                waiters.remove(future)

    def not_found(self, name: str) -> EndpointNotFound:
        """The error for an unknown endpoint name, listing the known ones."""
        known = ", ".join(repr(n) for n in sorted(self.endpoints)) or "none"
        return EndpointNotFound(f"No endpoint named {name!r}. Known endpoints: {known}.")

    # -- the request path -----------------------------------------------------------------------

    async def enter(self, call: Call) -> Any:
        """The one way in: admit ``call``, pick a backend, send shadow copies, run it there."""
        if self.state is not _RUNNING and call.parent is None:
            raise ServeShutdown(
                f"This aioserve instance is {self.state.value}; it takes no new requests."
            )
        endpoint = self.endpoints.get(call.endpoint)
        if endpoint is None:
            raise self.not_found(call.endpoint)
        chooser = endpoint.chooser
        if chooser is None:
            raise NoTraffic(
                f"Endpoint {endpoint.name!r} has no backend yet; "
                f"link one with set_traffic() or link()."
            )
        tag = chooser.choose(call.shard_key)
        if endpoint.shadows:
            self._send_shadows(endpoint, call)
        series = endpoint.series.get(tag)
        if series is None:
            series = endpoint.series[tag] = self.metrics.series(endpoint.name, tag)
        # The metrics clock is perf_counter: the end time also places the request in its second.
        start = time.perf_counter()
        try:
            result = await self._backends[tag].call(call)
        except Exception:
            end = time.perf_counter()
            series.observe(end - start, True, end)
            raise
        end = time.perf_counter()
        series.observe(end - start, False, end)
        return result

    def _send_shadows(self, endpoint: Endpoint, call: Call) -> None:
        for tag, proportion in endpoint.shadows.items():
            if proportion < 1.0 and self.rng.random() >= proportion:
                continue
            backend = self._backends.get(tag)
            if backend is None:
                continue
            if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
                self.metrics.num_shadows_dropped += 1
                continue
            self._shadows.spawn(_shadow(backend, call.copy()))

    async def aclose(self) -> None:
        """Cancel shadow copies still running and waiters for endpoints."""
        await self._shadows.aclose()
        for waiters in self._endpoint_waiters.values():
            for future in waiters:
                future.cancel()
        self._endpoint_waiters.clear()


async def _shadow(backend: Backend, call: Call) -> None:
    # A shadow's result and errors are discarded; it never touches the primary request. It runs
    # as its own Call (same request id, same web flag), which records the replica serving it.
    call_var.set(call)
    try:
        await backend.call(call)
    except Exception as exc:
        logger.debug("Shadow copy to backend %r failed: %r", backend.tag, exc)
