"""The error tree of aioserve.

Every error aioserve raises on purpose derives from :class:`ServeError`, and also from the builtin
exception a caller would naturally catch: ``except KeyError`` and ``except ServeError`` both work::

    ServeError (Exception)                      alias: RayServeException
    ├── ConfigError (ValueError)                bad config value, unknown field, invalid argument
    │   ├── DeploymentError (ValueError)        errors in a TOML deployment file (deployment.py)
    │   ├── RouteConflict (ValueError)          duplicate endpoint name or route
    │   ├── BackendNotFound (ValueError)        no backend with that tag
    │   └── BackendInUse (ValueError)           delete_backend while traffic or shadows use it
    ├── ConfigTypeError (TypeError)             an argument of the wrong type
    ├── EndpointNotFound (KeyError, ValueError) no endpoint with that name
    ├── MethodNotFound (AttributeError)         no such public method on the backend; HTTP 404
    │   └── NoTraffic (ValueError)              endpoint has no backend linked yet; HTTP 503
    ├── Overloaded (RuntimeError)               queue bound reached; HTTP 503 with Retry-After
    ├── DeadlineExceeded (TimeoutError)         the request's deadline passed before it started; 504
    ├── BatchError (RuntimeError)               a batch handler returned a wrong result
    ├── BackendError (RuntimeError)             a constructor or reconfigure() raised
    ├── ReplicaStopped (RuntimeError)           the replica serving the request was stopped (force)
    ├── ServeShutdown (RuntimeError)            the instance has been shut down
    ├── BodyTooLarge (ValueError)               a request body over max_body_bytes; HTTP 413
    ├── StoreError (ValueError)                 state that cannot be stored, or a foreign file
    └── BindError (OSError)                     the HTTP server could not bind its address

This module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackendError",
    "BackendInUse",
    "BackendNotFound",
    "BatchError",
    "BindError",
    "BodyTooLarge",
    "ConfigError",
    "ConfigTypeError",
    "DeadlineExceeded",
    "DeploymentError",
    "EndpointNotFound",
    "MethodNotFound",
    "NoTraffic",
    "Overloaded",
    "RayServeException",
    "ReplicaStopped",
    "RouteConflict",
    "ServeError",
    "ServeShutdown",
    "StoreError",
]


class ServeError(Exception):
    """Base class of every error aioserve raises on purpose."""


RayServeException = ServeError


class ConfigError(ServeError, ValueError):
    """A configuration value or an argument is invalid."""


class ConfigTypeError(ServeError, TypeError):
    """An argument has the wrong type."""


class RouteConflict(ConfigError):
    """An endpoint name or route is already taken."""


class BackendNotFound(ConfigError):
    """No backend has the given tag."""


class BackendInUse(ConfigError):
    """The backend still receives traffic or shadow copies from an endpoint."""


class EndpointNotFound(ServeError, KeyError, ValueError):
    """No endpoint has the given name (a KeyError for lookups, a ValueError for traffic changes)."""

    def __str__(self) -> str:
        # KeyError.__str__ would show the repr of the message, quotes and all.
        return str(self.args[0]) if self.args else ""


class MethodNotFound(ServeError, AttributeError):
    """The backend has no method of that name that a caller may reach (HTTP 404).

    ``method_name`` is the name asked for; the message also lists the reachable methods, which
    the HTTP edge does not show to clients.
    """

    def __init__(self, message: str = "", method_name: str | None = None) -> None:
        super().__init__(message)
        self.method_name = method_name


class DeploymentError(ConfigError):
    """A deployment file that cannot be read or is invalid, or a step of applying it that
    ``Serve`` refused.

    ``str()`` is the whole report. ``errors`` holds its ``FILE:LINE: key.path: message`` lines, one
    per problem (empty when the file could not be read). When raised while applying, ``__cause__``
    is the error ``Serve`` raised.
    """

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.errors: tuple[str, ...] = tuple(errors)


class NoTraffic(ConfigError):
    """The endpoint has no backend to send requests to: a configuration to fix, not a load to
    wait out (HTTP 503 without ``Retry-After``)."""


class Overloaded(ServeError, RuntimeError):
    """The request could not be admitted: the backend's queue is full. Retry after
    ``retry_after_s`` seconds (HTTP 503 with ``Retry-After``)."""

    def __init__(self, message: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServeError, TimeoutError):
    """The request's deadline passed before it could start (HTTP 504)."""


class BatchError(ServeError, RuntimeError):
    """A batch handler returned something other than a list of one result per request."""


class BackendError(ServeError, RuntimeError):
    """A backend's constructor or ``reconfigure`` raised; the original is the ``__cause__``."""


class ReplicaStopped(ServeError, RuntimeError):
    """The replica running the request was stopped before it finished."""


class ServeShutdown(ServeError, RuntimeError):
    """The aioserve instance has been shut down."""


class BodyTooLarge(ServeError, ValueError):
    """The request body is larger than ``http_options`` ``max_body_bytes`` (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than {limit} bytes, the limit of this server "
            f"(http_options max_body_bytes)."
        )
        self.limit = limit


class StoreError(ServeError, ValueError):
    """The control state cannot be stored, or the state file cannot be used."""


class BindError(ServeError, OSError):
    """The HTTP server could not bind its host and port."""
