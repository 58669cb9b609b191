"""pyfuse3 ``Operations`` serving the view model read-only: the shim between FUSE and the
model, the reader and the refresh engine.

Kept thin on purpose (like pyfuse3's ``passthroughfs``): the tree comes from
``model.build_tree`` (kept current by ``refresh.Refresher``), disk files are read by
``reader``; this class maps inodes and handles onto them.

* Inodes: one per path, assigned on first sight. A path keeps its number while it is in
  the tree or the kernel holds it (``lookup``/readdirplus count references, ``forget``
  drops them), so numbers are stable across refreshes and the tables stay the size of
  the tree plus what the kernel holds, however long the cache churns.
* Generated files (``status``, ``image.json``, ``disk.vmdk``, …) are opened with
  ``direct_io``: their content is per-snapshot and must never be served stale from the
  page cache. ``status.json``/``metrics`` are rendered from a fresh scan at each open.
* Disk files (``rootfs.img``, ``fsmeta.erofs``, ``layers/*``) are served from the artifact
  files with leases held while open (``reader``); ``keep_cache`` lets the kernel keep the
  pages across opens, and a refresh never invalidates an unchanged disk.
* Live: a lookup miss, and every walk through an image directory (entry timeout 0), asks
  the refresher whether the index may have changed (one non-blocking inotify read) and
  catches up if so, so pulls and removals are seen at once. Everything else has long
  timeouts and is invalidated explicitly when a rescan sees it change or go, so
  ``ls -lR`` is answered from the kernel's caches (READDIRPLUS fills them).
* No xattrs: EOPNOTSUPP, so ``ls -l`` stops probing one per file (``getxattr``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..cache.store import GlobalCache
from .model import (
    BytesNode,
    CacheSnapshot,
    ConcatNode,
    DirNode,
    DocNode,
    LiveNode,
    Node,
    SymlinkNode,
    resolve,
    walk,
)
from .reader import READ_BUF, BufferPool, ConcatHandle, close_concat, open_concat, read_concat
from .refresh import POLL_INTERVAL_S, Refresher
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

Path_ = tuple[str, ...]


@dataclass(slots=True)
class _BytesHandle:
    data: bytes


@dataclass(slots=True)
class _DirHandle:
    entries: list[tuple[str, Path_, Node]] = field(default_factory=list)


_Handle = _BytesHandle | ConcatHandle | _DirHandle


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
        self.refresher = Refresher(cache, msb_db, links=links, snapshot=snapshot)
        self.refresher.apply = self.apply
        self.msb_db = self.refresher.msb_db
        self.snapshot = self.refresher.snapshot
        self.root = self.refresher.root
        self._inodes: dict[Path_, int] = {(): pyfuse3.ROOT_INODE}
        self._paths: dict[int, Path_] = {pyfuse3.ROOT_INODE: ()}
        # The kernel's references per inode (lookups and readdirplus entries it counted).
        self._lookups: dict[int, int] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._uid = os.getuid()
        self._gid = os.getgid()
        # Per tree (dropped by ``apply``): inode → node and inode → attributes, so a
        # readdirplus or getattr is a dict hit instead of a path walk and an object build.
        self._node_cache: dict[int, tuple[Path_, Node]] = {}
        self._attr_cache: dict[int, pyfuse3.EntryAttributes] = {}
        self._live_sizes: dict[str, int] = {}
        self._buffers = BufferPool()

    # -- inode bookkeeping ------------------------------------------------------------

    def _inode(self, path: Path_) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _node(self, inode: int) -> tuple[Path_, Node]:
        hit = self._node_cache.get(inode)
        if hit is not None:
            return hit
        path = self._paths.get(inode)
        node = resolve(self.root, path) if path is not None else None
        if path is None or node is None:
            raise _errno(errno.ENOENT)
        self._node_cache[inode] = (path, node)
        return path, node

    async def _known(self, inode: int) -> tuple[Path_, Node]:
        """``_node``, catching up first if the inode's path is not in this tree.

        The kernel holds the inode, so the path existed; it may have gone and come back
        (a registry directory between an rm and the next pull), and the kernel asks for
        its attributes at every walk through it once they are invalidated (a child's
        invalidation invalidates its parent's): an older tree must not answer ENOENT.
        """
        try:
            return self._node(inode)
        except pyfuse3.FUSEError:
            await self.refresher.catch_up(time.time_ns())
            return self._node(inode)

    def _referenced(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped references; an inode it no longer holds whose path left the
        tree is forgotten here too (a path still in the tree keeps its number)."""
        for ino, n in inode_list:
            left = self._lookups.get(ino, 0) - n
            if left > 0:
                self._lookups[ino] = left
                continue
            self._lookups.pop(ino, None)
            path = self._paths.get(ino)
            if path is not None and ino != pyfuse3.ROOT_INODE \
                    and resolve(self.root, path) is None:
                self._drop(ino, path)

    def _drop(self, ino: int, path: Path_) -> None:
        del self._paths[ino]
        if self._inodes.get(path) == ino:
            del self._inodes[path]
        self._node_cache.pop(ino, None)
        self._attr_cache.pop(ino, None)

    def inode_counts(self) -> tuple[int, int]:
        """(inodes known, inodes the kernel holds): for status and tests of boundedness."""
        return len(self._paths), len(self._lookups)

    def _new_fh(self, handle: _Handle) -> int:
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

    def _attr(self, path: Path_, node: Node) -> pyfuse3.EntryAttributes:
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
                a.st_blksize = READ_BUF
        a.st_size = size
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        path, node = await self._known(inode)
        return self._attr(path, node)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        """A name the view does not know, or an image directory (which the kernel
        revalidates at every walk) when the index may have changed, first brings the view
        up to date: a path that exists in the cache when the lookup starts (after
        `cachefs pull` returned) is found, and a removed image is gone at once."""
        arrived = time.time_ns()
        child_name = os.fsdecode(name)
        path, child = self._child(parent_inode, child_name)
        if child is None or (isinstance(child, DirNode) and child.image
                             and self.refresher.may_have_changed()):
            await self.refresher.catch_up(arrived)
            path, child = self._child(parent_inode, child_name)
        if path is None or child is None:
            raise _errno(errno.ENOENT)
        attr = self._attr((*path, child_name), child)
        self._referenced(attr.st_ino)
        return attr

    def _child(self, parent_inode: int, name: str) -> tuple[Path_ | None, Node | None]:
        """The parent's path and its child ``name``; (None, None) if the parent is not in
        this tree: the kernel may still walk through a directory that left an older tree
        (its invalidation is asynchronous) and has come back in the cache since."""
        try:
            path, node = self._node(parent_inode)
        except pyfuse3.FUSEError:
            return None, None
        if not isinstance(node, DirNode):
            raise _errno(errno.ENOTDIR)
        return path, node.children.get(name)

    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        _, node = await self._known(inode)
        if not isinstance(node, SymlinkNode):
            raise _errno(errno.EINVAL)
        return os.fsencode(node.target)

    # -- directories --------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        path, node = await self._known(inode)
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
            attr = self._attr(path, node)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break
            self._referenced(attr.st_ino)  # readdirplus: the kernel counts the entry

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise _errno(errno.EROFS)
        path, node = await self._known(inode)
        if isinstance(node, DirNode):
            raise _errno(errno.EISDIR)
        if isinstance(node, BytesNode):
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(node.content)),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, DocNode):
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(node.render())),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, LiveNode):
            snap = await trio.to_thread.run_sync(self.refresher.fresh_snapshot)
            content = self._live_content(node, snap)
            return pyfuse3.FileInfo(fh=self._new_fh(_BytesHandle(content)),
                                    direct_io=True, keep_cache=False)
        if isinstance(node, ConcatNode):
            handle = await trio.to_thread.run_sync(open_concat, node, "/".join(path))
            return pyfuse3.FileInfo(fh=self._new_fh(handle), direct_io=False, keep_cache=True)
        raise _errno(errno.EINVAL)

    # pyfuse3's stub says bytes, but its read handler takes any contiguous buffer
    # (PyObject_GetBuffer, handlers.pxi); a memoryview spares a copy per read.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        handle = self._handles.get(fh)
        if isinstance(handle, _BytesHandle):
            return handle.data[off : off + size]
        if isinstance(handle, ConcatHandle):
            return await read_concat(handle, off, size, self._buffers)
        raise _errno(errno.EBADF)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, ConcatHandle):
            close_concat(handle)

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
        """EOPNOTSUPP, not ENOSYS: the kernel turns ENOSYS into "no ACL" (ENODATA) for
        ``system.posix_acl_access``, which ``ls -l`` then probes for every file, each probe
        a path walk that revalidates the image directory (a round trip here). Told "not
        supported" once, ``ls`` stops probing the whole file system: ``ls -lR`` of 1,000
        images makes 12,000 fewer round trips."""
        raise _errno(errno.EOPNOTSUPP)

    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        raise _errno(errno.ENOSYS)

    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        await self._known(inode)
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

    async def refresh_loop(self, interval: float = POLL_INTERVAL_S,
                           on_refresh: Callable[[], None] | None = None) -> None:
        """Rescan when the cache changes (``Refresher.loop``); runs until cancelled."""
        await self.refresher.loop(interval, on_refresh)

    async def apply(self, snap: CacheSnapshot, new_root: DirNode) -> None:
        """Swap in the tree of ``snap`` and invalidate what the kernel may have cached.

        A path that left the tree is invalidated, children first: FUSE drops an inode
        with its last dentry, so the kernel forgets it and ``forget`` lets its number go.
        Not invalidated "as deleted": that marks a directory dead in the kernel, and a
        walk that took the old dentry just before a directory of the same name came back
        (``images/<registry>`` between an rm and the next pull) would then find nothing.
        Until the kernel forgets it, a number still resolves by its path in the current
        tree, so such a walk finds what is there now.
        """
        old = dict(walk(self.root))
        new = dict(walk(new_root))
        self.snapshot = snap
        self.root = new_root
        self._node_cache = {}
        self._attr_cache = {}
        self._live_sizes = {}
        changed: list[int] = []
        gone: list[tuple[Path_, int]] = []
        for path, node in old.items():
            ino = self._inodes.get(path)
            if ino is None:
                continue  # the kernel never saw it
            if path not in new:
                gone.append((path, ino))
            elif _differs(node, new[path]):
                changed.append(ino)
        for path, ino in sorted(gone, key=lambda g: -len(g[0])):
            parent = self._inodes.get(path[:-1])
            if ino in self._lookups and parent is not None:
                pyfuse3.invalidate_entry_async(parent, os.fsencode(path[-1]),
                                               ignore_enoent=True)
        for path, ino in list(self._inodes.items()):
            if path not in new and ino not in self._lookups and ino != pyfuse3.ROOT_INODE:
                self._drop(ino, path)
        if changed:
            await trio.to_thread.run_sync(_invalidate_inodes, changed)


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
