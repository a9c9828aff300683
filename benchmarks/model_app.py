"""The servers of :mod:`benchmarks.batching_model` and :mod:`benchmarks.digits_model`.

``python -m benchmarks.model_app --app aioserve|starlette --port P [--loop L] [--http H]``

Every route answers ``{"pixels": [64 numbers]}`` with ``{"label": int, ...}``. Two models:

- the worked example's digits classifier (``examples/digits``), here a 50-tree random forest,
  which holds the GIL for much of a ``predict`` and costs about the same for 1 image or 32;
- :class:`MatmulModel`, a stand-in for a model whose inference releases the GIL (numpy: one
  ``256 x 256`` matrix product and a ``tanh``, a few ms), to show how replicas use cores.

``--app starlette`` (the baseline; each route reads the body with ``await request.json()`` and
runs the model in Starlette's threadpool, which is what a ``def`` route gets):

- ``POST /predict``: the example's checks and scaling, one ``predict`` per request;
- ``POST /matmul``: the numpy model.

``--app aioserve`` (one ``Serve`` behind uvicorn, every backend with one replica unless said):

- ``POST /predict``: the example's model backend with one version (``DigitsModel``: its
  ``async def __call__`` reads and checks the body and awaits its sync ``@serve.batch`` method of
  up to 32 images);
- ``POST /predict-unbatched``: a sync ``def`` backend, ``request.get_json()``, the same checks
  and scaling and one ``predict`` per request on its replica's thread;
- ``POST /matmul-1`` and ``POST /matmul-2``: the numpy model as a sync ``def`` backend with one
  replica and with two (each replica runs one call at a time on its own thread).

Both serve ``GET /-/healthz`` for readiness, run on uvicorn with the same settings, and limit
BLAS to one thread per call (threadpoolctl), so that a matrix product uses one core and
concurrency, not BLAS, decides how many cores work.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from threadpoolctl import threadpool_limits

import aioserve
from benchmarks._harness import server_argparser
from benchmarks.aioserve_app import loop_factory, run_uvicorn, serve_forever_on_granian
from benchmarks.bare_starlette import run_app
from examples.digits.model import DigitsModel
from examples.digits.preprocess import parse_pixels, scale

N_ESTIMATORS = 50
"""Trees of the benchmark's forest (the example's versions have 20 and 30)."""

MATMUL_SIZE = 256  # a multiple of the 64 pixels


class MatmulModel:
    """The image, tiled to ``256 x 256``, through one dense layer: ``tanh(x @ w)``.

    numpy releases the GIL inside the product and the ``tanh``, so two calls on two threads
    can run on two cores at once.
    """

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        size = MATMUL_SIZE
        self.weights: NDArray[np.float64] = rng.standard_normal((size, size)) / math.sqrt(size)

    def label(self, pixels: list[float]) -> int:
        row = np.asarray(pixels, dtype=np.float64)
        x = np.tile(row, (MATMUL_SIZE, MATMUL_SIZE // row.size))
        return int(np.argmax(np.tanh(x @ self.weights).sum(axis=0))) % 10


def classifier() -> Any:
    """The benchmark's forest: the example's model class, trained with ``N_ESTIMATORS`` trees."""
    return DigitsModel("v1", N_ESTIMATORS).classifier


# -- the baseline ------------------------------------------------------------------------------


def starlette_app() -> Starlette:
    """The models behind bare Starlette routes, one call per request in the threadpool."""
    threadpool_limits(limits=1)  # also in a granian worker, which builds the app itself
    forest = classifier()
    matmul_model = MatmulModel()

    def label(body: object) -> int:
        return int(forest.predict(scale([parse_pixels(body)]))[0])

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"label": await run_in_threadpool(label, body)})

    async def matmul(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"label": await run_in_threadpool(matmul_model.label, body["pixels"])})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/matmul", matmul, methods=["POST"]),
            Route("/-/healthz", healthz, methods=["GET"]),
        ]
    )


# -- the candidate -----------------------------------------------------------------------------


class UnbatchedDigits:
    """The forest without batching: a sync handler, one ``predict`` per request."""

    def __init__(self) -> None:
        self.forest = classifier()

    def __call__(self, request: aioserve.ServeRequest) -> dict[str, int]:
        pixels = parse_pixels(request.get_json())
        return {"label": int(self.forest.predict(scale([pixels]))[0])}


class Matmul:
    """The numpy model as a sync backend."""

    def __init__(self) -> None:
        self.model = MatmulModel()

    def __call__(self, request: aioserve.ServeRequest) -> dict[str, int]:
        return {"label": self.model.label(request.get_json()["pixels"])}


async def build(serve: aioserve.Serve) -> None:
    """Create the benchmark's backends and endpoints on a started ``serve``."""
    await serve.create_backend("digits", DigitsModel, "v1", N_ESTIMATORS)
    await serve.create_endpoint("digits", backend="digits", route="/predict", methods=["POST"])
    await serve.create_backend("digits-unbatched", UnbatchedDigits)
    await serve.create_endpoint(
        "predict-unbatched",
        backend="digits-unbatched",
        route="/predict-unbatched",
        methods=["POST"],
    )
    for replicas in (1, 2):
        tag = f"matmul-{replicas}"
        await serve.create_backend(tag, Matmul, config={"num_replicas": replicas})
        await serve.create_endpoint(tag, backend=tag, route=f"/{tag}", methods=["POST"])


async def serve_aioserve(port: int, loop: str, http: str) -> None:
    """The candidate behind uvicorn until SIGTERM or SIGINT."""
    async with aioserve.Serve(http_options={"location": "NoServer"}) as serve:
        await build(serve)
        await run_uvicorn(serve.asgi_app, port, loop, http)


def main(argv: Sequence[str] | None = None) -> int:
    parser = server_argparser(
        "python -m benchmarks.model_app", "Serve the benchmark models behind POST routes."
    )
    parser.add_argument("--app", choices=["aioserve", "starlette"], required=True)
    args = parser.parse_args(argv)
    threadpool_limits(limits=1)  # one BLAS thread per call, in every thread of this process
    if args.app == "starlette":
        run_app("benchmarks.model_app:starlette_app", args)
        return 0
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        if args.server == "granian":
            runner.run(serve_forever_on_granian(args.port, build))
        else:
            runner.run(serve_aioserve(args.port, args.loop, args.http))
    return 0


if __name__ == "__main__":
    sys.exit(main())
