"""One answer per question about the cache (issue 12): ``df`` and ``status`` count the same
bytes, a download is in flight only while its lock is held, ``gc`` collects what a dead
reference-record writer left, and the catalogue reports what it cannot parse."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from cachefs.cache.health import account_bytes, downloads_in_flight
from cachefs.view.model import scan_cache
from cachefs.view.status import render_metrics
from tests.cli.conftest import (
    REF_A,
    LoadedCache,
    assert_one_line_error,
    cli,
    held_by_other_process,
    run,
)

BLOB = "sha256:" + "cd" * 32


def _json(loaded: LoadedCache, *args: str) -> dict:  # type: ignore[type-arg]
    result = cli(loaded.root, *args, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def test_df_and_status_count_a_work_directory_alike(loaded: LoadedCache) -> None:
    """A ``tmp/<m>.work`` directory (an fsmeta build under way or abandoned): df counted
    its files, status.json counted the directory as 0."""
    work = loaded.cache.work_dir(BLOB)
    work.mkdir()
    (work / "fsmeta.erofs").write_bytes(b"y" * 8192)
    df = _json(loaded, "df")
    status = _json(loaded, "status")
    assert df["bytes_by_kind"]["tmp"] == 8192
    assert status["bytes"]["tmp"] == 8192
    assert df["bytes_by_kind"] == status["bytes"]
    # every kind is the real sum of its files
    layers = sum(p.stat().st_size for p in loaded.cache.layers_dir().glob("*.erofs"))
    assert status["bytes"]["layers"] == layers == account_bytes(loaded.cache).bytes_by_kind[
        "layers"]


def _metrics(loaded: LoadedCache) -> str:
    """The view's ``metrics`` file as it renders it."""
    return render_metrics(scan_cache(loaded.cache)).decode()


def test_a_stale_part_is_not_a_download_in_flight(loaded: LoadedCache) -> None:
    """A ``.part`` a killed pull left behind is not a download; one whose download lock
    another process holds is."""
    part = loaded.cache.part_path(BLOB)
    part.write_bytes(b"x" * 1000)
    assert _json(loaded, "status")["downloads_in_flight"] == []
    assert "cachefs_downloads_in_flight 0\n" in _metrics(loaded)
    assert downloads_in_flight(loaded.cache) == {}
    with held_by_other_process(loaded.cache.download_lock_path(BLOB), shared=False):
        assert _json(loaded, "status")["downloads_in_flight"] == [
            {"file": part.name, "bytes": 1000}]
        assert "cachefs_downloads_in_flight 1\n" in _metrics(loaded)
    assert _json(loaded, "status")["downloads_in_flight"] == []
    # the bytes are still counted (as tmp), whether or not anyone downloads them
    assert _json(loaded, "status")["bytes"]["tmp"] == 1000


def _dead_writers_record_part(loaded: LoadedCache) -> Path:
    """What ``record_reference`` leaves when its process dies before the rename: a child
    writes the part under the product's naming (its pid) and exits."""
    code = ("import os, sys\nfrom pathlib import Path\n"
            "from cachefs.cache.store import GlobalCache\n"
            "c = GlobalCache(Path(sys.argv[1])); p = c.ref_record_path(sys.argv[2])\n"
            "p.parent.mkdir(parents=True, exist_ok=True)\n"
            "t = p.with_name(p.name + f'.{os.getpid()}.part')\n"
            "t.write_bytes(b'{\"reference\": \"half'); print(t)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(loaded.root), REF_A],
                          capture_output=True, text=True, check=True, timeout=60)
    path = Path(proc.stdout.strip())
    assert path.exists() and path.parent == loaded.cache.refs_dir()
    return path


def test_gc_collects_a_dead_writers_reference_record_part(loaded: LoadedCache) -> None:
    leftover = _dead_writers_record_part(loaded)
    live = loaded.cache.refs_dir() / f"{'ab' * 32}.json.{1}.part"  # pid 1 lives
    live.write_bytes(b"{")
    report = _json(loaded, "gc")
    assert {Path(r["path"]) for r in report["removed"]} == {leftover}
    assert not leftover.exists()
    assert live.exists()
    assert any(Path(s["path"]) == live for s in report["skipped"])
    assert cli(loaded.root, "verify").exit_code == 0


def _add_db_reference(loaded: LoadedCache, reference: str) -> None:
    """A row msb's database holds (written as msb's schema has it) that cachefs cannot
    parse, pointing at REF_A's manifest."""
    digest = loaded.metadata(REF_A).manifest_digest
    conn = sqlite3.connect(loaded.msb.db)
    try:
        (mid,) = conn.execute("SELECT id FROM manifest WHERE digest = ?", (digest,)).fetchone()
        conn.execute("INSERT INTO image_ref (reference, manifest_id, created_at, updated_at)"
                     " VALUES (?, ?, '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
                     (reference, mid))
        conn.commit()
    finally:
        conn.close()


def test_an_unparsable_reference_is_a_problem_and_stops_gc(loaded: LoadedCache) -> None:
    _add_db_reference(loaded, "Not A//Reference")
    status = _json(loaded, "status")
    problems = [p["problem"] for p in status["problems"] if p["scope"] == "cache"]
    assert any("unparsable reference 'Not A//Reference'" in p for p in problems), problems
    # A listing says so too (a warning), and lists what it can.
    listing = run(loaded.root, "images")
    assert listing.returncode == 0 and "unparsable reference 'Not A//Reference'" in \
        listing.stderr and REF_A in listing.stdout
    # A deleter cannot tell which layers that row keeps alive: it stops, deletes nothing.
    garbage = loaded.cache.layer_erofs_path("sha256:" + "ab" * 32)
    garbage.write_bytes(loaded.layer(loaded.metadata(REF_A).diff_ids[0]).read_bytes())
    before = _data_files(loaded)
    result = cli(loaded.root, "gc")
    line = assert_one_line_error(result, 10)
    assert "unparsable reference" in line
    assert _data_files(loaded) == before and garbage.exists()


def _data_files(loaded: LoadedCache) -> dict[str, int]:
    """The cache's files less lock files (a deleter may create its coordination lock)."""
    return {k: v for k, v in loaded.files().items() if not k.endswith(".lock")}
