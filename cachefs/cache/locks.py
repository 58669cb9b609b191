"""msb-compatible locks: BSD ``flock`` on zero-length files that are never deleted.

Two kinds (FORMATS.md §1.3, §1.5):

* materialisation locks (``layers/<d>.erofs.lock``, ``fsmeta/<m>.erofs.lock``,
  ``manifests/<key>.lock``, ``tmp/<blob>.download.lock``), exclusive while writing;
* leases (``<dir>/.msb-leases/<sha256(name)>.lock``): shared while an entry is read or
  served, exclusive-nonblocking by deleters, so ``msb image rm`` and ``cachefs gc`` never
  pull files out from under a reader.

Blocking acquisition from trio goes through a worker thread so the event loop never stalls.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

from ..errors import LockBusy

LEASE_DIR = ".msb-leases"


# Errors that mean "this process may not create or write the lock file" (a read-only
# cache, another user's cache), as opposed to a lock that is merely taken.
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _open_lock_file(path: Path) -> int:
    """Open (creating if needed) a lock file. flock needs no write access, so an existing
    lock file this process cannot write (msb's, on a read-only mount) is opened read-only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno not in _NO_ACCESS:
            raise
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise err from None


def try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


class FileLock:
    """One flock on one lock file. Not reentrant; one instance per holder."""

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, blocking: bool = True) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} already held by this object")
        fd = _open_lock_file(self.path)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            if blocking:
                fcntl.flock(fd, mode)
            elif not try_flock(fd, mode):
                os.close(fd)
                return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def flock_exclusive(path: Path, *, blocking: bool = True) -> Iterator[FileLock]:
    """Hold an exclusive flock on ``path``; ``LockBusy`` if not blocking and taken."""
    lock = FileLock(path)
    if not lock.acquire(blocking=blocking):
        raise LockBusy(f"{path} is locked by another process")
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def flock_shared(path: Path, *, blocking: bool = True) -> Iterator[FileLock]:
    lock = FileLock(path, shared=True)
    if not lock.acquire(blocking=blocking):
        raise LockBusy(f"{path} is locked exclusively by another process")
    try:
        yield lock
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def flock_exclusive_async(path: Path) -> AsyncIterator[FileLock]:
    """Exclusive flock acquired without blocking the trio loop.

    Polls with LOCK_NB first (cheap, no thread) and only then waits in a worker thread;
    the thread is abandonable so cancellation is not held up by a peer holding the lock.
    """
    lock = FileLock(path)
    if not lock.acquire(blocking=False):
        import trio  # here: listing and checking commands use the blocking locks only

        await trio.to_thread.run_sync(lock.acquire)
    try:
        yield lock
    finally:
        lock.release()


def lease_path(entry: Path) -> Path:
    """``D/name`` → ``realpath(D)/.msb-leases/<sha256(name)>.lock``."""
    directory = Path(os.path.realpath(entry.parent))
    digest = hashlib.sha256(entry.name.encode()).hexdigest()
    return directory / LEASE_DIR / f"{digest}.lock"


def publication_gate_path(manifests_dir: Path, key: str) -> Path:
    directory = Path(os.path.realpath(manifests_dir))
    digest = hashlib.sha256(f"{key}.publication".encode()).hexdigest()
    return directory / LEASE_DIR / f"{digest}.lock"


class Leases:
    """A set of leases held together; released together."""

    def __init__(self) -> None:
        self._locks: list[FileLock] = []

    def add_shared(self, entry: Path, *, blocking: bool = True,
                   best_effort: bool = False) -> bool:
        """Take a shared lease. ``best_effort``: if the lease file cannot be created or
        opened for lack of rights (read-only cache, another user's lease file), return
        False instead of raising; a lease held by a deleter still raises ``LockBusy``."""
        lock = FileLock(lease_path(entry), shared=True)
        try:
            acquired = lock.acquire(blocking=blocking)
        except OSError as err:
            if best_effort and err.errno in _NO_ACCESS:
                return False
            raise
        if not acquired:
            raise LockBusy(f"{entry} is being deleted by another process")
        self._locks.append(lock)
        return True

    def add_exclusive(self, entry: Path) -> None:
        """Deleter side: never blocks (so several leases cannot deadlock)."""
        lock = FileLock(lease_path(entry))
        if not lock.acquire(blocking=False):
            raise LockBusy(f"{entry} is in use (lease held by {lease_holders(entry)})")
        self._locks.append(lock)

    def release(self) -> None:
        while self._locks:
            self._locks.pop().release()

    @classmethod
    def acquire_all(cls, entries: Iterable[Path], *, exclusive: bool = False) -> Leases:
        """Leases on every entry, or none: whatever was taken is released on failure."""
        leases = cls()
        try:
            for entry in entries:
                if exclusive:
                    leases.add_exclusive(entry)
                else:
                    leases.add_shared(entry)
        except BaseException:
            leases.release()
            raise
        return leases

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold_leases(entries: Iterable[Path], *, exclusive: bool = False) -> Iterator[Leases]:
    """Shared (readers, publishers) or exclusive non-blocking (deleters) leases on entries."""
    with Leases.acquire_all(entries, exclusive=exclusive) as leases:
        yield leases


def is_lock_entry(name: str) -> bool:
    """A lease directory or a lock file: zero-length flock targets that pulls, deleters and
    the view create and never delete; bookkeeping, never cache content."""
    return name == LEASE_DIR or name.endswith(".lock")


def lock_is_busy(path: Path) -> bool:
    """True if someone holds the lock file ``path`` right now; creates nothing."""
    if not path.exists():
        return False
    lock = FileLock(path)
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def lease_is_busy(entry: Path) -> bool:
    """True if another process holds any lease on ``entry`` (probe without keeping it)."""
    return lock_is_busy(lease_path(entry))


# -- who holds a lease (for messages) ---------------------------------------------------

_MAX_HOLDERS_SHOWN = 4


def _proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _lock_pids(path: Path) -> list[int]:
    """Pids holding an flock on ``path``, from /proc/locks (the process that took it)."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ  1234 00:2d:5678 0 EOF" (blocked waiters: "-> ...")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident:
            with contextlib.suppress(ValueError):
                pids.append(int(fields[4]))
    return sorted(set(pids))


def _view_mountpoints() -> list[str]:
    """Mountpoints of every cachefs view (FUSE subtype ``cachefs``)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["fuse.cachefs"]:
            out.append(pre.split()[4].replace("\\040", " "))
    return out


def _view_readers(mountpoints: list[str]) -> list[str]:
    """Processes with a file open below a cachefs view (what a VMM holds through it)."""
    if not mountpoints:
        return []
    prefixes = tuple(m.rstrip("/") + "/" for m in mountpoints)
    readers: list[str] = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefixes):
                readers.append(f"{_proc_name(pid)} (pid {pid}) reading {target}")
                break
    return readers


def lease_holders(entry: Path) -> str:
    """Who holds a lease on ``entry``, for a message: "qemu-system-x86 (pid 42) reading
    /mnt/images/…/fsmeta.erofs via the cachefs view (pid 7)", or "another process".

    A VMM reading through the view holds no lease itself (the view daemon does, for it),
    so for a view daemon the processes with files open below the view are named too.
    Best effort: /proc may hide other users' processes.
    """
    pids = _lock_pids(lease_path(entry))
    if not pids:
        return "another process"
    names = []
    for pid in pids[:_MAX_HOLDERS_SHOWN]:
        name = _proc_name(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if any(b"cachefs" in arg for arg in cmdline) and (
            b"cachefs.view.daemon" in cmdline or b"mount" in cmdline
        ):
            readers = _view_readers(_view_mountpoints())[:_MAX_HOLDERS_SHOWN]
            via = f"the cachefs view (pid {pid})"
            names.append(f"{', '.join(readers)} via {via}" if readers else via)
        else:
            names.append(f"{name} (pid {pid})")
    more = len(pids) - _MAX_HOLDERS_SHOWN
    return "; ".join(names) + (f" and {more} more" if more > 0 else "")
