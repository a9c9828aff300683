"""A server with example backends: ``python examples/quickstart.py [--host H] [--port P]``.

Then try::

    curl 'http://127.0.0.1:8000/hello?name=aioserve'
    curl -X POST http://127.0.0.1:8000/counter -d '{"by": 5}'
    curl http://127.0.0.1:8000/-/routes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from starlette.requests import Request

import aioserve as serve


def hello(request: Request) -> str:
    """A sync function backend: runs on its replica's thread, never on the event loop."""
    return f"hello {request.query_params.get('name', 'world')}"


class Counter:
    """An async class backend with state and a user_config."""

    def __init__(self, start: int) -> None:
        self.count = start
        self.step = 1

    def reconfigure(self, user_config: dict[str, int]) -> None:
        self.step = user_config.get("step", 1)

    async def __call__(self, request: Request) -> dict[str, object]:
        body = await request.json() if request.method == "POST" else {}
        self.count += body.get("by", self.step)
        return {"count": self.count, "replica": serve.get_replica_context().replica_tag}


async def main(host: str, port: int) -> None:
    async with serve.Serve(http_options={"host": host, "port": port}) as s:
        await s.create_backend("hello", hello)
        await s.create_endpoint("hello", backend="hello", route="/hello")
        await s.create_backend("counter", Counter, 0, config={"user_config": {"step": 1}})
        await s.create_endpoint(
            "counter", backend="counter", route="/counter", methods=["GET", "POST"]
        )
        print(f"aioserve is serving on {s.url} (routes: {s.url}/-/routes). Ctrl-C stops it.")
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
