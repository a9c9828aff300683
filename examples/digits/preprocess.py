"""The ``POST /predict`` backend: check the body, scale the pixels, ask the model through a handle.

A client sends ``{"pixels": [64 numbers from 0 to 16]}`` (an 8 x 8 image, row by row, as
``load_digits()`` has them) and gets ``{"label": int, "version": str}``. A body that is not JSON
gets 400; JSON that is not such an image gets 422 with a sentence saying what is wrong
(``pixels[3] is 17: each pixel is a number from 0 (white) to 16 (black).``), never a 500.

Why :class:`Preprocessor` is ``async def`` and holds an async handle: its own work (checking and
scaling 64 numbers) takes microseconds, so it can run on the event loop; what it mostly does is
wait for the model. An async replica waits for up to ``max_concurrent_queries`` (100) calls at
once, so the images of concurrent requests reach the model's batch queue together and share one
``predict``. A sync backend would hold its replica's thread while it waited, one request at a
time, and the model would see batches of one. (Heavy preprocessing, such as decoding an image
file, would belong in a sync backend of its own with several replicas.)
"""

from __future__ import annotations

import math
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

import aioserve as serve
from examples.digits.model import MAX_PIXEL

NUM_PIXELS = 64
_NUMBERS = frozenset({int, float})  # JSON numbers as json.loads makes them (bool is not one)
MODEL_ENDPOINT = "digits-model"
"""The headless endpoint the model versions are behind (see :mod:`examples.digits.deployment`)."""


def parse_pixels(body: object) -> list[float]:
    """The 64 pixels of a request body ``{"pixels": [...]}``, checked.

    Raises ``ValueError`` with a sentence naming what is wrong and what is expected.
    """
    expected = f'{{"pixels": [{NUM_PIXELS} numbers from 0 to {MAX_PIXEL}]}}'
    if not isinstance(body, dict):
        raise ValueError(f"The body must be a JSON object {expected}, got {_json_type(body)}.")
    if "pixels" not in body:
        keys = ", ".join(repr(key) for key in list(body)[:5]) or "none"
        raise ValueError(f"The body has no 'pixels' key (its keys: {keys}); send {expected}.")
    pixels = body["pixels"]
    if (
        type(pixels) is list
        and len(pixels) == NUM_PIXELS
        and set(map(type, pixels)) <= _NUMBERS
        and min(pixels) >= 0
        and max(pixels) <= MAX_PIXEL
        and math.isfinite(sum(pixels))  # no NaN
    ):
        # The common case, checked in a few passes of built-ins (no Python loop): the loop
        # below finds what is wrong with the others.
        return [float(pixel) for pixel in pixels]
    if not isinstance(pixels, list) or len(pixels) != NUM_PIXELS:
        got = f"{len(pixels)} values" if isinstance(pixels, list) else _json_type(pixels)
        raise ValueError(
            f"'pixels' must be a list of {NUM_PIXELS} numbers (an 8 x 8 image), got {got}."
        )
    for i, pixel in enumerate(pixels):
        # bool is an int in Python, not a number in JSON; NaN fails the comparisons.
        if (
            isinstance(pixel, bool)
            or not isinstance(pixel, int | float)
            or not 0 <= pixel <= MAX_PIXEL
        ):
            shown = repr(pixel) if len(repr(pixel)) <= 40 else _json_type(pixel)
            raise ValueError(
                f"pixels[{i}] is {shown}: each pixel is a number from 0 (white) to "
                f"{MAX_PIXEL} (black)."
            )
    return [float(pixel) for pixel in pixels]


def scale(pixels: list[float]) -> list[float]:
    """Pixels 0..16 -> 0..1, the scale the model was trained on."""
    return [pixel / MAX_PIXEL for pixel in pixels]


def _json_type(value: object) -> str:
    """What a decoded JSON value is, with its article: ``an array``, ``a string``, ``null``."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")


class Preprocessor:
    """The HTTP-facing backend; ``model_endpoint`` names the endpoint of the model versions."""

    def __init__(self, model_endpoint: str = MODEL_ENDPOINT) -> None:
        # The handle goes to the endpoint, not to a backend: each call takes the endpoint's
        # traffic split (90 % v1, 10 % v2). missing_ok: the endpoint may be created after this
        # backend (a TOML deployment creates every backend first); calls wait for it. Inside a
        # backend, serve.get_handle() reaches the instance the replica runs in, however it was
        # started (a script, `aioserve run`, a FastAPI lifespan); sync=False: an async handle.
        self.model = serve.get_handle(model_endpoint, missing_ok=True, sync=False)

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.json()  # a body that is not JSON: aioserve answers 400
        try:
            image = scale(parse_pixels(body))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        result: dict[str, Any] = await self.model.remote(image)
        return result
