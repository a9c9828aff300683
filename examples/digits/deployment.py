"""The digits deployment: ``aioserve run examples.digits.deployment:setup`` (from the repository
root; ``examples/digits/deployment.toml`` declares the same thing).

Three backends and two endpoints::

    POST /api/predict, GET /api/docs ──> endpoint "api" ──> backend "api" (DigitsAPI, FastAPI)
                                                              │ await handle.remote({"pixels": ...})
                                                              v
    POST /predict ──────────────────> endpoint "digits" ──> 90 % backend "digits-v1" (20 trees)
                                                        └─> 10 % backend "digits-v2" (30 trees)

The model versions sit behind one endpoint; its traffic split sends each request, from HTTP or
from a handle, to one of them, so v2 can take a small share of real requests (a canary) before it
takes them all: ``await serve.set_traffic("digits", {"digits-v2": 1.0})``.
"""

from __future__ import annotations

from aioserve import Serve
from examples.digits.model import MODEL_ENDPOINT, DigitsModel
from examples.digits.typed_api import DigitsAPI

TRAFFIC = {"digits-v1": 0.9, "digits-v2": 0.1}


async def setup(serve: Serve) -> None:
    """Create the backends and endpoints on a started instance."""
    await serve.create_backend("digits-v1", DigitsModel, "v1", 20)
    await serve.create_backend("digits-v2", DigitsModel, "v2", 30)
    await serve.create_endpoint(
        MODEL_ENDPOINT, backend="digits-v1", route="/predict", methods=["POST"]
    )
    await serve.set_traffic(MODEL_ENDPOINT, TRAFFIC)
    # The same model behind a typed FastAPI app (@serve.ingress): every path under /api.
    await serve.create_backend("api", DigitsAPI, MODEL_ENDPOINT)
    await serve.create_endpoint("api", backend="api", route="/api")
