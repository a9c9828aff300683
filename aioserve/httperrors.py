"""The one status table of the HTTP edge: which error is which HTTP answer, and its body.

:func:`error_response` maps an exception raised while serving a request to a plain-text
response: a Starlette/FastAPI ``HTTPException`` keeps its status and detail; the errors of
:data:`STATUS` get their status (``Retry-After`` on an overload); anything else is a 500, logged
with its traceback (in the body only in debug mode). Bodies never carry control characters and
are at most :data:`MAX_ERROR_CHARS` long.
"""

from __future__ import annotations

import json
import logging
import math
import re
import traceback
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse, Response

from ._types import Message, Receive
from .exceptions import (
    BodyTooLarge,
    DeadlineExceeded,
    EndpointNotFound,
    MethodNotFound,
    NoTraffic,
    Overloaded,
    ReplicaStopped,
    ServeShutdown,
)

__all__ = ["MAX_ERROR_CHARS", "STATUS", "body_limit_as_413", "clean", "error_response", "plain"]

logger = logging.getLogger("aioserve.http")

MAX_ERROR_CHARS = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

# The first matching class wins.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (BodyTooLarge, 413),
    (json.JSONDecodeError, 400),
    (UnicodeDecodeError, 400),
    (DeadlineExceeded, 504),
    (Overloaded, 503),
    (NoTraffic, 503),
    (ServeShutdown, 503),
    (ReplicaStopped, 503),
    (EndpointNotFound, 404),
    (MethodNotFound, 404),
)


def clean(text: str) -> str:
    """Error text fit for a response body: no control characters, bounded length."""
    text = _CONTROL.sub(" ", text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def plain(status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
    """A plain-text response."""
    return PlainTextResponse(text, status_code=status, headers=headers)


def error_response(exc: Exception, *, debug: bool = False) -> Response:
    """The response for an error raised while serving a request (the one status table).

    The body names the error's type and message (control characters replaced, at most
    ``MAX_ERROR_CHARS``); the traceback only in debug mode, and in the log for a 500.
    """
    if isinstance(exc, HTTPException):
        return plain(exc.status_code, clean(str(exc.detail)), exc.headers)
    for cls, status in STATUS:
        if isinstance(exc, cls):
            logger.debug("Request failed with %d: %r", status, exc)
            headers = None
            if isinstance(exc, Overloaded):
                headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
            if isinstance(exc, MethodNotFound):
                # The handle caller's message lists the class's methods; a client's does not.
                text = f"No method {exc.method_name!r} is served by this endpoint."
                return plain(status, clean(f"MethodNotFound: {text}"))
            if status == 400:
                return plain(400, clean(f"The request body cannot be decoded: {exc}"))
            return plain(status, clean(f"{type(exc).__name__}: {exc}"), headers)
    logger.error("Request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    text = clean(f"{type(exc).__name__}: {exc}")
    if debug:
        text += "\n\n" + "".join(traceback.format_exception(exc))
    return plain(500, text)


def body_limit_as_413(receive: Receive) -> Receive:
    """``receive`` for an ingress app: a body past the limit is Starlette's HTTPException 413,
    which FastAPI passes on (it turns other errors of the body into 400)."""

    async def receive_within_limit() -> Message:
        try:
            return await receive()
        except BodyTooLarge as exc:
            raise HTTPException(413, str(exc)) from None

    return receive_within_limit
