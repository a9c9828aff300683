"""A handler's result as an HTTP response (API.md §4): ``str`` as text, ``bytes`` raw, ``None``
empty, a ``Response`` as it is, a stream chunk by chunk, anything else as JSON (numpy arrays and
scalars, dataclasses, pydantic models included; orjson when installed, the standard library
otherwise, with the same values and errors).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import inspect
import json
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.datastructures import URL
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from ._types import Stream

__all__ = ["json_dumps", "to_response"]


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    model_dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(model_dump):
        return model_dump(mode="json")
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, URL | uuid.UUID | decimal.Decimal | pathlib.PurePath):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _stdlib_json_dumps(obj: Any) -> bytes:
    return json.dumps(
        obj, default=_json_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


_orjson_dumps: Callable[..., bytes] | None
try:  # the aioserve[fast] extra: the same JSON, encoded several times faster
    import orjson
except ImportError:  # pragma: no cover - the dev extras install it
    _orjson_dumps = None
    _OrjsonError: type[Exception] = TypeError
    _ORJSON_OPTIONS = 0
else:
    _orjson_dumps = orjson.dumps
    _OrjsonError = orjson.JSONEncodeError
    _ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS  # int, float, bool and None keys, as json takes


def json_dumps(obj: Any) -> bytes:
    """Encode a handler's result as compact UTF-8 JSON (numpy, dataclasses, pydantic included).

    With orjson when it is installed (``aioserve[fast]``), else with the standard library: the
    same JSON values either way, and the same errors (NaN and infinities are refused).
    """
    if _orjson_dumps is None:  # pragma: no cover - the dev extras install orjson
        return _stdlib_json_dumps(obj)
    try:
        data = _orjson_dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
    except _OrjsonError:
        # What orjson does not take (ints past 64 bits, nesting past 254 levels, lone
        # surrogates, circular references): the standard library encodes it, or raises.
        return _stdlib_json_dumps(obj)
    if b"null" in data:
        # orjson writes NaN and infinities as null where json refuses them (a 500, as
        # Starlette's JSONResponse gives): only the standard library tells them from None.
        return _stdlib_json_dumps(obj)
    return data


def _chunk(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode("utf-8")
    return json_dumps(item) + b"\n"


async def _encode_async(items: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            yield _chunk(item)
    finally:
        # A client that went away stops the stream: the replica's slot comes back now.
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def to_response(result: Any) -> Response:
    """Turn a handler's result into a response (see API.md §4 for the rules)."""
    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, bytes | bytearray | memoryview):
        return Response(bytes(result), media_type="application/octet-stream")
    if result is None:
        return Response(b"")
    if isinstance(result, Stream) or inspect.isasyncgen(result):
        return StreamingResponse(_encode_async(result), media_type="application/octet-stream")
    return Response(json_dumps(result), media_type="application/json")
