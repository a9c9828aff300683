"""A scikit-learn model behind ``POST /predict``, batched: ``python examples/digits_batch.py``.

A random forest is trained at startup on scikit-learn's bundled digits data set (8 x 8 images,
no download). Requests carry one image each; the model sees them in batches of up to 32, because
one ``predict`` call costs about the same for 1 row or 32. Then try::

    curl -X POST http://127.0.0.1:8000/predict \\
        -d '{"pixels": [0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,
                        0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]}'

The pattern: the batched method is a plain ``def`` (the model is sync, CPU-bound code), so its
batches run on the replica's thread, never on the event loop. The handler is ``async def``: it
reads the body with ``await request.json()`` and awaits the batched method with one item, so many
requests can wait for the same batch at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
from typing import Any

from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from starlette.requests import Request
from starlette.responses import JSONResponse

import aioserve as serve

NUM_PIXELS = 64
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.010


class DigitsModel:
    """A class backend: trains once per replica, answers one image per request."""

    def __init__(self, n_estimators: int = 50) -> None:
        digits = load_digits()
        # n_jobs=1: one predict uses one core; batching, not threads, gives the throughput.
        self.model = RandomForestClassifier(n_estimators=n_estimators, random_state=0, n_jobs=1)
        self.model.fit(digits.data, digits.target)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    def predict(self, images: list[list[float]]) -> list[int]:
        """Label a batch of images (each 64 numbers); runs on the replica's thread."""
        return [int(label) for label in self.model.predict(images)]

    async def __call__(self, request: Request) -> Any:
        body = await request.json()
        pixels = body.get("pixels") if isinstance(body, dict) else None
        # Checked before batching: one bad image would otherwise fail its whole batch.
        if not _is_image(pixels):
            return JSONResponse(
                {"error": f'The body must be {{"pixels": [{NUM_PIXELS} numbers]}}.'},
                status_code=400,
            )
        return {"label": await self.predict(pixels)}


def _is_image(pixels: object) -> bool:
    return (
        isinstance(pixels, list)
        and len(pixels) == NUM_PIXELS
        and all(
            isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p)
            for p in pixels
        )
    )


async def setup(s: serve.Serve, n_estimators: int = 50) -> None:
    """Create the backend and the ``POST /predict`` endpoint on a started instance."""
    await s.create_backend("digits", DigitsModel, n_estimators)
    await s.create_endpoint("predict", backend="digits", route="/predict", methods=["POST"])


async def main(host: str, port: int) -> None:
    async with serve.Serve(http_options={"host": host, "port": port}) as s:
        await setup(s)
        print(f"aioserve is serving on {s.url}: POST {s.url}/predict. Ctrl-C stops it.")
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
