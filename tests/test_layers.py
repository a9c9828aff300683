"""The package's shape (STYLE.md): imports point down the layer table, Starlette and uvicorn stay at
their edges, and the public surface is curated with useful reprs."""

from __future__ import annotations

import ast
import enum
import inspect
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import aioserve
from aioserve import Serve

PACKAGE = Path(aioserve.__file__).parent

# STYLE.md's table, adapted to the modules that exist (and a few it proposes).
LAYERS: dict[str, int] = {
    "_types": 0,
    "exceptions": 0,
    "config": 1,
    "calloptions": 1,
    "context": 1,
    "metrics": 1,
    "exposition": 1,
    "_concurrency": 1,
    "_importer": 1,
    "policy": 2,
    "_waitqueue": 2,
    "_streams": 2,
    "batchpolicy": 2,
    "batchqueue": 2,
    "batching": 2,
    "callable": 2,
    "ingress": 2,
    "runners": 2,
    "workermetrics": 2,
    "backend": 3,
    "handle": 4,
    "router": 4,
    "inbox": 5,
    "accesslog": 5,
    "responses": 5,
    "http": 5,
    "httperrors": 5,
    "servers": 6,
    "serve": 6,
    # STYLE.md puts state and store at L7, but Serve (L6) restores and checkpoints through them, so
    # they sit at its layer; they import nothing above L1 (and Serve only under TYPE_CHECKING).
    "state": 6,
    "store": 6,
    "client": 7,
    "api": 7,
    "cli": 7,
    "cliworkers": 7,
    "clitarget": 7,
    "clisummary": 7,
    "clireload": 7,
    "deployment": 7,
    "__main__": 7,
    "__init__": 7,
}

# Third-party packages allowed only in some modules (at run time; TYPE_CHECKING imports are free).
# cliworkers runs uvicorn's own process manager for --workers, clireload its reloader; ingress
# is where a FastAPI app (a user type) is taken apart, and httperrors the HTTP edge's table.
CONFINED = {
    "starlette": {"http", "httperrors", "inbox", "ingress", "responses", "router"},
    "uvicorn": {"servers", "cliworkers", "clireload"},
    "fastapi": {"ingress"},
}

MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom) -> Iterator[tuple[str, str]]:
    """(kind, name) pairs: ("package", module of aioserve) or ("external", top-level package)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == "aioserve":
                yield "package", parts[1] if len(parts) > 1 else "__init__"
            else:
                yield "external", parts[0]
        return
    if node.level > 1:
        yield "package", f"<relative import beyond the package: level {node.level}>"
        return
    if node.level == 1:
        parts = node.module.split(".") if node.module else []
    else:
        assert node.module is not None  # "from import x" is not Python
        parts = node.module.split(".")
        if parts[0] != "aioserve":
            yield "external", parts[0]
            return
        parts = parts[1:]
    if parts:
        yield "package", parts[0]
        return
    # "from . import x" or "from aioserve import x": x is a module or a name of __init__.
    for alias in node.names:
        yield "package", alias.name if alias.name in MODULES else "__init__"


def _imports_of(module: str) -> list[tuple[int, str, str]]:
    source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source, filename=f"{module}.py")
    return [
        (node.lineno, kind, name)
        for node in _runtime_imports(tree)
        for kind, name in _targets(node)
    ]


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m not in LAYERS]
    assert not missing, f"Put these modules in the layer table of this test: {missing}"
    assert {"exceptions", "config", "runners", "backend", "handle", "serve"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_the_layer_table(module: str) -> None:
    layer = LAYERS.get(module)
    if layer is None:
        pytest.skip(f"{module} has no layer (see test_every_module_has_a_layer)")
    upward = [
        f"line {line}: {module} (L{layer}) imports {name} (L{LAYERS.get(name, '?')})"
        for line, kind, name in _imports_of(module)
        if kind == "package" and (name not in LAYERS or LAYERS[name] > layer)
    ]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", MODULES)
def test_starlette_and_uvicorn_stay_at_their_edges(module: str) -> None:
    wrong = [
        f"line {line}: {module} imports {name}"
        for line, kind, name in _imports_of(module)
        if kind == "external" and name in CONFINED and module not in CONFINED[name]
    ]
    assert not wrong, "\n".join(wrong)


def test_leaves_import_nothing_of_the_package() -> None:
    for module in ("exceptions", "_types"):
        own = [name for _, kind, name in _imports_of(module) if kind == "package"]
        assert own == [], f"{module} imports {own}"


def test_the_layer_checker_sees_upward_imports() -> None:
    # The checker itself: a relative, an absolute and a lazy import are all seen; TYPE_CHECKING
    # ones are not.
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .serve import Serve\n"
        "import aioserve.http\n"
        "def f():\n"
        "    from . import router\n"
        "if TYPE_CHECKING:\n"
        "    from .backend import Backend\n"
    )
    found = [
        (kind, name)
        for node in _runtime_imports(ast.parse(source))
        for kind, name in _targets(node)
    ]
    assert sorted(found) == [
        ("external", "typing"),
        ("package", "http"),
        ("package", "router"),
        ("package", "serve"),
    ]


# -- the public surface ---------------------------------------------------------------------------


def test_all_names_exist_and_are_public() -> None:
    names = aioserve.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert hasattr(aioserve, name), f"aioserve.__all__ names {name!r}, which does not exist"
        assert not name.startswith("_") or (name.startswith("__") and name.endswith("__")), name


def test_no_public_name_outside_all() -> None:
    leaked = sorted(
        name
        for name, value in vars(aioserve).items()
        if not name.startswith("_")
        and name not in aioserve.__all__
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"  # `from __future__ import annotations`
    )
    assert leaked == [], f"public names missing from aioserve.__all__: {leaked}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "__init__"])
def test_module_all_names_exist(module: str) -> None:
    mod = __import__(f"aioserve.{module}", fromlist=["_"])
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"aioserve.{module}.__all__ names missing {name!r}"


def _user_held_classes() -> list[type]:
    classes = {
        value
        for name in aioserve.__all__
        if inspect.isclass(value := getattr(aioserve, name))
        and not issubclass(value, BaseException | enum.Enum)
    }
    return sorted(classes, key=lambda c: c.__name__)


def test_public_classes_define_a_repr() -> None:
    classes = _user_held_classes()
    names = {c.__name__ for c in classes}
    assert {"Serve", "ServeHandle", "Client", "BackendConfig", "HTTPOptions"} <= names
    default = [c.__name__ for c in classes if c.__repr__ is object.__repr__]
    assert default == [], f"classes with object's default repr: {default}"


def _useful(text: str, *needles: str) -> None:
    assert " object at 0x" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


async def test_reprs_of_objects_users_hold(serve: Serve) -> None:
    await serve.create_backend("summarize", lambda request: "ok")
    await serve.create_endpoint("summarize", backend="summarize")
    _useful(repr(serve), "Serve", "running")
    _useful(repr(Serve(http_options={"location": "NoServer"})), "Serve")
    _useful(repr(serve.get_handle("summarize")), "summarize")
    _useful(repr(aioserve.BackendConfig(num_replicas=3)), "BackendConfig", "num_replicas=3")
    _useful(repr(aioserve.HTTPOptions(port=8123)), "HTTPOptions", "8123")
    _useful(repr(aioserve.ReplicaContext("summarize", "summarize#1")), "summarize#1")
    _useful(repr(aioserve.PythonRequest("body", {"q": 1})), "PythonRequest", "body")
    _useful(repr(aioserve.context), "web")


def test_reprs_of_the_sync_facade(client: aioserve.Client) -> None:
    client.create_endpoint("translate")
    _useful(repr(client), "Client")
    _useful(repr(client.get_handle("translate")), "SyncServeHandle", "translate")
    _useful(repr(client.get_handle("translate", sync=False)), "ServeHandle", "translate")
