"""The access log: one line per HTTP request, to the ``aioserve.access`` logger, at INFO.

::

    127.0.0.1:52344 "GET /hello?name=x" 200 1.25ms id=5f3a9c1e-2a

The client's address and port (``-`` when the server gives none), the method and path with its
query string (the path as the server received it, ``root_path`` included, percent-encoded), the
status, the latency in milliseconds from when the server handed the request to the app until the
last byte of its response was handed back (a streamed response counts whole), and the request id:
the ``X-Request-ID`` the response carries (``-`` for the few answers that carry none: 413 and 431
given before the request is read, and system routes).

A request whose client went away before it was answered logs status **499** (nginx's "client
closed request"; uvicorn logs nothing then) with the request's id: nothing was sent. A request
whose handling raised before anything was sent logs 500, as the server answers it. The instance
writes these lines itself (the servers' own access logs stay off), so they are the same on
uvicorn and granian, in one process or in each worker. Answers a server gives without calling
the app have no line: uvicorn's 503 past ``max_connections``, granian's 431 for more than 100
headers, a malformed request's 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from ._types import Message, Receive, Scope, Send

__all__ = ["CLIENT_CLOSED_REQUEST", "access_logger", "serve_logged"]

access_logger = logging.getLogger("aioserve.access")

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request nobody answered because its client went away."""

_FORMAT = '%s "%s %s" %d %.2fms id=%s'

ASGIHandler = Callable[[Scope, Receive, Send], Awaitable[None]]


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _target(scope: Scope) -> str:
    path = quote(scope.get("path", ""))
    query: bytes = scope.get("query_string", b"")
    if query:
        text = query.decode("latin-1")
        if not (text.isascii() and text.isprintable()):
            # Escaped: one request, one line, whatever the client sent.
            text = text.encode("unicode_escape").decode("ascii")
        return f"{path}?{text}"
    return path


async def serve_logged(app: ASGIHandler, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` on one HTTP request and log its access line once it is answered."""
    started = time.perf_counter()
    status = 0
    request_id = "-"

    async def send_noting_status(message: Message) -> None:
        nonlocal status, request_id
        if message["type"] == "http.response.start":
            status = message["status"]
            for key, value in message.get("headers", ()):
                if key.lower() == b"x-request-id":
                    request_id = value.decode("latin-1")
        await send(message)

    try:
        await app(scope, receive, send_noting_status)
    except asyncio.CancelledError:
        status = status or CLIENT_CLOSED_REQUEST
        raise
    except Exception:
        status = status or 500
        raise
    finally:
        if not status:
            status = CLIENT_CLOSED_REQUEST
            request_id = scope.get("aioserve.request_id", request_id)
        access_logger.info(
            _FORMAT,
            _client(scope),
            scope.get("method", "-"),
            _target(scope),
            status,
            (time.perf_counter() - started) * 1000.0,
            request_id,
        )
