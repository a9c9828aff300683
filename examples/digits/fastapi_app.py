"""The digits deployment inside a FastAPI app: ``uvicorn examples.digits.fastapi_app:app``.

The app has no aioserve server of its own: its ``Serve`` is made with ``location="NoServer"``,
entered in the FastAPI lifespan (which builds the deployment of
:mod:`examples.digits.deployment`) and mounted, so the host app's server drives both:

- ``POST /models/predict``: aioserve's own endpoint under the mount (routes are relative to it),
  as ``aioserve run`` serves it; ``/models/-/metrics`` and the other system routes too.
- ``POST /classify``: a FastAPI route with a typed body (pydantic checks it: 422 with FastAPI's
  error list, and a schema in ``/docs``) that calls the model versions through a handle to their
  endpoint, with the same traffic split and batching as ``POST /models/predict``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import aioserve
from examples.digits.deployment import setup
from examples.digits.model import MODEL_ENDPOINT
from examples.digits.typed_api import Image, Prediction


def create_app() -> FastAPI:
    """A FastAPI app with its own aioserve instance (one per app)."""
    digits = aioserve.Serve(http_options={"location": "NoServer"})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with digits:  # stops the instance, draining its requests, when the server stops
            await setup(digits)
            yield

    app = FastAPI(title="digits", lifespan=lifespan)
    app.mount("/models", digits.asgi_app)

    @app.post("/classify")
    async def classify(image: Image) -> Prediction:
        """Label one image with the model versions behind the ``digits`` endpoint."""
        answer = await digits.get_handle(MODEL_ENDPOINT).remote({"pixels": image.pixels})
        return Prediction(**answer)

    return app


app = create_app()
