"""What ``POST /predict`` takes: checking the body and scaling the pixels.

A client sends ``{"pixels": [64 numbers from 0 to 16]}`` (an 8 x 8 image, row by row, as
``load_digits()`` has them). :func:`parse_pixels` checks it and says, in one sentence, what is wrong
with a body that is not such an image (``pixels[3] is 17: each pixel is a number from 0 (white)
to 16 (black).``); the model backend turns that into a 422. It takes microseconds: it runs on
the event loop, in the model backend's ``async def __call__``, before the image joins a batch.
:func:`scale` maps a batch of checked images to the 0..1 the model was trained on, in one numpy
operation, on the replica's thread with the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

NUM_PIXELS = 64
MAX_PIXEL = 16
"""Pixels of the digits data set go from 0 (white) to 16 (black)."""

_NUMBERS = frozenset({int, float})  # JSON numbers as json.loads makes them (bool is not one)


def parse_pixels(body: object) -> list[float]:
    """The 64 pixels of a request body ``{"pixels": [...]}``, checked (JSON numbers as they
    came: ``int`` or ``float``).

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
        return pixels
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
    return pixels


def scale(images: Sequence[Sequence[float]]) -> NDArray[np.float64]:
    """Checked images (pixels 0..16) -> one row each of the 0..1 the model was trained on."""
    return np.asarray(images, dtype=np.float64) / MAX_PIXEL


def _json_type(value: object) -> str:
    """What a decoded JSON value is, with its article: ``an array``, ``a string``, ``null``."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")
