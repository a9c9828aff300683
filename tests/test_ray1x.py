"""Ray Serve 1.x behaviours that 1.0-1.3 code relies on, through the public API.

Each test is one behaviour a 1.x user would notice (issue: "Faithful to Ray Serve 1.x"); the last
one runs a 1.3-style composition app unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from _sample_backends import HANG_GUARD_S, Gate, wait_until

import aioserve
from aioserve import (
    BackendConfig,
    DeploymentMode,
    EndpointNotFound,
    ReplicaStopped,
    Serve,
    get_replica_context,
)
from aioserve.context import LOG_FORMAT


async def deploy(
    serve: Serve, tag: str, target: Any, *, config: Any = None, route: Any = None
) -> Any:
    await serve.create_backend(tag, target, config=config)
    await serve.create_endpoint(tag, backend=tag, route=route)
    return serve.get_handle(tag)


# -- replicas share the load ---------------------------------------------------------------------


async def replica_tag(x: Any = None) -> str:
    return get_replica_context().replica_tag


async def test_sequential_requests_reach_every_replica(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    handle = await deploy(serve, "tags", replica_tag, config={"num_replicas": 3}, route="/tags")
    by_handle = {await handle.remote() for _ in range(6)}
    by_http = {(await http.get("/tags")).text for _ in range(6)}
    assert len(by_handle) == 3
    assert by_http == by_handle


async def test_a_busy_replica_is_skipped_while_another_is_idle(serve: Serve, gate: Gate) -> None:
    async def handler(x: Any = None) -> str:
        if x == "hold":
            await gate.pass_through(x)
        return get_replica_context().replica_tag

    handle = await deploy(serve, "busy", handler, config={"num_replicas": 2})
    held = handle.remote("hold")
    await gate.until_inside(1)
    others = {await handle.remote() for _ in range(4)}
    gate.release.set()
    busy = await held
    # Least loaded wins when loads differ: every call went to the one idle replica.
    assert len(others) == 1
    assert busy not in others


# -- BackendConfig as the 1.x pydantic model -----------------------------------------------------


class Configured:
    def __init__(self) -> None:
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.config = config

    @aioserve.accept_batch
    def __call__(self, items: list[Any]) -> list[Any]:
        return [(self.config, len(items)) for _ in items]


async def test_partial_backend_config_update_changes_only_what_it_sets(serve: Serve) -> None:
    config = {"user_config": {"v": 1}, "max_batch_size": 4, "max_queued_queries": 70}
    handle = await deploy(serve, "partial", Configured, config=config)
    await serve.update_backend_config("partial", BackendConfig(num_replicas=2))
    after = serve.get_backend_config("partial")
    assert after.num_replicas == 2
    assert after.user_config == {"v": 1}
    assert after.max_batch_size == 4
    assert after.max_queued_queries == 70
    # Both replicas, the new one too, serve with the user_config given at creation.
    results = await asyncio.gather(*(handle.remote(i) for i in range(8)))
    assert {cfg["v"] for cfg, _ in results} == {1}


async def test_legacy_read_modify_write_of_a_config_keeps_the_rest(serve: Serve) -> None:
    await deploy(serve, "rmw", Configured, config={"user_config": {"v": 2}, "max_batch_size": 3})
    config = serve.get_backend_config("rmw")
    config.num_replicas = 2
    await serve.update_backend_config("rmw", config)
    after = serve.get_backend_config("rmw")
    assert (after.num_replicas, after.user_config, after.max_batch_size) == (2, {"v": 2}, 3)


async def test_experimental_graceful_shutdown_keywords_reach_the_backend(serve: Serve) -> None:
    config = BackendConfig(
        experimental_graceful_shutdown_timeout_s=3.5,
        experimental_graceful_shutdown_wait_loop_s=0.5,
    )
    await serve.create_backend("graceful", replica_tag, config=config)
    info = serve.list_backends()["graceful"]
    assert info["graceful_shutdown_timeout_s"] == 3.5
    assert info.graceful_shutdown_wait_loop_s == 0.5


def test_experimental_keyword_and_its_field_together_are_refused() -> None:
    with pytest.raises(ValueError, match="graceful_shutdown_timeout_s"):
        BackendConfig(graceful_shutdown_timeout_s=1, experimental_graceful_shutdown_timeout_s=2)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("num_replicas", 0, ValueError),
        ("num_replicas", "2", TypeError),
        ("max_batch_size", 1.5, TypeError),
        ("batch_wait_timeout", -1, ValueError),
        ("graceful_shutdown_timeout_s", float("inf"), ValueError),
    ],
)
def test_backend_config_validates_on_assignment(field: str, value: Any, error: type) -> None:
    config = BackendConfig(num_replicas=2)
    before = config.to_dict()
    with pytest.raises(error, match=field):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_backend_config_refuses_unknown_attributes() -> None:
    config = BackendConfig()
    with pytest.raises(AttributeError, match="num_replica"):
        config.num_replica = 2  # type: ignore[attr-defined]


# -- HTTP options: NoServer and DeploymentMode ---------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"host": None}, {"location": None}, {"location": DeploymentMode.NoServer}],
)
async def test_no_host_or_no_location_means_no_server_and_says_so(options: Any) -> None:
    async with Serve(http_options=options) as s:
        assert s.http_options.location == "NoServer"
        assert s.http_options.location is DeploymentMode.NoServer
        assert s.url is None
        await s.create_backend("ok", replica_tag)
        await s.create_endpoint("ok", backend="ok", route="/ok")
        transport = httpx.ASGITransport(app=s.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            assert (await client.get("/ok")).status_code == 200


@pytest.mark.parametrize("mode", [DeploymentMode.HeadOnly, DeploymentMode.EveryNode])
async def test_deployment_mode_enum_runs_a_server(mode: DeploymentMode) -> None:
    async with Serve(http_options={"port": 0, "location": mode}) as s:
        await s.create_backend("ok", lambda request: "ok")
        await s.create_endpoint("ok", backend="ok", route="/ok")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{s.url}/ok")).text == "ok"
        assert s.http_options.location == mode.value


# -- handle options seen by a legacy handler ----------------------------------------------------


async def test_handle_http_method_and_headers_reach_a_legacy_request(serve: Serve) -> None:
    async def legacy(request: Any) -> Any:
        return request.method, request.headers.get("x-token"), request.query_params

    handle = await deploy(serve, "legacy", legacy)
    posting = handle.options(http_method="post", http_headers={"X-Token": "secret"})
    assert await posting.remote(flag=True) == ("POST", "secret", {"flag": True})
    # The handle it came from is unchanged.
    method, token, _ = await handle.remote(flag=True)
    assert (method, token) == ("CALL", None)
    with pytest.raises(ValueError, match="FOO BAR"):
        handle.options(http_method="FOO BAR")


# -- stuck sync handlers never strand their callers ---------------------------------------------


class Stuck:
    """A sync handler that blocks its replica's thread until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: Any = None) -> str:
        self.entered.set()
        self.release.wait(HANG_GUARD_S)
        return "finished"


async def stuck_backend(serve: Serve, tag: str, config: Any = None) -> Stuck:
    stuck = Stuck()
    await serve.create_backend(tag, lambda request=None: stuck(request), config=config)
    await serve.create_endpoint(tag, backend=tag, route=f"/{tag}")
    return stuck


async def test_force_delete_fails_callers_of_a_stuck_sync_handler_at_once(
    serve: Serve, http: httpx.AsyncClient
) -> None:
    stuck = await stuck_backend(serve, "stuck")
    try:
        over_http = asyncio.create_task(http.get("/stuck"))
        await wait_until(stuck.entered.is_set, "the handler is running")
        queued = serve.get_handle("stuck").remote()  # waits behind it on the replica's thread
        await wait_until(
            lambda: serve.backend_statistics("stuck").num_running == 2, "both calls on the replica"
        )
        await serve.delete_endpoint("stuck")
        await serve.delete_backend("stuck", force=True)
        response = await asyncio.wait_for(over_http, HANG_GUARD_S)
        assert response.status_code == 503
        assert "stopped" in response.text
        with pytest.raises(ReplicaStopped):
            await asyncio.wait_for(queued, HANG_GUARD_S)
        assert not stuck.release.is_set()  # nobody waited for the thread
    finally:
        stuck.release.set()


async def test_drain_timeout_fails_callers_of_a_stuck_sync_handler(serve: Serve) -> None:
    stuck = await stuck_backend(serve, "slow", config={"graceful_shutdown_timeout_s": 0.05})
    try:
        call = serve.get_handle("slow").remote()
        await wait_until(stuck.entered.is_set, "the handler is running")
        await serve.delete_endpoint("slow")
        await serve.delete_backend("slow")
        with pytest.raises(ReplicaStopped, match="stopped"):
            await asyncio.wait_for(call, HANG_GUARD_S)
    finally:
        stuck.release.set()


async def test_force_delete_ends_a_stream_stuck_in_a_sync_generator(serve: Serve) -> None:
    stuck = Stuck()

    def ticks(request: Any = None) -> Iterator[str]:
        yield "first"
        yield stuck()

    await deploy(serve, "ticks", ticks)
    try:
        stream = await serve.get_handle("ticks").remote()
        assert await anext(stream) == "first"
        second = asyncio.ensure_future(anext(stream))
        await wait_until(stuck.entered.is_set, "the generator is stuck in its thread")
        await serve.delete_endpoint("ticks")
        await serve.delete_backend("ticks", force=True)
        with pytest.raises(ReplicaStopped):
            await asyncio.wait_for(second, HANG_GUARD_S)
    finally:
        stuck.release.set()


# -- @serve.batch as 1.3 validated it -----------------------------------------------------------


async def test_batch_accepts_a_whole_number_float_size() -> None:
    sizes: list[int] = []

    @aioserve.batch(max_batch_size=2.0)  # type: ignore[arg-type]
    async def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [i * 2 for i in items]

    assert await asyncio.gather(*(double(i) for i in range(4))) == [0, 2, 4, 6]
    assert max(sizes) == 2


def test_batch_refuses_a_fractional_size_and_what_is_not_a_function() -> None:
    with pytest.raises(TypeError, match="max_batch_size"):
        aioserve.batch(max_batch_size=2.5)  # type: ignore[arg-type]

    async def stream(items: list[int]) -> Any:
        yield items

    # 1.3 took only async def; a plain def batches on the replica's thread now, too.
    with pytest.raises(TypeError, match="async def"):
        aioserve.batch(stream)


# -- handles: missing endpoints, list_backends, import paths -------------------------------------


async def test_missing_ok_handle_gives_up_with_endpoint_not_found(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    handle = serve.get_handle("never", missing_ok=True, relative_slo_ms=20)
    caplog.set_level(logging.WARNING, logger="aioserve")
    for _ in range(2):
        with pytest.raises(EndpointNotFound, match="'never'"):
            await asyncio.wait_for(handle.remote(), HANG_GUARD_S)
    warnings = [r for r in caplog.records if "'never'" in r.getMessage()]
    assert len(warnings) == 1


async def test_list_backends_values_are_dicts_with_attributes(serve: Serve) -> None:
    await serve.create_backend("b", replica_tag, config={"num_replicas": 2})
    info = serve.list_backends()["b"]
    assert info["num_replicas"] == info.num_replicas == 2
    assert info.accepts_batches is False
    assert dict(info)["max_batch_size"] is None
    with pytest.raises(AttributeError, match="no_such_field"):
        _ = info.no_such_field


async def test_import_path_backend_takes_batches_without_the_decorator(serve: Serve) -> None:
    handle = await deploy(
        serve, "doubler", "_sample_backends:ListDoubler", config={"max_batch_size": 2}
    )
    results = await asyncio.gather(*(handle.remote(i) for i in range(4)))
    assert [r["doubled"] for r in results] == [0, 2, 4, 6]
    assert serve.list_backends()["doubler"]["accepts_batches"] is True
    # Without max_batch_size an import-path backend is called with the arguments as given.
    plain = await deploy(serve, "shout", "_sample_backends:shout")
    assert await plain.remote("hi") == "HI"


async def test_import_path_naming_a_non_callable_is_named_in_the_error(serve: Serve) -> None:
    with pytest.raises(TypeError, match="'os:sep'"):
        await serve.create_backend("sep", "os:sep")
    assert "sep" not in serve.list_backends()


# -- routes and methods --------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/-/metrics", "/-/mine", "/-"])
async def test_routes_under_the_system_prefix_are_refused(serve: Serve, route: str) -> None:
    await serve.create_backend("r", replica_tag)
    with pytest.raises(ValueError, match="reserved"):
        await serve.create_endpoint("r", backend="r", route=route)
    assert serve.list_endpoints() == {}


@pytest.mark.parametrize("method", ["FOO BAR", "GET\r\n", "(GET)"])
async def test_methods_must_be_http_tokens(serve: Serve, method: str) -> None:
    await serve.create_backend("m", replica_tag)
    with pytest.raises(ValueError, match="HTTP method"):
        await serve.create_endpoint("m", backend="m", route="/m", methods=[method])
    assert serve.list_endpoints() == {}


# -- logs carry the backend and replica tags -----------------------------------------------------


async def test_default_log_format_shows_backend_and_replica(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    def chatty(request: Any = None) -> str:
        logging.getLogger("user.model").warning("scored")
        return get_replica_context().replica_tag

    caplog.set_level(logging.WARNING, logger="user.model")
    handle = await deploy(serve, "chatty", chatty)
    replica = await handle.remote()
    (record,) = [r for r in caplog.records if r.name == "user.model"]
    line = logging.Formatter(LOG_FORMAT).format(record)
    assert f"[backend=chatty replica={replica}]: scored" in line
    make_record = logging.getLogRecordFactory()
    outside = make_record("user.model", logging.WARNING, __file__, 1, "idle", None, None)
    assert "[backend=" not in logging.Formatter(LOG_FORMAT).format(outside)


def test_facade_prints_backend_and_replica_tags_by_default() -> None:
    # A script that configures no logging, as 1.x scripts did: a warning logged in a backend is
    # printed with its backend and replica tags.
    script = textwrap.dedent(
        """
        import logging
        import aioserve as serve

        serve.start(http_options={"location": "NoServer"})

        def chatty(request=None):
            logging.getLogger("user.model").warning("scored")
            return serve.get_replica_context().replica_tag

        serve.create_backend("chatty", chatty)
        serve.create_endpoint("chatty", backend="chatty")
        print(serve.get_handle("chatty").remote().result(20))
        serve.shutdown()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    replica = done.stdout.strip()
    assert replica.startswith("chatty#")
    assert f"[backend=chatty replica={replica}]: scored" in done.stderr


# -- the sync facade as 1.0-1.3 scripts use it ---------------------------------------------------

LOCAL = {"host": "127.0.0.1", "port": 0}


@pytest.mark.usefixtures("no_instance_left")
def test_start_takes_the_1_2_http_arguments_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="http_options"):
        client = aioserve.start(http_host="127.0.0.1", http_port=0)
    try:
        aioserve.create_backend("hi", lambda request: "hi")
        aioserve.create_endpoint("hi", backend="hi", route="/hi")
        assert client.url is not None and client.url.startswith("http://127.0.0.1:")
        assert requests.get(f"{client.url}/hi", timeout=HANG_GUARD_S).text == "hi"
    finally:
        client.shutdown()
    with pytest.raises(ValueError, match="http_options"):
        aioserve.start(http_options=LOCAL, http_port=8123)


@pytest.mark.usefixtures("no_instance_left")
def test_default_handle_results_are_futures_that_async_backends_await() -> None:
    client = aioserve.start(http_options=LOCAL)
    try:
        aioserve.create_backend("inner", lambda x: x + 1)
        aioserve.create_endpoint("inner", backend="inner")

        async def outer(request: Any) -> int:
            # The 1.x idiom: the default (sync) handle, awaited inside an async backend.
            return await aioserve.get_handle("inner").remote(int(request.query_params["x"])) * 10

        aioserve.create_backend("outer", outer)
        aioserve.create_endpoint("outer", backend="outer", route="/outer")
        response = requests.get(f"{client.url}/outer?x=4", timeout=HANG_GUARD_S)
        assert response.status_code == 200
        assert response.json() == 50
        future = aioserve.get_handle("inner").remote(1)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(HANG_GUARD_S) == 2

        async def elsewhere() -> int:  # awaitable on another loop as well
            result: int = await aioserve.get_handle("inner").remote(2)
            return result

        assert asyncio.run(elsewhere()) == 3
    finally:
        client.shutdown()


# -- done when: a 1.3-style composition app runs unchanged --------------------------------------


@pytest.mark.usefixtures("no_instance_left")
def test_a_1_3_composition_app_runs_unchanged() -> None:
    client = aioserve.start(http_options=LOCAL, legacy_requests=True)
    serve = aioserve  # the app below is written as 1.3 code: `from ray import serve`
    try:

        class Preprocess:
            async def __call__(self, request: Any) -> dict[str, str]:
                data = await request.json()
                return {"text": data["text"].strip().lower()}

        @serve.accept_batch
        def score(requests: list[Any]) -> list[int]:
            return [len(r.query_params["text"]) for r in requests]

        async def pipeline(request: Any) -> dict[str, Any]:
            body = await request.json()
            clean = await serve.get_handle("preprocess").remote({"text": body["text"]})
            scored = await serve.get_handle("score").remote(text=clean["text"])
            doubled = await serve.get_handle("doubler").remote(scored)
            return {"clean": clean["text"], "score": scored, "doubled": doubled["doubled"]}

        serve.create_backend("preprocess", Preprocess)
        serve.create_endpoint("preprocess", backend="preprocess")
        serve.create_backend("score", score, config={"max_batch_size": 4})
        serve.create_endpoint("score", backend="score")
        serve.create_backend(
            "doubler", "_sample_backends:ListDoubler", config={"max_batch_size": 2}
        )
        serve.create_endpoint("doubler", backend="doubler")
        serve.create_backend("pipeline", pipeline)
        serve.create_endpoint("pipeline", backend="pipeline", route="/pipeline", methods=["POST"])

        response = requests.post(
            f"{client.url}/pipeline", json={"text": "  Hello "}, timeout=HANG_GUARD_S
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"clean": "hello", "score": 5, "doubled": 10}
        # From the script itself: the default handle with keyword arguments, ray.get style.
        futures = [serve.get_handle("score").remote(text="x" * n) for n in range(1, 5)]
        assert [f.result(HANG_GUARD_S) for f in futures] == [1, 2, 3, 4]
    finally:
        client.shutdown()
