"""Import a user's object by its path: ``"package.module:Name"`` or ``"package.module.Name"``.

Importing runs user module code, which may block; callers on the event loop run it in a thread.
This module imports nothing of the package but its errors.
"""

from __future__ import annotations

import importlib
from typing import Any

from .exceptions import ConfigError

__all__ = ["import_attr"]


def import_attr(path: str) -> Any:
    """Import ``"package.module:Name"`` or ``"package.module.Name"`` and return the object."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"Import path must be a non-empty string, got {path!r}.")
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"Import path {path!r} must look like 'package.module:Name' or 'package.module.Name'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"Cannot import module {module_name!r} of {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"Module {module_name!r} has no attribute {attr!r}.") from None
    return obj
