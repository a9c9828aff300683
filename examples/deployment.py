"""An example deployment for ``aioserve run``, three ways. From the repository root::

    aioserve run examples.deployment:setup --port 8000        # an async setup function
    aioserve run examples/deployment.toml                     # the same, declared in TOML
    aioserve run examples.deployment:setup --workers 4 --port 8000   # four processes, one port

Then try::

    curl 'http://127.0.0.1:8000/hello?name=aioserve'
    curl http://127.0.0.1:8000/greet
    curl http://127.0.0.1:8000/pid        # which worker process answered
    curl http://127.0.0.1:8000/-/routes

``aioserve run examples.deployment:app`` serves the :class:`~aioserve.Serve` instance ``app`` as it
is configured here (it has no backends: a bare instance is useful with a ``kv_store_path``, whose
saved state it restores at start).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request

from aioserve import Serve


def hello(request: Request) -> str:
    """A sync function backend: runs on its replica's thread, never on the event loop."""
    return f"hello {request.query_params.get('name', 'world')}"


class Greeter:
    """A sync class backend with a constructor argument and a user_config."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting
        self.punctuation = ""

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called on every replica at start and on each config update that sets user_config."""
        self.punctuation = str(user_config.get("punctuation", ""))

    def __call__(self, request: Request) -> str:
        return f"{self.greeting}{self.punctuation}"


async def pid(request: Request) -> dict[str, int]:
    """An async function backend telling which process answered (see ``--workers``)."""
    return {"pid": os.getpid()}


async def setup(serve: Serve) -> None:
    """Create the example's backends and endpoints on a started instance."""
    await serve.create_backend("hello", hello)
    await serve.create_endpoint("hello", backend="hello", route="/hello")
    await serve.create_backend(
        "greeter",
        Greeter,
        "bonjour",
        config={"num_replicas": 2, "user_config": {"punctuation": "!"}},
    )
    await serve.create_endpoint("greet", backend="greeter", route="/greet", methods=["GET", "POST"])
    await serve.create_backend("pid", pid)
    await serve.create_endpoint("pid", backend="pid", route="/pid")


app = Serve(http_options={"host": "127.0.0.1", "port": 8000})
