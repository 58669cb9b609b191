"""Locks and leases against a second, real process (flock is per open file description)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache import GlobalCache
from cachefs.cache.locks import (
    FileLock,
    flock_exclusive,
    flock_exclusive_async,
    flock_shared,
    hold_leases,
    lease_is_busy,
    lease_path,
    publication_gate_path,
)
from cachefs.digest import Digest
from cachefs.errors import LockBusy
from tests.fixtures.system import flock_holders, watch_opens

D = Digest("sha256", "ab" * 32)

HOLDER = r"""
import fcntl, os, sys
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another process holding a flock until told to stop."""

    def __init__(self, path: Path, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout=10) == 0


@pytest.fixture
def holder() -> Iterator[type[Holder]]:
    made: list[Holder] = []

    class Tracked(Holder):
        def __init__(self, path: Path, mode: str) -> None:
            super().__init__(path, mode)
            made.append(self)

    yield Tracked
    for h in made:
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait()


def test_lock_file_mode_and_never_deleted(tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path)
    path = cache.layer_erofs_lock_path(D)
    old = os.umask(0)
    try:
        with flock_exclusive(path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert path.stat().st_size == 0
    finally:
        os.umask(old)
    assert path.exists()


def test_held_layer_lock_blocks_another_process(tmp_path: Path, holder: type[Holder]) -> None:
    cache = GlobalCache.new(tmp_path)
    path = cache.layer_erofs_lock_path(D)
    with flock_exclusive(path):
        probe = subprocess.run(
            [sys.executable, "-c",
             "import fcntl,os,sys\n"
             "fd=os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept BlockingIOError:\n"
             " sys.exit(3)\n",
             str(path)],
        )
        assert probe.returncode == 3
    h = holder(path, "ex")
    with pytest.raises(LockBusy, match=str(path.name)), flock_exclusive(path, blocking=False):
        pass
    h.stop()
    with flock_exclusive(path, blocking=False):
        pass


def test_shared_lease_makes_exclusive_attempt_fail(tmp_path: Path, holder: type[Holder]) -> None:
    cache = GlobalCache.new(tmp_path)
    entry = cache.layer_erofs_path(D)
    lease = lease_path(entry)
    assert lease == tmp_path.resolve() / "layers" / ".msb-leases" / (
        __import__("hashlib").sha256(entry.name.encode()).hexdigest() + ".lock"
    )
    assert not lease_is_busy(entry)
    h = holder(lease, "sh")
    assert lease_is_busy(entry)
    with pytest.raises(LockBusy, match="in use"), hold_leases([entry], exclusive=True):
        pass
    # other readers can share it
    with hold_leases([entry]):
        pass
    h.stop()
    with hold_leases([entry], exclusive=True):
        probe = subprocess.run(
            [sys.executable, "-c",
             "import fcntl,os,sys\n"
             "fd=os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n fcntl.flock(fd, fcntl.LOCK_SH|fcntl.LOCK_NB)\nexcept BlockingIOError:\n"
             " sys.exit(3)\n",
             str(lease)],
        )
        assert probe.returncode == 3  # a deleter's exclusive lease keeps readers out
    assert not lease_is_busy(entry)


def test_exclusive_leases_release_all_on_partial_failure(
    tmp_path: Path, holder: type[Holder]
) -> None:
    cache = GlobalCache.new(tmp_path)
    a, b = cache.layer_erofs_path(D), cache.fsmeta_erofs_path(D)
    h = holder(lease_path(b), "sh")
    with pytest.raises(LockBusy), hold_leases([a, b], exclusive=True):
        pass
    assert not lease_is_busy(a)  # the lease on a was released again
    h.stop()


def test_shared_lock_against_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with flock_shared(path):
        other = FileLock(path)
        assert other.acquire(blocking=False) is False
        with flock_shared(path, blocking=False):
            pass
    with flock_exclusive(path), pytest.raises(LockBusy), flock_shared(path, blocking=False):
        pass


def test_publication_gate_name(tmp_path: Path) -> None:
    import hashlib

    p = publication_gate_path(tmp_path, "k")
    assert p.name == hashlib.sha256(b"k.publication").hexdigest() + ".lock"


async def test_async_lock_waits_without_blocking_the_loop(
    tmp_path: Path, holder: type[Holder]
) -> None:
    """While another process holds the lock, the waiting task leaves the loop free (this
    task runs) and does not get the lock; once the holder lets go, it does.

    A watchdog releases the holder after a long deadline, so an implementation that blocked
    the loop would end this test with ``released`` set instead of hanging it."""
    path = tmp_path / "a.lock"
    h = holder(path, "ex")
    acquired = trio.Event()
    released = threading.Event()

    def release() -> None:
        released.set()
        h.stop()

    watchdog = threading.Timer(60.0, release)
    watchdog.start()

    async def take() -> None:
        async with flock_exclusive_async(path):
            acquired.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()  # take() is waiting for the lock
            assert not released.is_set(), "the loop was blocked until the watchdog fired"
            assert not acquired.is_set(), "took a lock another process holds"
            assert flock_holders(path) == {h.proc.pid: "WRITE"}
            await trio.to_thread.run_sync(h.stop)
            with trio.fail_after(60):
                await acquired.wait()
    finally:
        watchdog.cancel()
    assert not released.is_set()


def test_msb_cannot_take_a_layer_lock_we_hold(tmp_path: Path, msb) -> None:  # type: ignore[no-untyped-def]
    """While cachefs holds a layer's lock, msb's load of that layer waits for it."""
    from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg

    image = TestImage(layers=[layer_tar([reg("f", b"x")])])
    archive = docker_archive(image, ["example.com/l/k:v"], tmp_path / "i.tar")
    cache = GlobalCache.new(msb.cache)
    lock = cache.layer_erofs_lock_path(image.diff_ids()[0])
    with flock_exclusive(lock), watch_opens(lock) as opened:
        proc = subprocess.Popen([msb.binary, "load", "-i", str(archive)], env=msb.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert opened(60), "msb never opened the layer's lock"
        # msb polls the lock (LOCK_NB): it opens it again and again, and writes nothing.
        assert opened(60), "msb opened the layer's lock once and did not retry"
        assert proc.poll() is None
        assert not cache.layer_erofs_path(image.diff_ids()[0]).exists()
    assert proc.wait(timeout=60) == 0
    assert cache.is_layer_materialized(image.diff_ids()[0])
