"""The servers of :mod:`benchmarks.batching_model`: one scikit-learn model behind ``POST /predict``.

``python -m benchmarks.model_app --app aioserve|starlette --port P [--loop L] [--http H]``

Both answer ``{"pixels": [64 numbers]}`` with ``{"label": int}`` from the same model (a 50-tree
random forest trained at startup on scikit-learn's digits data, as in ``examples/digits_batch.py``):

- ``aioserve``: the example itself, a sync ``@serve.batch`` method (up to 32 images per
  ``predict``) behind an async handler.
- ``starlette``: a bare Starlette route, one ``predict`` per request, run in Starlette's
  threadpool (what a ``def`` route gets) so that the model never blocks the event loop.

Both serve ``GET /-/healthz`` for readiness and run on uvicorn with the same settings.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import aioserve
from benchmarks._harness import LOCAL_HOST, server_argparser
from benchmarks.aioserve_app import loop_factory, run_uvicorn
from examples.digits_batch import DigitsModel, setup


def starlette_app() -> Starlette:
    """The baseline: the example's model, one image per ``predict``, no batching."""
    model = DigitsModel().model

    def label(pixels: list[float]) -> int:
        return int(model.predict([pixels])[0])

    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"label": await run_in_threadpool(label, body["pixels"])})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/-/healthz", healthz, methods=["GET"]),
        ]
    )


async def serve_aioserve(port: int, loop: str, http: str) -> None:
    """The candidate: the example's backend behind uvicorn until SIGTERM or SIGINT."""
    async with aioserve.Serve(http_options={"location": "NoServer"}) as serve:
        await setup(serve)
        await run_uvicorn(serve.asgi_app, port, loop, http)


def main(argv: Sequence[str] | None = None) -> int:
    parser = server_argparser(
        "python -m benchmarks.model_app", "Serve the digits model behind POST /predict."
    )
    parser.add_argument("--app", choices=["aioserve", "starlette"], required=True)
    args = parser.parse_args(argv)
    if args.app == "starlette":
        uvicorn.run(
            starlette_app(),
            host=LOCAL_HOST,
            port=args.port,
            loop=args.loop,
            http=args.http,
            log_level="warning",
            access_log=False,
        )
        return 0
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(serve_aioserve(args.port, args.loop, args.http))
    return 0


if __name__ == "__main__":
    sys.exit(main())
