"""``rm`` and ``gc``: deleting from a cache that msb and other cachefs processes share.

The protocol is msb's (FORMATS.md §1.3, §1.5), so neither tool pulls files out from
under the other:

* every deletion runs under ``.image-deletions/coordination.lock`` (exclusive), which is
  what ``msb image rm`` serialises on;
* an entry is deleted only after ``LOCK_EX|LOCK_NB`` succeeds on its lease; a busy lease
  means a reader or publisher uses it. ``rm`` then refuses as a whole (nothing is
  removed); ``gc`` skips that entry and says so;
* a running pull of the reference (``manifests/<key>.lock`` held) makes ``rm`` refuse;
  transient files are collected only when the lock of the process that would own them
  (download lock, layer lock, fsmeta lock) is free, and is held while we delete;
* "used by another image" is decided from every source (``cache.catalog.referenced``), recomputed
  after the leases are held so a publisher that finished in between is seen.

Lock and lease files are never deleted: their inodes must stay stable (§1.3).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.catalog import ImageInfo, find_image, list_images, referenced
from ..cache.locks import (
    FileLock,
    Leases,
    lease_holders,
    lease_path,
    lock_is_busy,
    publication_gate_path,
    try_flock,
)
from ..cache.msb_db import forget_images, writable_schema
from ..cache.msb_index import SOURCE_MSB_DB, default_msb_db
from ..cache.publish import fsync_dir
from ..cache.store import GlobalCache
from ..digest import Digest
from ..errors import CacheCorrupt, CachefsError, LockBusy, UsageError
from ..reference import Reference

COORDINATION_LOCK = Path(".image-deletions") / "coordination.lock"


@dataclass(frozen=True, slots=True)
class Removal:
    path: Path
    kind: str  # layer | fsmeta | vmdk | manifest | record | tmp | download
    size: int


@dataclass(frozen=True, slots=True)
class Skipped:
    path: Path
    reason: str


@dataclass(slots=True)
class RemoveReport:
    """What an ``rm`` or ``gc`` removed (or, with ``dry_run``, would remove)."""

    removed: list[Removal] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def bytes_reclaimed(self) -> int:
        return sum(r.size for r in self.removed)

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "images": self.images,
            "bytes_reclaimed": self.bytes_reclaimed,
            "removed": [
                {"path": str(r.path), "kind": r.kind, "size": r.size} for r in self.removed
            ],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
        }


@contextlib.contextmanager
def coordination(cache: GlobalCache) -> Iterator[None]:
    """msb's deletion lock: one deleter at a time across msb and cachefs.

    Taken without waiting, like every deleter lock: a concurrent ``msb image rm`` or
    ``cachefs gc`` is reported (``LockBusy``) rather than queued behind.
    """
    lock = FileLock(cache.root / COORDINATION_LOCK)
    if not lock.acquire(blocking=False):
        raise LockBusy("another process (msb image rm, cachefs rm/gc) is deleting from "
                       f"{cache.root}", hint="retry when it has finished")
    try:
        yield
    finally:
        lock.release()


_UNREAD_HINT = "nothing was deleted; fix or remove that file, then retry"


@contextlib.contextmanager
def _stop_if_unread() -> Iterator[None]:
    """A source of "what is in use" that cannot be read stops a deleter before it deletes
    anything; the message says so (``CacheUnreadable`` does already)."""
    try:
        yield
    except CacheCorrupt as err:
        if err.hint is None:
            err.hint = _UNREAD_HINT
        raise


def _size(path: Path) -> int:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if path.is_dir() and not path.is_symlink():
        return sum(_size(p) for p in path.iterdir())
    return st.st_size


def _unlink(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _try_lock(path: Path, held: dict[Path, FileLock]) -> bool:
    """Take an exclusive non-blocking flock on ``path`` and keep it in ``held``.

    Keyed by path because flock conflicts between two opens even in one process: the
    fsmeta and the VMDK of one digest share one lock and must not lock each other out.
    """
    if path in held:
        return True
    lock = FileLock(path)
    if not lock.acquire(blocking=False):
        return False
    held[path] = lock
    return True


# ---------------------------------------------------------------------------------------
# rm
# ---------------------------------------------------------------------------------------


def remove_images(
    cache: GlobalCache,
    names: list[str],
    *,
    force: bool = False,
    msb_db: Path | None = None,
    dry_run: bool = False,
    write_msb_db: bool = True,
) -> RemoveReport:
    """Remove images and whatever of theirs no remaining image uses.

    Refuses (``LockBusy``) when a pull of one of them is running or any entry to be
    removed is leased; nothing is removed then. In a database of msb 0.7.11's schema
    (and ``write_msb_db``) the images' rows go first, as ``msb image rm`` removes them;
    otherwise an image registered there needs ``force`` and its rows stay (msb will
    treat it as a cache miss). ``force`` also makes unknown names a no-op.
    """
    db = msb_db if msb_db is not None else default_msb_db(cache)
    db_writable = write_msb_db and writable_schema(db)
    report = RemoveReport(dry_run=dry_run)
    held: dict[Path, FileLock] = {}
    with coordination(cache), _stop_if_unread():
        try:
            targets = _targets(cache, names, force=force, db=db, db_rows_go=db_writable)
            keys = {t.key for t in targets}
            for info in targets:
                pull_lock = cache.manifests_dir() / f"{info.key}.lock"
                if not _try_lock(pull_lock, held):
                    raise LockBusy(f"{info.name} is being pulled by another process",
                                   hint="wait for the pull to finish")
                if not _try_lock(publication_gate_path(cache.manifests_dir(), info.key), held):
                    raise LockBusy(f"{info.name} is being published by another process")
            with Leases() as leases:
                plan = _rm_plan(cache, targets, keys, db)
                for removal in plan:
                    if removal.kind == "record":
                        continue
                    try:
                        leases.add_exclusive(removal.path)
                    except LockBusy:
                        raise LockBusy(
                            f"{removal.path} is in use: lease held by "
                            f"{lease_holders(removal.path)}",
                            hint="stop the sandbox or view using it, then retry",
                        ) from None
                # A publisher may have finished between planning and leasing: plan again.
                plan = [r for r in _rm_plan(cache, targets, keys, db)
                        if any(r.path == p.path for p in plan)]
                report.images = [t.name for t in targets]
                if db_writable and not dry_run:  # rows first: msb never lists a lost image
                    forget_images(db, keys)
                for removal in plan:
                    report.removed.append(removal)
                    if not dry_run:
                        _unlink(removal.path)
                if not dry_run:
                    for directory in {r.path.parent for r in plan}:
                        with contextlib.suppress(OSError):
                            fsync_dir(directory)
        finally:
            for lock in held.values():
                lock.release()
    return report


def _targets(cache: GlobalCache, names: list[str], *, force: bool, db: Path,
             db_rows_go: bool = False) -> list[ImageInfo]:
    if not names:
        raise UsageError("rm needs at least one image reference")
    images = list_images(cache, db, strict=True)
    out: dict[str, ImageInfo] = {}
    for name in names:
        try:
            info = find_image(images, name)
        except CachefsError:
            if force:
                continue
            raise
        if SOURCE_MSB_DB in info.sources and not (force or db_rows_go):
            raise UsageError(
                f"{info.name} is registered in msb's database; removing its files leaves msb "
                "a dangling entry",
                hint="use `msb image rm`, or `cachefs rm --force`",
            )
        out[info.key] = info
    return list(out.values())


def _rm_plan(
    cache: GlobalCache, targets: list[ImageInfo], keys: set[str], db: Path
) -> list[Removal]:
    remaining = referenced(cache, db, excluding=keys)
    plan: list[Removal] = []
    seen: set[Path] = set()

    def add(path: Path, kind: str) -> None:
        if path not in seen and (path.exists() or path.is_symlink()):
            seen.add(path)
            plan.append(Removal(path, kind, _size(path)))

    for info in targets:
        add(cache.manifests_dir() / f"{info.key}.json", "manifest")
        if info.reference is not None:
            add(cache.ref_record_path(Reference.parse(info.reference)), "record")
    for info in targets:
        digests = {d for d in (info.digest, info.manifest_digest) if d}
        for digest in digests - remaining.manifests:
            add(cache.fsmeta_erofs_path(digest), "fsmeta")
            add(cache.vmdk_path(digest), "vmdk")
    for info in targets:
        for diff_id in info.diff_ids:
            if diff_id not in remaining.layers:
                add(cache.layer_erofs_path(diff_id), "layer")
    return plan


# ---------------------------------------------------------------------------------------
# gc
# ---------------------------------------------------------------------------------------

_SAFE = r"([A-Za-z0-9+.=_-]+?)"
_LAYER_RE = re.compile(rf"^{_SAFE}\.erofs$")
_TARGZ_RE = re.compile(rf"^{_SAFE}\.tar\.gz$")
_PART_RE = re.compile(rf"^{_SAFE}\.part$")
_LAYER_PART_RE = re.compile(rf"^{_SAFE}\.erofs\.part$")
_SPOOL_RE = re.compile(rf"^{_SAFE}\.spool$")
_WORK_RE = re.compile(rf"^{_SAFE}\.work$")
_LOAD_BLOB_RE = re.compile(r"^load-\d+-(\d+)-\d+\.blob$")
_REF_PART_RE = re.compile(r"^[0-9a-f]{64}\.json\.(\d+)\.part$")


@dataclass(frozen=True, slots=True)
class _Candidate:
    path: Path
    kind: str
    locks: tuple[Path, ...]  # materialisation/download locks that must be free
    lease: bool  # does a lease guard it?
    safe_name: str | None = None  # path-safe digest, for the reference re-check


def _is_safe_digest(safe: str) -> str | None:
    """``sha256_<hex>`` → ``sha256:<hex>`` (None if it is not a digest we wrote)."""
    algo, sep, enc = safe.partition("_")
    if not sep:
        return None
    try:
        return str(Digest.parse(f"{algo}:{enc}"))
    except CachefsError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _listdir(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


def _gc_candidates(cache: GlobalCache, refs_layers: set[str], refs_manifests: set[str],
                   pulls_running: bool) -> tuple[list[_Candidate], list[Skipped]]:
    out: list[_Candidate] = []
    skipped: list[Skipped] = []
    layers, tmp = cache.layers_dir(), cache.tmp_dir()
    for name in _listdir(layers):
        path = layers / name
        if m := _LAYER_RE.match(name):
            digest = _is_safe_digest(m.group(1))
            if digest is not None and digest not in refs_layers:
                out.append(_Candidate(path, "layer", (Path(f"{path}.lock"),), True, digest))
        elif m := _TARGZ_RE.match(name):
            # A pull keeps the compressed blob until all its layers are materialised, and
            # that pull's lock is per reference, not per blob: never race any pull.
            if pulls_running:
                skipped.append(Skipped(path, "a pull is running"))
                continue
            lock = tmp / f"{m.group(1)}.download.lock"
            out.append(_Candidate(path, "download", (lock,), True))
    for directory, kind in ((cache.fsmeta_dir(), "fsmeta"), (cache.vmdk_dir(), "vmdk")):
        suffix = ".erofs" if kind == "fsmeta" else ".vmdk"
        for name in _listdir(directory):
            if not name.endswith(suffix):
                continue
            digest = _is_safe_digest(name[: -len(suffix)])
            if digest is None or digest in refs_manifests:
                continue
            lock = cache.fsmeta_dir() / f"{name[: -len(suffix)]}.erofs.lock"
            out.append(_Candidate(directory / name, kind, (lock,), True, digest))
    for name in _listdir(cache.manifests_dir()):
        # A metadata file whose publisher died before the rename (§1.4); the publisher
        # holds the publication gate exclusively around that rename.
        if m := re.match(r"^([0-9a-f]{64})\.json\.part$", name):
            gate = publication_gate_path(cache.manifests_dir(), m.group(1))
            out.append(_Candidate(cache.manifests_dir() / name, "tmp", (gate,), False))
    for name in _listdir(tmp):
        path = tmp / name
        if name.endswith(".lock"):
            continue
        if m := _LAYER_PART_RE.match(name):
            locks: tuple[Path, ...] = (layers / f"{m.group(1)}.erofs.lock",)
        elif m := _PART_RE.match(name):
            locks = (tmp / f"{m.group(1)}.download.lock",)
        elif m := _SPOOL_RE.match(name):
            locks = (layers / f"{m.group(1)}.erofs.lock",)
        elif m := _WORK_RE.match(name):
            locks = (cache.fsmeta_dir() / f"{m.group(1)}.erofs.lock",)
        elif m := _LOAD_BLOB_RE.match(name):
            if _pid_alive(int(m.group(1))):
                skipped.append(Skipped(path, f"process {m.group(1)} is loading it"))
                continue
            locks = ()
        else:
            continue
        out.append(_Candidate(path, "tmp", locks, False))
    for name in _listdir(cache.refs_dir()):
        # A reference record whose writer died before the rename (``record_reference``
        # names it after its pid; no lock guards it, so a live pid keeps it).
        if m := _REF_PART_RE.match(name):
            if _pid_alive(int(m.group(1))):
                skipped.append(Skipped(cache.refs_dir() / name,
                                       f"process {m.group(1)} is writing it"))
            else:
                out.append(_Candidate(cache.refs_dir() / name, "tmp", (), False))
    from ..share.leftovers import leftovers  # EROFS-artifact scratch, stale provenance

    out.extend(_Candidate(path, "tmp", (), False) for path in leftovers(cache, _pid_alive))
    return out, skipped


def _pulls_running(cache: GlobalCache) -> bool:
    return any(lock_is_busy(p) for p in cache.manifests_dir().glob("*.lock"))


def collect_garbage(
    cache: GlobalCache, *, dry_run: bool = False, msb_db: Path | None = None
) -> RemoveReport:
    """Remove layers, fsmeta and VMDKs no image uses, and abandoned transient files.

    An entry whose lease or owning lock is held is skipped and reported, never waited for.
    With ``dry_run`` nothing is removed and no lock is taken: locks and leases are probed
    read-only, so a dry run needs no write access to the cache.
    """
    db = msb_db if msb_db is not None else default_msb_db(cache)
    if dry_run:
        with _stop_if_unread():
            return _gc_dry_run(cache, db)
    report = RemoveReport(dry_run=dry_run)
    with coordination(cache), _stop_if_unread():
        refs = referenced(cache, db)
        candidates, report.skipped = _gc_candidates(
            cache, refs.layers, refs.manifests, _pulls_running(cache)
        )
        held: dict[Path, FileLock] = {}
        try:
            with Leases() as leases:
                taken: list[_Candidate] = []
                for cand in candidates:
                    busy = next((lk for lk in cand.locks if not _try_lock(lk, held)), None)
                    if busy is not None:
                        report.skipped.append(Skipped(cand.path, f"locked ({busy.name})"))
                        continue
                    if cand.lease:
                        try:
                            leases.add_exclusive(cand.path)
                        except LockBusy:
                            report.skipped.append(Skipped(
                                cand.path, f"lease held by {lease_holders(cand.path)}"))
                            continue
                    taken.append(cand)
                # Leases held: anything published meanwhile is visible now; re-check.
                refs = referenced(cache, db)
                for cand in taken:
                    used = refs.layers if cand.kind == "layer" else refs.manifests
                    if cand.safe_name is not None and cand.safe_name in used:
                        report.skipped.append(Skipped(cand.path, "referenced again"))
                        continue
                    if not (cand.path.exists() or cand.path.is_symlink()):
                        continue
                    report.removed.append(Removal(cand.path, cand.kind, _size(cand.path)))
                    if not dry_run:
                        _unlink(cand.path)
        finally:
            for lock in held.values():
                lock.release()
    return report


def _busy(path: Path) -> bool:
    """Does someone hold the lock file ``path``? Probed read-only; creates nothing.

    A dry run may be run by someone who can read the cache but not write it (an
    operator, a monitoring job): a lock file that cannot be opened cannot be probed, and
    reads as free, since nothing is deleted on its account.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if try_flock(fd, fcntl.LOCK_EX):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def _gc_dry_run(cache: GlobalCache, db: Path) -> RemoveReport:
    """What ``gc`` would remove now, without its locks: nothing is written or held.

    The same candidates and the same skip rules as a real run, with every lock and
    lease probed instead of taken; a real run re-checks all of it under its locks.
    """
    report = RemoveReport(dry_run=True)
    refs = referenced(cache, db)
    candidates, report.skipped = _gc_candidates(
        cache, refs.layers, refs.manifests, any(_busy(p) for p in _pull_locks(cache))
    )
    for cand in candidates:
        busy = next((lk for lk in cand.locks if _busy(lk)), None)
        if busy is not None:
            report.skipped.append(Skipped(cand.path, f"locked ({busy.name})"))
        elif cand.lease and _busy(lease_path(cand.path)):
            report.skipped.append(Skipped(cand.path, "lease held (in use)"))
        elif cand.path.exists() or cand.path.is_symlink():
            report.removed.append(Removal(cand.path, cand.kind, _size(cand.path)))
    return report


def _pull_locks(cache: GlobalCache) -> list[Path]:
    try:
        return list(cache.manifests_dir().glob("*.lock"))
    except OSError:
        return []


__all__ = ["Removal", "RemoveReport", "Skipped", "collect_garbage", "remove_images"]
