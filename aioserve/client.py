"""The sync facade: ``Client`` runs an instance on a background event-loop thread for scripts.

Every method blocks until the work is done on the instance's loop. Calling one from that loop's own
thread (from inside an async backend, say) would deadlock, so it raises a clear error instead.

The control API is written once, in the core: each ``Client`` method is built from the ``Serve``
method of the same name (same signature, docstring and static type) and runs it on the loop
thread. What the facade adds is only what the sync world and the legacy scripts need: ``sync=``
handles, ``detached`` instances, and the 0.8 argument orders (``create_backend(func, "tag")``,
``create_endpoint(name, "/route")``) and names (``set_backend_config``, ``split``, ``link``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from ._concurrency import new_event_loop
from .config import HTTPOptions
from .context import current_replica, use_default_log_format
from .exceptions import ConfigError, ServeError, ServeShutdown
from .handle import ServeFuture, ServeHandle
from .serve import Serve

__all__ = ["Client", "RayServeSyncHandle", "SyncServeHandle"]

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

Args = tuple[Any, ...]
Kwargs = dict[str, Any]
LegacyForm = Callable[[Args, Kwargs], tuple[Args, Kwargs]]


class _Loop:
    """An event loop running on one thread, driven from the others."""

    loop: asyncio.AbstractEventLoop
    _ident: int | None

    @property
    def is_current(self) -> bool:
        """Whether the calling thread is this loop's thread."""
        return threading.get_ident() == self._ident

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it is done."""
        if self.is_current:
            coro.close()
            raise ServeError(
                "A blocking aioserve call was made from the instance's own event loop thread "
                "(from an async backend?); it would deadlock. Use the async API there: "
                "serve.get_handle(name, sync=False) and await its remote() calls."
            )
        if self.loop.is_closed():
            coro.close()
            raise ServeShutdown("This aioserve instance has been shut down.")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop thread (reads race with nothing there)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def stop(self) -> None:
        """Stop the loop, if this object owns it."""


class _AttachedLoop(_Loop):
    """The loop of an instance someone else runs (``async with Serve``, ``aioserve run``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ident: int | None) -> None:
        self.loop = loop
        self._ident = ident


class _LoopThread(_Loop):
    """A daemon thread running one event loop until stopped."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ident = self._thread.ident

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        """Stop the loop and wait for the thread to end."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if not self.is_current:
            self._thread.join(timeout=30)


class SyncServeHandle:
    """A handle for plain threads: ``handle.remote(x)`` returns a ``concurrent.futures.Future``
    (a :class:`ServeFuture`, which async code may also await)."""

    __slots__ = ("_handle",)

    def __init__(self, handle: ServeHandle) -> None:
        self._handle = handle

    @property
    def endpoint_name(self) -> str:
        """The endpoint this handle calls."""
        return self._handle.endpoint_name

    def remote(self, *args: Any, **kwargs: Any) -> ServeFuture[Any]:
        """Send a request; returns a ``concurrent.futures.Future`` whose ``.result()`` waits for
        its result, and which async code can ``await`` too (the 1.x composition idiom
        ``await serve.get_handle("m").remote(x)`` inside an async backend)."""
        return self._handle.remote_threadsafe(*args, **kwargs)

    def options(self, **options: Any) -> SyncServeHandle:
        """A new handle with these options (see ``ServeHandle.options``); this one is unchanged."""
        return SyncServeHandle(self._handle.options(**options))

    def __getattr__(self, name: str) -> SyncServeHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return SyncServeHandle(getattr(self._handle, name))

    def __repr__(self) -> str:
        return repr(self._handle).replace("ServeHandle", "SyncServeHandle", 1)

    def __reduce__(self) -> Any:
        raise TypeError("A handle belongs to one process and cannot be pickled.")


RayServeSyncHandle = SyncServeHandle


# -- delegation: one definition (the core's), presented unchanged --------------------------------


def present_as(
    wrapper: Callable[..., Any],
    target: Callable[..., Any],
    *,
    qualname: str,
    bound: bool = False,
    note: str | None = None,
    keywords: Sequence[inspect.Parameter] = (),
) -> None:
    """Give ``wrapper`` the name, docstring and signature of ``target``, for help() and IDEs.

    ``bound`` drops the target's first parameter (a method presented as a plain function);
    ``note`` is appended to the docstring and ``keywords`` to the parameters, unless the target
    has them already (what a legacy form adds).
    """
    module = wrapper.__module__
    functools.update_wrapper(wrapper, target)
    wrapper.__module__ = module
    wrapper.__qualname__ = qualname
    if note is not None:
        wrapper.__doc__ = f"{inspect.cleandoc(target.__doc__ or '')}\n\n{inspect.cleandoc(note)}"
    signature = inspect.signature(target)
    params = list(signature.parameters.values())[1 if bound else 0 :]
    added = [p for p in keywords if p.name not in signature.parameters]
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params[-1:-1] = added
    else:
        params.extend(added)
    wrapper.__dict__["__signature__"] = signature.replace(parameters=params)


def forwarding(target: Callable[..., Any]) -> Callable[[F], F]:
    """Show a function's ``**options`` as the keyword parameters of ``target`` it passes them to.

    The function names only what it adds or orders differently; every other option is
    ``target``'s, so an option added there is accepted and documented here at once.
    """

    def decorate(func: F) -> F:
        own = inspect.signature(func)
        head = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        tail = [
            p.replace(kind=p.KEYWORD_ONLY)
            for p in inspect.signature(target).parameters.values()
            if p.name not in own.parameters and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        func.__dict__["__signature__"] = own.replace(parameters=[*head, *tail])
        return func

    return decorate


def _blocking(
    core: Callable[Concatenate[Serve, P], Coroutine[Any, Any, T]],
    *,
    legacy: LegacyForm | None = None,
    legacy_keywords: Sequence[inspect.Parameter] = (),
) -> Callable[Concatenate[Client, P], T]:
    """A ``Client`` method that runs the core coroutine ``core`` on the loop and waits for it."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        if legacy is None:
            return self._thread.run(core(self._serve, *args, **kwargs))
        # The rewritten arguments are the core's modern form; only their static type is lost.
        call_args, call_kwargs = legacy(args, kwargs)
        untyped: Callable[..., Coroutine[Any, Any, T]] = core
        return self._thread.run(untyped(self._serve, *call_args, **call_kwargs))

    present_as(
        method,
        core,
        qualname=f"Client.{core.__name__}",
        note=legacy.__doc__ if legacy is not None else None,
        keywords=legacy_keywords,
    )
    return method


def _read(core: Callable[Concatenate[Serve, P], T]) -> Callable[Concatenate[Client, P], T]:
    """A ``Client`` method that runs the core's plain read ``core`` on the loop thread.

    On that thread it races with no control call: it sees the state before or after one, whole.
    """

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._thread.call(functools.partial(core, self._serve, *args, **kwargs))

    present_as(method, core, qualname=f"Client.{core.__name__}")
    return method


def _create_backend_0_8(args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs]:
    """The 0.8 forms are accepted too: ``backend_config=`` for ``config=``, and the order
    ``create_backend(func_or_class, "tag", *init_args)``."""
    if len(args) >= 2 and not isinstance(args[0], str) and isinstance(args[1], str):
        args = (args[1], args[0], *args[2:])
    if "backend_config" in kwargs:
        kwargs = dict(kwargs)
        backend_config = kwargs.pop("backend_config")
        if backend_config is not None:
            if kwargs.get("config") is not None:
                raise ConfigError(
                    f"create_backend got config={kwargs['config']!r} and its 0.8 name "
                    f"backend_config={backend_config!r}; pass config only, not both."
                )
            kwargs["config"] = backend_config
    return args, kwargs


_BACKEND_CONFIG = inspect.Parameter(
    "backend_config",
    inspect.Parameter.KEYWORD_ONLY,
    default=None,
    annotation="BackendConfig | Mapping[str, Any] | None",
)


def _route_second(args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs]:
    """The 0.8 form ``create_endpoint(name, "/route")`` (a second argument starting with "/")
    sets the route; the endpoint has no backend until ``link`` or ``set_traffic``."""
    if (
        len(args) == 2
        and isinstance(args[1], str)
        and args[1].startswith("/")
        and kwargs.get("route") is None
    ):
        return args[:1], {**kwargs, "route": args[1]}
    return args, kwargs


class Client:
    """A running instance driven from synchronous code; every method blocks until done.

    The control methods are the core's (see :class:`Serve`), run on the instance's loop thread;
    ``get_handle`` returns a sync handle unless ``sync=False``.
    """

    def __init__(self, serve: Serve, loop_thread: _Loop, *, detached: bool = False) -> None:
        self._serve = serve
        self._thread = loop_thread
        self.detached = detached

    @classmethod
    @forwarding(Serve)
    def start(
        cls,
        http_options: HTTPOptions | Mapping[str, Any] | None = None,
        *,
        detached: bool = False,
        **serve_options: Any,
    ) -> Client:
        """Start a new instance on its own loop thread and return its client.

        Every option of the :class:`Serve` constructor is accepted (``access_log``, ``seed``, ...).
        Where the application has not configured logging, warnings and errors are printed with
        :data:`~aioserve.context.LOG_FORMAT` (the backend and replica tags of records made in a
        backend).
        """
        serve = Serve(http_options, **serve_options)
        use_default_log_format()
        thread = _LoopThread("aioserve-loop")
        try:
            thread.run(serve.start())
        except BaseException:
            thread.stop()
            raise
        return cls(serve, thread, detached=detached)

    @classmethod
    def attach(cls, serve: Serve) -> Client:
        """A client of an instance already running on its own loop (``async with Serve``,
        ``aioserve run``, a FastAPI lifespan): its methods block until the work is done there.
        What ``serve.connect()`` returns inside a backend of such an instance."""
        return cls(serve, _AttachedLoop(serve.loop, serve.loop_thread))

    def __repr__(self) -> str:
        return f"<Client {self._serve!r}{' detached' if self.detached else ''}>"

    @property
    def serve(self) -> Serve:
        """The async core this client drives."""
        return self._serve

    @property
    def url(self) -> str | None:
        """The base URL of the HTTP server, or None without one."""
        return self._serve.url

    @property
    def http_port(self) -> int | None:
        """The port the HTTP server listens on."""
        return self._serve.http_port

    @property
    def running(self) -> bool:
        """Whether the instance is running."""
        return self._serve.state.value == "running"

    def shutdown(self) -> None:
        """Stop the instance: drain, close the server, stop the loop thread. Idempotent."""
        ctx = current_replica()
        if ctx is not None and ctx.instance is self._serve:
            # It would wait for its own request to drain (or deadlock on the loop thread).
            raise ServeError(
                "An aioserve instance cannot be shut down from inside one of its own backends."
            )
        if not self._thread.loop.is_closed():
            self._thread.run(self._serve.aclose())
        self._thread.stop()

    # -- the control API: the core's methods, run on the loop thread ----------------------------

    create_backend = _blocking(
        Serve.create_backend, legacy=_create_backend_0_8, legacy_keywords=[_BACKEND_CONFIG]
    )
    list_backends = _read(Serve.list_backends)
    get_backend_config = _read(Serve.get_backend_config)
    backend_statistics = _read(Serve.backend_statistics)
    update_backend_config = _blocking(Serve.update_backend_config)
    delete_backend = _blocking(Serve.delete_backend)

    create_endpoint = _blocking(Serve.create_endpoint, legacy=_route_second)
    list_endpoints = _read(Serve.list_endpoints)
    delete_endpoint = _blocking(Serve.delete_endpoint)
    set_traffic = _blocking(Serve.set_traffic)
    shadow_traffic = _blocking(Serve.shadow_traffic)

    stat = _read(Serve.stat)

    # -- the 0.8 names ---------------------------------------------------------------------------

    set_backend_config = update_backend_config
    split = set_traffic

    def link(self, /, endpoint_name: str, backend_tag: str) -> None:
        """Send all of an endpoint's traffic to one backend (``set_traffic(name, {tag: 1.0})``)."""
        self.set_traffic(endpoint_name, {backend_tag: 1.0})

    # -- handles --------------------------------------------------------------------------------

    @forwarding(Serve.get_handle)
    def get_handle(
        self, /, endpoint_name: str, missing_ok: bool = False, sync: bool = True, **options: Any
    ) -> SyncServeHandle | ServeHandle:
        """A sync handle (default) or, with ``sync=False``, an async one usable from any loop.

        Every option of :meth:`Serve.get_handle` is accepted (``relative_slo_ms``, ``shard_key``).
        Unlike the other methods this one runs on the calling thread, so an async backend can get
        an async handle on the loop thread itself.
        """
        # A read of one dict entry: safe from any thread, including the loop's own.
        handle = self._serve.get_handle(endpoint_name, missing_ok, **options)
        return SyncServeHandle(handle) if sync else handle
