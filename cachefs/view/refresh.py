"""Keeping the view as new as the cache: when to rescan, and the rescans themselves.

Two questions with two costs:

* Lookups ask "could an image have come or gone?" on every walk through an image
  directory (``may_have_changed``): one non-blocking read of an inotify queue watching
  the index (msb's database directory, the metadata and reference-record directories).
  Only if something happened is the index signature taken (4 ``stat`` calls) and, if it
  changed, the cache rescanned (``catch_up``). Without inotify every walk takes the
  signature, as before.
* The poll (``loop``) asks "did anything that shows in the view change?" (an artifact
  corrupted in place, a ``chmod``): the identity of every metadata file, record and
  artifact, taken only when a watched directory saw an event (or inotify is missing), and
  a full rescan every ``FULL_RESCAN_S`` as a safety net.

A rescan builds the snapshot and its tree in a worker thread and hands both to the
``apply`` callback (the FUSE operations swap trees and invalidate what the kernel cached).
Concurrent callers share one scan (a lock), which is the rate limit.

A rescan that fails keeps the view as it was: in particular one that cannot read msb's
database (msb holds it longer than the view waits), which read as "no images" would hide
every image only that database names from a guest about to open its ``rootfs.img``
(``scan``). Only the poll retries, at growing intervals: a walk never waits for one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from ..cache.index import default_msb_db
from ..cache.locks import is_lock_entry
from ..cache.store import GlobalCache
from ..errors import CachefsError, MsbDbUnreadable
from .changes import DirWatch
from .model import CacheSnapshot, DirNode, build_tree, scan_cache
from .noise import db_identity, not_a_change

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
# The poll signature covers every artifact file's identity, so in-place corruption is
# seen at the next poll; a full rescan is only a safety net (e.g. a metadata json
# rewritten in place with the same size and mtime, or a change on another NFS client).
FULL_RESCAN_S = 60.0
# A signature whose newest file time is this close to its scan's start is not trusted.
_RACY_NS = 50_000_000
# After a failed rescan the poll retries after POLL_INTERVAL_S, then after doubling waits
# up to this: msb may hold its database for long, and each try waits out the view's busy
# timeout in a worker thread.
RETRY_MAX_S = 4.0

Identity = tuple[int, int, int, int, int] | None
Apply = Callable[[CacheSnapshot, DirNode], Awaitable[None]]


class Refresher:
    """The current snapshot and tree of one cache, and the rules for renewing them."""

    def __init__(self, cache: GlobalCache, msb_db: Path | None = None, *,
                 links: bool = False, snapshot: CacheSnapshot | None = None) -> None:
        self.cache = cache
        self.msb_db = default_msb_db(cache) if msb_db is None else msb_db
        self.links = links
        self.apply: Apply | None = None  # set by the owner of the tree
        # The view's own traces (its database reads, its leases) are no change: counted,
        # each rescan would cause the next (``noise``).
        ignore = not_a_change(self.msb_db)
        self._index_watch = DirWatch(self._index_dirs(), ignore=ignore)
        self._content_watch = DirWatch([*self._index_dirs(), cache.vmdk_dir(),
                                        cache.layers_dir(), cache.fsmeta_dir()],
                                       ignore=ignore)
        # The signatures are taken before the scan: a change racing it is seen later.
        self._signature: tuple[object, ...] | None = None
        self._index_sig: tuple[object, ...] = ()
        self._scan_started_ns = 0
        self._lock = trio.Lock()
        self._pending = False  # index events drained but not yet checked
        # Set while the last scan failed: when the poll tries again (``time.monotonic``).
        self._retry_at: float | None = None
        self._retry_wait = POLL_INTERVAL_S
        # Why the view shows its last good state instead of the cache's (a cache-wide
        # problem in status.json), or None.
        self.stale: str | None = None
        if snapshot is None:
            self._scan_started_ns = time.time_ns()
            self._index_sig = self.index_signature()
            self._signature = self.watch_signature()
            try:
                snapshot = self.scan()
            except MsbDbUnreadable:  # the poll tries again until it can read it
                snapshot = self.scan(first=True)
                self._failed(None)
        self.snapshot = snapshot
        self.root = build_tree(snapshot, links=links)

    def _index_dirs(self) -> list[Path]:
        return [self.msb_db.parent, self.cache.manifests_dir(), self.cache.refs_dir()]

    # -- signatures ----------------------------------------------------------------------

    def index_signature(self) -> tuple[object, ...]:
        """Which images exist: msb's database (and WAL) and the directories of metadata
        files and reference records (4 ``stat`` calls). Every pull, ``cachefs rm`` and
        ``msb image rm`` changes one of them; the view's own reads of the database do not
        (``noise.db_identity``)."""
        c = self.cache
        return (db_identity(self.msb_db), db_identity(Path(f"{self.msb_db}-wal")),
                _identity(c.manifests_dir()), _identity(c.refs_dir()))

    def watch_signature(self) -> tuple[object, ...]:
        """Fingerprint of everything whose change can change the view (the poll's rule).

        The index signature, the directories' owners and modes, and the identity (inode,
        size, mtime, ctime) of every metadata file, reference record and artifact: an
        in-place edit or a ``chmod`` changes a file's ctime but not its directory's mtime.
        Leases and locks are not content (``is_lock_entry``), nor is a directory's mtime,
        which the first lease in it changes (its entries are all listed). A ``stat`` is a
        few µs per file, far below a rescan.
        """
        c = self.cache
        sig: list[object] = [self.index_signature()]
        for d in (c.vmdk_dir(), c.manifests_dir(), c.refs_dir(), c.layers_dir(),
                  c.fsmeta_dir()):
            sig.append(_owner_and_mode(d))
            for e in _scandir(d):
                if is_lock_entry(e.name):
                    continue
                try:
                    est = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                sig.append((e.name, est.st_ino, est.st_size, est.st_mtime_ns,
                            est.st_ctime_ns, est.st_mode))
        return tuple(sig)

    def _racy(self) -> bool:
        """Was the last scan's index taken in the same clock tick as a change to it?

        File times come from a coarse clock: a second change within the same tick keeps
        the signature, so a signature too close to its scan is not trusted (git's
        "racily clean" rule); the next check rescans once more.
        """
        newest = max((i[2] for i in self._index_sig if isinstance(i, tuple)), default=0)
        return self._scan_started_ns - newest < _RACY_NS

    # -- the lookup path ----------------------------------------------------------------

    def may_have_changed(self) -> bool:
        """Cheap and exact for local changes: False means no image came or went since the
        last check (nothing was in the index watch's queue, and nothing drained from it is
        still unchecked)."""
        if self._index_watch.changed():
            self._pending = True
        return self._pending

    async def catch_up(self, since_ns: int) -> None:
        """Make the view at least as new as the cache was at ``since_ns``.

        If a scan started after ``since_ns`` it already saw that state; else a rescan
        runs if the index changed. Not while the last rescan failed: the view stays as
        it is and the poll retries (``loop``); a walk waiting out msb's busy database
        would stall every request queued behind it.
        """
        if self._retry_at is not None:
            return
        async with self._lock:
            if self._scan_started_ns > since_ns:
                return
            self._pending = False  # from here on, an event means a change this check missed
            # Inline, not in a worker thread: four stat calls of directories the kernel
            # has cached take microseconds, and a thread hop on every walk through an
            # image directory cost a VMM's open a millisecond or more on a busy host.
            sig = self.index_signature()
            if sig == self._index_sig and not self._racy():
                return
            await self._rescan()

    # -- rescans -------------------------------------------------------------------------

    def scan(self, *, first: bool = False) -> CacheSnapshot:
        """A full scan (blocking): the one answer to "what does an unreadable msb
        database mean to the view?".

        While the view shows a state, it raises ``MsbDbUnreadable``: the caller keeps
        that state (``_rescan``, ``fresh_snapshot``), since read as empty the database
        would hide every image only it names (what msb pulled or loaded) from a guest
        about to boot one: the direction that loses data. Only the very first scan
        (``first``: nothing shown yet) reads it as empty, the problem in the snapshot.
        """
        return scan_cache(self.cache, self.msb_db, db_required=not first)

    def fresh_snapshot(self) -> CacheSnapshot:
        """A scan for status.json/metrics: reuses the current index if nothing it read
        changed since (the poll signature), the last rescan failed (the poll retries) or
        msb's database cannot be read now, else scans everything (blocking)."""
        sig = self.watch_signature()
        stale = self.stale
        if self._retry_at is None and sig != self._signature:
            try:
                return self.scan()
            except MsbDbUnreadable as err:
                stale = self._stale_text(err)
        snap = scan_cache(self.cache, self.msb_db, previous=self.snapshot)
        return snap if stale is None else replace(snap, problems=[*snap.problems, stale])

    def _stale_text(self, err: MsbDbUnreadable) -> str:
        taken = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                              time.gmtime(self.snapshot.taken_at_ns / 1e9))
        return (f"{err.one_line()}; the view shows its last good state (of {taken}) "
                f"until it can read it again")

    def _failed(self, stale: str | None) -> None:
        """Keep the view as it is; the poll tries again later, at doubling intervals."""
        if stale is not None and stale != self.stale:
            log.warning("%s", stale)
        self.stale = stale
        self._signature = None
        self._pending = True
        self._retry_at = time.monotonic() + self._retry_wait
        self._retry_wait = min(self._retry_wait * 2, RETRY_MAX_S)

    def _retrying(self) -> bool:
        """The last scan failed and its retry is not due yet."""
        return self._retry_at is not None and time.monotonic() < self._retry_at

    async def _rescan(self) -> bool:
        """Scan, build and apply (the caller holds the lock); False if it failed."""
        started = time.time_ns()
        try:
            # Signatures before the scan: a change racing the scan is seen next time.
            # The tree is built in the worker thread too: for 1,000 images it takes
            # ~0.15 s, which on the trio thread would stall every request meanwhile.
            idx, sig, snap, tree = await trio.to_thread.run_sync(self._scan_all)
        except MsbDbUnreadable as err:
            self._failed(self._stale_text(err))
            return False
        except (CachefsError, OSError) as err:
            log.warning("rescan of %s failed, keeping the previous view: %s",
                        self.cache.root, err)
            self._failed(self.stale)
            return False
        if self.stale is not None:
            log.warning("msb database %s read again: the view is current", self.msb_db)
        self.stale, self._retry_at, self._retry_wait = None, None, POLL_INTERVAL_S
        self.snapshot, self.root = snap, tree
        if self.apply is not None:
            await self.apply(snap, tree)
        self._index_sig, self._signature, self._scan_started_ns = idx, sig, started
        return True

    def _scan_all(self) -> tuple[tuple[object, ...], tuple[object, ...], CacheSnapshot,
                                 DirNode]:
        # Drained first: an event from here on means a change the scan may have missed.
        self._content_watch.changed()
        idx = self.index_signature()
        sig = self.watch_signature()
        snap = self.scan()
        return idx, sig, snap, build_tree(snap, links=self.links)

    async def loop(self, interval: float = POLL_INTERVAL_S,
                   on_refresh: Callable[[], None] | None = None) -> None:
        """Rescan when the cache changes (polled); runs until cancelled."""
        since_full = 0.0
        while True:
            await trio.sleep(interval)
            since_full += interval
            if self._retrying():
                continue  # the last rescan failed: its retry is not due yet
            due = since_full >= FULL_RESCAN_S or self._retry_at is not None
            if not due and not self._racy() and not self._content_watch.changed():
                continue  # nothing happened in a watched directory: no signature needed
            sig = await trio.to_thread.run_sync(self.watch_signature)
            if sig == self._signature and not self._racy() and not due:
                continue
            async with self._lock:
                if sig == self._signature and not self._racy() and not due:
                    continue  # a lookup's catch-up scanned meanwhile
                since_full = 0.0
                done = await self._rescan()
            if done and on_refresh is not None:
                on_refresh()

    def close(self) -> None:
        self._index_watch.close()
        self._content_watch.close()


def _identity(path: Path) -> Identity:
    """(inode, size, mtime, ctime, mode) of ``path``, None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _owner_and_mode(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_uid, st.st_gid, st.st_mode)


def _scandir(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:
        return []
