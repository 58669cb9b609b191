"""The cache index: cachefs's records plus msb's database, over caches msb really wrote."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cachefs.cache.index import default_msb_db, index_images, read_msb_db
from cachefs.cache.store import GlobalCache
from cachefs.view.model import scan_cache
from tests.fixtures.system import Msb
from tests.view.conftest import image_one, image_three, load


def test_index_from_msb_db(msb: Msb, tmp_path: Path) -> None:
    load(msb, tmp_path, image_one(), ["one", "127.0.0.1:5055/fmt/img"], "one")
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    cache = GlobalCache(msb.cache)
    assert default_msb_db(cache) == msb.db
    images = index_images(cache)
    assert [str(i.reference) for i in images] == [
        "127.0.0.1:5055/fmt/img:latest",
        "docker.io/library/one:latest",
        "docker.io/library/three:v3",
    ]
    one = images[1]
    assert one.typed == "one" and one.sources == {"msb-db", "manifest-json"}
    assert one.metadata is not None and one.manifest_digest == one.metadata.manifest_digest
    three = images[2]
    assert three.metadata is not None
    assert three.layers == [layer.diff_id for layer in three.metadata.layers]
    assert three.layers == image_three().diff_ids()
    # The database alone gives the same layer order (manifest_layer.position).
    rows = {r.typed: r for r in read_msb_db(msb.db)}
    assert rows["three:v3"].layers == three.layers
    assert rows["three:v3"].manifest_digest == three.manifest_digest


def test_records_merge_with_db_and_metadata_is_authoritative(msb: Msb, tmp_path: Path) -> None:
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    cache = GlobalCache(msb.cache)
    meta = cache.read_image_metadata("three:v3")
    assert meta is not None
    # Same reference typed differently, and a stale digest: one entry, the json wins.
    cache.record_reference("docker.io/library/three:v3", "index.docker.io/library/three:v3",
                           "sha256:" + "0" * 64, "pull")
    cache.record_reference("only/ours:1", "only/ours:1", meta.manifest_digest, "load")
    images = {str(i.reference): i for i in index_images(cache)}
    assert set(images) == {"docker.io/library/three:v3", "docker.io/only/ours:1"}
    three = images["docker.io/library/three:v3"]
    assert three.sources == {"msb-db", "cachefs-pull", "manifest-json"}
    assert three.manifest_digest == meta.manifest_digest
    ours = images["docker.io/only/ours:1"]
    assert ours.metadata is None and ours.layers == []  # no json under that key


def test_db_missing_locked_or_garbage_is_tolerated(msb: Msb, tmp_path: Path) -> None:
    load(msb, tmp_path, image_one(), ["one:1"], "one")
    cache = GlobalCache(msb.cache)
    cache.record_reference("one:1", "one:1", "sha256:" + "0" * 64, "load")

    problems: list[str] = []
    assert [str(i.reference) for i in index_images(cache, tmp_path / "nope.db", problems)] == [
        "docker.io/library/one:1"]
    assert problems == []

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    problems = []
    images = index_images(cache, garbage, problems)
    assert [i.sources for i in images] == [{"cachefs-load", "manifest-json"}]
    assert problems and "cannot" in problems[0]

    # An exclusive writer (as during a migration): we give up quickly, without raising.
    conn = sqlite3.connect(msb.db, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        problems = []
        images = index_images(cache, msb.db, problems)
        assert [str(i.reference) for i in images] == ["docker.io/library/one:1"]
        assert problems and "msb database" in problems[0]
    finally:
        conn.rollback()
        conn.close()
    # Read-only means read-only: the database is untouched and nothing enters the WAL
    # (SQLite may create an empty -wal/-shm pair for a WAL reader, as msb itself does).
    wal = Path(f"{msb.db}-wal")
    before = msb.db.read_bytes(), wal.read_bytes() if wal.exists() else b""
    assert index_images(cache)[0].sources == {"msb-db", "cachefs-load", "manifest-json"}
    assert (msb.db.read_bytes(), wal.read_bytes() if wal.exists() else b"") == before


def test_scan_detects_corruption(msb: Msb, tmp_path: Path) -> None:
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    cache = GlobalCache(msb.cache)
    meta = cache.read_image_metadata("three:v3")
    assert meta is not None
    snap = scan_cache(cache)
    assert all(snap.layers[x.diff_id].ok for x in meta.layers)
    fm = snap.fsmeta[meta.manifest_digest]
    assert fm.ok and snap.derived[meta.manifest_digest] == ()
    layer = cache.layer_erofs_path(meta.diff_ids[1])
    with open(layer, "r+b") as f:
        f.seek(1024)
        f.write(b"\0\0\0\0")  # bad magic: msb itself would re-materialise it
    snap = scan_cache(cache)
    assert snap.layers[str(meta.diff_ids[1])].problem == "corrupt (not a valid EROFS image)"
    assert snap.bytes_by_kind["layers"] == sum(
        p.stat().st_size for p in (msb.cache / "layers").glob("*.erofs"))


def test_strict_reading_refuses_an_unreadable_db(msb: Msb, tmp_path: Path) -> None:
    """gc/rm must not guess what is in use: there an unreadable database is an error."""
    from cachefs.errors import CacheCorrupt
    from cachefs.maintenance import list_images

    load(msb, tmp_path, image_one(), ["one:1"], "one")
    assert [row.typed for row in read_msb_db(msb.db, strict=True)] == ["one:1"]
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(CacheCorrupt, match="cannot"):
        read_msb_db(garbage, strict=True)
    with pytest.raises(CacheCorrupt, match="msb database"):
        list_images(GlobalCache(msb.cache), garbage)
