"""Package attributes loaded on first use (PEP 562), for every package that re-exports.

``import cachefs`` and the CLI's start-up then pay only for what a command touches: a pull
never loads the archive reader (tarfile), a load never loads the registry client (httpx).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``exports`` maps each name to the module
    that defines it (``.sub`` relative to ``package``, or absolute). A value is stored in
    the package once loaded, so the hook runs once per name, except where the name is
    also a submodule's (``cachefs.pipeline.pull``): the import system owns that attribute, and
    ``import cachefs.pipeline.pull`` must keep finding the module there."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        if f"{package}.{name}" not in sys.modules:
            setattr(sys.modules[package], name, value)
        return value

    return __getattr__
