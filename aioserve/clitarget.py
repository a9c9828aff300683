"""What ``aioserve run`` serves: its TARGET resolved (:class:`_Target`), and the errors of the
command line (:class:`_CLIError`, reported as ``aioserve: error: ...`` with an exit code).

A TARGET that does not load says how to fix it: a file name given for a module (``app.py:setup``
-> ``app:setup``; see :mod:`aioserve._importer`), a module that is nowhere on ``sys.path``, a
missing attribute (the public names nearest to it), a module without ``:attr`` (the names in it
that ``run`` can serve), or an object ``run`` cannot serve (what it can, and how to serve a plain
function or class as a backend).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ._importer import file_hint, import_attr, module_of_file, public_names
from .config import HTTPOptions, ServerName
from .deployment import Deployment, load_deployment
from .exceptions import ConfigError, ConfigTypeError, DeploymentError
from .serve import Serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT"]

logger = logging.getLogger("aioserve.cli")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class _CLIError(Exception):
    """An error reported on stderr as ``aioserve: error: ...``; the process exits with ``code``."""

    def __init__(self, message: str, code: int = 2, *, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details  # a traceback worth showing above the one-line message


def _exit_code(exc: BaseException) -> int:
    return 2 if isinstance(exc, ConfigError | ConfigTypeError) else 1


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


# -- targets ---------------------------------------------------------------------------------------

Setup = Callable[[Serve], Awaitable[None]]

_ACCEPTED = (
    "'aioserve run' serves a Serve instance ('module:app'), an async setup function "
    "('module:setup', defined as 'async def setup(serve: Serve) -> None') or a deployment file "
    "('deployment.toml')."
)


def _is_setup(obj: Any) -> bool:
    """An async function that may be a setup function (not an async handler of requests)."""
    if not inspect.iscoroutinefunction(obj):
        return False
    try:
        first = next(iter(inspect.signature(obj).parameters.values()), None)
    except (TypeError, ValueError):
        return False
    if first is None:
        return False
    return first.name not in ("request", "req") and "Request" not in str(first.annotation)


def _servable(obj: Any) -> bool:
    return isinstance(obj, Serve) or _is_setup(obj)


def _suggestable(obj: Any) -> bool:
    return isinstance(obj, Serve) or callable(obj)


def _servable_in(module_name: str) -> list[str]:
    """The names ``run`` can serve in an importable module (none if it does not import)."""
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return []
    return public_names(module, _servable)


def _meant(module: str, names: list[str]) -> str:
    return " or ".join(repr(f"{module}:{name}") for name in names[:3])


def _no_attr(spec: str) -> str:
    """The error for a TARGET with no ``:attr``: the names meant, when the module has some."""
    found = module_of_file(spec)
    if found is not None:
        module, where = found
        names = [] if where else _servable_in(module)
        meant = _meant(module, names) if names else repr(f"{module}:NAME")
        run_from = f", run from {where!r} (or with it on PYTHONPATH)" if where else ""
        return (
            f"TARGET {spec!r} is a file name, not 'module:attr': did you mean {meant}{run_from}? "
            f"{_ACCEPTED}"
        )
    names = _servable_in(spec)
    module = spec
    if not names and "." in spec:
        # 'package.module.setup': the module part may import.
        parent, _, name = spec.rpartition(".")
        if name in _servable_in(parent):
            module, names = parent, [name]
    if names:
        return (
            f"TARGET {spec!r} names a module, not what to serve in it: "
            f"did you mean {_meant(module, names)}?"
        )
    return (
        f"TARGET {spec!r} must be 'module:attr' or the path of a .toml deployment file. {_ACCEPTED}"
    )


def _what(obj: Any) -> str:
    if inspect.isclass(obj):
        return f"the class {obj.__qualname__}"
    if inspect.isroutine(obj):
        return "a sync function"
    if any(c.__module__.split(".")[0] in ("starlette", "fastapi") for c in type(obj).__mro__):
        return f"an ASGI application ({type(obj).__name__})"
    return f"{obj!r} of type {type(obj).__name__}"


def _not_servable(spec: str, obj: Any) -> str:
    module, _, attr = spec.partition(":")
    text = f"{spec!r} is {_what(obj)}. {_ACCEPTED}"
    if inspect.isroutine(obj) or inspect.isclass(obj):
        name = attr.rpartition(".")[2]
        text += (
            f" To serve {name} as a backend, create it in a setup function: "
            f'await serve.create_backend("{name}", {name}), then an endpoint for it.'
        )
    elif "ASGI" in text:
        text += " To serve it together with aioserve, mount a Serve's asgi_app in it."
    names = _servable_in(module)
    if names:
        text += f" {module!r} has {', '.join(repr(f'{module}:{n}') for n in names)}."
    return text


@dataclasses.dataclass
class _Target:
    """What ``run`` serves: a TOML deployment, an async setup function, or a Serve instance."""

    spec: str
    deployment: Deployment | None = None
    setup: Setup | None = None
    instance: Serve | None = None
    root_path_flag: str | None = None  # --root-path, which replaces the target's

    @classmethod
    def load(cls, spec: str) -> _Target:
        """Resolve TARGET; :class:`_CLIError` (exit 2) when it is not something ``run`` serves."""
        if spec.endswith(".toml"):
            try:
                return cls(spec, deployment=load_deployment(spec))
            except DeploymentError as exc:
                raise _CLIError(str(exc)) from None
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise _CLIError(_no_attr(spec))
        hint = file_hint(module, attr)
        if hint is not None:
            raise _CLIError(f"TARGET {spec!r}: {hint}")
        try:
            obj = import_attr(spec, suggest=_suggestable)
        except ConfigError as exc:
            # Chained: the module exists and raised while importing (show where).
            details = "" if exc.__cause__ is None else _traceback(exc.__cause__)
            raise _CLIError(f"Cannot load {spec!r}: {exc}", details=details) from None
        except Exception as exc:
            raise _CLIError(
                f"Importing {module!r} raised {type(exc).__name__}: {exc}",
                details=_traceback(exc),
            ) from None
        if isinstance(obj, Serve):
            return cls(spec, instance=obj)
        if inspect.iscoroutinefunction(obj):
            try:
                inspect.signature(obj).bind(None)
            except TypeError:
                raise _CLIError(
                    f"The setup function {spec!r} must take one argument, the Serve instance: "
                    f"'async def {attr.rpartition('.')[2]}(serve: Serve) -> None'."
                ) from None
            return cls(spec, setup=obj)
        raise _CLIError(_not_servable(spec, obj))

    def server(self, flag: ServerName | None) -> ServerName:
        """The HTTP server: the flag, else the file's or the instance's, else uvicorn."""
        if flag is not None:
            return flag
        if self.instance is not None:
            return self.instance.http_options.server
        if self.deployment is not None:
            # The file's [http] table holds valid HTTPOptions values only (checked on load).
            return cast(ServerName, self.deployment.http.get("server", "uvicorn"))
        return "uvicorn"

    @property
    def root_path(self) -> str:
        """--root-path, else the root_path of the file's [http] table or of the instance."""
        if self.root_path_flag is not None:
            return self.root_path_flag
        if self.instance is not None:
            return self.instance.http_options.root_path
        if self.deployment is not None:
            return str(self.deployment.http.get("root_path", ""))
        return ""

    def address(self, host: str | None, port: int | None) -> tuple[str, int]:
        """Where to serve: the flags, else the file's or the instance's, else the defaults."""
        given: dict[str, Any] = {}
        if self.instance is not None and self.instance.http_options.serves:
            given = {
                "host": self.instance.http_options.host,
                "port": self.instance.http_options.port,
            }
        elif self.deployment is not None:
            given = self.deployment.http
        return (
            host if host is not None else given.get("host", DEFAULT_HOST),
            port if port is not None else given.get("port", DEFAULT_PORT),
        )

    def make_serve(
        self,
        address: tuple[str, int] | None,
        kv_store_path: str | None,
        limits: dict[str, Any] | None = None,
        server: ServerName = "uvicorn",
        *,
        access_log: bool = True,
        debug: bool = False,
    ) -> Serve:
        """The instance to run; without an address it has no server of its own (a worker).

        ``limits`` are HTTP options given on the command line; they replace the target's.
        ``access_log`` replaces the instance's; ``debug`` turns debug mode on, never off.
        """
        options = {**(limits or {}), "root_path": self.root_path}
        if address is None:
            options["location"] = "NoServer"
        else:
            options.update(host=address[0], port=address[1], location="HeadOnly", server=server)
        if self.instance is not None:
            if kv_store_path is not None:
                raise _CLIError(
                    "--kv-store-path does not apply to a Serve instance; give the instance its "
                    "own kv_store_path."
                )
            instance = self.instance
            instance.http_options = dataclasses.replace(instance.http_options, **options)
            instance.access_log = access_log
            instance.debug = debug or instance.debug
            return instance
        return Serve(
            http_options=HTTPOptions(**options),
            kv_store_path=kv_store_path,
            access_log=access_log,
            debug=debug,
        )

    async def populate(self, serve: Serve) -> None:
        """Create the deployment on a started instance (nothing to do for an instance target)."""
        if self.instance is not None:
            return
        if serve.list_backends() or serve.list_endpoints():
            logger.warning(
                "State restored from the kv store (%d backends, %d endpoints); %s is not applied.",
                len(serve.list_backends()),
                len(serve.list_endpoints()),
                self.spec,
            )
            return
        if self.deployment is not None:
            try:
                await self.deployment.state.apply(serve)
            except DeploymentError as exc:
                cause = exc.__cause__ if exc.__cause__ is not None else exc
                config = isinstance(cause, ConfigError | ConfigTypeError)
                details = "" if config else _traceback(cause)
                raise _CLIError(str(exc), _exit_code(cause), details=details) from exc
        elif self.setup is not None:
            try:
                await self.setup(serve)
            except Exception as exc:
                raise _CLIError(
                    f"The setup function {self.spec!r} raised {type(exc).__name__}: {exc}",
                    _exit_code(exc),
                    details=_traceback(exc),
                ) from exc
