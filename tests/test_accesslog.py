"""The access line, in process: its fields, and the requests that end without an answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from aioserve._types import Message, Receive, Scope, Send
from aioserve.accesslog import CLIENT_CLOSED_REQUEST, serve_logged


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[list[str]]:
    logger = logging.getLogger("aioserve.access")
    handler = Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def scope(**changes: Any) -> Scope:
    base: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/hello",
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "headers": [],
    }
    return {**base, **changes}


async def receive() -> Message:
    return {"type": "http.disconnect"}


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-request-id", b"rid-1")]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


async def test_a_line_names_client_method_target_status_latency_and_id(lines: list[str]) -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await serve_logged(answer, scope(query_string=b"name=ada"), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    (line,) = lines
    head, latency, request_id = line.rsplit(" ", 2)
    assert head == '127.0.0.1:5000 "GET /hello?name=ada" 201'
    assert latency.endswith("ms") and float(latency[:-2]) >= 0
    assert request_id == "id=rid-1"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"client": None}, '- "GET /hello" 201'),
        ({"client": ("::1", 5000)}, '[::1]:5000 "GET /hello" 201'),
        ({"client": ("127.0.0.1", "5000")}, '127.0.0.1:5000 "GET /hello" 201'),  # granian's
        ({"path": "/a b\n"}, '127.0.0.1:5000 "GET /a%20b%0A" 201'),  # one request, one line
        ({"query_string": b"q=\xff\n"}, '127.0.0.1:5000 "GET /hello?q=\\xff\\n" 201'),
    ],
)
async def test_odd_clients_and_paths_stay_on_one_readable_line(
    lines: list[str], changes: dict[str, Any], expected: str
) -> None:
    async def send(message: Message) -> None:
        pass

    await serve_logged(answer, scope(**changes), receive, send)
    assert lines[0].startswith(expected + " ")
    assert "\n" not in lines[0]


async def test_no_answer_is_499_with_the_request_id_the_app_left(lines: list[str]) -> None:
    async def gone(scope: Scope, receive: Receive, send: Send) -> None:
        scope["aioserve.request_id"] = "rid-gone"  # what HTTPApp leaves when the client left

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    await serve_logged(gone, scope(), receive, send)
    assert lines[0].startswith(f'127.0.0.1:5000 "GET /hello" {CLIENT_CLOSED_REQUEST} ')
    assert lines[0].endswith(" id=rid-gone")


async def test_an_app_that_raises_logs_500_and_one_cancelled_logs_499(lines: list[str]) -> None:
    async def raises(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def cancelled(scope: Scope, receive: Receive, send: Send) -> None:
        raise asyncio.CancelledError

    async def send(message: Message) -> None:
        pass

    with pytest.raises(RuntimeError):
        await serve_logged(raises, scope(), receive, send)
    with pytest.raises(asyncio.CancelledError):
        await serve_logged(cancelled, scope(), receive, send)
    assert [line.split('" ')[1].split()[0] for line in lines] == ["500", "499"]
    assert all(line.endswith(" id=-") for line in lines)
