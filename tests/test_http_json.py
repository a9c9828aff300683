"""The JSON encoding of results (``aioserve.responses.json_dumps``): orjson when installed, with the
standard library's answers. Whatever the encoder, a client decodes the same values, and what the
standard library refuses (NaN, infinities, unknown types) is still refused."""

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
