"""Validated configuration: :class:`BackendConfig`, :class:`HTTPOptions`, :class:`HandleOptions`,
and the deadline maths of handles and HTTP (:func:`check_slo`, :func:`deadline_from`).

Both are plain dataclasses validated on construction. ``BackendConfig`` stays mutable because
legacy scripts do ``config = serve.get_backend_config(tag); config.num_replicas = 2;
serve.set_backend_config(tag, config)``; every entry point re-validates it (:meth:`coerce`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .exceptions import ConfigError, ConfigTypeError

__all__ = [
    "BackendConfig",
    "HTTPOptions",
    "HandleOptions",
    "Location",
    "ServerName",
    "check_int",
    "check_seconds",
    "check_slo",
    "deadline_from",
]

Location = Literal["HeadOnly", "EveryNode", "NoServer"]
_LOCATIONS: tuple[str, ...] = ("HeadOnly", "EveryNode", "NoServer")

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


@dataclasses.dataclass
class BackendConfig:
    """How a backend runs: replicas, batching, concurrency and queue limits, user config.

    ``max_concurrent_queries=None`` means the legacy default, resolved when the backend is created:
    ``2 * max_batch_size`` (or 8) for a sync callable, 100 for an async one.
    """

    num_replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_timeout: float = 0.0
    max_concurrent_queries: int | None = None
    max_queued_queries: int | None = 1000
    user_config: Any = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        check_int("num_replicas", self.num_replicas, minimum=1, optional=False)
        check_int("max_batch_size", self.max_batch_size, minimum=1, optional=True)
        check_seconds("batch_wait_timeout", self.batch_wait_timeout)
        check_int("max_concurrent_queries", self.max_concurrent_queries, minimum=1, optional=True)
        check_int("max_queued_queries", self.max_queued_queries, minimum=1, optional=True)
        check_seconds("graceful_shutdown_wait_loop_s", self.graceful_shutdown_wait_loop_s)
        check_seconds("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s)
        self.batch_wait_timeout = float(self.batch_wait_timeout)

    @classmethod
    def coerce(cls, value: BackendConfig | Mapping[str, Any] | None) -> BackendConfig:
        """Return a validated copy of ``value`` (a BackendConfig, a dict of its fields, or None)."""
        if value is None:
            return cls()
        if isinstance(value, BackendConfig):
            # Re-validate: the object may have been mutated since it was made.
            return dataclasses.replace(value)
        if isinstance(value, Mapping):
            return cls(**cls._fields_from(value))
        raise ConfigTypeError(
            f"config must be a BackendConfig or a dict of its fields, got {type(value).__name__}."
        )

    def updated(self, changes: BackendConfig | Mapping[str, Any]) -> BackendConfig:
        """A validated copy with ``changes`` applied (a dict applies only the keys it names)."""
        if isinstance(changes, BackendConfig):
            return dataclasses.replace(changes)
        if isinstance(changes, Mapping):
            return dataclasses.replace(self, **self._fields_from(changes))
        raise ConfigTypeError(
            f"config must be a BackendConfig or a dict of its fields, got {type(changes).__name__}."
        )

    @staticmethod
    def _fields_from(mapping: Mapping[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(BackendConfig)}
        out: dict[str, Any] = {}
        for key, val in mapping.items():
            field = _BACKEND_ALIASES.get(key, key)
            if field not in names:
                known = ", ".join(sorted(names))
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

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class HTTPOptions:
    """Where and how the HTTP server runs.

    ``host=None`` or ``location`` ``"NoServer"``/None means no server of its own: mount ``asgi_app``
    in another ASGI app instead. ``"HeadOnly"`` and ``"EveryNode"`` both mean one server here.
    ``port=0`` picks a free port (read it back from ``Serve.http_port``). ``server`` is the HTTP
    server that runs it: ``"uvicorn"`` (the default) or ``"granian"`` (``pip install
    'aioserve[granian]'``).
    """

    host: str | None = "127.0.0.1"
    port: int = 8000
    location: Location | None = "HeadOnly"
    middlewares: Sequence[Any] = ()
    root_path: str = ""
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
        if self.server not in _SERVERS:
            raise ConfigError(
                f"http_options server must be one of {', '.join(map(repr, _SERVERS))}, "
                f"got {self.server!r}."
            )

    @property
    def serves(self) -> bool:
        """Whether this instance runs an HTTP server of its own."""
        return self.host is not None and self.location not in (None, "NoServer")

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


# -- handle options and deadlines -------------------------------------------------------------

UNSET: Any = object()
"""The default of an option left out of ``options()``: unchanged."""


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
        fields.update({k: v for k, v in changes.items() if v is not UNSET})
        return HandleOptions(**fields)

    def describe(self) -> str:
        """The options that are set, for repr."""
        parts = [
            f"{name}={getattr(self, name)!r}"
            for name in ("method_name", "shard_key", "relative_slo_ms", "absolute_slo_ms")
            if getattr(self, name) is not None
        ]
        return (" " + " ".join(parts)) if parts else ""
