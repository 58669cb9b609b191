"""pyfuse3 ``Operations`` serving the view model read-only, refreshed as the cache changes.

Kept thin on purpose (like pyfuse3's ``passthroughfs``): the tree comes from
``model.build_tree``; this class only maps it onto FUSE requests.

* Inodes: one per path, assigned on first sight and never reused or changed for the life
  of the mount, so a path that vanishes and comes back keeps its number.
* Generated files (``status``, ``image.json``, ``disk.vmdk``, …) are opened with
  ``direct_io``: their content is per-snapshot and must never be served stale from the
  page cache. ``status.json``/``metrics`` are rendered from a fresh scan at each open.
* Disk files (``rootfs.img``, ``fsmeta.erofs``, ``layers/*``) are served from the artifact
  files (for ``rootfs.img`` fsmeta then the layers; the others one file each), each open
  handle keeping its own fds, mappings and SHARED msb leases (FORMATS.md §1.5) so that
  ``msb image rm`` or gc does not delete them under a reader. Cached pages are replied
  straight from the mapping (one kernel copy); the rest is ``pread`` into recycled
  buffers, in a worker thread when it would block. The artifacts are content-addressed
  and immutable, so ``keep_cache`` lets the kernel keep the pages across opens, and a
  refresh never invalidates an unchanged ``rootfs.img``.
* Live: ``refresh_loop`` polls a cheap signature (directories, msb's database, the
  identity of every metadata file, record and artifact), rescans only when it changes and
  tells the kernel to drop entries and attributes of nodes that changed or went away. A
  lookup miss, and every walk through an image directory (entry timeout 0), first
  checks the index (``catch_up``), so pulls and removals are seen at once. That explicit
  invalidation is what keeps the view fresh, so attribute/entry timeouts are long and
  ``ls -lR`` is answered from
  the kernel's caches (READDIRPLUS fills them; attributes are built once per tree).
* No xattrs: ENOSYS, so the kernel stops asking (``ls -l`` probes one per file).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..cache.index import default_msb_db
from ..cache.locks import Leases
from ..cache.store import GlobalCache
from ..errors import CachefsError
from .model import (
    BytesNode,
    CacheSnapshot,
    ConcatNode,
    DirNode,
    DocNode,
    LiveNode,
    Node,
    SymlinkNode,
    build_tree,
    resolve,
    scan_cache,
    walk,
)
from .status import render_metrics, render_status_json

log = logging.getLogger(__name__)

# Freshness comes from explicit invalidation (``apply``): every node that changes or goes
# away is invalidated the moment a rescan sees it, and new names are never cached
# negatively. The timeouts only bound how long a lost invalidation could linger, so they
# can be long enough that `ls -lR` over thousands of entries is answered from the
# kernel's caches (a timeout shorter than the listing makes the kernel re-ask mid-way).
ATTR_TIMEOUT_S = 30.0
# status.json and metrics change with every scan; their size is a snapshot's guess anyway.
LIVE_ATTR_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.5
# The poll signature covers every artifact file's identity, so in-place corruption is
# seen at the next poll; a full rescan is only a safety net (e.g. a metadata json
# rewritten in place with the same size and mtime).
FULL_RESCAN_S = 60.0
# A signature whose newest file time is this close to its scan's start is not trusted.
_RACY_NS = 50_000_000
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
# rootfs.img reads land in recycled buffers of this size: libfuse's request buffer caps a
# read at 1 MiB, and a fresh bytearray per request costs a zero-fill (and often page
# faults) of the whole megabyte, a large part of the daemon's CPU on a cold read.
_READ_BUF = 1 << 20
_POOL_MAX = 16


@dataclass(slots=True)
class _BytesHandle:
    data: bytes


@dataclass(slots=True)
class _ConcatHandle:
    """An open ``rootfs.img``: one fd per part, the parts' start offsets, held leases."""

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


@dataclass(slots=True)
class _DirHandle:
    entries: list[tuple[str, tuple[str, ...], Node]] = field(default_factory=list)


def _errno(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class ViewOperations(pyfuse3.Operations):
    """The read-only view of one cache."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        cache: GlobalCache,
        msb_db: Path | None = None,
        *,
        snapshot: CacheSnapshot | None = None,
        log_target: str | None = None,
        links: bool = False,
    ) -> None:
        super().__init__()
        self.links = links  # fsmeta/layers as symlinks (``cachefs mount --symlinks``)
        self.cache = cache
        self.log_target = log_target  # where this daemon logs, for status.json
        self.msb_db = default_msb_db(cache) if msb_db is None else msb_db
        # The signatures are taken before the scan: a change racing it is seen later.
        self._signature: tuple[object, ...] | None = None
        self._index_sig: tuple[object, ...] = ()
        self._scan_started_ns = 0
        self._scan_lock = trio.Lock()
        if snapshot is None:
            self._scan_started_ns = time.time_ns()
            self._index_sig = self._index_signature()
            self._signature = self._watch_signature()
            snapshot = scan_cache(cache, self.msb_db)
        self.snapshot = snapshot
        self.root = build_tree(self.snapshot, links=links)
        self._inodes: dict[tuple[str, ...], int] = {(): pyfuse3.ROOT_INODE}
        self._paths: dict[int, tuple[str, ...]] = {pyfuse3.ROOT_INODE: ()}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, _BytesHandle | _ConcatHandle | _DirHandle] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        # Per tree (dropped by ``apply``): inode → node and inode → attributes, so a
        # readdirplus or getattr is a dict hit instead of a path walk and an object build.
        self._node_cache: dict[int, tuple[tuple[str, ...], Node]] = {}
        self._attr_cache: dict[int, pyfuse3.EntryAttributes] = {}
        self._live_sizes: dict[str, int] = {}
        self._free_bufs: list[bytearray] = []

    # -- inode bookkeeping ------------------------------------------------------------

    def _inode(self, path: tuple[str, ...]) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _node(self, inode: int) -> tuple[tuple[str, ...], Node]:
        hit = self._node_cache.get(inode)
        if hit is not None:
            return hit
        path = self._paths.get(inode)
        node = resolve(self.root, path) if path is not None else None
        if path is None or node is None:
            raise _errno(errno.ENOENT)
        self._node_cache[inode] = (path, node)
        return path, node

    def _new_fh(self, handle: _BytesHandle | _ConcatHandle | _DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    # -- attributes -------------------------------------------------------------------

    def _live_content(self, node: LiveNode, snap: CacheSnapshot) -> bytes:
        if node.kind == "status.json":
            return render_status_json(snap, log=self.log_target)
        return render_metrics(snap)

    def _live_size(self, node: LiveNode) -> int:
        size = self._live_sizes.get(node.kind)
        if size is None:
            size = self._live_sizes[node.kind] = len(self._live_content(node, self.snapshot))
        return size

    def _attr(self, path: tuple[str, ...], node: Node) -> pyfuse3.EntryAttributes:
        """The node's attributes, built once per tree (pyfuse3 copies them into replies)."""
        ino = self._inode(path)
        a = self._attr_cache.get(ino)
        if a is None:
            a = self._attr_cache[ino] = self._build_attr(ino, node)
        return a

    def _build_attr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        timeout = LIVE_ATTR_TIMEOUT_S if isinstance(node, LiveNode) else ATTR_TIMEOUT_S
        a.entry_timeout = timeout
        a.attr_timeout = timeout
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_blksize = 4096
        a.st_rdev = 0
        if isinstance(node, DirNode):
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2 + sum(isinstance(c, DirNode) for c in node.children.values())
            size = 0
            if node.image:
                a.entry_timeout = 0  # revalidated by every path walk: see ``lookup``
        elif isinstance(node, SymlinkNode):
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
            size = len(os.fsencode(node.target))
        else:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            if isinstance(node, BytesNode):
                size = len(node.content)
            elif isinstance(node, DocNode):
                size = node.size
            elif isinstance(node, LiveNode):
                size = self._live_size(node)
            else:
                size = node.size
                # The preferred I/O size: one full FUSE request (tools like cat size
                # their buffer by it; 4 KiB would make them ask in 128 KiB steps).
                a.st_blksize = _READ_BUF
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        path, node = self._node(inode)
        return self._attr(path, node)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        """A name the view does not know, or an image directory (which the kernel
        revalidates at every walk), first brings the view up to date: a path that exists
        in the cache when the lookup starts (after `cachefs pull` returned) is found, and
        a removed image is gone at once."""
        arrived = time.time_ns()
        child_name = os.fsdecode(name)
        path, child = self._child(parent_inode, child_name)
        if child is None or (isinstance(child, DirNode) and child.image):
            await self.catch_up(arrived)
            path, child = self._child(parent_inode, child_name)
        if child is None:
            raise _errno(errno.ENOENT)
        return self._attr((*path, child_name), child)

    def _child(self, parent_inode: int, name: str) -> tuple[tuple[str, ...], Node | None]:
        path, node = self._node(parent_inode)
        if not isinstance(node, DirNode):
            raise _errno(errno.ENOTDIR)
        return path, node.children.get(name)

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        _, node = self._node(inode)
        if not isinstance(node, SymlinkNode):
            raise _errno(errno.EINVAL)
        return os.fsencode(node.target)

    # -- directories --------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        path, node = self._node(inode)
        if not isinstance(node, DirNode):
            raise _errno(errno.ENOTDIR)
        entries = [(name, (*path, name), child) for name, child in node.children.items()]
        return self._new_fh(_DirHandle(entries))

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, _DirHandle):
            raise _errno(errno.EBADF)
        for i in range(start_id, len(handle.entries)):
            name, path, node = handle.entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(path, node), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise _errno(errno.EROFS)
        path, node = self._node(inode)
        if isinstance(node, DirNode):
            raise _errno(errno.EISDIR)
        if isinstance(node, BytesNode):
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(node.content)),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, DocNode):
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(node.render())),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, LiveNode):
            snap = await trio.to_thread.run_sync(self._fresh_snapshot)
            content = self._live_content(node, snap)
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(content)),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, ConcatNode):
            handle = await trio.to_thread.run_sync(_open_concat, node, "/".join(path))
            return pyfuse3.FileInfo(fh=self._new_fh(handle), direct_io=False, keep_cache=True)
        raise _errno(errno.EINVAL)

    # pyfuse3's stub says bytes, but its read handler takes any contiguous buffer
    # (PyObject_GetBuffer, handlers.pxi); a memoryview spares a copy per read.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        handle = self._handles.get(fh)
        if isinstance(handle, _BytesHandle):
            return handle.data[off : off + size]
        if isinstance(handle, _ConcatHandle):
            return await self._read_concat(handle, off, size)
        raise _errno(errno.EBADF)

    async def _read_concat(self, h: _ConcatHandle, off: int, size: int) -> memoryview | bytes:
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
        buf = self._free_bufs.pop() if n <= _READ_BUF and self._free_bufs else None
        if buf is None:
            buf = bytearray(max(n, _READ_BUF))
        view = memoryview(buf)[:n]
        done = _fill_concat(h, view, off, nowait=True)
        if done < n:
            await trio.to_thread.run_sync(_fill_concat, h, view[done:], off + done)
        if len(buf) == _READ_BUF and len(self._free_bufs) < _POOL_MAX:
            # pyfuse3 copies the reply to the kernel right after this returns, before any
            # other task runs; the buffer is free again from the next scheduler tick on.
            trio.lowlevel.current_trio_token().run_sync_soon(self._free_bufs.append, buf)
        return view

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _ConcatHandle):
            _close_concat(handle)

    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        total = sum(a.size for a in self.snapshot.layers.values() if a.exists)
        total += sum(a.size for a in self.snapshot.fsmeta.values() if a.exists)
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        # ENOSYS (not ENODATA): the kernel then stops asking for the life of the mount and
        # answers "not supported" itself. `ls -l` probes an xattr of every entry, which
        # would otherwise cost one round trip to this daemon per file listed.
        raise _errno(errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        raise _errno(errno.ENOSYS)

    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        self._node(inode)
        return not mode & os.W_OK

    # -- everything that would write ---------------------------------------------------

    async def setattr(self, *args: Any, **kw: Any) -> pyfuse3.EntryAttributes:
        raise _errno(errno.EROFS)

    async def write(self, *args: Any, **kw: Any) -> int:
        raise _errno(errno.EROFS)

    async def create(self, *args: Any, **kw: Any) -> Any:
        raise _errno(errno.EROFS)

    async def _refuse(self, *args: Any, **kw: Any) -> Any:
        raise _errno(errno.EROFS)

    mknod = mkdir = unlink = rmdir = symlink = rename = link = _refuse
    setxattr = removexattr = _refuse

    # -- live refresh --------------------------------------------------------------------

    def _index_signature(self) -> tuple[object, ...]:
        """Which images exist: msb's database (and WAL) and the directories of metadata
        files and reference records (4 ``stat`` calls). Every pull, ``cachefs rm`` and
        ``msb image rm`` changes one of them, so a lookup can afford to check it."""
        c = self.cache
        return tuple(_identity(p) for p in (self.msb_db, Path(f"{self.msb_db}-wal"),
                                            c.manifests_dir(), c.refs_dir()))

    def _watch_signature(self) -> tuple[object, ...]:
        """Fingerprint of everything whose change can change the view (the poll's rule).

        The index signature, the directories, and the identity (inode, size, mtime,
        ctime) of every metadata file, reference record and artifact: an in-place edit or
        a ``chmod`` changes a file's ctime but not its directory's mtime. A ``stat`` is a
        few µs per file, far below a rescan.
        """
        c = self.cache
        sig: list[object] = [self._index_signature()]
        for d in (c.vmdk_dir(), c.manifests_dir(), c.refs_dir(), c.layers_dir(),
                  c.fsmeta_dir()):
            sig.append(_identity(d))
            for e in _scandir(d):
                try:
                    est = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                sig.append((e.name, est.st_ino, est.st_size, est.st_mtime_ns,
                            est.st_ctime_ns, est.st_mode))
        return tuple(sig)

    def _fresh_snapshot(self) -> CacheSnapshot:
        """A scan for status.json/metrics: reuses the current index if nothing it read
        changed since (the poll signature), else scans everything (blocking)."""
        sig = self._watch_signature()
        if sig == self._signature:
            return scan_cache(self.cache, self.msb_db, previous=self.snapshot)
        return scan_cache(self.cache, self.msb_db)

    def _racy(self) -> bool:
        """Was the last scan's index taken in the same clock tick as a change to it?

        File times come from a coarse clock: a second change within the same tick keeps
        the signature, so a signature too close to its scan is not trusted (git's
        "racily clean" rule); the next check rescans once more.
        """
        newest = max((i[2] for i in self._index_sig if isinstance(i, tuple)), default=0)
        return self._scan_started_ns - newest < _RACY_NS

    async def catch_up(self, since_ns: int) -> None:
        """Make the view at least as new as the cache was at ``since_ns``.

        Called on a lookup miss (and for an image directory): if a scan started after
        ``since_ns`` it already saw that state; else a rescan runs if the index changed.
        Concurrent callers share one scan, which is the rate limit.
        """
        async with self._scan_lock:
            if self._scan_started_ns > since_ns:
                return
            # Inline, not in a worker thread: four stat calls of directories the kernel
            # has cached take microseconds, and a thread hop on every walk through an
            # image directory cost a VMM's open a millisecond or more on a busy host.
            sig = self._index_signature()
            if sig == self._index_sig and not self._racy():
                return
            await self._rescan()

    async def _rescan(self) -> bool:
        """Scan, build and apply (the caller holds ``_scan_lock``); False if it failed."""
        started = time.time_ns()
        try:
            # Signatures before the scan: a change racing the scan is seen next time.
            # The tree is built in the worker thread too: for 1,000 images it takes
            # ~0.15 s, which on the trio thread would stall every request meanwhile.
            idx, sig, snap, tree = await trio.to_thread.run_sync(self._scan_all)
        except (CachefsError, OSError) as err:
            log.warning("rescan of %s failed, keeping the previous view: %s",
                        self.cache.root, err)
            self._signature = None
            return False
        await self.apply(snap, tree)
        self._index_sig, self._signature, self._scan_started_ns = idx, sig, started
        return True

    def _scan_all(self) -> tuple[tuple[object, ...], tuple[object, ...], CacheSnapshot,
                                 DirNode]:
        idx = self._index_signature()
        sig = self._watch_signature()
        snap = scan_cache(self.cache, self.msb_db)
        return idx, sig, snap, build_tree(snap, links=self.links)

    async def refresh_loop(self, interval: float = POLL_INTERVAL_S,
                           on_refresh: Callable[[], None] | None = None) -> None:
        """Rescan when the cache changes (polled); runs until cancelled."""
        since_full = 0.0
        while True:
            await trio.sleep(interval)
            since_full += interval
            sig = await trio.to_thread.run_sync(self._watch_signature)
            if sig == self._signature and not self._racy() and since_full < FULL_RESCAN_S:
                continue
            async with self._scan_lock:
                if sig == self._signature and not self._racy() and since_full < FULL_RESCAN_S:
                    continue  # a lookup's catch-up scanned meanwhile
                since_full = 0.0
                done = await self._rescan()
            if done and on_refresh is not None:
                on_refresh()

    async def apply(self, snap: CacheSnapshot, new_root: DirNode | None = None) -> None:
        """Swap in the tree of ``snap`` (``new_root`` if already built from it) and
        invalidate what the kernel may have cached."""
        if new_root is None:
            new_root = build_tree(snap, links=self.links)
        old = dict(walk(self.root))
        new = dict(walk(new_root))
        self.snapshot = snap
        self.root = new_root
        self._node_cache = {}
        self._attr_cache = {}
        self._live_sizes = {}
        changed: list[int] = []
        for path, node in old.items():
            ino = self._inodes.get(path)
            if ino is None:
                continue  # the kernel never saw it
            if path not in new:
                parent = self._inodes.get(path[:-1])
                if parent is not None:
                    pyfuse3.invalidate_entry_async(parent, os.fsencode(path[-1]),
                                                   ignore_enoent=True)
            elif _differs(node, new[path]):
                changed.append(ino)
        if changed:
            await trio.to_thread.run_sync(_invalidate_inodes, changed)


def _identity(path: Path) -> tuple[int, int, int, int, int] | None:
    """(inode, size, mtime, ctime, mode) of ``path``, None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:
        return []


def _differs(a: Node, b: Node) -> bool:
    if isinstance(a, DirNode) and isinstance(b, DirNode):
        return a.mtime_ns != b.mtime_ns or a.children.keys() != b.children.keys()
    return a != b


def _invalidate_inodes(inodes: list[int]) -> None:
    """Drop cached attributes and pages (a worker thread: the kernel may call back into us)."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError as err:
            if err.errno != errno.ENOENT:
                log.warning("cannot invalidate inode %d: %s", ino, err)


# -- rootfs.img handles (blocking; run in worker threads) -------------------------------------


_UNLEASED: set[Path] = set()


def _open_concat(node: ConcatNode, where: str) -> _ConcatHandle:
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
                raise _errno(errno.ESTALE)
            starts.append(offset)
            sizes.append(size)
            paths.append(part)
            offset += size
        handle = _ConcatHandle(fds, starts, sizes, paths, leases, offset)
        _map_parts(handle)
        return handle
    except (CachefsError, OSError) as err:
        for fd in fds:
            os.close(fd)
        leases.release()
        log.warning("cannot open %s: %s", where, err)
        code = err.errno if isinstance(err, OSError) and err.errno == errno.ENOENT else errno.EIO
        raise _errno(code) from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        leases.release()
        raise


def _fill_concat(h: _ConcatHandle, view: memoryview, off: int, *, nowait: bool = False) -> int:
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
            raise _errno(errno.EIO) from None
        pos += got
        if got != n:
            if nowait:
                return pos - off
            if got == 0:
                log.warning("%s is shorter than when it was opened", h.paths[i])
                raise _errno(errno.EIO)
            continue  # a short read: ask again for the rest
        i += 1
    return pos - off


_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_mincore.restype = ctypes.c_int
_PAGE = mmap.PAGESIZE
_MINCORE_VEC = ctypes.create_string_buffer(_READ_BUF // _PAGE + 2)  # trio thread only


def _resident(addr: int, n: int) -> bool:
    """Are all pages of the mapped range [addr, addr+n) in the page cache (mincore)?"""
    start = addr & ~(_PAGE - 1)
    pages = (addr + n - start + _PAGE - 1) // _PAGE
    if pages > len(_MINCORE_VEC):
        return False
    if _mincore(start, addr + n - start, _MINCORE_VEC) != 0:
        return False
    return ctypes.string_at(_MINCORE_VEC, pages).find(b"\0") < 0


def _map_parts(h: _ConcatHandle) -> None:
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


def _close_concat(h: _ConcatHandle) -> None:
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
