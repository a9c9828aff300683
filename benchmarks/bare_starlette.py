"""The baseline: the benchmark handlers as bare Starlette routes on uvicorn.

``python -m benchmarks.bare_starlette --port P [--loop uvloop|asyncio] [--http httptools|h11]``

Routes (the same contract ``benchmarks.aioserve_app`` serves through aioserve):

- ``GET /noop``: async, returns ``ok`` as text/plain.
- ``GET /sync-noop``: a plain ``def``, which Starlette runs in its threadpool; returns ``ok``.
- ``POST /json``: async, returns ``{"echo": <the request's JSON body>}``.
- ``GET /-/healthz``: readiness.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from benchmarks._harness import LOCAL_HOST, server_argparser


async def noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def sync_noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def echo_json(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"echo": body})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/noop", noop, methods=["GET"]),
            Route("/sync-noop", sync_noop, methods=["GET"]),
            Route("/json", echo_json, methods=["POST"]),
            Route("/-/healthz", healthz, methods=["GET"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = server_argparser(
        "python -m benchmarks.bare_starlette", "Serve the benchmark routes with bare Starlette."
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(),
        host=LOCAL_HOST,
        port=args.port,
        loop=args.loop,
        http=args.http,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
