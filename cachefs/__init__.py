"""cachefs: the msb-compatible OCI image cache (EROFS layers, fsmeta, VMDK) and a FUSE view.

The public API is small; everything else is reachable through its module. Names are
loaded on first use so ``import cachefs`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "GlobalCache": "cachefs.cache",
    "default_cache_dir": "cachefs.cache",
    "Digest": "cachefs.digest",
    "Reference": "cachefs.reference",
    "CachedImageMetadata": "cachefs.models",
    "CachefsError": "cachefs.errors",
    "PullPolicy": "cachefs.pipeline.pull",
    "PullResult": "cachefs.pipeline.pull",
    "pull": "cachefs.pipeline.pull",
    "load": "cachefs.pipeline.pull",
    "RegistryClient": "cachefs.oci",
    "ErofsImage": "cachefs.erofs.reader",
    "is_valid_erofs": "cachefs.erofs.reader",
}

__all__ = [  # noqa: RUF022 - grouped like _EXPORTS
    "__version__",
    "GlobalCache",
    "default_cache_dir",
    "Digest",
    "Reference",
    "CachedImageMetadata",
    "CachefsError",
    "PullPolicy",
    "PullResult",
    "pull",
    "load",
    "RegistryClient",
    "ErofsImage",
    "is_valid_erofs",
]

if TYPE_CHECKING:
    from .cache import GlobalCache, default_cache_dir
    from .digest import Digest
    from .erofs.reader import ErofsImage, is_valid_erofs
    from .errors import CachefsError
    from .models import CachedImageMetadata
    from .oci import RegistryClient
    from .pipeline.pull import PullPolicy, PullResult, load, pull
    from .reference import Reference

__getattr__ = lazy_exports(__name__, _EXPORTS)
