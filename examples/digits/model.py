"""The model backend behind ``POST /predict``: a random forest trained at startup, labelling
images in batches.

:class:`DigitsModel` is a class backend: each replica constructs it once (its constructor runs on
the replica's thread, so training never blocks the event loop) and then serves calls. A call is
an HTTP request whose body is ``{"pixels": [64 numbers from 0 to 16]}``, or the same dict sent
through a handle (``await handle.remote({"pixels": [...]})``); the answer is
``{"label": int, "version": str}``. A body that is not JSON is the client's error (aioserve
answers 400); JSON that is not such an image is a 422 with a sentence saying what is wrong (see
:mod:`examples.digits.preprocess`).

Batching: one ``predict`` call of a forest costs about the same for 1 image as for 32 (each tree
is walked once per call, whatever the number of rows), so :meth:`DigitsModel._predict` takes a
list. It is a plain ``def`` decorated with ``@serve.batch``: its batches run on the replica's
thread, never on the event loop, and each call awaits it with one checked image.
``__call__`` is ``async def`` for that reason: many calls wait on the same batch at once (an
async replica runs up to ``max_concurrent_queries``, 100 by default, calls at a time), where a
sync ``__call__`` would run one call at a time and leave nothing to batch. Reading and checking
the body takes microseconds, so it runs on the event loop, before the image joins a batch: a bad
body fails only its own request, never the batch it would have joined.

The batch method's name starts with an underscore, so that neither a handle nor an HTTP client
(``X-Serve-Call-Method``) can reach it with something that is not a checked image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from starlette.exceptions import HTTPException
from starlette.requests import Request

import aioserve as serve
from examples.digits.preprocess import MAX_PIXEL, parse_pixels, scale

MODEL_ENDPOINT = "digits"
"""The endpoint of the model versions, at ``POST /predict`` (see :mod:`examples.digits.deployment`);
handles go to it too, so that every call takes its traffic split."""

MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.010


def _is_held_out(count: int) -> NDArray[np.bool_]:
    # Every fifth image is kept out of training, so that accuracy can be measured on images the
    # model never saw (see held_out()).
    return np.arange(count) % 5 == 4


def training_set() -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The images the model learns from (four in five, scaled to 0..1) and their labels."""
    digits = load_digits()
    keep = ~_is_held_out(len(digits.target))
    return digits.data[keep] / MAX_PIXEL, digits.target[keep]


def held_out() -> tuple[list[list[float]], list[int]]:
    """The other fifth: raw images (pixels 0..16, as a client sends them) and their labels."""
    digits = load_digits()
    out = _is_held_out(len(digits.target))
    return digits.data[out].tolist(), [int(label) for label in digits.target[out]]


class DigitsModel:
    """One version of the classifier: ``DigitsModel("v2", n_estimators=30)``.

    ``version`` is echoed in every answer, so a client can tell which version served it when
    traffic is split between two; ``n_estimators`` (the number of trees) is what differs between
    the versions of this example.
    """

    def __init__(self, version: str = "v1", n_estimators: int = 20) -> None:
        self.version = version
        images, labels = training_set()
        # n_jobs=1: one predict uses one core; batching, not threads, gives the throughput.
        self.classifier = RandomForestClassifier(
            n_estimators=n_estimators, random_state=0, n_jobs=1
        )
        self.classifier.fit(images, labels)

    async def __call__(self, request: Request | dict[str, Any]) -> dict[str, Any]:
        """Label one image: ``POST /predict`` with the image as its JSON body, or
        ``await handle.remote({"pixels": [...]})``. The image joins the next batch."""
        body = await request.json() if isinstance(request, Request) else request
        try:
            pixels = parse_pixels(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return await self._predict(pixels)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    def _predict(self, images: list[list[float]]) -> list[dict[str, Any]]:
        """Label a batch of checked images (pixels 0..16); runs on the replica's thread."""
        labels = self.classifier.predict(scale(images))
        return [{"label": int(label), "version": self.version} for label in labels]
