"""The Python-side request and ``serve.context``.

Handlers written for the legacy API take a request object even when called from Python. When a
handle call's arguments do not fit the handler's signature as given, the handler gets a
:class:`PythonRequest` instead: it mirrors the read API of a Starlette ``Request`` (``method``,
``headers``, ``query_params``, ``path_params``, ``await body()``, ``await json()``).

This module imports nothing of the package.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "CallContext",
    "PythonRequest",
    "context",
    "current_replica",
    "install_log_context",
    "new_request_id",
    "python_request",
]


class CallContext:
    """The request being served in this context: its id, its endpoint, whether it is HTTP.

    One object per request, set once in a context variable; what changes during the request is
    changed on the object (an attribute write costs less than another context variable).
    ``waiting_hook``, when set, is called if the request has to wait for a replica or a batch.
    ``replica`` is the :class:`~aioserve.replica.ReplicaContext` of the replica serving the
    request, set when the replica starts it (and left in place: tasks the handler started keep
    seeing it after the request ends).
    """

    __slots__ = ("_request_id", "endpoint", "parent", "replica", "waiting_hook", "web")

    def __init__(
        self,
        endpoint: str,
        web: bool,
        request_id: str | None = None,
        parent: CallContext | None = None,
    ) -> None:
        self._request_id = request_id
        self.endpoint = endpoint
        self.web = web
        self.parent = parent
        self.waiting_hook: Callable[[], None] | None = None
        self.replica: Any = None

    @property
    def request_id(self) -> str:
        """The request's id: given, inherited from the calling request, or made on first use."""
        request_id = self._request_id
        if request_id is None:
            parent = self.parent
            request_id = parent.request_id if parent is not None else new_request_id()
            self._request_id = request_id
        return request_id

    def __repr__(self) -> str:
        return f"<CallContext {self.request_id} endpoint={self.endpoint!r} web={self.web}>"


# Set once per request, in the request's own task context (HTTP) or the handle call's task.
call_var: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "aioserve_call", default=None
)
# The ReplicaContext of the replica running user code outside of a request (its constructor and
# reconfigure(), or calls made without a CallContext); inside a request it is CallContext.replica.
replica_var: contextvars.ContextVar[Any] = contextvars.ContextVar("aioserve_replica", default=None)


def current_replica() -> Any:
    """The ReplicaContext of the replica running the current code, or None outside of one."""
    call = call_var.get()
    if call is not None and call.replica is not None:
        return call.replica
    return replica_var.get()


_ID_PREFIX = secrets.token_hex(4)
_ids = itertools.count(1)


def new_request_id() -> str:
    """A request id unique in this process and unlikely to repeat across processes."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


_log_context_installed = False


def install_log_context() -> None:
    """Give every log record ``serve_request_id``, ``serve_endpoint``, ``serve_backend`` and
    ``serve_replica`` attributes ("-" outside a request), for formats like
    ``"%(serve_request_id)s %(serve_replica)s %(message)s"``. Idempotent.
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
        return record

    logging.setLogRecordFactory(factory)


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


class PythonRequest:
    """A request made from Python: keyword arguments as query params, one positional arg as body."""

    __slots__ = ("_body", "query_params")

    method = "CALL"
    url = ""
    headers: Mapping[str, str] = {}
    path_params: Mapping[str, Any] = {}

    def __init__(self, body: Any = None, query_params: Mapping[str, Any] | None = None) -> None:
        self._body = body
        # A copy, so that a handler changing it changes nothing the caller holds.
        self.query_params: dict[str, Any] = dict(query_params) if query_params else {}

    @property
    def args(self) -> dict[str, Any]:
        """Flask's name for ``query_params``."""
        return self.query_params

    async def body(self) -> Any:
        """The positional argument of the handle call, unchanged (None if there was none)."""
        return self._body

    async def json(self) -> Any:
        """The positional argument, decoded if it is JSON text or bytes, else unchanged."""
        if isinstance(self._body, str | bytes | bytearray):
            return json.loads(self._body)
        return self._body

    def __repr__(self) -> str:
        return f"<PythonRequest body={self._body!r} query_params={self.query_params!r}>"


_new_object = object.__new__


def python_request(body: Any, kwargs: dict[str, Any]) -> PythonRequest:
    """The request a handle call's handler gets: ``kwargs`` becomes its ``query_params``.

    Unlike the constructor this does not copy ``kwargs``: it is the dict of one call's keyword
    arguments, made for that call and used for nothing else, so nobody else holds it.
    """
    request: PythonRequest = _new_object(PythonRequest)
    request._body = body
    request.query_params = kwargs if kwargs else {}
    return request
