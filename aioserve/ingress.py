"""FastAPI ingress: ``@serve.ingress(app)`` turns a class into a backend that serves a FastAPI app.

The endpoint's route becomes a prefix: every path under it (HTTP and WebSocket) goes to the app,
run inside one replica of the class, with that replica's instance passed as ``self`` to the route
functions the class defines::

    app = FastAPI()

    @serve.ingress(app)
    class Classifier:
        def __init__(self) -> None:
            self.model = load_model()

        @app.post("/predict")
        def predict(self, item: Item) -> Prediction:    # sync: runs on the replica's thread
            return self.model.predict(item)

    await serve.create_backend("classifier", Classifier)
    await serve.create_endpoint("classifier", backend="classifier", route="/clf")
    # POST /clf/predict, GET /clf/docs, GET /clf/openapi.json

A request takes the one path every request takes (traffic split, replica choice,
``max_concurrent_queries``, deadlines, metrics, request ids) and then runs the app in the replica
it was given. The app's own routing, validation (422) and OpenAPI docs do the rest. A route
function of the class that is ``async def`` runs on the event loop; a ``def`` one runs on the
replica's thread, as any sync handler does. Handles call the class's methods by name, as for any
class backend (``handle.predict.remote(item)``).

Decorating rewrites the app's routes whose endpoint is a function of the class: each gets a
wrapper whose first parameter (``self``) is a FastAPI dependency resolving to the instance of the
replica serving the request, and whose other parameters are those of the function. The function
itself is left unchanged, so handles and tests can still call it as a method.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .context import current_replica
from .exceptions import ConfigTypeError, ServeError

__all__ = ["INGRESS_ATTR", "ingress", "ingress_app", "replica_thread"]

# The attribute a decorated class carries: the ASGI app its replicas serve.
INGRESS_ATTR = "__serve_ingress__"
# The attribute the app (or router) carries: the one class it serves; and the class's FastAPI app.
_OWNER_ATTR = "_aioserve_ingress_class"
_FASTAPI_ATTR = "__serve_ingress_fastapi__"

_C = TypeVar("_C", bound=type)

# Set by the runner while it serves an ingress request: runs a sync route function on the
# replica's thread, as the request (its argument: a zero-argument callable).
replica_thread: contextvars.ContextVar[Callable[[Callable[[], Any]], Awaitable[Any]] | None] = (
    contextvars.ContextVar("aioserve_ingress_thread", default=None)
)


def ingress_app(target: Any) -> Any:
    """The ASGI app a class decorated with :func:`ingress` serves, or None.

    Routes of the class added to the app after it was decorated (an ``APIRouter`` included at
    the end of the module, say) are bound now, when a backend is made of the class.
    """
    if not inspect.isclass(target):
        return None
    app = getattr(target, INGRESS_ATTR, None)
    if app is not None:
        _bind_routes(getattr(target, _FASTAPI_ATTR).router, target)
    return app


def ingress(app: Any) -> Callable[[_C], _C]:
    """Serve a FastAPI app (or ``APIRouter``) from the replicas of the decorated class.

    Raises ``TypeError`` for anything but a FastAPI app or router, for a decorated object that is
    not a class, and for a route function of the class without a first (``self``) parameter.
    """
    try:
        from fastapi import APIRouter, FastAPI
    except ImportError:  # pragma: no cover - fastapi is in the test and dev extras
        raise ConfigTypeError(
            "serve.ingress() takes a FastAPI app or APIRouter, and FastAPI is not installed: "
            "pip install 'aioserve[fastapi]'."
        ) from None
    if not isinstance(app, (FastAPI, APIRouter)):
        raise ConfigTypeError(
            f"serve.ingress() takes a FastAPI app or APIRouter, got {type(app).__name__}: {app!r}."
        )

    def decorator(cls: _C) -> _C:
        if not inspect.isclass(cls):
            raise ConfigTypeError(
                f"@serve.ingress(app) decorates a class, got {type(cls).__name__}: {cls!r}. "
                f"Put the route functions in a class and decorate the class."
            )
        owner = getattr(app, _OWNER_ATTR, None)
        if owner is not None and owner is not cls:
            raise ConfigTypeError(
                f"This FastAPI app already serves the class {owner.__qualname__}; "
                f"{cls.__qualname__} needs an app (or APIRouter) of its own: each replica runs "
                f"the whole app with its own instance as self."
            )
        if isinstance(app, FastAPI):
            served = app
            router = app.router
        else:
            served = FastAPI()
            router = app
        _bind_routes(router, cls)
        setattr(app, _OWNER_ATTR, cls)
        if served is not app:
            served.include_router(router)
        setattr(cls, _FASTAPI_ATTR, served)
        setattr(cls, INGRESS_ATTR, _ending_quietly(served))
        return cls

    return decorator


def _ending_quietly(app: Any) -> Any:
    """``app``, for which a WebSocket closed by its client (or by a shutdown) while a route
    waits for it is how the connection ends, not an error of the route."""
    from starlette.websockets import WebSocketDisconnect

    async def serve_app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except WebSocketDisconnect:
            if scope["type"] != "websocket":
                raise

    return serve_app


async def _servable_object() -> Any:
    """A FastAPI dependency: the instance of the replica serving the current request."""
    replica = current_replica()
    if replica is None or replica.servable_object is None:
        raise ServeError(
            "This route belongs to a class decorated with @serve.ingress: it runs inside a "
            "replica of that class, so serve the class as a backend instead of running the "
            "FastAPI app on its own."
        )
    return replica.servable_object


def _class_functions(cls: type) -> set[int]:
    """The ids of the functions defined in ``cls`` and its bases (route endpoints to bind)."""
    ids: set[int] = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            if inspect.isfunction(value):
                ids.add(id(value))
    return ids


def _bind_routes(router: Any, cls: type) -> None:
    """Replace each route whose endpoint is a function of ``cls`` by one whose ``self`` is the
    serving replica's instance (see the module docstring)."""
    from fastapi.routing import APIRoute, APIWebSocketRoute

    functions = _class_functions(cls)
    routes = router.routes
    changed = False
    for index, route in enumerate(routes):
        included = getattr(route, "original_router", None)
        if included is not None:
            # A router included as it is (FastAPI >= 0.16x includes lazily): its own routes.
            _bind_routes(included, cls)
            continue
        if not isinstance(route, (APIRoute, APIWebSocketRoute)):
            continue
        if id(route.endpoint) not in functions:
            continue
        route_type = type(route)
        # Every parameter of the route's constructor is kept on the route under its own name,
        # but for a WebSocket route's dependency_overrides_provider: the router's (the app).
        params = list(inspect.signature(route_type.__init__).parameters)[1:]
        kwargs = {name: getattr(route, name) for name in params if hasattr(route, name)}
        if "dependency_overrides_provider" in params and not hasattr(
            route, "dependency_overrides_provider"
        ):
            kwargs["dependency_overrides_provider"] = getattr(
                router, "dependency_overrides_provider", None
            )
        kwargs["endpoint"] = _bind_self(route.endpoint, cls)
        routes[index] = route_type(**kwargs)
        changed = True
    mark_changed = getattr(router, "_mark_routes_changed", None)
    if changed and mark_changed is not None:
        mark_changed()  # FastAPI versions that cache the routes of included routers


def _bind_self(fn: Callable[..., Any], cls: type) -> Callable[..., Any]:
    """A route endpoint calling ``fn`` with the serving replica's instance as its first argument."""
    try:
        signature = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError):  # an annotation that cannot be evaluated: keep the text
        signature = inspect.signature(fn)
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigTypeError(
            f"{cls.__name__}.{fn.__name__} is a route of an @serve.ingress class, so it needs a "
            f"first parameter (self) for the replica's instance."
        )
    from fastapi import Depends

    self_name = parameters[0].name
    rest = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        if p.kind is not inspect.Parameter.VAR_KEYWORD
        else p
        for p in parameters[1:]
        if p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    first = inspect.Parameter(
        self_name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=Depends(_servable_object),
    )
    new_signature = signature.replace(parameters=[first, *rest])

    if inspect.iscoroutinefunction(fn):

        async def endpoint(**values: Any) -> Any:
            instance = values.pop(self_name)
            return await fn(instance, **values)

    else:

        async def endpoint(**values: Any) -> Any:
            instance = values.pop(self_name)
            run = replica_thread.get()
            work = functools.partial(fn, instance, **values)
            if run is None:  # not served through a runner: never block the loop all the same
                return await asyncio.to_thread(work)
            return await run(work)

    # The function's name and docstring (FastAPI's operation id and description), not its
    # __wrapped__: FastAPI must see the new signature.
    functools.update_wrapper(endpoint, fn, updated=())
    vars(endpoint).pop("__wrapped__", None)
    endpoint.__signature__ = new_signature  # type: ignore[attr-defined]
    return endpoint
