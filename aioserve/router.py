"""The router: endpoint -> backend, with traffic splits, shard keys and shadow copies.

HTTP requests and handle calls both enter here, so both get the same traffic split, shadows, shard
keys, replica choice and batching. The router holds the endpoint table; the backends belong to the
``Serve`` instance and are shared with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from ._concurrency import TaskOwner
from .backend import Backend
from .exceptions import EndpointNotFound, NoTraffic
from .metrics import Metrics, Series
from .policy import Chooser, RoutePolicy, TrafficTable, make_chooser
from .request import CallContext, call_var

__all__ = ["Endpoint", "Router"]

logger = logging.getLogger(__name__)

# Shadow copies beyond this many in flight are dropped rather than queued without bound.
MAX_SHADOWS_IN_FLIGHT = 1000


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
        self._backends = backends
        self._shadows = TaskOwner("shadow copies")
        self._endpoint_waiters: dict[str, list[asyncio.Future[Endpoint]]] = {}
        self.metrics = metrics or Metrics()
        # False once the instance shuts down: only calls made by requests in flight get in.
        self.admitting = True

    def __repr__(self) -> str:
        return f"<Router endpoints={len(self.endpoints)} policy={self.policy.name}>"

    # -- the endpoint table ---------------------------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> None:
        """Register ``endpoint`` and wake handles waiting for it (``missing_ok``)."""
        self.endpoints[endpoint.name] = endpoint
        for future in self._endpoint_waiters.pop(endpoint.name, []):
            if not future.done():
                future.set_result(endpoint)

    def remove_endpoint(self, name: str) -> Endpoint | None:
        """Unregister an endpoint; returns it, or None if there was none."""
        return self.endpoints.pop(name, None)

    def set_traffic(self, endpoint: Endpoint, traffic: Mapping[str, float]) -> None:
        """Install a validated traffic dict (a new chooser: policy state starts afresh)."""
        table = TrafficTable(traffic)
        endpoint.chooser = make_chooser(
            self.policy,
            table,
            rng=self.rng,
            load=self._backend_load,
            policy_kwargs=self.policy_kwargs,
        )
        endpoint.table = table

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

    async def wait_for_endpoint(self, name: str) -> Endpoint:
        """Wait until an endpoint called ``name`` exists."""
        endpoint = self.endpoints.get(name)
        if endpoint is not None:
            return endpoint
        future: asyncio.Future[Endpoint] = asyncio.get_running_loop().create_future()
        waiters = self._endpoint_waiters.setdefault(name, [])
        waiters.append(future)
        try:
            return await future
        finally:
            if future in waiters:
                waiters.remove(future)

    # -- the request path -----------------------------------------------------------------------

    async def call_endpoint(
        self,
        endpoint: Endpoint,
        method: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        shard_key: str | None,
        deadline: float | None,
    ) -> Any:
        """Pick a backend for one request to ``endpoint``, send shadow copies, run it."""
        chooser = endpoint.chooser
        if chooser is None:
            raise NoTraffic(
                f"Endpoint {endpoint.name!r} has no backend yet; "
                f"link one with set_traffic() or link()."
            )
        tag = chooser.choose(shard_key)
        if endpoint.shadows:
            self._send_shadows(endpoint, method, args, kwargs)
        series = endpoint.series.get(tag)
        if series is None:
            series = endpoint.series[tag] = self.metrics.series(endpoint.name, tag)
        # The metrics clock is perf_counter: the end time also places the request in its second.
        start = time.perf_counter()
        try:
            result = await self._backends[tag].call(method, args, kwargs, deadline)
        except Exception:
            end = time.perf_counter()
            series.observe(end - start, True, end)
            raise
        end = time.perf_counter()
        series.observe(end - start, False, end)
        return result

    def _send_shadows(
        self, endpoint: Endpoint, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        for tag, proportion in endpoint.shadows.items():
            if proportion < 1.0 and self.rng.random() >= proportion:
                continue
            backend = self._backends.get(tag)
            if backend is None:
                continue
            if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
                self.metrics.num_shadows_dropped += 1
                continue
            self._shadows.spawn(_shadow(backend, method, args, dict(kwargs)))

    def not_found(self, name: str) -> EndpointNotFound:
        """The error for an unknown endpoint name, listing the known ones."""
        known = ", ".join(repr(n) for n in sorted(self.endpoints)) or "none"
        return EndpointNotFound(f"No endpoint named {name!r}. Known endpoints: {known}.")

    async def aclose(self) -> None:
        """Cancel shadow copies still running and waiters for endpoints."""
        await self._shadows.aclose()
        for waiters in self._endpoint_waiters.values():
            for future in waiters:
                future.cancel()
        self._endpoint_waiters.clear()


async def _shadow(
    backend: Backend, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    # A shadow's result and errors are discarded; it never touches the primary request. Its own
    # CallContext (same request id, same web flag) records the replica serving the copy.
    primary = call_var.get()
    if primary is not None:
        call_var.set(CallContext(primary.endpoint, primary.web, None, primary))
    try:
        await backend.call(method, args, kwargs, None)
    except Exception as exc:
        logger.debug("Shadow copy to backend %r failed: %r", backend.tag, exc)
