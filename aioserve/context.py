"""Who is running: the request being served, the replica serving it, and ``serve.context``.

The call being served lives in one context variable (:data:`call_var`, holding a
:class:`~aioserve._types.Call`); the replica running user code outside of any request (a
constructor, ``reconfigure()``) in a second one. Log records get both through
:func:`install_log_context`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import Any

from ._types import Call
from .exceptions import ServeError

__all__ = [
    "LOG_FORMAT",
    "ReplicaContext",
    "call_var",
    "context",
    "current_replica",
    "get_replica_context",
    "install_log_context",
    "replica_var",
    "use_default_log_format",
]


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What user code can learn about the replica it runs in (``serve.get_replica_context()``)."""

    backend_tag: str
    replica_tag: str
    servable_object: Any = dataclasses.field(default=None, compare=False, repr=False)
    # The aioserve instance the replica belongs to (used by ``serve.connect()`` inside a backend).
    instance: Any = dataclasses.field(default=None, compare=False, repr=False)


# Set once per request, in the request's own task context (HTTP) or the handle call's task.
call_var: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "aioserve_call", default=None
)
# The replica running user code outside of a request (its constructor and reconfigure(), or
# calls made without a Call); inside a request it is Call.replica.
replica_var: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "aioserve_replica", default=None
)


def current_replica() -> ReplicaContext | None:
    """The replica running the current code, or None outside of one."""
    call = call_var.get()
    if call is not None and call.replica is not None:
        replica: ReplicaContext = call.replica
        return replica
    return replica_var.get()


def get_replica_context() -> ReplicaContext:
    """The context of the replica running the current call; raises outside of one."""
    ctx = current_replica()
    if ctx is None:
        raise ServeError(
            "get_replica_context() was called outside of a backend replica; "
            "it only works inside a backend's constructor, handler or reconfigure()."
        )
    return ctx


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(serve_tags)s: %(message)s"
"""The default log format of the command line and the facade: inside a replica a record reads
``... INFO my.module [backend=model replica=model#a1b2c3]: message``, as 1.x prefixed it."""

_log_context_installed = False


def install_log_context() -> None:
    """Give every log record ``serve_request_id``, ``serve_endpoint``, ``serve_backend`` and
    ``serve_replica`` attributes ("-" outside a request), for formats like
    ``"%(serve_request_id)s %(serve_replica)s %(message)s"``, and ``serve_tags`` (" [backend=...
    replica=...]" inside a replica, "" outside) used by :data:`LOG_FORMAT`. Idempotent.
    """
    global _log_context_installed
    if _log_context_installed:
        return
    _log_context_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        call = call_var.get()
        replica = current_replica()
        record.serve_request_id = call.request_id if call is not None else "-"
        record.serve_endpoint = call.endpoint if call is not None else "-"
        record.serve_backend = replica.backend_tag if replica is not None else "-"
        record.serve_replica = replica.replica_tag if replica is not None else "-"
        record.serve_tags = (
            f" [backend={replica.backend_tag} replica={replica.replica_tag}]"
            if replica is not None
            else ""
        )
        return record

    logging.setLogRecordFactory(factory)


def use_default_log_format() -> None:
    """The facade's default: when logging is not configured at all, Python prints warnings and
    errors through its last-resort handler as bare messages; give that handler
    :data:`LOG_FORMAT`, so records made in a backend show its backend and replica tags. Logging
    configured by the application (any handler) is left alone."""
    install_log_context()
    last_resort = logging.lastResort
    if last_resort is not None and last_resort.formatter is None:
        last_resort.setFormatter(logging.Formatter(LOG_FORMAT))


class _Context:
    """``serve.context``: facts about the call being served."""

    @property
    def web(self) -> bool:
        """True while the call being served came in over HTTP, False for a handle call."""
        call = call_var.get()
        return call is not None and call.web

    @property
    def request_id(self) -> str | None:
        """The id of the request being served (``X-Request-ID`` over HTTP), or None."""
        call = call_var.get()
        return call.request_id if call is not None else None

    def __repr__(self) -> str:
        return f"<serve.context web={self.web}>"


context = _Context()
