"""The startup summary and the worker's drain line, on an in-process instance."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import aioserve
from aioserve import Serve
from aioserve.clisummary import (
    MAX_LISTED,
    in_flight,
    log_drain,
    startup_summary,
    summary_claimed,
    summary_marker,
)


async def test_headless_endpoints_splits_shadows_and_no_traffic(serve: Serve) -> None:
    await serve.create_backend("a", lambda request: "a", config={"num_replicas": 3})
    await serve.create_backend("b", lambda request: "b")
    await serve.create_endpoint("split", backend="a", route="/split", methods=["GET", "POST"])
    await serve.set_traffic("split", {"a": 0.9, "b": 0.1})
    await serve.shadow_traffic("split", "b", 0.25)
    await serve.create_endpoint("inner", backend="b")
    await serve.create_endpoint("later", route="/later")
    text = startup_summary(
        serve, url="http://h:1", server="granian", pid=7, workers=4, root_path="/api"
    )
    assert text.splitlines() == [
        f"aioserve {aioserve.__version__} ready on http://h:1 (root_path /api, granian, "
        "4 worker processes, each serving this; logged by pid 7)",
        "  endpoint split  GET,POST  /split         -> a 90%, b 10% + shadow b 25%",
        "  endpoint inner  -         (handle only)  -> b",
        "  endpoint later  GET       /later         -> no traffic (503 until one is set)",
        "  backend a  3 replicas",
        "  backend b  1 replica",
    ]


async def test_a_long_deployment_is_listed_in_part(serve: Serve) -> None:
    for n in range(MAX_LISTED + 5):
        await serve.create_backend(f"b{n}", lambda request: "x")
    lines = startup_summary(serve, url="http://h:1", server="uvicorn", pid=1).splitlines()
    assert lines[1] == "  no endpoints"
    assert len([line for line in lines if line.startswith("  backend ")]) == MAX_LISTED
    assert lines[-1] == "  ... and 5 more backends"


def test_one_process_claims_the_summary(tmp_path: Path) -> None:
    marker = summary_marker(tmp_path / "run")
    (tmp_path / "run").mkdir()
    assert marker.parent == tmp_path / "run"  # removed with the run's directory
    assert summary_claimed(marker) is True
    assert summary_claimed(marker) is False  # the other workers
    (tmp_path / "other").mkdir()
    assert summary_claimed(summary_marker(tmp_path / "other")) is True


async def test_the_drain_line_counts_requests_in_flight_once(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: object) -> str:
        entered.set()
        await release.wait()
        return "done"

    await serve.create_backend("slow", slow)
    await serve.create_endpoint("slow", backend="slow")
    call = asyncio.ensure_future(serve.get_handle("slow").remote(None))
    await entered.wait()
    assert in_flight(serve) == 1
    with caplog.at_level(logging.INFO, logger="aioserve.cli"):
        log_drain(serve, 7.0)
        log_drain(serve, 7.0)  # a second signal: already draining, said once
    assert caplog.messages == [
        "Shutting down: 1 request(s) in flight drain for up to 7.0 s (--timeout-graceful-shutdown)."
    ]
    assert serve.state is aioserve.Lifecycle.DRAINING
    release.set()
    assert await call == "done"
