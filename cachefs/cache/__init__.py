"""The msb-compatible on-disk cache: paths, metadata, locks, leases, publication.

Names load on first use: importing ``cachefs.cache.locks`` (or ``.location``) must not
import the store, which brings the models and trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GlobalCache": "cachefs.cache.store",
    "RefRecord": "cachefs.cache.store",
    "read_metadata_file": "cachefs.cache.store",
    "default_cache_dir": "cachefs.cache.location",
}

__all__ = ["GlobalCache", "RefRecord", "default_cache_dir", "read_metadata_file"]

if TYPE_CHECKING:
    from .location import default_cache_dir
    from .store import GlobalCache, RefRecord, read_metadata_file


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cachefs.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
