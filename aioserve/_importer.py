"""Import a user's object by its path: ``"package.module:Name"`` or ``"package.module.Name"``.

A path that cannot be imported says how to fix it: a file name given for a module
(``digits_app.py:setup`` -> ``digits_app:setup``), a module that is nowhere on ``sys.path`` (and
where Python looked, and the modules there with a similar name), a missing attribute (and the
module's public names nearest to it).

Importing runs user module code, which may block; callers on the event loop run it in a thread.
This module imports nothing of the package but its errors.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .exceptions import ConfigError

__all__ = ["file_hint", "import_attr", "module_of_file", "public_names"]

# How many near names an error proposes.
_NEAREST = 3
# A module with at most this many candidates lists them all when none is near.
_LIST_ALL = 8


def import_attr(path: str, *, suggest: Callable[[Any], bool] = callable) -> Any:
    """Import ``"package.module:Name"`` or ``"package.module.Name"`` and return the object.

    :class:`ConfigError` when it cannot: chained to the original exception when importing the
    module raised inside it (the module exists), unchained when the path names nothing.
    ``suggest`` picks which of the module's public names a missing attribute's error proposes.
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"Import path must be a non-empty string, got {path!r}.")
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    hint = file_hint(module_name, attr)
    if hint is not None:
        raise ConfigError(f"Import path {path!r}: {hint}")
    if not module_name or not attr:
        raise ConfigError(
            f"Import path {path!r} must look like 'package.module:Name' or 'package.module.Name'."
        )
    module = _import_module(module_name, path)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            near = _nearest(part, public_names(obj, suggest))
            raise ConfigError(f"Module {module_name!r} has no attribute {attr!r}.{near}") from None
    return obj


def _import_module(module_name: str, path: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            # The path names a module that does not exist (not one its code imports).
            raise ConfigError(
                f"Cannot import module {module_name!r} of {path!r}: {_not_found(missing)}"
            ) from None
        raise ConfigError(f"Cannot import module {module_name!r} of {path!r}: {exc}") from exc
    except ImportError as exc:
        raise ConfigError(f"Cannot import module {module_name!r} of {path!r}: {exc}") from exc


def _not_found(missing: str) -> str:
    """Where Python looked for the module ``missing``, and the names near it there."""
    parent_name, _, leaf = missing.rpartition(".")
    if parent_name:
        parent = sys.modules.get(parent_name)
        places = list(getattr(parent, "__path__", []))
        where = f"package {parent_name!r} ({', '.join(map(repr, places))})"
    else:
        cwd = os.getcwd()
        places = [cwd] if "" in sys.path or cwd in sys.path else []
        where = (
            f"the current directory {cwd!r} nor elsewhere on sys.path"
            if places
            else f"sys.path (which does not hold the current directory {cwd!r})"
        )
    names = sorted({info.name for info in pkgutil.iter_modules(places)})
    return f"there is no module {leaf!r} in {where}.{_nearest(leaf, names)}"


def _nearest(name: str, candidates: list[str]) -> str:
    """`` Did you mean 'x'?`` for the candidates near ``name`` (or all of a few); else ''."""
    near = difflib.get_close_matches(name, candidates, n=_NEAREST, cutoff=0.6)
    if near:
        return f" Did you mean {' or '.join(map(repr, near))}?"
    if 0 < len(candidates) <= _LIST_ALL:
        return f" It has {', '.join(map(repr, candidates))}."
    return ""


def public_names(obj: Any, suggest: Callable[[Any], bool] = callable) -> list[str]:
    """The public names of ``obj`` whose value ``suggest`` accepts; in a module, of its functions
    and classes only those defined there or named in its ``__all__`` (not what it imported)."""
    own = obj.__name__ if inspect.ismodule(obj) else None
    exported = set(getattr(obj, "__all__", ())) if own is not None else set()
    names: list[str] = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            value = inspect.getattr_static(obj, name)
        except AttributeError:
            continue
        if inspect.ismodule(value) or not suggest(value):
            continue
        defined = inspect.isfunction(value) or inspect.isclass(value)
        imported = own is not None and defined and getattr(value, "__module__", own) != own
        if imported and name not in exported:
            continue
        names.append(name)
    return names


def module_of_file(name: str) -> tuple[str, str] | None:
    """If ``name`` is a file's name or path (``app.py``, ``pkg/app.py``): the module it holds, as
    imported from the current directory (``pkg.app``), and the directory to import it from when
    it is outside the current one (else ''). None for anything else."""
    if not (name.endswith(".py") or "/" in name or os.sep in name):
        return None
    file = Path(name)
    stem = file.with_suffix("") if file.suffix == ".py" else file
    try:
        parts = stem.resolve().relative_to(Path.cwd().resolve()).parts
    except ValueError:
        parts = ()
    if parts and all(part.isidentifier() for part in parts):
        dotted, where = ".".join(parts), ""
    else:
        # Outside the current directory, or under a directory whose name cannot be part of a
        # module name (a hyphen, say): import it from its own directory.
        dotted, where = stem.name, str(file.resolve().parent)
    return dotted.removesuffix(".__init__"), where


def file_hint(module_name: str, attr: str) -> str | None:
    """If ``module_name`` is a file's name or path, the sentence that gives the import path
    meant (``app.py`` -> ``app:attr``, ``pkg/app.py`` -> ``pkg.app:attr``); else None."""
    found = module_of_file(module_name)
    if found is None:
        return None
    dotted, where = found
    meant = f"{dotted}:{attr}" if attr else dotted
    run_from = f", run from {where!r} (or with it on PYTHONPATH)" if where else ""
    return (
        f"{module_name!r} is a file name, not a module name: did you mean {meant!r}{run_from}? "
        f"An import path names a module as Python imports it, dotted and without '.py'."
    )
