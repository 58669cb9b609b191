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

import trio

from ..errors import LockBusy

LEASE_DIR = ".msb-leases"


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


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

    def add_shared(self, entry: Path, *, blocking: bool = True) -> None:
        lock = FileLock(lease_path(entry), shared=True)
        if not lock.acquire(blocking=blocking):
            raise LockBusy(f"{entry} is being deleted by another process")
        self._locks.append(lock)

    def add_exclusive(self, entry: Path) -> None:
        """Deleter side: never blocks (so several leases cannot deadlock)."""
        lock = FileLock(lease_path(entry))
        if not lock.acquire(blocking=False):
            raise LockBusy(f"{entry} is in use by another process (lease held)")
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
