"""An unchanged cache is never rescanned: the view's own traces are no change.

A guest (QEMU as another user) opens ``disk.vmdk`` and its extents through the view, then
``rootfs.img``: every open walks through the image directory, which asks whether the cache
changed. The view's own work (its reads of msb's database, the leases it takes on the
files it serves) used to answer "yes": each walk was a full rescan and a new tree swapped
in under the guest's path walk. Nothing here sleeps: the root directory's mtime is the time
of the view's current snapshot, so every rescan shows as a new one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.cache.locks import Leases
from cachefs.cache.msb_index import read_msb_db
from cachefs.cache.store import GlobalCache
from cachefs.view.changes import DirWatch
from cachefs.view.noise import not_a_change
from cachefs.view.refresh import Refresher
from tests.fixtures.system import Msb
from tests.view.conftest import OtherUser, image_one, image_three, load, view_mount

pytestmark = pytest.mark.system

REF = "docker.io/library/three:v3"
CYCLES = 50

# Run as the other user: what QEMU does to the view, as fast as a script can.
GUEST = r"""
import errno, json, os, sys
mnt, image, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = os.path.join(mnt, "images", image)
extents = ["disk.vmdk", "fsmeta.erofs"]
extents += [os.path.join("layers", n) for n in sorted(os.listdir(os.path.join(d, "layers")))]
misses, roots = 0, []
for _ in range(cycles):
    fds = [os.open(os.path.join(d, name), os.O_RDONLY) for name in extents]
    for fd in fds:
        os.pread(fd, 4096, 0)
    for fd in fds:
        os.close(fd)  # the guest exits: its leases are released
    try:
        fd = os.open(os.path.join(d, "rootfs.img"), os.O_RDONLY)
    except OSError as err:
        if err.errno != errno.ENOENT:
            raise
        misses += 1
    else:
        os.pread(fd, 4096, 0)
        os.close(fd)
    roots.append(os.stat(mnt).st_mtime_ns)
print(json.dumps({"misses": misses, "roots": roots}))
"""


def test_guests_opening_disks_cause_no_rescan(msb: Msb, tmp_path: Path, shared_dir: Path,
                                              other_user: OtherUser) -> None:
    """50 guest-like cycles as ``nobody`` over a private cache: no rescan, no miss (main
    before the fix: a rescan at every cycle); a pull is still seen at once."""
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    script = shared_dir / "guest.py"
    script.write_text(GUEST)
    with view_mount(msb.cache, shared_dir / "mnt", allow_other=True) as vm:
        start = (vm.mnt).stat().st_mtime_ns
        run = other_user.run(other_user.python, str(script), str(vm.mnt), REF, str(CYCLES),
                             home=shared_dir)
        assert run.returncode == 0, run.stderr
        seen = json.loads(run.stdout)
        rescans = len(set(seen["roots"]) - {start})
        assert (seen["misses"], rescans) == (0, 0), seen
        # Real changes are still changes: a load is in the view at the next walk.
        load(msb, tmp_path, image_one(), ["one:1"], "one")
        assert (vm.image_dir("docker.io/library/one:1") / "status").read_text() == "ready\n"
        assert vm.alive()


@pytest.fixture
def msb_db(tmp_path: Path) -> Iterator[Path]:
    """msb's database as a running msb leaves it: WAL mode, a writer connection open (the
    WAL stays), msb's tables (empty)."""
    db = tmp_path / "db" / "msb.db"
    db.parent.mkdir()
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.executescript("""
        CREATE TABLE manifest (id INTEGER PRIMARY KEY, digest TEXT);
        CREATE TABLE layer (id INTEGER PRIMARY KEY, diff_id TEXT);
        CREATE TABLE manifest_layer (manifest_id INTEGER, layer_id INTEGER, position INTEGER);
        CREATE TABLE image_ref (id INTEGER PRIMARY KEY, reference TEXT, manifest_id INTEGER);
    """)
    try:
        yield db
    finally:
        writer.close()


def _write(db: Path) -> None:
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("INSERT INTO manifest (digest) VALUES ('sha256:' || hex(randomblob(32)))")
    conn.close()


def test_reading_msb_db_and_taking_leases_are_no_change(tmp_path: Path, msb_db: Path) -> None:
    """What the view does itself (read the database, as root too; lease a disk file) is
    neither an event nor a new signature; what msb does (write a row) and a new artifact
    are both."""
    cache = GlobalCache.new(tmp_path / "cache")
    refresher = Refresher(cache, msb_db)  # its first scan read the database
    watch = DirWatch([msb_db.parent, cache.layers_dir()], ignore=not_a_change(msb_db))
    index, content = refresher.index_signature(), refresher.watch_signature()
    try:
        problems: list[str] = []
        for _ in range(3):
            assert read_msb_db(msb_db, problems) == []
        assert not problems
        layer = cache.layers_dir() / "sha256_00.erofs"
        leases = Leases()
        leases.add_shared(layer, blocking=False)  # creates .msb-leases/<h>.lock
        leases.release()
        assert not watch.changed()
        assert not refresher.may_have_changed()
        assert refresher.index_signature() == index
        assert refresher.watch_signature() == content

        _write(msb_db)
        assert watch.changed() and refresher.may_have_changed()
        assert refresher.index_signature() != index
        layer.write_bytes(b"\0" * 4096)
        assert watch.changed()
        assert refresher.watch_signature() != content
    finally:
        watch.close()
        refresher.close()
