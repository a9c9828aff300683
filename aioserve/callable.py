"""What the user gave ``create_backend``, analysed once, and how each call binds to it.

:class:`UserCallable` tells function from class, sync from async from generator, batching or not,
and decides once per call shape how a call's arguments bind to the handler's signature (as given;
0.8 style with a request in front; 1.x style with only a request, a :class:`PythonRequest`).
:func:`bind_method` is the one place that decides which methods a caller may reach by name.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._types import ASGI_METHOD
from .batching import accepts_batches
from .config import BackendConfig
from .exceptions import ConfigError, ConfigTypeError, MethodNotFound
from .ingress import ingress_app

__all__ = [
    "LIFECYCLE_HOOKS",
    "Kind",
    "PythonRequest",
    "UserCallable",
    "adapt",
    "bind_method",
    "kind_of",
    "legacy_request",
]

# Methods the system calls on a replica's object; never reachable by a caller's method name.
LIFECYCLE_HOOKS = frozenset({"reconfigure", "check_health", "__del__"})


class Kind(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    ASYNC_GEN = "async generator"
    SYNC_GEN = "generator"


def kind_of(fn: Callable[..., Any]) -> Kind:
    """How a handler runs: sync on the replica's thread, async on the loop, or as a stream."""
    if inspect.isgeneratorfunction(fn):
        return Kind.SYNC_GEN
    if inspect.isasyncgenfunction(fn):
        return Kind.ASYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return Kind.ASYNC
    return Kind.SYNC


class _Mode(enum.IntEnum):
    AS_GIVEN = 0  # call with exactly the handle's arguments
    REQUEST_FIRST = 1  # 0.8 style: a request object, then the arguments
    REQUEST_ONLY = 2  # 1.x style: only a request, built from the arguments


# Reading an enum member costs about 50 ns on 3.11; the request path compares with these instead.
_REQUEST_FIRST = _Mode.REQUEST_FIRST

_PLACEHOLDER = object()
_NO_KWARGS: dict[str, Any] = {}  # never mutated: only ever unpacked with **


class UserCallable:
    """A backend's function or class, analysed once and shared by all its replicas."""

    def __init__(
        self, target: Any, init_args: tuple[Any, ...] = (), *, from_import_path: bool = False
    ) -> None:
        if inspect.isclass(target):
            self.is_class = True
            # A class without __call__ is allowed: it is reached through method names only (an
            # @serve.ingress class through its app, which is async).
            call = _own_call(target)
            # The FastAPI app of an @serve.ingress class (its endpoints' routes are prefixes).
            self.ingress: Any = ingress_app(target)
            if call is not None:
                self.kind = kind_of(call)
            else:
                self.kind = Kind.ASYNC if self.ingress is not None else Kind.SYNC
        elif callable(target):
            if not (inspect.isroutine(target) or isinstance(target, functools.partial)):
                cls = type(target).__name__
                raise ConfigTypeError(
                    f"create_backend takes a function, a class or an import path, got an "
                    f"instance of {cls}. Pass the class itself and its constructor arguments "
                    f"instead: create_backend(tag, {cls}, *init_args)."
                )
            if init_args:
                raise ConfigTypeError(
                    f"Constructor arguments {init_args!r} were given with the function "
                    f"{getattr(target, '__name__', target)!r}; they only apply to a class."
                )
            self.is_class = False
            self.kind = kind_of(target)
            self.ingress = None
        else:
            raise ConfigTypeError(
                f"create_backend takes a function, a class or an import path string, got "
                f"{target!r} of type {type(target).__name__}."
            )
        self.target = target
        self.init_args = init_args
        self.name = getattr(target, "__qualname__", repr(target))
        # A class batches if it, or any of its callable methods, is marked @accept_batch; which
        # calls take lists is then decided per method (method_accepts_batches).
        self.accepts_batches = accepts_batches(target) or (
            self.is_class
            and any(
                accepts_batches(getattr(target, name, None))
                for name in dir(target)
                if name == "__call__" or not name.startswith("_")
            )
        )
        # Ray 1.3 took a backend given by import path to accept batches (the decorator cannot be
        # seen from the config file that names it): see batches_with.
        self.from_import_path = from_import_path
        self.has_reconfigure = self.is_class and callable(getattr(target, "reconfigure", None))
        self.uses_batch_decorator = _uses_batch_decorator(target)
        self._modes: dict[tuple[Any, ...], _Mode] = {}
        self._method_batches: dict[str | None, bool] = {}

    @property
    def is_async(self) -> bool:
        """Whether the main entry point (the function, or the class's ``__call__``) is async."""
        return self.kind is Kind.ASYNC or self.kind is Kind.ASYNC_GEN

    def batches_with(self, config: BackendConfig) -> bool:
        """Whether calls take the batch path under ``config``: always for a callable marked with
        ``@accept_batch``; for an unmarked one given by import path (taken to accept batches, as
        in 1.3) only when ``max_batch_size > 1``, so without it calls pass as given."""
        return self.accepts_batches or (self.from_import_path and (config.max_batch_size or 1) > 1)

    def check_config(self, tag: str, config: BackendConfig) -> None:
        """Check the config rules that need the callable too (raises :class:`ConfigError`)."""
        if (config.max_batch_size or 1) > 1 and not self.batches_with(config):
            raise ConfigError(
                f"Backend {tag!r}: max_batch_size={config.max_batch_size!r} needs a callable that "
                f"accepts batches; mark {self.name} with @serve.accept_batch."
            )
        if config.user_config is not None and not self.has_reconfigure:
            raise ConfigError(
                f"Backend {tag!r}: user_config needs a class with a reconfigure(user_config) "
                f"method; {self.name} has none."
            )

    def method_accepts_batches(self, method: str | None) -> bool:
        """Whether calls to ``method`` (None: the default entry point) take lists."""
        cached = self._method_batches.get(method)
        if cached is None:
            if method == ASGI_METHOD:
                cached = False  # a connection to an ingress app: never part of a batch
            elif not self.accepts_batches and self.from_import_path:
                cached = True  # every method, when its config batches (batches_with)
            elif not self.is_class:
                cached = self.accepts_batches
            elif (
                method is not None and method != "__call__" and not _reachable(self.target, method)
            ):
                # Not a method a caller may reach: no batch queue and nothing cached for a
                # name a client chose (the call fails with MethodNotFound).
                return False
            else:
                # The class's mark covers every method; otherwise the method's own mark decides.
                name = "__call__" if method is None else method
                cached = accepts_batches(self.target) or accepts_batches(
                    getattr(self.target, name, None)
                )
            self._method_batches[method] = cached
        return cached

    def construct(self) -> Any:
        """Build one instance (runs on a replica thread, never on the loop)."""
        if not self.is_class:
            return self.target
        return self.target(*self.init_args)

    def mode_for(
        self,
        key: tuple[Any, ...],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kw: Mapping[str, Any],
    ) -> _Mode:
        """How a call of this shape binds to ``fn``; decided once per shape, then cached."""
        mode = self._modes.get(key)
        if mode is None:
            mode = self._modes[key] = _decide_mode(fn, args, kw)
        return mode

    def __repr__(self) -> str:
        what = "class" if self.is_class else "function"
        return f"<UserCallable {what} {self.name} {self.kind.value}>"


def _uses_batch_decorator(target: Any) -> bool:
    if hasattr(target, "__serve_batch_params__"):
        return True
    if inspect.isclass(target):
        return any(
            hasattr(getattr(target, name, None), "__serve_batch_params__") for name in dir(target)
        )
    return False


def _decide_mode(fn: Callable[..., Any], args: tuple[Any, ...], kw: Mapping[str, Any]) -> _Mode:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: call as given
        return _Mode.AS_GIVEN
    for mode, leading in ((_Mode.AS_GIVEN, ()), (_Mode.REQUEST_FIRST, (_PLACEHOLDER,))):
        try:
            sig.bind(*leading, *args, **kw)
        except TypeError:
            continue
        return mode
    if len(args) <= 1:
        try:
            sig.bind(_PLACEHOLDER)
        except TypeError:
            pass
        else:
            return _Mode.REQUEST_ONLY
    name = getattr(fn, "__qualname__", repr(fn))
    raise ConfigTypeError(
        f"{name}{sig} cannot be called with {len(args)} positional argument(s) and keyword "
        f"argument(s) {sorted(kw)!r}, nor with a request object in front of them."
    )


def adapt(
    mode: _Mode,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    http: tuple[str | None, Mapping[str, str] | None] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if mode is _REQUEST_FIRST:
        return (python_request(None, kwargs, http), *args), kwargs
    return (python_request(args[0] if args else None, kwargs, http),), _NO_KWARGS


_MISSING = object()


def _reachable(cls: type, name: str) -> bool:
    """Whether ``name`` is a method of ``cls`` a caller may reach: looked up statically, so no
    property or other descriptor of the class is evaluated."""
    if name.startswith("_") or name in LIFECYCLE_HOOKS:
        return False
    # The class and its bases only: never the metaclass (``mro``, ABCMeta's ``register``).
    static = next((vars(k)[name] for k in cls.__mro__ if name in vars(k)), _MISSING)
    if static is _MISSING or inspect.isclass(static) or isinstance(static, property):
        return False
    return callable(static) or isinstance(static, staticmethod | classmethod)


def bind_method(obj: Any, method: str | None, user_callable: UserCallable, backend_tag: str) -> Any:
    """The handler a call to ``method`` reaches on a replica's object ``obj``.

    Reachable by name: public methods of the class only; never private or dunder names (but the
    default entry point, ``__call__``), lifecycle hooks (:data:`LIFECYCLE_HOOKS`), properties,
    instance attributes or other non-methods. :class:`MethodNotFound` otherwise; its message lists
    the reachable methods, and its ``method_name`` lets an HTTP edge answer without them.
    """
    if not user_callable.is_class:
        if method not in (None, "__call__"):
            raise MethodNotFound(
                f"Backend {backend_tag!r} is the function {user_callable.name}; "
                f"it has no method {method!r}.",
                method_name=method,
            )
        return obj
    cls = type(obj)
    if method is None or method == "__call__":
        if _own_call(cls) is not None:
            return obj.__call__
        name = "__call__"
    elif _reachable(cls, method):
        return getattr(obj, method)
    else:
        name = method
    public = sorted(n for n in dir(cls) if _reachable(cls, n))
    raise MethodNotFound(
        f"Backend {backend_tag!r} ({user_callable.name}) has no method {name!r} that can be "
        f"called. Its public methods: {', '.join(public) or 'none'}.",
        method_name=name,
    )


def _own_call(cls: type) -> Any:
    """The ``__call__`` a class defines (or inherits from a class of the user's), or None: not
    the one every class has from its metaclass."""
    for klass in cls.__mro__:
        if klass is not object and "__call__" in vars(klass):
            call = vars(klass)["__call__"]
            return call if callable(call) else None
    return None


class PythonRequest:
    """A request made from Python: keyword arguments as query params, one positional arg as body.

    ``method`` is ``"CALL"`` and ``headers`` empty unless the handle set them with
    ``options(http_method=..., http_headers=...)`` (Ray 1.2); ``headers`` is case-insensitive,
    as a Starlette request's.
    """

    __slots__ = ("_body", "headers", "method", "query_params")

    url = ""
    path_params: Mapping[str, Any] = {}

    def __init__(
        self,
        body: Any = None,
        query_params: Mapping[str, Any] | None = None,
        *,
        method: str = "CALL",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._body = body
        # A copy, so that a handler changing it changes nothing the caller holds.
        self.query_params: dict[str, Any] = dict(query_params) if query_params else {}
        self.method = method
        self.headers: Mapping[str, str] = Headers(headers) if headers else _NO_HEADERS

    @property
    def args(self) -> dict[str, Any]:
        """Flask's name for ``query_params``."""
        return self.query_params

    async def body(self) -> Any:
        """The positional argument of the handle call, unchanged (None if there was none)."""
        return self._body

    async def json(self) -> Any:
        """The positional argument, decoded if it is JSON text or bytes, else unchanged."""
        return self.get_json()

    @property
    def data(self) -> Any:
        """The positional argument, unchanged (Flask's name, for sync handlers)."""
        return self._body

    def get_data(self, as_text: bool = False) -> Any:
        """The positional argument (bytes decoded as UTF-8 with ``as_text=True``)."""
        if as_text and isinstance(self._body, bytes | bytearray):
            return bytes(self._body).decode("utf-8")
        return self._body

    def get_json(self) -> Any:
        """The positional argument, decoded if it is JSON text or bytes, else unchanged."""
        if isinstance(self._body, str | bytes | bytearray):
            return json.loads(self._body)
        return self._body

    def __repr__(self) -> str:
        return f"<PythonRequest body={self._body!r} query_params={self.query_params!r}>"


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive headers of a :class:`PythonRequest` (names lower-cased)."""

    __slots__ = ("_items",)

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self._items = {k.lower(): v for k, v in headers.items()} if headers else {}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _is_asgi_request(value: Any) -> bool:
    # A Starlette Request (or WebSocket) being forwarded, recognised without importing Starlette.
    scope = getattr(value, "scope", None)
    return isinstance(scope, dict) and scope.get("type") in ("http", "websocket")


_NO_HEADERS = Headers()
_new_object = object.__new__


def python_request(
    body: Any,
    kwargs: dict[str, Any],
    http: tuple[str | None, Mapping[str, str] | None] | None = None,
) -> PythonRequest:
    """The request a handle call's handler gets: ``kwargs`` becomes its ``query_params``.

    Unlike the constructor this does not copy ``kwargs``: it is the dict of one call's keyword
    arguments, made for that call and used for nothing else, so nobody else holds it.
    """
    request: PythonRequest = _new_object(PythonRequest)
    request._body = body
    request.query_params = kwargs if kwargs else {}
    if http is None:
        request.method = "CALL"
        request.headers = _NO_HEADERS
    else:
        method, headers = http
        request.method = method or "CALL"
        request.headers = Headers(headers) if headers else _NO_HEADERS
    return request


def legacy_request(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    http: tuple[str | None, Mapping[str, str] | None] | None = None,
) -> tuple[Any, ...]:
    """The arguments of a handle call delivered as Ray 1.x did (the ``legacy_requests`` switch):
    one request whose ``body()``/``json()`` give the one positional argument and whose
    ``query_params`` are the keyword arguments. A Starlette request passed alone is forwarded
    unchanged. More than one positional argument is a :class:`ConfigTypeError`, as in 1.x.
    """
    if len(args) > 1:
        raise ConfigTypeError(
            f"With legacy_requests on, a handle call takes at most one positional argument (the "
            f"request body) and keyword arguments (its query params), as in Ray 1.x; got "
            f"{len(args)} positional arguments."
        )
    body = args[0] if args else None
    if not kwargs and http is None and _is_asgi_request(body):
        return args
    return (python_request(body, kwargs, http),)
