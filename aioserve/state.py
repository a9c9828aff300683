"""The control state: what the mutating calls of :class:`~aioserve.Serve` build, as data.

A :class:`ControlState` holds backends (tag, target, init args, the config fields given) and
endpoints (name, route, methods, traffic, shadows), each in creation order. It has one replay
routine, :meth:`ControlState.apply`, which recreates it on a started ``Serve`` through Serve's
public coroutines only. The SQLite state file (:mod:`aioserve.store`) and the TOML deployment file
(:mod:`aioserve.deployment`) are two serialisations of it.

An item may carry an ``origin``, the place it was declared (``"deploy.toml:12: backends[0]"``):
when ``Serve`` refuses the step that creates it, :meth:`ControlState.apply` raises a
:class:`DeploymentError` starting with that origin, with Serve's error as ``__cause__``. Origins are
not compared and not stored.

What can be stored (checked by :meth:`BackendRecord.of` when a backend is created with persistence
on, before anything starts):

- the target: an import path string (``"package.module:Name"``) that imports, or a function or class
  defined at the top level of an importable module (:func:`target_spec`). Lambdas, nested functions,
  instances and anything defined in ``__main__`` cannot be found again by another process;
- init args and ``user_config``: JSON values only (:func:`check_storable`): None, bool, int, float,
  str, list, and dict with str keys. Tuples are refused because they would come back as lists.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._importer import import_attr
from .config import BackendConfig
from .exceptions import ConfigError, DeploymentError, ServeError, StoreError

if TYPE_CHECKING:
    from .serve import Serve

__all__ = [
    "BackendRecord",
    "ControlState",
    "EndpointRecord",
    "check_storable",
    "target_spec",
]

_JSON_HELP = (
    "Only JSON values can be stored: None, bool, int, float, str, list, and dict with str keys "
    "(a tuple would come back as a list, so pass a list)."
)


# -- what can be stored ---------------------------------------------------------------------------


def target_spec(target: object) -> str:
    """The import path under which ``target`` is stored: ``"package.module:QualName"``.

    An import path string is returned as given once it imports. A function or class must be
    importable again by that name (``import_attr(spec) is target``); anything else raises
    :class:`StoreError` saying why and how to fix it.
    """
    if isinstance(target, str):
        try:
            import_attr(target)
        except ConfigError as exc:
            raise StoreError(f"The backend target {target!r} cannot be stored: {exc}") from exc
        return target
    if not (inspect.isclass(target) or inspect.isroutine(target)):
        kind = type(target).__name__
        raise StoreError(
            f"The backend target {target!r} cannot be stored: it is an instance of {kind}, which "
            f"has no import path. Pass a module-level function or class (and its init args) or "
            f"an import path 'package.module:Name'."
        )
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    name = qualname or repr(target)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise StoreError(
            f"The backend target {name} cannot be stored: it has no module and qualified name "
            f"to import it by. Pass an import path 'package.module:Name' instead."
        )
    if "<lambda>" in qualname:
        raise StoreError(
            f"The backend target {module}.{qualname} cannot be stored: a lambda has no name to "
            f"import it by. Define it with 'def' at the top level of a module, or pass its import "
            f"path 'package.module:name'."
        )
    if "<locals>" in qualname:
        raise StoreError(
            f"The backend target {module}.{qualname} cannot be stored: it is defined inside a "
            f"function, so no other process can import it. Move it to the top level of a module."
        )
    if module == "__main__":
        raise StoreError(
            f"The backend target {qualname} cannot be stored: it is defined in the __main__ "
            f"module (the script being run), which another process cannot import by that name. "
            f"Move it into a module and import it from there."
        )
    spec = f"{module}:{qualname}"
    try:
        found = import_attr(spec)
    except ConfigError as exc:
        raise StoreError(
            f"The backend target {name} cannot be stored: {spec!r} does not import ({exc})."
        ) from exc
    if found is not target:
        raise StoreError(
            f"The backend target {name} cannot be stored: {spec!r} imports a different object "
            f"(the name was rebound, or a decorator did not keep __module__ and __qualname__). "
            f"Pass an import path 'package.module:Name' that names it."
        )
    return spec


def check_storable(value: object, what: str) -> None:
    """Raise :class:`StoreError` naming ``what`` unless ``value`` round-trips through JSON."""
    problem = _json_problem(value, "")
    if problem is not None:
        where, description = problem
        at = f" at {where}" if where else ""
        raise StoreError(f"{what} cannot be stored: the value{at} is {description}. {_JSON_HELP}")


def _json_problem(value: object, where: str) -> tuple[str, str] | None:
    kind = type(value)
    # Exact types: a subclass (IntEnum, OrderedDict, a str subclass) would come back as its base.
    if value is None or kind in (bool, int, float, str):
        return None
    if isinstance(value, list) and kind is list:
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict) and kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{where}", f"a dict with the non-str key {key!r}"
            problem = _json_problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if kind is tuple:
        return where, f"the tuple {value!r}"
    return where, f"{value!r} of type {kind.__name__}"


# -- the model ------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackendRecord:
    """A backend: its tag, target (an import path, or the function or class), init args, and the
    :class:`~aioserve.BackendConfig` fields as given (``max_concurrent_queries`` unresolved)."""

    tag: str
    target: Any
    init_args: list[Any] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Where it was declared, for errors while applying (not compared, not stored).
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        tag: str,
        target: object,
        init_args: Sequence[Any] = (),
        config: BackendConfig | Mapping[str, Any] | None = None,
    ) -> BackendRecord:
        """The storable record of a backend about to be created: the target by its import path,
        every config field. :class:`StoreError` if any of it cannot be stored."""
        try:
            spec = target_spec(target)
        except StoreError as exc:
            raise StoreError(f"Backend {tag!r} cannot be persisted. {exc}") from exc
        args = list(init_args)
        check_storable(args, f"The init args of backend {tag!r}")
        fields = BackendConfig.coerce(config).to_dict()
        check_storable(fields["user_config"], f"The user_config of backend {tag!r}")
        return cls(tag=tag, target=spec, init_args=args, config=fields)


@dataclasses.dataclass
class EndpointRecord:
    """An endpoint: name, route (None: reachable by handle only), methods, traffic, shadows."""

    name: str
    route: str | None = None
    methods: list[str] = dataclasses.field(default_factory=lambda: ["GET"])
    traffic: dict[str, float] = dataclasses.field(default_factory=dict)
    shadows: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Where the endpoint, its traffic and each shadow were declared (not compared, not stored);
    #: the traffic and a shadow without their own fall back to ``origin``.
    origin: str | None = dataclasses.field(default=None, compare=False, repr=False)
    traffic_origin: str | None = dataclasses.field(default=None, compare=False, repr=False)
    shadow_origins: dict[str, str] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_info(cls, name: str, info: Mapping[str, Any]) -> EndpointRecord:
        """The record of one entry of ``Serve.list_endpoints()``."""
        return cls(
            name=name,
            route=info.get("route"),
            methods=list(info.get("methods", ["GET"])),
            traffic=dict(info.get("traffic", {})),
            shadows=dict(info.get("shadows", {})),
        )


@dataclasses.dataclass
class ControlState:
    """The whole control state: backends by tag and endpoints by name, each in creation order."""

    backends: dict[str, BackendRecord] = dataclasses.field(default_factory=dict)
    endpoints: dict[str, EndpointRecord] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<ControlState backends={list(self.backends)!r} endpoints={list(self.endpoints)!r}>"

    @classmethod
    def capture(
        cls, backends: Iterable[BackendRecord], endpoints: Mapping[str, Mapping[str, Any]]
    ) -> ControlState:
        """The state of a running instance, for a checkpoint: the records its backends were
        created from (:meth:`BackendRecord.of`) and its ``list_endpoints()``."""
        return cls(
            backends={record.tag: record for record in backends},
            endpoints={
                name: EndpointRecord.from_info(name, info) for name, info in endpoints.items()
            },
        )

    async def apply(self, serve: Serve) -> None:
        """Create the backends, then the endpoints with their traffic and shadows, in order, on the
        started ``serve``, through its public coroutines.

        An endpoint whose traffic goes to one backend is created with it in one step. When
        ``serve`` refuses a step, its error is raised as it is, or, if the item has an origin, as a
        :class:`DeploymentError` starting with the origin, with ``serve``'s error as
        ``__cause__``. What was created before the failing step stays.
        """
        for b in self.backends.values():
            create = serve.create_backend(b.tag, b.target, *b.init_args, config=b.config)
            await _step(b.origin, create)
        for e in self.endpoints.values():
            only = next(iter(e.traffic)) if len(e.traffic) == 1 else None
            create = serve.create_endpoint(e.name, only, route=e.route, methods=e.methods)
            await _step(e.origin, create)
            if e.traffic and only is None:
                await _step(e.traffic_origin or e.origin, serve.set_traffic(e.name, e.traffic))
            for tag, proportion in e.shadows.items():
                origin = e.shadow_origins.get(tag, e.origin)
                await _step(origin, serve.shadow_traffic(e.name, tag, proportion))


async def _step(origin: str | None, call: Coroutine[Any, Any, None]) -> None:
    if origin is None:
        await call
        return
    try:
        await call
    except ServeError as exc:
        line = f"{origin}: {exc}"
        raise DeploymentError(line, [line]) from exc
