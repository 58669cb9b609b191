"""Is a view being served at a mountpoint? The answer ``cachefs status --mountpoint`` needs.

A health check that falls back to computing the status from the cache would say "fine"
about a view that is not mounted, or whose daemon died; so the mountpoint must be a live
cachefs mount, and a dead one (``ENOTCONN``) is named as such.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from ..errors import MountError
from .daemon import is_mountpoint


def require_live_view(mountpoint: Path) -> None:
    """Raise ``MountError`` unless a live view answers at ``mountpoint``."""
    if not is_mountpoint(mountpoint):
        raise MountError(f"no cachefs view is mounted at {mountpoint}",
                         hint=f"start it: cachefs mount {mountpoint}, or "
                              "systemctl start cachefs.service")
    # The kernel answers a known name from its caches even after the daemon died; a name
    # never looked up before must reach the daemon.
    probe = mountpoint / f".cachefs-health-{os.getpid()}-{time.monotonic_ns()}"
    try:
        try:
            os.stat(probe)
        except FileNotFoundError:
            pass
        os.stat(mountpoint / "status.json")
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise MountError(f"the view at {mountpoint} is dead (its daemon is gone)",
                             hint=f"detach it: cachefs umount --lazy {mountpoint}, then "
                                  "mount again") from None
        raise MountError(f"{mountpoint} is a mount point but not a cachefs view "
                         f"(status.json: {err.strerror})") from None
