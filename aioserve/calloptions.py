"""Per-call options: :class:`HandleOptions` (what a handle's ``options()`` set), and the deadline
maths shared by handles and the HTTP edge (:func:`check_slo`, :func:`deadline_from`).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping
from typing import Any

from ._types import ASGI_METHOD
from .exceptions import ConfigError, ConfigTypeError

__all__ = ["UNSET", "HandleOptions", "check_http_method", "check_slo", "deadline_from"]


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


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_http_method(value: object) -> str:
    """Return ``value`` upper-cased if it is an HTTP method (an RFC 9110 token); else raise."""
    if not isinstance(value, str):
        raise ConfigTypeError(f"An HTTP method must be a str, got {value!r}.")
    if not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"{value!r} is not an HTTP method: a method is a non-empty token of letters, digits "
            f"and !#$%&'*+-.^_`|~ (no spaces), such as 'GET' or 'POST'."
        )
    return value.upper()


class HandleOptions:
    """The per-handle call options; immutable, shared by handles made from each other.

    ``http_method`` and ``http_headers`` (1.2) are what a legacy handler reached through the
    handle sees as ``request.method`` and ``request.headers`` on its Python-side request.
    """

    _FIELDS = (
        "absolute_slo_ms",
        "http_headers",
        "http_method",
        "method_name",
        "missing_ok",
        "relative_slo_ms",
        "shard_key",
    )
    __slots__ = (*_FIELDS, "http")

    def __init__(
        self,
        method_name: str | None = None,
        shard_key: str | None = None,
        relative_slo_ms: float | None = None,
        absolute_slo_ms: float | None = None,
        missing_ok: bool = False,
        http_method: str | None = None,
        http_headers: Mapping[str, str] | None = None,
    ) -> None:
        if method_name is not None and not isinstance(method_name, str):
            raise ConfigTypeError(f"method_name must be a str or None, got {method_name!r}.")
        if method_name == ASGI_METHOD:
            raise ConfigError(
                f"method_name {method_name!r} is reserved: it hands an HTTP connection to an "
                f"@serve.ingress app. Call the class's methods by their own names."
            )
        if shard_key is not None and not isinstance(shard_key, str | int | bytes):
            raise ConfigTypeError(f"shard_key must be a str or None, got {shard_key!r}.")
        if http_headers is not None and (
            not isinstance(http_headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in http_headers.items())
        ):
            raise ConfigTypeError(
                f"http_headers must be a dict of str to str or None, got {http_headers!r}."
            )
        self.method_name = method_name
        self.shard_key = None if shard_key is None else str(shard_key)
        self.relative_slo_ms = check_slo("relative_slo_ms", relative_slo_ms)
        self.absolute_slo_ms = check_slo("absolute_slo_ms", absolute_slo_ms)
        self.missing_ok = bool(missing_ok)
        self.http_method = None if http_method is None else check_http_method(http_method)
        self.http_headers = None if http_headers is None else dict(http_headers)
        # What a call carries for a legacy handler's request (None: nothing set).
        self.http: tuple[str | None, dict[str, str] | None] | None = (
            None
            if self.http_method is None and self.http_headers is None
            else (self.http_method, self.http_headers)
        )

    def replace(self, **changes: Any) -> HandleOptions:
        """A copy with the given options changed."""
        fields = {name: getattr(self, name) for name in self._FIELDS}
        fields.update({k: v for k, v in changes.items() if v is not UNSET})
        return HandleOptions(**fields)

    def describe(self) -> str:
        """The options that are set, for repr."""
        parts = [
            f"{name}={getattr(self, name)!r}"
            for name in (
                "method_name",
                "shard_key",
                "relative_slo_ms",
                "absolute_slo_ms",
                "http_method",
                "http_headers",
            )
            if getattr(self, name) is not None
        ]
        return (" " + " ".join(parts)) if parts else ""
