"""Embedding aioserve in a host ASGI app (API.md §1 (c)): ``location="NoServer"`` and a mount.

The host app's server and lifespan drive the instance; routes are relative to the mount point.
One test runs a real FastAPI app under a real uvicorn server; the others use httpx's
ASGITransport, which does not run lifespan, so they enter ``async with s`` themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from _servers import run_uvicorn
from fastapi import FastAPI
from fastapi import HTTPException as FastAPIHTTPException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import aioserve

pytestmark = pytest.mark.usefixtures("no_loop_errors")


def echo(request: Request) -> dict[str, Any]:
    return {"path": request.url.path, "params": dict(request.path_params)}


async def double(x: int) -> int:
    if x < 0:
        raise ValueError(f"cannot double a negative number: {x}")
    return 2 * x


async def test_mounted_in_fastapi_under_real_uvicorn() -> None:
    s = aioserve.Serve(http_options={"location": "NoServer"})
    lifespan_ran: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with s:
            await s.create_backend("echo", echo)
            await s.create_endpoint("echo", backend="echo", route="/echo")
            await s.create_endpoint("item", backend="echo", route="/items/{item_id:int}")
            await s.create_backend("double", double)
            await s.create_endpoint("double", backend="double")  # headless: handles only
            lifespan_ran.append("started")
            yield
        lifespan_ran.append("stopped")

    app = FastAPI(lifespan=lifespan)

    @app.get("/own")
    async def own() -> dict[str, bool]:
        return {"own": True}

    @app.get("/compose/{x}")
    async def compose(x: int) -> dict[str, int]:
        # The host app's own route calls into aioserve through a handle.
        try:
            return {"doubled": await s.get_handle("double").remote(x)}
        except ValueError as exc:  # the backend's exception arrives as the same type
            raise FastAPIHTTPException(status_code=400, detail=str(exc)) from exc

    app.mount("/models", s.asgi_app)

    async with run_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert lifespan_ran == ["started"]
        assert (await client.get("/models/-/healthz")).status_code == 200  # running
        assert s.url is None  # no server of its own

        r = await client.get("/own")
        assert (r.status_code, r.json()) == (200, {"own": True})

        # Routes are relative to the mount; the request still sees its full public path.
        r = await client.get("/models/echo")
        assert r.status_code == 200
        assert r.json() == {"path": "/models/echo", "params": {}}
        r = await client.get("/models/items/42")
        assert r.json() == {"path": "/models/items/42", "params": {"item_id": 42}}

        r = await client.get("/models/-/routes")
        assert r.status_code == 200
        assert r.json() == {
            "/echo": ["echo", ["GET"]],
            "/items/{item_id:int}": ["item", ["GET"]],
            "double": ["double", ["GET"]],
        }
        assert (await client.get("/models/-/healthz")).status_code == 200

        r = await client.get("/compose/21")
        assert (r.status_code, r.json()) == (200, {"doubled": 42})
        r = await client.get("/compose/-1")
        assert r.status_code == 400
        assert "cannot double a negative number" in r.json()["detail"]

        # Unknown paths: the host app's own 404 at the top level, aioserve's inside the mount.
        r = await client.get("/nope")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
        r = await client.get("/echo")  # aioserve routes exist only under the mount
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
        r = await client.get("/models/nope")
        assert r.status_code == 404
        assert "/-/routes" in r.text
        assert (await client.post("/models/echo")).status_code == 405

    # The host's lifespan shutdown closed the instance: it refuses work and reports so.
    assert lifespan_ran == ["started", "stopped"]
    with pytest.raises(aioserve.ServeError):
        s.get_handle("double")
    transport = httpx.ASGITransport(app=s.asgi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
        assert (await client.get("/-/healthz")).status_code == 503


async def _home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("home")


async def test_mounted_in_starlette_over_asgi_transport() -> None:
    s = aioserve.Serve(http_options={"location": "NoServer"})
    app = Starlette(routes=[Route("/", _home), Mount("/serve", app=s.asgi_app)])
    transport = httpx.ASGITransport(app=app)
    # ASGITransport runs no lifespan: the test drives the instance itself.
    async with s, httpx.AsyncClient(transport=transport, base_url="http://host") as client:
        await s.create_backend("echo", echo)
        await s.create_endpoint("echo", backend="echo", route="/echo/{name}")
        assert (await client.get("/")).text == "home"
        r = await client.get("/serve/echo/ada")
        assert r.status_code == 200
        assert r.json() == {"path": "/serve/echo/ada", "params": {"name": "ada"}}
        assert (await client.get("/serve/-/routes")).json() == {"/echo/{name}": ["echo", ["GET"]]}
        assert (await client.get("/serve/nope")).status_code == 404
        assert (await client.get("/elsewhere")).status_code == 404
        # A route added while serving is live at once.
        await s.create_backend("hi", lambda request: "hi")
        await s.create_endpoint("hi", backend="hi", route="/hi")
        assert (await client.get("/serve/hi")).text == "hi"


async def test_mounted_app_answers_503_before_start_and_after_shutdown() -> None:
    s = aioserve.Serve(http_options={"location": "NoServer"})
    app = Starlette(routes=[Mount("/serve", app=s.asgi_app)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as client:
        for path in ("/serve/echo", "/serve/-/healthz"):
            r = await client.get(path)
            assert r.status_code == 503, path
            assert r.text
        async with s:
            await s.create_backend("echo", echo)
            await s.create_endpoint("echo", backend="echo", route="/echo")
            assert (await client.get("/serve/echo")).status_code == 200
            assert (await client.get("/serve/-/healthz")).status_code == 200
        # Shut down: a clear 503 again, not a crash.
        r = await client.get("/serve/echo")
        assert r.status_code == 503
        assert (await client.get("/serve/-/healthz")).status_code == 503
