"""Serving disk files: the bytes of cache artifacts behind one open view file.

A ``ConcatNode`` (``rootfs.img``: fsmeta then the layers; ``fsmeta.erofs`` and each layer:
one part) is opened as a ``ConcatHandle``: one fd per part, the SHARED msb leases
(FORMATS.md §1.5) that keep ``msb image rm`` and gc from deleting a part under a reader,
and a mapping of each part. A read whose pages are in the page cache (``mincore``) is
replied straight from the mapping (one kernel copy); the rest is ``pread`` into recycled
buffers (``BufferPool``), in a worker thread only from where a non-blocking read stopped.

The parts are content-addressed and immutable while they exist, so the kernel may keep
their pages across opens (``keep_cache``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from ..cache.locks import Leases
from ..errors import CachefsError
from .model import ConcatNode

log = logging.getLogger(__name__)

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# Reads land in recycled buffers of this size: libfuse's request buffer caps a read at
# 1 MiB, and a fresh bytearray per request costs a zero-fill (and often page faults) of
# the whole megabyte, a large part of the daemon's CPU on a cold read.
READ_BUF = 1 << 20
_POOL_MAX = 16


@dataclass(slots=True)
class ConcatHandle:
    """An open disk file: one fd per part, the parts' start offsets, held leases."""

    fds: list[int]
    starts: list[int]
    sizes: list[int]
    paths: list[Path]
    leases: Leases
    total: int
    # Each part mapped (copy-on-write, never written: the pages are the page cache's own)
    # with its address for mincore; empty if mapping failed (pread serves everything).
    maps: list[mmap.mmap] = field(default_factory=list)
    addrs: list[int] = field(default_factory=list)


class BufferPool:
    """Recycled 1 MiB read buffers (trio thread only)."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def take(self, n: int) -> bytearray:
        if n <= READ_BUF and self._free:
            return self._free.pop()
        return bytearray(max(n, READ_BUF))

    def give_back_soon(self, buf: bytearray) -> None:
        """pyfuse3 copies a reply to the kernel right after the handler returns, before
        any other task runs; the buffer is free again from the next scheduler tick on."""
        if len(buf) == READ_BUF and len(self._free) < _POOL_MAX:
            trio.lowlevel.current_trio_token().run_sync_soon(self._free.append, buf)


async def read_concat(h: ConcatHandle, off: int, size: int, pool: BufferPool
                      ) -> memoryview | bytes:
    """Page-cache hits are served inline (a thread hop costs more than the copy); the
    rest, from where the non-blocking read stopped, in a worker thread."""
    n = min(off + size, h.total) - off
    if n <= 0:
        return b""
    if h.maps:
        # Zero-copy: reply straight from the mapped artifact when its pages are in the
        # page cache. The kernel then copies page cache → FUSE page once, instead of
        # pread copying into a buffer and the reply copying that again.
        i = bisect_right(h.starts, off) - 1
        rel = off - h.starts[i]
        # (A page evicted between mincore and the reply is faulted in by the kernel's
        # copy: a rare short stall of this thread, never wrong data.)
        if rel + n <= h.sizes[i] and _resident(h.addrs[i] + rel, n):
            return memoryview(h.maps[i])[rel : rel + n]
    buf = pool.take(n)
    view = memoryview(buf)[:n]
    done = fill_concat(h, view, off, nowait=True)
    if done < n:
        await trio.to_thread.run_sync(fill_concat, h, view[done:], off + done)
    pool.give_back_soon(buf)
    return view


_UNLEASED: set[Path] = set()


def open_concat(node: ConcatNode, where: str) -> ConcatHandle:
    """Lease, open and check every part; all or nothing."""
    leases = Leases()
    fds: list[int] = []
    try:
        for part, _ in node.parts:
            # Non-blocking: a deleter holding the lease exclusively means the file is going.
            # Best effort: on a cache the daemon may not write, no lease can be taken;
            # the disk is still served and status says so (``model.lease_problem``).
            if not leases.add_shared(part, blocking=False, best_effort=True) \
                    and part not in _UNLEASED and len(_UNLEASED) < 10_000:
                _UNLEASED.add(part)  # said once per file, not at every open
                log.warning("%s: no lease on %s (the cache is not writable for the view)",
                            where, part)
        starts, sizes, paths = [], [], []
        offset = 0
        for part, size in node.parts:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            # VMMs and cat read disks front to back: a doubled readahead window on the
            # artifact keeps its pages ahead of FUSE's requests on a cold read.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            actual = os.fstat(fd).st_size
            if actual != size:
                log.warning("%s: %s changed size (%d, expected %d)", where, part, actual, size)
                raise pyfuse3.FUSEError(errno.ESTALE)
            starts.append(offset)
            sizes.append(size)
            paths.append(part)
            offset += size
        handle = ConcatHandle(fds, starts, sizes, paths, leases, offset)
        _map_parts(handle)
        return handle
    except (CachefsError, OSError) as err:
        for fd in fds:
            os.close(fd)
        leases.release()
        log.warning("cannot open %s: %s", where, err)
        code = err.errno if isinstance(err, OSError) and err.errno == errno.ENOENT else errno.EIO
        raise pyfuse3.FUSEError(code) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        leases.release()
        raise


def fill_concat(h: ConcatHandle, view: memoryview, off: int, *, nowait: bool = False) -> int:
    """Read bytes [off, off+len(view)) of the concatenation into ``view``; returns the count.

    With ``nowait``, only data already in the page cache is read (``RWF_NOWAIT``); it
    stops at the first byte that would block and says how far it got. Without, it reads
    everything or raises EIO.
    """
    end = off + len(view)
    flags = _RWF_NOWAIT if nowait else 0
    if nowait and not flags:
        return 0  # no RWF_NOWAIT here: everything goes through the blocking path
    i = bisect_right(h.starts, off) - 1
    pos = off
    while pos < end:
        start, part_size = h.starts[i], h.sizes[i]
        n = min(end, start + part_size) - pos
        try:
            got = os.preadv(h.fds[i], [view[pos - off : pos - off + n]], pos - start, flags)
        except OSError as err:
            if nowait:
                return pos - off  # EAGAIN: the blocking path continues from here
            log.warning("read of %s failed: %s", h.paths[i], err)
            raise pyfuse3.FUSEError(errno.EIO) from None
        pos += got
        if got != n:
            if nowait:
                return pos - off
            if got == 0:
                log.warning("%s is shorter than when it was opened", h.paths[i])
                raise pyfuse3.FUSEError(errno.EIO)
            continue  # a short read: ask again for the rest
        i += 1
    return pos - off


_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_mincore.restype = ctypes.c_int
_PAGE = mmap.PAGESIZE
_MINCORE_VEC = ctypes.create_string_buffer(READ_BUF // _PAGE + 2)  # trio thread only


def _resident(addr: int, n: int) -> bool:
    """Are all pages of the mapped range [addr, addr+n) in the page cache (mincore)?"""
    start = addr & ~(_PAGE - 1)
    pages = (addr + n - start + _PAGE - 1) // _PAGE
    if pages > len(_MINCORE_VEC):
        return False
    if _mincore(start, addr + n - start, _MINCORE_VEC) != 0:
        return False
    return ctypes.string_at(_MINCORE_VEC, pages).find(b"\0") < 0


def _map_parts(h: ConcatHandle) -> None:
    """Map every part for zero-copy replies; on any failure keep the pread path only.

    ACCESS_COPY (private, writable) only because ctypes needs a writable buffer to learn
    the address for mincore; nothing ever writes, so every page stays the page cache's.
    Under strict overcommit a huge layer may be refused: then replies are copied.
    """
    maps: list[mmap.mmap] = []
    addrs: list[int] = []
    try:
        for fd, size in zip(h.fds, h.sizes, strict=True):
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            maps.append(mm)
            anchor = ctypes.c_char.from_buffer(mm)  # needs a writable buffer: ACCESS_COPY
            addrs.append(ctypes.addressof(anchor))
            del anchor
    except (OSError, ValueError, BufferError) as err:
        log.info("not mapping %s (%s): replies are copied", h.paths, err)
        for mm in maps:
            _close_map(mm)
        return
    h.maps, h.addrs = maps, addrs


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a reply view still alive: the mapping goes when that view does


def close_concat(h: ConcatHandle) -> None:
    for mm in h.maps:
        _close_map(mm)
    h.maps.clear()
    h.addrs.clear()
    for fd in h.fds:
        try:
            os.close(fd)
        except OSError:
            pass
    h.fds.clear()
    h.leases.release()
