"""JSON both ways, orjson when installed, with the standard library's answers.

Results (``aioserve.responses.json_dumps``): whatever the encoder, a client decodes the same
values, and what the standard library refuses (NaN, infinities, unknown types) is still refused.
Request bodies (``aioserve.inbox.loads_json``, behind ``await request.json()`` and
``request.get_json()``): a handler gets what ``json.loads`` gives, of the same types, and a body
``json.loads`` refuses is refused."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioserve.inbox import loads_json
from aioserve.responses import json_dumps


def stdlib(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text() | st.integers(), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values)
def test_clients_decode_the_same_values_as_from_the_standard_library(value: Any) -> None:
    try:
        expected = stdlib(value)
    except (ValueError, TypeError) as exc:
        with pytest.raises(type(exc)):
            json_dumps(value)
        return
    assert json.loads(json_dumps(value)) == json.loads(expected)


@pytest.mark.parametrize(
    "value",
    [
        [1.0, math.nan],
        {"p": math.inf},
        [-math.inf],
        np.array([0.5, np.nan]),
        {"nested": [[np.float64("nan")]]},
    ],
    ids=["nan", "inf", "-inf", "numpy-nan", "nested-numpy-nan"],
)
def test_nan_and_infinities_are_refused_as_the_standard_library_does(value: Any) -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json_dumps(value)


def test_unknown_types_are_refused_with_the_standard_library_message() -> None:
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        json_dumps({"x": object()})


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: float
    y: float


@pytest.mark.parametrize(
    "value",
    [
        {"none": None, "flag": True, "n": 2**70, "s": 'é\n"\\'},
        {3: "int key", 2.5: "float key", True: "bool key", None: "none key"},
        [0.1, 1e-7, 1e16, 5e-324, 1.7976931348623157e308, -0.0],
        {"when": datetime.datetime(2026, 12, 5, 3, 4, 5, 6), "day": datetime.date(2026, 12, 5)},
        {"colour": Colour.RED, "id": uuid.UUID(int=7), "set": {3}, "tuple": (1, 2)},
        Point(1.5, -2.0),
        np.array([0.1, 0.2], dtype=np.float32),  # float32 widened as tolist() does
        np.arange(6).reshape(2, 3),
    ],
)
def test_values_decode_as_they_did_with_the_standard_library(value: Any) -> None:
    def default(obj: Any) -> Any:
        if isinstance(obj, Point):
            return dataclasses.asdict(obj)
        if isinstance(obj, datetime.date):
            return obj.isoformat()
        if isinstance(obj, set | tuple):
            return list(obj)
        if isinstance(obj, Colour):
            return obj.value
        if isinstance(obj, uuid.UUID):
            return str(obj)
        return obj.tolist()

    expected = json.dumps(value, default=default, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(json_dumps(value)) == json.loads(expected)


def test_a_float32_array_keeps_the_widened_values() -> None:
    assert json_dumps(np.array([0.1], dtype=np.float32)) == b"[0.10000000149011612]"


def test_long_float_lists_round_trip_exactly() -> None:
    values = [i / 7 for i in range(1000)]
    assert json.loads(json_dumps(values)) == values
    assert json.loads(json_dumps(np.array(values))) == values


# -- request bodies -----------------------------------------------------------------------------


def same_values(got: Any, expected: Any) -> bool:
    """Equal, of the same types all the way down (1 is not 1.0), NaN equal to NaN."""
    return json.dumps(got) == json.dumps(expected) and type(got) is type(expected)


def assert_decodes_as_the_standard_library(body: bytes) -> None:
    try:
        expected = json.loads(body)
    except (ValueError, RecursionError):
        with pytest.raises(json.JSONDecodeError):
            loads_json(body)
        return
    assert same_values(loads_json(body), expected), body


body_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities too: json.loads takes them
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=30,
)


@given(body_values)
def test_a_body_decodes_to_what_the_standard_library_gives(value: Any) -> None:
    assert_decodes_as_the_standard_library(json.dumps(value).encode())
    assert_decodes_as_the_standard_library(json.dumps(value, ensure_ascii=False).encode())


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_bytes_decode_or_fail_as_with_the_standard_library(body: bytes) -> None:
    assert_decodes_as_the_standard_library(body)


@pytest.mark.parametrize(
    "body",
    [
        b"18446744073709551616",  # 2**64: orjson would give a float
        b"-9223372036854775809",  # below the smallest 64-bit integer
        b'{"n": [123456789012345678901234567890]}',
        b"1234567890123456789",
        b"0000000000000000000",
        b"[0.12345678901234567890123]",
        b"NaN",
        b"[-Infinity, Infinity]",
        b"1e400",
        b'"\\ud800"',  # a lone surrogate
        b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
        '{"a": 1}'.encode("utf-16"),
        b'{"a": 1, "a": 2}',
        b"[1, 2",
        b'"\xff"',
        b"[" * 100_000,
        b"[" * 1000 + b"]" * 1000,  # deeper than json.loads goes, within orjson's 1024
        b'{"a":' * 1000 + b"1" + b"}" * 1000,
    ],
)
def test_bodies_orjson_reads_differently_decode_as_the_standard_library(body: bytes) -> None:
    assert_decodes_as_the_standard_library(body)
