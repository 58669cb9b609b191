"""glibc's allocator told to reuse the ingest's large buffers instead of faulting them in anew.

Why: ingesting a layer allocates a few hundred short-lived buffers of 256 KiB-1 MiB (blob
reads, inflate output, each freed a moment later in another thread). By default glibc
serves such sizes with ``mmap`` or from the top of an arena that it trims back after
each free, so every new buffer's pages fault in (and are zeroed) again: 15,000-24,000
page faults and 20-30 ms of CPU per Debian layer (170 MB), measured with ``perf stat``
on the ingest alone (issue 15). With buffers up to ``MMAP_BELOW`` taken from the arenas
and up to ``KEEP_FREE`` kept at an arena's top, freed buffers are reused: ~6,600 faults.
The price is ~5 MiB more peak RSS per ingesting process.

Process-wide and set once, by the first ingest of a process (the pull, ``load``, a layer
worker). Elsewhere than glibc (no ``mallopt``) nothing changes.
"""

from __future__ import annotations

import ctypes
import threading

MMAP_BELOW = 4 << 20
KEEP_FREE = 8 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_done = False


def reuse_large_buffers() -> None:
    """Set the thresholds (once per process; later calls return at once)."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _done = True
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc: its own defaults stay
            return
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt(_M_MMAP_THRESHOLD, MMAP_BELOW)
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREE)
