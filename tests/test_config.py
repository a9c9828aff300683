"""Tests of aioserve.config: BackendConfig and HTTPOptions validation (API.md §2 and §4)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aioserve
from aioserve import BackendConfig, HTTPOptions, Serve

# No example database: it would write a .hypothesis directory into the work tree.
quick = settings(database=None, max_examples=300, deadline=None)

DEFAULTS = {
    "num_replicas": 1,
    "max_batch_size": None,
    "batch_wait_timeout": 0.0,
    "max_concurrent_queries": None,
    "max_queued_queries": 1000,
    "user_config": None,
    "graceful_shutdown_wait_loop_s": 2.0,
    "graceful_shutdown_timeout_s": 20.0,
    "batch_wait_policy": "adaptive",
}

INT_FIELDS = ("num_replicas",)
OPTIONAL_INT_FIELDS = ("max_batch_size", "max_concurrent_queries", "max_queued_queries")
SECONDS_FIELDS = (
    "batch_wait_timeout",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
)
ALIASES = {
    "experimental_graceful_shutdown_wait_loop_s": "graceful_shutdown_wait_loop_s",
    "experimental_graceful_shutdown_timeout_s": "graceful_shutdown_timeout_s",
}


def is_valid(field: str, value: Any) -> bool:
    """The rule of API.md §2 for one field, written independently of the package."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if field in INT_FIELDS:
        return is_int and value >= 1
    if field in OPTIONAL_INT_FIELDS:
        return value is None or (is_int and value >= 1)
    if field in SECONDS_FIELDS:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return is_number and math.isfinite(value) and value >= 0
    if field == "batch_wait_policy":
        return isinstance(value, str) and value in ("adaptive", "fixed")
    assert field == "user_config"
    return True


def sync_handler(request: object) -> str:
    return "sync"


async def async_handler(request: object) -> str:
    return "async"


@aioserve.accept_batch
def batch_handler(requests: list[object]) -> list[str]:
    return ["batch" for _ in requests]


class WithReconfigure:
    def __init__(self) -> None:
        self.config: object = None

    def reconfigure(self, config: object) -> None:
        self.config = config

    def __call__(self, request: object) -> object:
        return self.config


# -- BackendConfig: defaults and single fields ----------------------------------------------------


def test_backend_config_defaults() -> None:
    assert BackendConfig().to_dict() == DEFAULTS
    assert BackendConfig.coerce(None) == BackendConfig()
    assert BackendConfig.coerce({}) == BackendConfig()


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("num_replicas", 0, ValueError),
        ("num_replicas", -1, ValueError),
        ("num_replicas", None, TypeError),
        ("num_replicas", True, TypeError),
        ("num_replicas", 1.0, TypeError),
        ("num_replicas", "2", TypeError),
        ("max_batch_size", 0, ValueError),
        ("max_batch_size", False, TypeError),
        ("max_batch_size", 2.5, TypeError),
        ("max_concurrent_queries", 0, ValueError),
        ("max_concurrent_queries", True, TypeError),
        ("max_concurrent_queries", "8", TypeError),
        ("max_queued_queries", 0, ValueError),
        ("max_queued_queries", -5, ValueError),
        ("max_queued_queries", True, TypeError),
        ("batch_wait_timeout", -0.1, ValueError),
        ("batch_wait_timeout", math.nan, ValueError),
        ("batch_wait_timeout", None, TypeError),
        ("batch_wait_timeout", True, TypeError),
        ("batch_wait_timeout", "0.1", TypeError),
        ("graceful_shutdown_wait_loop_s", -1, ValueError),
        ("graceful_shutdown_wait_loop_s", None, TypeError),
        ("graceful_shutdown_timeout_s", -0.5, ValueError),
        ("graceful_shutdown_timeout_s", False, TypeError),
    ],
)
def test_backend_config_rejects_bad_value_naming_field_and_value(
    field: str, value: Any, error: type[Exception]
) -> None:
    for make in (
        lambda: BackendConfig(**{field: value}),
        lambda: BackendConfig.coerce({field: value}),
    ):
        with pytest.raises(error) as info:
            make()
        assert isinstance(info.value, aioserve.ServeError)
        assert field in str(info.value)
        assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_replicas", 1),
        ("num_replicas", 64),
        ("max_batch_size", None),
        ("max_batch_size", 1),
        ("max_batch_size", 32),
        ("max_concurrent_queries", None),
        ("max_concurrent_queries", 1),
        ("max_queued_queries", None),
        ("max_queued_queries", 1),
        ("batch_wait_timeout", 0),
        ("batch_wait_timeout", 0.25),
        ("graceful_shutdown_wait_loop_s", 0),
        ("graceful_shutdown_timeout_s", 0.0),
        ("user_config", {"threshold": 0.5}),
        ("user_config", [1, 2]),
    ],
)
def test_backend_config_accepts_good_value(field: str, value: Any) -> None:
    config = BackendConfig.coerce({field: value})
    assert getattr(config, field) == value
    assert config.to_dict() == {**DEFAULTS, field: value}


def test_batch_wait_timeout_is_stored_as_float() -> None:
    config = BackendConfig(batch_wait_timeout=1)
    assert config.batch_wait_timeout == 1.0
    assert isinstance(config.batch_wait_timeout, float)


@pytest.mark.parametrize("key", ["bogus", "num_replica", "max_batch"])
def test_unknown_key_is_a_value_error_naming_it(key: str) -> None:
    with pytest.raises(ValueError, match=repr(key)):
        BackendConfig.coerce({"num_replicas": 2, key: 1})


@pytest.mark.parametrize(("alias", "field"), sorted(ALIASES.items()))
def test_experimental_aliases_set_the_field(alias: str, field: str) -> None:
    config = BackendConfig.coerce({alias: 7.5})
    assert getattr(config, field) == 7.5
    assert alias not in config.to_dict()
    with pytest.raises(ValueError, match=field):
        BackendConfig.coerce({alias: -1.0})


@pytest.mark.parametrize("bad", [42, "num_replicas=2", [("num_replicas", 2)]])
def test_coerce_rejects_non_mapping(bad: object) -> None:
    with pytest.raises(TypeError, match="config"):
        BackendConfig.coerce(bad)  # type: ignore[arg-type]


def test_a_config_is_validated_when_a_field_is_assigned() -> None:
    config = BackendConfig(num_replicas=2)
    with pytest.raises(ValueError, match="num_replicas"):
        config.num_replicas = 0
    assert BackendConfig.coerce(config).num_replicas == 2


def test_a_config_remembers_the_fields_set_explicitly() -> None:
    config = BackendConfig(num_replicas=2)
    assert config.fields_set == {"num_replicas"}
    config.user_config = {"a": 1}
    assert config.fields_set == {"num_replicas", "user_config"}
    assert BackendConfig.coerce(config).fields_set == config.fields_set
    base = BackendConfig(max_batch_size=4, user_config="u", num_replicas=3)
    assert base.updated(BackendConfig(num_replicas=1)) == BackendConfig(
        max_batch_size=4, user_config="u", num_replicas=1
    )


def test_coerce_returns_a_copy() -> None:
    config = BackendConfig(num_replicas=2)
    copy = BackendConfig.coerce(config)
    assert copy == config
    assert copy is not config
    copy.num_replicas = 3
    assert config.num_replicas == 2


# -- resolved_max_concurrent_queries ---------------------------------------------------------------


@pytest.mark.parametrize(("max_batch_size", "expected_sync"), [(None, 8), (1, 2), (4, 8), (16, 32)])
def test_resolved_max_concurrent_queries_legacy_rule(
    max_batch_size: int | None, expected_sync: int
) -> None:
    config = BackendConfig(max_batch_size=max_batch_size)
    assert config.resolved_max_concurrent_queries(is_async=False) == expected_sync
    assert config.resolved_max_concurrent_queries(is_async=True) == 100
    assert config.max_concurrent_queries is None  # resolving does not change the config


@pytest.mark.parametrize("is_async", [False, True])
def test_resolved_max_concurrent_queries_explicit_wins(is_async: bool) -> None:
    config = BackendConfig(max_concurrent_queries=3, max_batch_size=16)
    assert config.resolved_max_concurrent_queries(is_async=is_async) == 3


# -- property tests over dicts of field values ---------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=False),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)
USER_CONFIG = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
)
FIELDS = tuple(DEFAULTS)


@st.composite
def config_dicts(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A dict as a user writes it (aliases included) and the same values by canonical field."""
    fields = draw(st.sets(st.sampled_from(FIELDS)))
    user: dict[str, Any] = {}
    canonical: dict[str, Any] = {}
    for field in sorted(fields):
        value = draw(USER_CONFIG if field == "user_config" else ANY_VALUE)
        aliases = [a for a, f in ALIASES.items() if f == field]
        key = draw(st.sampled_from([field, *aliases]))
        user[key] = value
        canonical[field] = value
    return user, canonical


@quick
@given(config_dicts())
def test_config_dicts_accepted_iff_every_field_is_valid(
    pair: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    user, canonical = pair
    invalid = {f: v for f, v in canonical.items() if not is_valid(f, v)}
    if invalid:
        with pytest.raises((ValueError, TypeError)) as info:
            BackendConfig.coerce(user)
        message = str(info.value)
        assert any(f in message and repr(v) in message for f, v in invalid.items()), message
        return
    config = BackendConfig.coerce(user)
    as_dict = config.to_dict()
    assert as_dict == {**DEFAULTS, **canonical}
    assert BackendConfig(**as_dict) == config
    assert BackendConfig.coerce(as_dict) == config
    assert dataclasses.replace(config) == config


@quick
@given(config_dicts(), st.text(min_size=1, max_size=8).filter(lambda k: k not in DEFAULTS))
def test_unknown_keys_always_rejected(
    pair: tuple[dict[str, Any], dict[str, Any]], unknown: str
) -> None:
    user, _ = pair
    if unknown in ALIASES or unknown == "batch_wait_timeout_s":
        return
    with pytest.raises((ValueError, TypeError)) as info:
        BackendConfig.coerce({**user, unknown: 1})
    if all(is_valid(f, v) for f, v in pair[1].items()):
        assert isinstance(info.value, ValueError)
        assert repr(unknown) in str(info.value)


@quick
@given(st.sampled_from(FIELDS), ANY_VALUE)
def test_updated_validates_like_coerce(field: str, value: Any) -> None:
    base = BackendConfig(num_replicas=2, max_queued_queries=5)
    if field == "user_config" or is_valid(field, value):
        new = base.updated({field: value})
        # user_config is stored as given (identity: a NaN there is not equal to itself).
        assert getattr(new, field) is value or getattr(new, field) == value
        # Fields not named in the update keep their values; the original is untouched.
        untouched = {k: v for k, v in base.to_dict().items() if k != field}
        assert {k: v for k, v in new.to_dict().items() if k != field} == untouched
        assert base == BackendConfig(num_replicas=2, max_queued_queries=5)
    else:
        with pytest.raises((ValueError, TypeError), match=field):
            base.updated({field: value})


# -- HTTPOptions ----------------------------------------------------------------------------------


def test_http_options_defaults() -> None:
    options = HTTPOptions()
    assert options.host == "127.0.0.1"
    assert options.port == 8000
    assert options.location == "HeadOnly"
    assert options.root_path == ""
    assert list(options.middlewares) == []
    assert HTTPOptions.coerce(None) == options
    assert HTTPOptions.coerce({}) == options


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("host", 127001, TypeError),
        ("host", b"localhost", TypeError),
        ("port", "8000", TypeError),
        ("port", True, TypeError),
        ("port", 80.0, TypeError),
        ("port", -1, ValueError),
        ("port", 65536, ValueError),
        ("location", "Nowhere", ValueError),
        ("location", "headonly", ValueError),
        ("middlewares", "CORSMiddleware", TypeError),
        ("middlewares", 3, TypeError),
        ("root_path", "api", ValueError),
    ],
)
def test_http_options_reject_bad_value_naming_field_and_value(
    field: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        HTTPOptions.coerce({field: value})
    assert field in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", None),
        ("host", "0.0.0.0"),
        ("host", "::1"),
        ("port", 0),
        ("port", 65535),
        ("location", None),
        ("location", "NoServer"),
        ("location", "EveryNode"),
        ("root_path", "/api"),
    ],
)
def test_http_options_accept_good_value(field: str, value: Any) -> None:
    # location=None means no server, and is reported as such (as 1.x's validator did).
    expected = "NoServer" if (field, value) == ("location", None) else value
    assert getattr(HTTPOptions.coerce({field: value}), field) == expected


def test_http_options_unknown_key_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'prot'"):
        HTTPOptions.coerce({"prot": 8000})


@quick
@given(st.one_of(st.integers(min_value=-(10**6), max_value=10**6), st.booleans(), st.floats()))
def test_http_options_port_rule(port: Any) -> None:
    ok = isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535
    if ok:
        assert HTTPOptions.coerce({"port": port}).port == port
    else:
        with pytest.raises((ValueError, TypeError), match="port"):
            HTTPOptions.coerce({"port": port})


@quick
@given(st.one_of(st.none(), st.text(max_size=12)))
def test_http_options_location_rule(location: str | None) -> None:
    if location in (None, "HeadOnly", "EveryNode", "NoServer"):
        assert HTTPOptions.coerce({"location": location}).location == (location or "NoServer")
    else:
        with pytest.raises(ValueError, match="location"):
            HTTPOptions.coerce({"location": location})


@pytest.mark.parametrize(
    ("options", "serves"),
    [
        ({}, True),
        ({"location": "EveryNode"}, True),
        ({"location": "NoServer"}, False),
        ({"location": None}, False),
        ({"host": None}, False),
    ],
)
def test_http_options_decide_whether_a_server_runs(options: dict[str, Any], serves: bool) -> None:
    assert HTTPOptions.coerce(options).serves is serves


@pytest.mark.parametrize(
    ("options", "error"),
    [({"port": "80"}, TypeError), ({"bogus": 1}, ValueError), ({"location": "Mars"}, ValueError)],
)
def test_serve_rejects_bad_http_options(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Serve(http_options=options)


# -- through the public API -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"num_replicas": 0}, ValueError),
        ({"num_replicas": True}, TypeError),
        ({"max_concurrent_queries": 0}, ValueError),
        ({"max_queued_queries": 0}, ValueError),
        ({"batch_wait_timeout": -1}, ValueError),
        ({"experimental_graceful_shutdown_timeout_s": -1}, ValueError),
        ({"replicas": 2}, ValueError),
        ("num_replicas=2", TypeError),
    ],
)
async def test_create_backend_with_bad_config_registers_nothing(
    serve: Serve, config: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await serve.create_backend("x", sync_handler, config=config)
    assert serve.list_backends() == {}
    await serve.create_backend("x", sync_handler)
    assert list(serve.list_backends()) == ["x"]


async def test_max_batch_size_above_one_needs_a_batching_callable(serve: Serve) -> None:
    with pytest.raises(ValueError, match="accept_batch"):
        await serve.create_backend("x", sync_handler, config={"max_batch_size": 2})
    assert serve.list_backends() == {}
    await serve.create_backend("x", sync_handler, config={"max_batch_size": 1})
    await serve.create_backend("y", batch_handler, config={"max_batch_size": 2})
    assert serve.list_backends()["y"]["max_batch_size"] == 2


async def test_user_config_needs_a_reconfigure_method(serve: Serve) -> None:
    with pytest.raises(ValueError, match="reconfigure"):
        await serve.create_backend("x", sync_handler, config={"user_config": {"a": 1}})
    assert serve.list_backends() == {}
    await serve.create_backend("x", WithReconfigure, config={"user_config": {"a": 1}})
    await serve.create_endpoint("x", backend="x")
    assert await serve.get_handle("x").remote() == {"a": 1}


async def test_create_backend_accepts_a_backend_config_object(serve: Serve) -> None:
    config = BackendConfig(num_replicas=2, max_concurrent_queries=3)
    await serve.create_backend("x", sync_handler, config=config)
    info = serve.list_backends()["x"]
    assert info["num_replicas"] == 2
    assert info["max_concurrent_queries"] == 3
    config.num_replicas = 5  # the caller's object is not the backend's config
    assert serve.get_backend_config("x").num_replicas == 2


@pytest.mark.parametrize(
    ("target", "config", "expected"),
    [
        (sync_handler, {}, 8),
        (async_handler, {}, 100),
        (batch_handler, {"max_batch_size": 4}, 8),
        (batch_handler, {"max_batch_size": 16}, 32),
        (sync_handler, {"max_concurrent_queries": 3}, 3),
        (async_handler, {"max_concurrent_queries": 3}, 3),
    ],
)
async def test_resolved_max_concurrent_queries_is_reported(
    serve: Serve, target: Any, config: dict[str, Any], expected: int
) -> None:
    await serve.create_backend("x", target, config=config)
    assert serve.list_backends()["x"]["max_concurrent_queries"] == expected
    assert serve.get_backend_config("x").max_concurrent_queries == expected
