"""The read-only FUSE view of the cache, by image reference (DESIGN.md "The view").

``mount``/``umount`` are imported lazily so that ``python -m cachefs.view.daemon`` does
not import its own module twice.
"""

from __future__ import annotations

from typing import Any

from .model import CacheSnapshot, build_tree, scan_cache


def mount(*args: Any, **kwargs: Any) -> None:
    """See ``cachefs.view.daemon.mount``."""
    from .daemon import mount as _mount

    _mount(*args, **kwargs)


def umount(*args: Any, **kwargs: Any) -> None:
    """See ``cachefs.view.daemon.umount``."""
    from .daemon import umount as _umount

    _umount(*args, **kwargs)


__all__ = ["CacheSnapshot", "build_tree", "mount", "scan_cache", "umount"]
