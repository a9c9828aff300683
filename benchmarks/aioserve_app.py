"""The candidate: the benchmark handlers as aioserve backends, on uvicorn or granian.

``python -m benchmarks.aioserve_app --port P [--loop L] [--http H] [--server S]
[--extra-endpoints N]``

Routes (the contract of :mod:`benchmarks.bare_starlette`, each an endpoint with its own backend):

- ``GET /noop``: an async function backend returning ``ok``.
- ``GET /sync-noop``: a sync function backend returning ``ok`` (run on its replica's thread).
- ``POST /json``: an async backend returning ``{"echo": <the request's JSON body>}``.
- ``GET /floats``: an async backend returning :data:`~benchmarks._harness.FLOATS` (1,000 floats),
  which aioserve encodes as JSON.
- ``GET /-/healthz``: aioserve's own readiness route.
- ``GET /e0`` .. ``/e<N-1>`` with ``--extra-endpoints N``: more static endpoints on the noop
  backend, so that the cost of a larger route table can be measured.

uvicorn gets the settings :mod:`benchmarks.bare_starlette` passes to ``uvicorn.run`` (loop, http,
``log_level="warning"``, ``access_log=False``, default log config, one worker); lifespan is off
because the ``Serve`` instance is entered here, on the same loop, before the server starts.
With ``--server granian`` it is aioserve's own granian server, as ``http_options={"server":
"granian"}`` starts it.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvicorn

import aioserve
from aioserve import servers
from aioserve._concurrency import TaskOwner
from benchmarks._harness import FLOATS, LOCAL_HOST, server_argparser


async def noop(request: Any) -> str:
    return "ok"


def sync_noop(request: Any) -> str:
    return "ok"


async def echo_json(request: Any) -> dict[str, Any]:
    return {"echo": await request.json()}


async def floats(request: Any) -> list[float]:
    return FLOATS


async def build(serve: aioserve.Serve, extra_endpoints: int = 0) -> None:
    """Create the benchmark backends and endpoints on a started ``serve``."""
    await serve.create_backend("noop", noop)
    await serve.create_backend("sync-noop", sync_noop)
    await serve.create_backend("json", echo_json)
    await serve.create_backend("floats", floats)
    await serve.create_endpoint("noop", backend="noop", route="/noop", methods=["GET"])
    await serve.create_endpoint(
        "sync-noop", backend="sync-noop", route="/sync-noop", methods=["GET"]
    )
    await serve.create_endpoint("json", backend="json", route="/json", methods=["POST"])
    await serve.create_endpoint("floats", backend="floats", route="/floats", methods=["GET"])
    for i in range(extra_endpoints):
        await serve.create_endpoint(f"e{i}", backend="noop", route=f"/e{i}", methods=["GET"])


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


async def serve_forever(port: int, loop: str, http: str, extra_endpoints: int) -> None:
    """Run aioserve behind uvicorn on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    async with aioserve.Serve(http_options={"location": "NoServer"}) as serve:
        await build(serve, extra_endpoints)
        await run_uvicorn(serve.asgi_app, port, loop, http)


async def run_uvicorn(app: Any, port: int, loop: str, http: str) -> None:
    """Serve ``app`` with uvicorn on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    config = uvicorn.Config(
        app,
        host=LOCAL_HOST,
        port=port,
        loop=loop,
        http=http,
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # uvicorn restores the handlers it found and re-raises the signal it caught once it has
    # shut down: with these in place, that ends serve() and lets `async with` close aioserve.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    await server.serve()


async def serve_forever_on_granian(
    port: int, build_app: Callable[[aioserve.Serve], Awaitable[None]]
) -> None:
    """Run aioserve behind its own granian server (``aioserve.servers.GranianServer``, what
    ``http_options={"server": "granian"}`` starts) on 127.0.0.1:``port`` until SIGTERM or SIGINT.

    The server starts once the endpoints exist, as the uvicorn one does, so that readiness
    (``/-/healthz``) means every route is served.
    """
    async with aioserve.Serve(http_options={"location": "NoServer"}) as serve:
        await build_app(serve)
        options = aioserve.HTTPOptions(host=LOCAL_HOST, port=port, server="granian")
        server = servers.make_server(serve.asgi_app, servers.bind(LOCAL_HOST, port), options)
        owner = TaskOwner("benchmark server")
        await server.start(owner)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()
            await owner.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = server_argparser(
        "python -m benchmarks.aioserve_app", "Serve the benchmark routes through aioserve."
    )
    parser.add_argument(
        "--extra-endpoints",
        type=int,
        default=0,
        metavar="N",
        help="add N static endpoints /e0../e<N-1> on the noop backend (default 0)",
    )
    args = parser.parse_args(argv)
    if args.extra_endpoints < 0:
        parser.error(f"--extra-endpoints must be at least 0, got {args.extra_endpoints!r}.")
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        if args.server == "granian":
            build_app = functools.partial(build, extra_endpoints=args.extra_endpoints)
            runner.run(serve_forever_on_granian(args.port, build_app))
        else:
            runner.run(serve_forever(args.port, args.loop, args.http, args.extra_endpoints))
    return 0


if __name__ == "__main__":
    sys.exit(main())
