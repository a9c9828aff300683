"""The facade is the core, delegated: same operations, same options; plus the legacy forms.

Expectations are read from ``Serve`` itself, so an operation or an option added to the core and
forgotten in ``Client`` or the module-level functions fails here. The legacy argument orders and
names are the facade's own, and are exercised end to end over real HTTP.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

import pytest
import requests

import aioserve
import aioserve as serve
from aioserve import Client, Serve

WAIT_S = 20.0

pytestmark = pytest.mark.usefixtures("no_instance_left")

# The facade owns the lifecycle (start/shutdown on a loop thread), not the core's coroutines;
# readiness and admission are for whoever runs the server loop (the command line, a host app).
CORE_LIFECYCLE = {"start", "aclose", "begin_shutdown", "set_ready"}
# Parameters the facade adds to a core operation: ``sync`` (API.md §4) and 0.8 keyword names.
FACADE_EXTRAS = {"get_handle": {"sync"}, "create_backend": {"backend_config"}}


def core_operations() -> list[str]:
    """Every public control operation of the core: its public functions, minus the lifecycle."""
    return sorted(
        name
        for name, value in vars(Serve).items()
        if not name.startswith("_") and inspect.isfunction(value) and name not in CORE_LIFECYCLE
    )


Shape = list[tuple[str, Any, Any, Any]]


def shape(fn: Callable[..., Any], *, method: bool, without: Collection[str] = ()) -> Shape:
    """(name, kind, default, annotation) of each parameter, ``self`` and ``without`` left out."""
    params = list(inspect.signature(fn).parameters.values())[1 if method else 0 :]
    return [(p.name, p.kind, p.default, p.annotation) for p in params if p.name not in without]


LOCAL = {"host": "127.0.0.1", "port": 0}


def get(url: str) -> requests.Response:
    return requests.get(url, timeout=WAIT_S)


# -- the same operations, the same options ------------------------------------------------------


def test_the_core_operations_are_found() -> None:
    # The parametrised checks below would pass vacuously if the discovery found nothing.
    assert {
        "create_backend",
        "list_backends",
        "get_backend_config",
        "update_backend_config",
        "delete_backend",
        "backend_statistics",
        "create_endpoint",
        "list_endpoints",
        "delete_endpoint",
        "set_traffic",
        "shadow_traffic",
        "stat",
        "get_handle",
    } <= set(core_operations())


@pytest.mark.parametrize("name", core_operations())
def test_client_method_takes_the_core_parameters(name: str) -> None:
    extras = FACADE_EXTRAS.get(name, set())
    method = getattr(Client, name, None)
    assert callable(method), f"Client has no method {name!r} (Serve.{name} exists)"
    core = shape(vars(Serve)[name], method=True, without=extras)
    assert shape(method, method=True, without=extras) == core
    assert {p for p in inspect.signature(method).parameters} >= extras


@pytest.mark.parametrize("name", core_operations())
def test_module_function_takes_the_core_parameters(name: str) -> None:
    extras = FACADE_EXTRAS.get(name, set())
    function = getattr(aioserve, name, None)
    assert callable(function), f"aioserve has no function {name!r} (Serve.{name} exists)"
    assert name in aioserve.__all__
    assert name in aioserve.api.__all__
    core = shape(vars(Serve)[name], method=True, without=extras)
    assert shape(function, method=False, without=extras) == core
    assert {p for p in inspect.signature(function).parameters} >= extras


def test_the_sync_default_of_get_handle_is_documented() -> None:
    for fn in (Client.get_handle, aioserve.get_handle):
        assert inspect.signature(fn).parameters["sync"].default is True


def test_bound_client_methods_show_the_core_signature(client: Client) -> None:
    for name in core_operations():
        extras = FACADE_EXTRAS.get(name, set())
        bound = getattr(client, name)
        core = shape(getattr(client.serve, name), method=False, without=extras)
        assert shape(bound, method=False, without=extras) == core, name


def test_help_shows_the_core_docstring_and_the_legacy_forms() -> None:
    core_doc = inspect.getdoc(Serve.create_backend)
    assert core_doc
    for fn in (Client.create_backend, aioserve.create_backend):
        doc = inspect.getdoc(fn)
        assert doc is not None
        assert doc.startswith(core_doc.splitlines()[0])
        assert 'create_backend(func_or_class, "tag", *init_args)' in doc
        assert fn.__name__ == "create_backend"
    assert 'create_endpoint(name, "/route")' in (inspect.getdoc(aioserve.create_endpoint) or "")


@pytest.mark.parametrize("start_fn", [Client.start, aioserve.start, aioserve.init])
def test_start_takes_every_option_of_the_serve_constructor(start_fn: Callable[..., Any]) -> None:
    params = inspect.signature(start_fn).parameters
    for option in inspect.signature(Serve).parameters.values():
        assert option.name in params, f"{start_fn.__qualname__} lacks {option.name!r}"
        theirs = params[option.name]
        assert theirs.default == option.default, option.name
        if start_fn is not aioserve.init:  # init keeps the 0.8 positional order
            assert theirs.kind in (option.kind, inspect.Parameter.KEYWORD_ONLY), option.name


# -- the options work through real calls ---------------------------------------------------------


class Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logged = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.logged.set()


def test_start_passes_access_log_and_debug_to_the_instance() -> None:
    logger = logging.getLogger("aioserve.access")
    collector = Collector()
    old_level = logger.level
    logger.addHandler(collector)
    logger.setLevel(logging.INFO)
    client = serve.start(http_options=LOCAL, access_log=True, debug=True)
    try:

        def fails(request: Any) -> None:
            raise RuntimeError("kaput")

        serve.create_backend("fails", fails)
        serve.create_endpoint("fails", backend="fails", route="/fails")
        response = get(f"{client.url}/fails")
        assert response.status_code == 500
        assert "Traceback" in response.text  # debug=True
        assert collector.logged.wait(WAIT_S)  # access_log=True
        assert any('"GET /fails" 500' in m for m in collector.messages)
    finally:
        client.shutdown()
        logger.removeHandler(collector)
        logger.setLevel(old_level)


@pytest.mark.parametrize("start", [Client.start, serve.start], ids=["Client", "module"])
def test_the_same_seed_routes_the_same_way(start: Callable[..., Client]) -> None:
    def routes() -> list[str]:
        client = start(http_options=LOCAL, seed=7)
        try:
            client.create_backend("a", lambda: "a")
            client.create_backend("b", lambda: "b")
            client.create_endpoint("split", backend="a")
            client.set_traffic("split", {"a": 0.5, "b": 0.5})
            handle = client.get_handle("split")
            return [handle.remote().result(WAIT_S) for _ in range(30)]
        finally:
            client.shutdown()

    first = routes()
    assert routes() == first
    assert set(first) == {"a", "b"}


class Model:
    def __call__(self, x: int) -> str:
        return f"call {x}"

    def other(self, x: int) -> str:
        return f"other {x}"


@pytest.mark.parametrize("via", ["client", "module"])
def test_get_handle_takes_every_core_option(client: Client, via: str) -> None:
    get_handle = client.get_handle if via == "client" else serve.get_handle
    # missing_ok: a handle to an endpoint that does not exist yet, usable once it does.
    early = get_handle("model", missing_ok=True)
    serve.create_backend("model", Model)
    serve.create_endpoint("model", backend="model")
    assert early.remote(1).result(WAIT_S) == "call 1"

    assert get_handle("model", method_name="other").remote(2).result(WAIT_S) == "other 2"
    with pytest.raises(serve.DeadlineExceeded):
        get_handle("model", absolute_slo_ms=1.0).remote(3).result(WAIT_S)
    assert get_handle("model", relative_slo_ms=60_000).remote(4).result(WAIT_S) == "call 4"

    serve.create_backend("model2", lambda x: "model2")
    serve.set_traffic("model", {"model": 0.5, "model2": 0.5})
    sharded = get_handle("model", shard_key="user-42")
    assert len({sharded.remote(5).result(WAIT_S) for _ in range(20)}) == 1

    assert isinstance(get_handle("model"), serve.SyncServeHandle)
    assert isinstance(get_handle("model", sync=False), serve.ServeHandle)
    with pytest.raises(KeyError, match="ghost"):
        get_handle("ghost")


def test_backend_statistics_through_the_facade(client: Client) -> None:
    serve.create_backend("pair", lambda x: x, config={"num_replicas": 2})
    for stats in (client.backend_statistics("pair"), serve.backend_statistics("pair")):
        assert stats.tag == "pair"
        assert stats.num_replicas == 2
        assert stats.num_queued == 0
    with pytest.raises(serve.BackendNotFound, match="'ghost'"):
        serve.backend_statistics("ghost")


# -- the legacy argument orders and names, end to end --------------------------------------------


def double(x: int) -> int:
    return 2 * x


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return self.factor * x


def test_create_backend_legacy_argument_order(client: Client) -> None:
    serve.create_backend(double, "legacy")
    serve.create_endpoint("legacy", backend="legacy")
    assert list(serve.list_backends()) == ["legacy"]
    assert serve.get_handle("legacy").remote(21).result(WAIT_S) == 42


def test_create_backend_legacy_order_with_init_args(client: Client) -> None:
    client.create_backend(Scaler, "legacy", 10)
    client.create_endpoint("legacy", backend="legacy")
    assert client.get_handle("legacy").remote(2).result(WAIT_S) == 20


def test_legacy_order_keeps_its_config_and_errors(client: Client) -> None:
    serve.create_backend(Scaler, "scaled", 3, config={"num_replicas": 2})
    assert serve.get_backend_config("scaled").num_replicas == 2
    with pytest.raises(ValueError, match="'scaled' already exists"):
        serve.create_backend(double, "scaled")
    assert serve.list_backends()["scaled"]["num_replicas"] == 2


def test_backend_config_is_the_0_8_name_of_config(client: Client) -> None:
    serve.create_backend("pair", double, backend_config={"num_replicas": 2})
    assert serve.get_backend_config("pair").num_replicas == 2
    with pytest.raises(ValueError, match="not both"):
        client.create_backend("x", double, config={}, backend_config={})
    assert list(serve.list_backends()) == ["pair"]


def test_seed_002_flow_over_http(client: Client) -> None:

    def echo_v1(request: Any) -> str:
        return "v1"

    def echo_v2(request: Any) -> str:
        return "v2"

    # An endpoint first, with its route as the second positional argument and no backend yet.
    serve.create_endpoint("my_endpoint", "/echo")
    endpoint = serve.list_endpoints()["my_endpoint"]
    assert endpoint["route"] == "/echo"
    assert endpoint["traffic"] == {}
    assert get(f"{client.url}/echo").status_code == 503

    serve.create_backend(echo_v1, "echo:v1")
    serve.link("my_endpoint", "echo:v1")
    assert get(f"{client.url}/echo").text == "v1"

    serve.create_backend(echo_v2, "echo:v2")
    serve.split("my_endpoint", {"echo:v1": 0.0, "echo:v2": 1.0})
    assert get(f"{client.url}/echo").text == "v2"
    assert serve.list_endpoints()["my_endpoint"]["traffic"] == {"echo:v1": 0.0, "echo:v2": 1.0}

    config = serve.get_backend_config("echo:v2")
    config.num_replicas = 2
    serve.set_backend_config("echo:v2", config)
    assert serve.get_backend_config("echo:v2").num_replicas == 2
    assert serve.backend_statistics("echo:v2").num_replicas == 2


def test_legacy_route_form_on_the_client_with_methods(client: Client) -> None:
    client.create_backend("poster", lambda request: "posted")
    client.create_endpoint("poster", "/post", methods=["post"])
    client.link("poster", "poster")
    assert client.list_endpoints()["poster"]["methods"] == ["POST"]
    assert requests.post(f"{client.url}/post", timeout=WAIT_S).text == "posted"
    assert get(f"{client.url}/post").status_code == 405


def test_a_second_positional_without_a_slash_is_the_backend(client: Client) -> None:
    serve.create_backend("plain", lambda request: "plain")
    serve.create_endpoint("plain", "plain", route="/plain")
    assert serve.list_endpoints()["plain"]["traffic"] == {"plain": 1.0}
    assert get(f"{client.url}/plain").text == "plain"
