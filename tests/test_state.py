"""The control-state model: what can be stored, capturing a running instance's state, and the one
replay routine, ``ControlState.apply``, with and without origins."""

from __future__ import annotations

import functools

import pytest
from _sample_backends import Greeter, shout

from aioserve import (
    BackendConfig,
    BackendError,
    ConfigError,
    DeploymentError,
    Serve,
    ServeError,
    StoreError,
)
from aioserve.state import BackendRecord, ControlState, EndpointRecord, check_storable, target_spec

# -- target_spec ----------------------------------------------------------------------------------


def test_target_spec_of_module_level_classes_functions_and_import_strings() -> None:
    assert target_spec(Greeter) == "_sample_backends:Greeter"
    assert target_spec(shout) == "_sample_backends:shout"
    assert target_spec(BackendConfig) == "aioserve.config:BackendConfig"
    # An import string is kept as given once it imports, in either spelling.
    assert target_spec("_sample_backends:Greeter") == "_sample_backends:Greeter"
    assert target_spec("_sample_backends.shout") == "_sample_backends.shout"


class _Outer:
    class Inner:
        """A nested class is importable by its qualified name."""

    def method(self) -> None:
        """Bound, it is not the object its qualified name imports."""


def test_target_spec_of_a_nested_class_uses_its_qualified_name() -> None:
    assert target_spec(_Outer.Inner) == f"{__name__}:_Outer.Inner"


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        (lambda request: "hi", "a lambda has no name"),
        (Greeter(), "instance of Greeter"),
        (functools.partial(shout, "x"), "instance of partial"),
        (_Outer().method, "imports a different object"),
        ("_sample_backends:Nope", "has no attribute"),
        ("no_such_module_xyz:thing", "Cannot import module"),
    ],
    ids=["lambda", "instance", "partial", "bound-method", "missing-attr", "missing-module"],
)
def test_target_spec_rejects_what_cannot_be_imported_again(target: object, needle: str) -> None:
    with pytest.raises(StoreError, match="cannot be stored") as info:
        target_spec(target)
    assert needle in str(info.value)


def test_target_spec_rejects_nested_functions() -> None:
    def nested(request: object) -> str:
        return "hi"

    with pytest.raises(StoreError, match="defined inside a function") as info:
        target_spec(nested)
    assert "top level of a module" in str(info.value)


def test_target_spec_rejects_main_module_objects() -> None:
    def fake() -> None: ...

    fake.__module__ = "__main__"
    fake.__qualname__ = "fake"
    with pytest.raises(StoreError, match="__main__") as info:
        target_spec(fake)
    assert "Move it into a module" in str(info.value)


def test_target_spec_rejects_a_rebound_name() -> None:
    def shout() -> None: ...

    shout.__module__ = "_sample_backends"
    shout.__qualname__ = "shout"
    with pytest.raises(StoreError, match="imports a different object"):
        target_spec(shout)


def test_store_errors_are_serve_and_value_errors() -> None:
    assert issubclass(StoreError, ServeError)
    assert issubclass(StoreError, ValueError)


# -- check_storable -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, 3, 2.5, "text", [], {}, [1, "a", None, {"k": [1.5, False]}], {"a": {"b": []}}],
)
def test_check_storable_accepts_json_values(value: object) -> None:
    check_storable(value, "The user_config")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ((1, 2), "the value is the tuple (1, 2)"),
        ([1, (2,)], "the value at [1] is the tuple (2,)"),
        ({"a": {1: "x"}}, "the value at ['a'] is a dict with the non-str key 1"),
        ({"a": {1, 2}}, "the value at ['a'] is {1, 2} of type set"),
        ([object], "the value at [0] is <class 'object'> of type type"),
        ([b"raw"], "the value at [0] is b'raw' of type bytes"),
    ],
)
def test_check_storable_names_what_and_where(value: object, needle: str) -> None:
    with pytest.raises(StoreError) as info:
        check_storable(value, "The init args of backend 'm'")
    message = str(info.value)
    assert message.startswith("The init args of backend 'm' cannot be stored: ")
    assert needle in message
    assert "a tuple would come back as a list" in message


def test_backend_record_checks_target_init_args_and_user_config() -> None:
    with pytest.raises(StoreError, match=r"Backend 'b' cannot be persisted.*lambda"):
        BackendRecord.of("b", lambda r: r)
    with pytest.raises(StoreError, match="init args of backend 'b'"):
        BackendRecord.of("b", Greeter, [("a", "tuple")])
    with pytest.raises(StoreError, match="user_config of backend 'b'"):
        BackendRecord.of("b", Greeter, [], {"user_config": {"when": object()}})
    record = BackendRecord.of("b", Greeter, ("hi",), BackendConfig(num_replicas=3))
    assert record.init_args == ["hi"]
    assert record.config["num_replicas"] == 3
    assert record.config["max_concurrent_queries"] is None  # stored unresolved
    assert BackendConfig.coerce(record.config) == BackendConfig(num_replicas=3)


def test_endpoint_record_from_list_endpoints_info() -> None:
    info = {"route": None, "methods": ["GET"], "traffic": {"a": 1.0}, "shadows": {"b": 0.5}}
    assert EndpointRecord.from_info("e", info) == EndpointRecord(
        "e", None, ["GET"], {"a": 1.0}, {"b": 0.5}
    )


def test_origins_are_neither_compared_nor_shown() -> None:
    plain = BackendRecord("b", "_sample_backends:shout")
    located = BackendRecord("b", "_sample_backends:shout", origin="d.toml:3: backends[0]")
    assert plain == located
    assert "d.toml" not in repr(located)
    assert EndpointRecord("e", origin="x", traffic_origin="y", shadow_origins={"b": "z"}) == (
        EndpointRecord("e")
    )
    state = ControlState({"b": plain}, {"e": EndpointRecord("e")})
    assert repr(state) == "<ControlState backends=['b'] endpoints=['e']>"


# -- capture and apply ----------------------------------------------------------------------------


def _state() -> ControlState:
    return ControlState(
        backends={
            "greeter": BackendRecord("greeter", Greeter, ["bonjour"], {"num_replicas": 2}),
            "shout": BackendRecord("shout", "_sample_backends:shout"),
        },
        endpoints={
            "greet": EndpointRecord(
                "greet", "/greet", ["GET", "POST"], {"greeter": 0.25, "shout": 0.75}, {"shout": 0.5}
            ),
            "loud": EndpointRecord("loud", None, ["GET"], {"shout": 1.0}),
            "idle": EndpointRecord("idle", "/idle"),
        },
    )


async def test_apply_creates_backends_endpoints_traffic_and_shadows_in_order(serve: Serve) -> None:
    await _state().apply(serve)
    assert list(serve.list_backends()) == ["greeter", "shout"]
    assert serve.get_backend_config("greeter").num_replicas == 2
    endpoints = serve.list_endpoints()
    assert list(endpoints) == ["greet", "loud", "idle"]
    assert endpoints["greet"]["route"] == "/greet"
    assert endpoints["greet"]["methods"] == ["GET", "POST"]
    assert endpoints["greet"]["traffic"] == {"greeter": 0.25, "shout": 0.75}
    assert endpoints["greet"]["shadows"] == {"shout": 0.5}
    assert endpoints["loud"]["traffic"] == {"shout": 1.0}
    assert endpoints["idle"]["traffic"] == {}
    assert await serve.get_handle("loud").remote("hi") == "HI"
    # A function target given as the object (not a path) is created as it is.
    state = ControlState({"fn": BackendRecord("fn", shout)}, {"fn": EndpointRecord("fn")})
    state.endpoints["fn"].traffic = {"fn": 1.0}
    await state.apply(serve)
    assert await serve.get_handle("fn").remote("x") == "X"


async def test_capture_of_an_applied_state_is_that_state(serve: Serve) -> None:
    state = _state()
    await state.apply(serve)
    records = [
        BackendRecord.of(b.tag, b.target, b.init_args, b.config) for b in state.backends.values()
    ]
    captured = ControlState.capture(records, serve.list_endpoints())
    assert captured.endpoints == state.endpoints
    assert list(captured.backends) == ["greeter", "shout"]
    assert captured.backends["greeter"].target == "_sample_backends:Greeter"
    assert captured.backends["greeter"].config == BackendConfig(num_replicas=2).to_dict()


async def test_a_refused_step_without_an_origin_raises_serves_own_error(serve: Serve) -> None:
    state = ControlState(
        {
            "ok": BackendRecord("ok", "_sample_backends:shout"),
            "bad": BackendRecord("bad", "_sample_backends:Greeter", ["a", "b"]),
        }
    )
    with pytest.raises(BackendError):
        await state.apply(serve)
    assert list(serve.list_backends()) == ["ok"]  # what came before the failing step stays


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (
            EndpointRecord("e", traffic={"nope": 1.0}, origin="f.toml:4: endpoints[0]"),
            "f.toml:4: endpoints[0]: ",
        ),
        (
            EndpointRecord(
                "e",
                traffic={"t": 0.5, "nope": 0.5},
                origin="f.toml:4: endpoints[0]",
                traffic_origin="f.toml:6: endpoints[0].traffic",
            ),
            "f.toml:6: endpoints[0].traffic: ",
        ),
        (
            EndpointRecord(
                "e",
                shadows={"t": 0.5, "nope": 0.5},
                origin="f.toml:4: endpoints[0]",
                shadow_origins={"nope": "f.toml:7: endpoints[0].shadows.nope"},
            ),
            "f.toml:7: endpoints[0].shadows.nope: ",
        ),
        (
            EndpointRecord("e", shadows={"nope": 0.5}, origin="f.toml:4: endpoints[0]"),
            "f.toml:4: endpoints[0]: ",
        ),
    ],
    ids=["create", "traffic", "shadow", "shadow-falls-back"],
)
async def test_a_refused_step_with_an_origin_is_located_there(
    serve: Serve, endpoint: EndpointRecord, expected: str
) -> None:
    state = ControlState({"t": BackendRecord("t", shout)}, {"e": endpoint})
    with pytest.raises(DeploymentError) as caught:
        await state.apply(serve)
    error = caught.value
    assert isinstance(error.__cause__, ConfigError)
    assert str(error) == f"{expected}{error.__cause__}"
    assert error.errors == (str(error),)
    assert "'nope'" in str(error)
