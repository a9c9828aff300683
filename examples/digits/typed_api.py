"""The digits model behind a typed API: a FastAPI app served by a class backend (ingress).

``POST /api/predict`` takes the same body as ``POST /predict``, but FastAPI checks it against
:class:`Image` (64 numbers from 0 to 16; anything else is FastAPI's 422 with the list of what is
wrong) and documents it: ``GET /api/docs`` is the interactive page, ``GET /api/openapi.json`` the
schema. The endpoint's route (``/api``) is the app's prefix.

:class:`DigitsAPI` is a backend like any other: its replicas take requests through the same
traffic split, limits and metrics, and ``self`` in a route is the instance of the replica serving
the request. It reaches the model versions through a handle to their endpoint, which
``POST /predict`` also goes to, so both front doors take the same traffic split and share the
model's batches.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

import aioserve as serve
from examples.digits.model import MODEL_ENDPOINT
from examples.digits.preprocess import MAX_PIXEL, NUM_PIXELS

app = FastAPI(title="digits", description="A random forest classifying 8 x 8 handwritten digits.")

Pixel = Annotated[float, Field(ge=0, le=MAX_PIXEL)]


class Image(BaseModel):
    """An 8 x 8 image, row by row: 64 pixels from 0 (white) to 16 (black)."""

    pixels: list[Pixel] = Field(min_length=NUM_PIXELS, max_length=NUM_PIXELS)


class Prediction(BaseModel):
    label: int
    version: str


@serve.ingress(app)
class DigitsAPI:
    def __init__(self, model_endpoint: str = MODEL_ENDPOINT) -> None:
        self.model = serve.get_handle(model_endpoint, missing_ok=True, sync=False)

    @app.post("/predict")
    async def predict(self, image: Image) -> Prediction:
        """The digit an image shows, and the model version that said so."""
        result: dict[str, Any] = await self.model.remote({"pixels": image.pixels})
        return Prediction(**result)
