"""msb's database that cannot be read does not empty the view.

msb names the images it pulled or loaded only in its database (no cachefs record). The
view reads it with a short busy timeout; a rescan that could not read it used to read it as
"no images" and swap in a tree without them, so a VMM opening ``rootfs.img`` at that
moment got ENOENT. Now the view keeps the state it shows, says so in ``status.json``, and
the poll tries again until it can read the database. Nothing here sleeps: the root
directory's mtime is the time of the view's current snapshot, so a rescan that replaced the
tree shows as a new one.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from cachefs.cache.msb_index import read_msb_db
from cachefs.view.model import CacheSnapshot
from tests.fixtures.system import Msb
from tests.view.conftest import (
    REFRESH_DEADLINE_S,
    ViewMount,
    image_one,
    image_three,
    load,
    view_mount,
    wait_for,
)

pytestmark = pytest.mark.system

REF = "docker.io/library/three:v3"
OTHER = "docker.io/library/one:1"
STALE = "the view shows its last good state"


@contextlib.contextmanager
def msb_db_held(db: Path) -> Iterator[Callable[[], None]]:
    """Hold msb's database as a writer that does not let go, until the block ends or the
    function it yields is called.

    In ``locking_mode=EXCLUSIVE`` a connection keeps the lock its write transaction took
    after the commit, so every other connection (a ``mode=ro`` reader of a WAL database
    too) is busy until it closes. The write changes nothing msb means, but it commits (the
    WAL grows): the view sees the database change and rescans.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE manifest SET digest = digest")
        conn.execute("COMMIT")
        problems: list[str] = []
        assert read_msb_db(db, problems, timeout=1.0) == []  # longer than the view waits
        assert problems and "locked" in problems[0], problems
        yield conn.close
    finally:
        conn.close()


def cache_problems(vm: ViewMount) -> list[str]:
    doc = json.loads((vm.mnt / "status.json").read_text())
    return [p["problem"] for p in doc["problems"] if p["scope"] == "cache"]


def disk_headers(image_dir: Path) -> tuple[bytes, bytes]:
    with (image_dir / "rootfs.img").open("rb") as f:
        rootfs = f.read(4096)
    return rootfs, (image_dir / "disk.vmdk").read_bytes()[:4]


def test_rescan_that_cannot_read_msb_db_keeps_the_images(msb: Msb, tmp_path: Path) -> None:
    """msb holds its database past the view's busy timeout while the view rescans: the
    images msb loaded stay, readable, and status.json says why the view is not current
    (main before the fix: both images gone). Once msb lets go, its ``image rm`` issued
    meanwhile shows, and the note clears."""
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    load(msb, tmp_path, image_one(), ["one:1"], "one")
    with view_mount(msb.cache, tmp_path / "mnt") as vm:
        image = vm.image_dir(REF)
        assert (image / "status").read_text() == "ready\n"
        headers = disk_headers(image)
        shown = vm.mnt.stat().st_mtime_ns
        with msb_db_held(msb.db):
            # The view rescanned (a new tree) or tried to and kept its own (its log says
            # so when a rescan fails; status.json alone could answer before any rescan).
            assert wait_for(lambda: vm.mnt.stat().st_mtime_ns != shown
                            or any(STALE in line for line in vm.stderr_lines))
            # msb removes the other image meanwhile: it waits for its database.
            rm = subprocess.Popen([msb.binary, "image", "rm", "one:1"], env=msb.env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert (image / "status").read_text() == "ready\n"
                assert disk_headers(image) == headers
                assert vm.image_dir(OTHER).is_dir()
                assert vm.mnt.stat().st_mtime_ns == shown  # still the last good state
                stale = [p for p in cache_problems(vm) if STALE in p]
                assert len(stale) == 1 and str(msb.db) in stale[0], stale
                assert "cannot be read" in stale[0] and "locked" in stale[0], stale
            except BaseException:
                rm.kill()
                rm.wait()
                raise
        _, err = rm.communicate(timeout=120)
        assert rm.returncode == 0, err
        # The poll tried again: the removal shows, the note is gone.
        assert wait_for(lambda: not vm.image_dir(OTHER).exists())
        assert wait_for(lambda: not cache_problems(vm)), cache_problems(vm)
        assert (image / "status").read_text() == "ready\n"
        assert disk_headers(image) == headers
        assert vm.alive()


def test_first_scan_of_unreadable_msb_db_shows_the_problem_then_the_images(
        msb: Msb, tmp_path: Path) -> None:
    """A view started while msb holds its database has nothing to keep: it shows no image
    and the problem; once msb lets go, the poll's retry shows the image (no other change
    needed), and a ``msb load`` after that shows too."""
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    with msb_db_held(msb.db) as release, view_mount(msb.cache, tmp_path / "mnt") as vm:
        problems = cache_problems(vm)
        assert any("cannot be read" in p and str(msb.db) in p for p in problems), problems
        assert not vm.image_dir(REF).exists()
        release()
        assert wait_for(lambda: vm.image_dir(REF).exists())
        assert (vm.image_dir(REF) / "status").read_text() == "ready\n"
        assert wait_for(lambda: not cache_problems(vm)), cache_problems(vm)
        load(msb, tmp_path, image_one(), ["one:1"], "one")
        assert wait_for(lambda: vm.image_dir(OTHER).exists())
        assert vm.alive()


def test_walks_never_wait_for_msb_db_and_the_poll_backs_off(msb: Msb) -> None:
    """While msb holds its database, a walk's catch-up neither waits out the busy timeout
    nor starts a scan (each would stall the requests behind it by 0.5 s): the view keeps
    its state and only the poll retries, each wait longer than the last (0.5 s, 1 s, …).
    Once msb lets go, the poll's retry makes the view current without any other change."""
    from cachefs.cache.store import GlobalCache
    from cachefs.view.refresh import POLL_INTERVAL_S, Refresher

    load(msb, msb.home, image_three(), ["three:v3"], "three")
    refresher = Refresher(GlobalCache(msb.cache), msb.db)
    scans: list[tuple[float, float]] = []  # (start, end) of each full scan
    real_scan = refresher.scan

    def counted(*, first: bool = False) -> CacheSnapshot:
        start = time.monotonic()
        try:
            return real_scan(first=first)
        finally:
            scans.append((start, time.monotonic()))

    refresher.scan = counted  # type: ignore[method-assign]
    shown = [str(i.reference) for i in refresher.snapshot.images]
    assert shown == [REF]

    async def run(release: Callable[[], None]) -> None:
        await refresher.catch_up(time.time_ns())  # msb's commit changed the index
        assert len(scans) == 1 and refresher.stale is not None and STALE in refresher.stale
        assert [str(i.reference) for i in refresher.snapshot.images] == shown
        for _ in range(20):
            await refresher.catch_up(time.time_ns())
        assert len(scans) == 1  # no walk retried
        with trio.fail_after(REFRESH_DEADLINE_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refresher.loop, 0.02)
                while len(scans) < 3:
                    await trio.sleep(0.02)
                release()
                while refresher.stale is not None:
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        # Each retry waited at least as long as its backoff after the failure before it.
        assert scans[1][0] - scans[0][1] >= POLL_INTERVAL_S
        assert scans[2][0] - scans[1][1] >= 2 * POLL_INTERVAL_S
        assert [str(i.reference) for i in refresher.snapshot.images] == shown
        assert not refresher.snapshot.problems

    try:
        with msb_db_held(msb.db) as release:
            trio.run(run, release)
    finally:
        refresher.close()
