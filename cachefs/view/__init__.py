"""The read-only FUSE view of the cache, by image reference (DESIGN.md "The view").

Modules, data flowing down::

    model       cache state -> CacheSnapshot -> tree of nodes (pure; every status text)
    changes     DirWatch: "did anything change here?" in one non-blocking read (inotify)
    refresh     Refresher: the current snapshot and tree, when to rescan, the rescans
    reader      disk files: leases, fds, mmap/mincore replies, pread into pooled buffers
    operations  pyfuse3 Operations: inodes (counted, forgotten), handles, invalidation
    status      status.json and metrics from a snapshot
    daemon      mount/umount/serve (trio + pyfuse3), logs; health: is a view live there

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
