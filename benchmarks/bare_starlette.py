"""The baseline: the benchmark handlers as bare Starlette routes on uvicorn or granian.

``python -m benchmarks.bare_starlette --port P [--loop uvloop|asyncio] [--http httptools|h11]
[--server uvicorn|granian]``

On uvicorn it runs as ``uvicorn.run`` does; on granian as ``granian --interface asgi`` does (its
process manager with one worker process, HTTP/1.1, one runtime thread), the way a user would run
a Starlette app on either.

Routes (the same contract ``benchmarks.aioserve_app`` serves through aioserve):

- ``GET /noop``: async, returns ``ok`` as text/plain.
- ``GET /sync-noop``: a plain ``def``, which Starlette runs in its threadpool; returns ``ok``.
- ``POST /json``: async, returns ``{"echo": <the request's JSON body>}``.
- ``GET /floats``: async, returns :data:`~benchmarks._harness.FLOATS` (1,000 floats) as a
  ``JSONResponse``.
- ``GET /-/healthz``: readiness.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from benchmarks._harness import FLOATS, LOCAL_HOST, server_argparser


async def noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def sync_noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def echo_json(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"echo": body})


async def floats(request: Request) -> JSONResponse:
    return JSONResponse(FLOATS)


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def build_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/noop", noop, methods=["GET"]),
            Route("/sync-noop", sync_noop, methods=["GET"]),
            Route("/json", echo_json, methods=["POST"]),
            Route("/floats", floats, methods=["GET"]),
            Route("/-/healthz", healthz, methods=["GET"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = server_argparser(
        "python -m benchmarks.bare_starlette", "Serve the benchmark routes with bare Starlette."
    )
    args = parser.parse_args(argv)
    run_app("benchmarks.bare_starlette:build_app", args)
    return 0


def run_app(factory: str, args: argparse.Namespace) -> None:
    """Serve the app ``factory`` (``module:function``) makes on the server ``args`` name, with
    the shared server command line's settings (:func:`benchmarks._harness.server_argparser`)."""
    if args.server == "granian":
        run_granian(factory, args.port, args.loop)
        return
    uvicorn.run(
        factory,
        factory=True,
        host=LOCAL_HOST,
        port=args.port,
        loop=args.loop,
        http=args.http,
        log_level="warning",
        access_log=False,
    )


def run_granian(factory: str, port: int, loop: str) -> None:
    """Serve the app ``factory`` makes as the ``granian`` command line would, until SIGTERM."""
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    Server(
        factory,
        address=LOCAL_HOST,
        port=port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,
        loop=Loops(loop),
        http=HTTPModes.http1,
        backlog=2048,
        log_level=LogLevels.warning,
        log_access=False,
    ).serve()


if __name__ == "__main__":
    sys.exit(main())
