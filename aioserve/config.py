"""Validated configuration: :class:`BackendConfig`, :class:`HTTPOptions`, :class:`HandleOptions`,
and the deadline maths of handles and HTTP (:func:`check_slo`, :func:`deadline_from`).

Both are plain dataclasses validated on construction. ``BackendConfig`` stays mutable because
legacy scripts do ``config = serve.get_backend_config(tag); config.num_replicas = 2;
serve.set_backend_config(tag, config)``; every entry point re-validates it (:meth:`coerce`).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .exceptions import ConfigError, ConfigTypeError

__all__ = [
    "BackendConfig",
    "BackendInfo",
    "DeploymentMode",
    "HTTPOptions",
    "Location",
    "ServerName",
    "check_int",
    "check_seconds",
]

Location = Literal["HeadOnly", "EveryNode", "NoServer"]
_LOCATIONS: tuple[str, ...] = ("HeadOnly", "EveryNode", "NoServer")


class DeploymentMode(enum.StrEnum):
    """Where HTTP servers run (Ray 1.x's enum). In one process ``HeadOnly`` and ``EveryNode`` both
    mean one server; ``NoServer`` means none (mount ``asgi_app`` elsewhere). A member equals its
    name as a string, so ``opts.location == "NoServer"`` holds either way."""

    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"
    NoServer = "NoServer"


ServerName = Literal["uvicorn", "granian"]
_SERVERS: tuple[str, ...] = ("uvicorn", "granian")


# Legacy spellings accepted in dicts, mapped to the field they set.
_BACKEND_ALIASES = {
    "experimental_graceful_shutdown_wait_loop_s": "graceful_shutdown_wait_loop_s",
    "experimental_graceful_shutdown_timeout_s": "graceful_shutdown_timeout_s",
    "batch_wait_timeout_s": "batch_wait_timeout",
}


def check_int(name: str, value: object, *, minimum: int = 1, optional: bool = False) -> Any:
    """Return ``value`` if it is an int >= ``minimum`` (or None, when ``optional``); else raise
    :class:`ConfigTypeError` (not an int) or :class:`ConfigError` (too small), naming ``name``."""
    if value is None and optional:
        return None
    allowed = "None or an int" if optional else "an int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{name} must be {allowed} >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}.")
    return value


def check_seconds(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number of seconds >= 0; else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(f"{name} must be a number of seconds >= 0, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value!r}.")
    return float(value)


WaitPolicy = Literal["adaptive", "fixed"]
"""How long a batch waits for more requests (see :mod:`aioserve.batchqueue`): ``"adaptive"``
treats the wait timeout as an upper bound, ``"fixed"`` waits until the batch is full or the
timeout passes."""
_WAIT_POLICIES: tuple[str, ...] = ("adaptive", "fixed")


def check_wait_policy(name: str, value: object) -> WaitPolicy:
    """Return ``value`` if it is a :data:`WaitPolicy`; else raise :class:`ConfigError`."""
    if value not in _WAIT_POLICIES:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(repr, _WAIT_POLICIES))}, got {value!r}."
        )
    policy: WaitPolicy = value  # type: ignore[assignment]
    return policy


_UNSET_FIELD: Any = object()

# Per-field validators: each returns the value to store, or raises naming the field.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "num_replicas": lambda n, v: check_int(n, v, minimum=1),
    "max_batch_size": lambda n, v: check_int(n, v, minimum=1, optional=True),
    "batch_wait_timeout": check_seconds,
    "max_concurrent_queries": lambda n, v: check_int(n, v, minimum=1, optional=True),
    "max_queued_queries": lambda n, v: check_int(n, v, minimum=1, optional=True),
    "user_config": lambda n, v: v,
    "graceful_shutdown_wait_loop_s": check_seconds,
    "graceful_shutdown_timeout_s": check_seconds,
    "batch_wait_policy": check_wait_policy,
}


@dataclasses.dataclass(init=False)
class BackendConfig:
    """How a backend runs: replicas, batching, concurrency and queue limits, user config.

    ``max_concurrent_queries=None`` means the legacy default, resolved when the backend is created:
    ``2 * max_batch_size`` (or 8) for a sync callable, 100 for an async one.

    As the 1.x pydantic model did, it validates every field on construction *and* on assignment,
    and remembers which fields were set explicitly (:attr:`fields_set`): an update with a
    ``BackendConfig`` changes only those. The 1.x names ``experimental_graceful_shutdown_*`` are
    accepted as keyword arguments for the ``graceful_shutdown_*`` fields.
    """

    num_replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_timeout: float = 0.0
    max_concurrent_queries: int | None = None
    max_queued_queries: int | None = 1000
    user_config: Any = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    batch_wait_policy: WaitPolicy = "adaptive"

    def __init__(
        self,
        *,
        num_replicas: int = _UNSET_FIELD,
        max_batch_size: int | None = _UNSET_FIELD,
        batch_wait_timeout: float = _UNSET_FIELD,
        max_concurrent_queries: int | None = _UNSET_FIELD,
        max_queued_queries: int | None = _UNSET_FIELD,
        user_config: Any = _UNSET_FIELD,
        graceful_shutdown_wait_loop_s: float = _UNSET_FIELD,
        graceful_shutdown_timeout_s: float = _UNSET_FIELD,
        batch_wait_policy: WaitPolicy = _UNSET_FIELD,
        experimental_graceful_shutdown_wait_loop_s: float = _UNSET_FIELD,
        experimental_graceful_shutdown_timeout_s: float = _UNSET_FIELD,
    ) -> None:
        given = {
            "num_replicas": num_replicas,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout": batch_wait_timeout,
            "max_concurrent_queries": max_concurrent_queries,
            "max_queued_queries": max_queued_queries,
            "user_config": user_config,
            "graceful_shutdown_wait_loop_s": graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
            "batch_wait_policy": batch_wait_policy,
        }
        wait_loop_s = experimental_graceful_shutdown_wait_loop_s
        experimental = {
            "experimental_graceful_shutdown_wait_loop_s": wait_loop_s,
            "experimental_graceful_shutdown_timeout_s": experimental_graceful_shutdown_timeout_s,
        }
        for alias, value in experimental.items():
            if value is _UNSET_FIELD:
                continue
            field = _BACKEND_ALIASES[alias]
            if given[field] is not _UNSET_FIELD:
                raise ConfigError(
                    f"BackendConfig got both {field}={given[field]!r} and its 1.x name "
                    f"{alias}={value!r}; pass one of them."
                )
            given[field] = value
        object.__setattr__(self, "_fields_set", set())
        for name, value in given.items():
            if value is _UNSET_FIELD:
                object.__setattr__(self, name, _DEFAULTS[name])
            else:
                setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        check = _CHECKS.get(name)
        if check is None:
            raise AttributeError(
                f"BackendConfig has no field {name!r}. Known fields: {', '.join(_CHECKS)}."
            )
        object.__setattr__(self, name, check(name, value))
        _set_fields(self).add(name)

    @property
    def fields_set(self) -> frozenset[str]:
        """The fields given to the constructor or assigned since (pydantic's ``__fields_set__``)."""
        return frozenset(_set_fields(self))

    def copy(self, **changes: Any) -> BackendConfig:
        """A copy with ``changes`` applied (validated); it remembers the same fields as set."""
        new = _copy.copy(self)
        object.__setattr__(new, "_fields_set", set(_set_fields(self)))
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    @classmethod
    def coerce(cls, value: BackendConfig | Mapping[str, Any] | None) -> BackendConfig:
        """Return a validated copy of ``value`` (a BackendConfig, a dict of its fields, or None)."""
        if value is None:
            return cls()
        if isinstance(value, BackendConfig):
            return value.copy()
        if isinstance(value, Mapping):
            return cls(**cls._fields_from(value))
        raise ConfigTypeError(
            f"config must be a BackendConfig or a dict of its fields, got {type(value).__name__}."
        )

    def updated(self, changes: BackendConfig | Mapping[str, Any]) -> BackendConfig:
        """A validated copy with ``changes`` applied: a dict's keys, or the fields set explicitly
        on a ``BackendConfig`` (as 1.x did with ``exclude_unset``)."""
        if isinstance(changes, BackendConfig):
            return self.copy(**{name: getattr(changes, name) for name in _set_fields(changes)})
        if isinstance(changes, Mapping):
            return self.copy(**self._fields_from(changes))
        raise ConfigTypeError(
            f"config must be a BackendConfig or a dict of its fields, got {type(changes).__name__}."
        )

    @staticmethod
    def _fields_from(mapping: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, val in mapping.items():
            field = _BACKEND_ALIASES.get(key, key)
            if field not in _CHECKS:
                known = ", ".join(sorted(_CHECKS))
                raise ConfigError(f"Unknown backend config field {key!r}. Known fields: {known}.")
            out[field] = val
        return out

    def resolved_max_concurrent_queries(self, *, is_async: bool) -> int:
        """The per-replica concurrency limit in force (the legacy default when unset)."""
        if self.max_concurrent_queries is not None:
            return self.max_concurrent_queries
        if is_async:
            return 100
        return 2 * self.max_batch_size if self.max_batch_size else 8

    def with_resolved_concurrency(self, *, is_async: bool) -> BackendConfig:
        """A copy whose ``max_concurrent_queries`` is the limit in force (not marked as set)."""
        new = self.copy()
        limit = self.resolved_max_concurrent_queries(is_async=is_async)
        object.__setattr__(new, "max_concurrent_queries", limit)
        return new

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def _set_fields(config: BackendConfig) -> set[str]:
    # Not a dataclass field (not compared, shown or serialised): kept in the instance dict.
    fields: set[str] = config.__dict__["_fields_set"]
    return fields


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(BackendConfig)}


class BackendInfo(dict[str, Any]):
    """What ``list_backends()`` gives per backend: a plain dict (the seed documents print it) whose
    keys are also attributes (1.2/1.3 returned ``BackendConfig`` objects): ``info["num_replicas"]``
    and ``info.num_replicas`` both work."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"Backend info has no field {name!r}. Known fields: {', '.join(self)}."
            ) from None


@dataclasses.dataclass(frozen=True)
class HTTPOptions:
    """Where and how the HTTP server runs.

    ``host=None`` or ``location`` ``"NoServer"``/None means no server of its own: mount ``asgi_app``
    in another ASGI app instead; ``location`` then reports :attr:`DeploymentMode.NoServer`, as in
    1.x. ``"HeadOnly"`` and ``"EveryNode"`` both mean one server here. ``location`` takes the
    :class:`DeploymentMode` enum or its names, and is always stored as the enum.
    ``port=0`` picks a free port (read it back from ``Serve.http_port``).

    Limits, with defaults safe for a server open to untrusted clients:

    * ``max_body_bytes``: a request body larger than this is refused with 413, checked against
      ``Content-Length`` before the handler runs and counted while the body streams in (None:
      no limit; a handler that reads ``request.stream()`` holds one chunk at a time anyway).
    * ``max_header_bytes`` / ``max_headers``: larger or more request headers get 431.
    * ``header_timeout_s``: a connection that has not sent a whole request head this long after
      it opened, or after its previous response, is closed (slow or idle clients).
    * ``keep_alive_timeout_s``: an idle keep-alive connection is closed after this long.
    * ``max_connections``: connections (and requests) served at once; past it new ones get 503.
    * ``system_routes``: serve ``/-/routes``, ``/-/healthz``, ``/-/ready``, ``/-/metrics`` on the
      serving port (True) or not (False); ``system_port`` serves them on a port of their own
      instead (same host), for a deployment that keeps them off its public port.
    * ``server``: the HTTP server that runs it: ``"uvicorn"`` (the default) or ``"granian"``
      (``pip install 'aioserve[granian]'``).
    """

    host: str | None = "127.0.0.1"
    port: int = 8000
    location: DeploymentMode | Location | None = DeploymentMode.HeadOnly
    middlewares: Sequence[Any] = ()
    root_path: str = ""
    max_body_bytes: int | None = 16 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int | None = 1000
    system_routes: bool = True
    system_port: int | None = None
    server: ServerName = "uvicorn"

    def __post_init__(self) -> None:
        if self.host is not None and not isinstance(self.host, str):
            raise ConfigTypeError(f"http_options host must be a str or None, got {self.host!r}.")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigTypeError(f"http_options port must be an int, got {self.port!r}.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http_options port must be in 0..65535, got {self.port!r}.")
        if self.location is not None and self.location not in _LOCATIONS:
            raise ConfigError(
                f"http_options location must be one of {', '.join(map(repr, _LOCATIONS))} or None, "
                f"got {self.location!r}."
            )
        # As 1.x's validator did: no host or no location both mean no server, and say so.
        location = (
            DeploymentMode.NoServer
            if self.host is None or self.location is None
            else DeploymentMode(self.location)
        )
        object.__setattr__(self, "location", location)
        if isinstance(self.middlewares, str | bytes) or not isinstance(self.middlewares, Sequence):
            raise ConfigTypeError(
                f"http_options middlewares must be a list of Middleware, got {self.middlewares!r}."
            )
        if not isinstance(self.root_path, str) or (
            self.root_path and not self.root_path.startswith("/")
        ):
            raise ConfigError(
                f"http_options root_path must be '' or start with '/', got {self.root_path!r}."
            )
        check_int("http_options max_body_bytes", self.max_body_bytes, optional=True)
        check_int("http_options max_header_bytes", self.max_header_bytes, minimum=1024)
        check_int("http_options max_headers", self.max_headers)
        check_seconds("http_options header_timeout_s", self.header_timeout_s)
        check_seconds("http_options keep_alive_timeout_s", self.keep_alive_timeout_s)
        check_int("http_options max_connections", self.max_connections, optional=True)
        if not isinstance(self.system_routes, bool):
            raise ConfigTypeError(
                f"http_options system_routes must be True or False, got {self.system_routes!r}."
            )
        if self.system_port is not None:
            check_int("http_options system_port", self.system_port, minimum=0)
            if self.system_port > 65535 or (self.system_port == self.port != 0):
                raise ConfigError(
                    f"http_options system_port must be in 0..65535 and differ from port, got "
                    f"{self.system_port!r}."
                )
        if self.server not in _SERVERS:
            raise ConfigError(
                f"http_options server must be one of {', '.join(map(repr, _SERVERS))}, "
                f"got {self.server!r}."
            )

    @property
    def serves(self) -> bool:
        """Whether this instance runs an HTTP server of its own."""
        return self.location is not DeploymentMode.NoServer

    @classmethod
    def coerce(cls, value: HTTPOptions | Mapping[str, Any] | None) -> HTTPOptions:
        """Return validated options from an HTTPOptions, a dict of its fields, or None."""
        if value is None:
            return cls()
        if isinstance(value, HTTPOptions):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ConfigError(
                    f"Unknown http_options field(s) {', '.join(map(repr, unknown))}. "
                    f"Known fields: {', '.join(sorted(names))}."
                )
            fields = dict(value)
            if "middlewares" in fields and isinstance(fields["middlewares"], list):
                fields["middlewares"] = tuple(fields["middlewares"])
            return cls(**fields)
        raise ConfigTypeError(
            f"http_options must be an HTTPOptions or a dict, got {type(value).__name__}."
        )
