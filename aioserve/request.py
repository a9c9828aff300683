"""The Python-side request and ``serve.context``.

Handlers written for the legacy API take a request object even when called from Python. When a
handle call's arguments do not fit the handler's signature as given, the handler gets a
:class:`PythonRequest` instead: it mirrors the read API of a Starlette ``Request`` (``method``,
``headers``, ``query_params``, ``path_params``, ``await body()``, ``await json()``).

This module imports nothing of the package.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["PythonRequest", "context"]

# True while the current call came in over HTTP; handle calls reset it.
web_var: contextvars.ContextVar[bool] = contextvars.ContextVar("aioserve_web", default=False)


class _Context:
    """``serve.context``: facts about the call being served."""

    @property
    def web(self) -> bool:
        """True while the call being served came in over HTTP, False for a handle call."""
        return web_var.get()

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
        self.query_params: dict[str, Any] = dict(query_params or {})

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
