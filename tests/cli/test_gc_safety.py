"""gc without write access (a dry run) and gc over a cache it cannot fully read (stops,
deletes nothing). "No write access" is root without CAP_DAC_OVERRIDE/CAP_FOWNER over a
cache whose modes deny writing, so the kernel, not our code, refuses every write."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.pipeline.pull import load
from cachefs.reference import Reference
from tests.cli.conftest import CACHEFS, REF_A, REF_B, LoadedCache, assert_one_line_error
from tests.cli.test_ops import FAKE, _orphans
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.system import require_root, require_tool

_NO_OVERRIDE = ["--bounding-set=-dac_override,-dac_read_search,-fowner",
                "--inh-caps=-dac_override,-dac_read_search,-fowner"]


def unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """``cachefs ARGS`` as root that file modes bind (no DAC override capabilities)."""
    require_root()
    setpriv = require_tool("setpriv")
    return subprocess.run([setpriv, *_NO_OVERRIDE, "--", CACHEFS, *args],
                          capture_output=True, text=True, timeout=120)


def _files(root: Path, *, locks: bool = True) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (files and directories) → (size, mode); ``locks=False``
    leaves out lock files and their directories, which a real gc may create."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if not locks and (rel.endswith(".lock") or ".image-deletions" in rel
                          or ".msb-leases" in rel):
            continue
        out[rel] = (p.lstat().st_size, p.lstat().st_mode)
    return out


def _chmod_all(root: Path, *, writable: bool) -> None:
    subprocess.run(["chmod", "-R", "u+w" if writable else "a-w", str(root)], check=True)


def test_gc_dry_run_needs_no_write_access(loaded: LoadedCache) -> None:
    garbage = _orphans(loaded)
    _chmod_all(loaded.root, writable=False)
    try:
        before = _files(loaded.root)
        proc = unprivileged("--cache", str(loaded.root), "gc", "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert {Path(r["path"]) for r in report["removed"]} == set(garbage.values())
        assert _files(loaded.root) == before  # not even a lock file was created
        # a real gc needs write access and says so in one line
        denied = unprivileged("--cache", str(loaded.root), "gc")
        assert "Permission denied" in assert_one_line_error(denied, 1)
        assert _files(loaded.root) == before
    finally:
        _chmod_all(loaded.root, writable=True)


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[GlobalCache]:
    """Two images loaded by cachefs (no msb database: the json is all that names layers),
    and one unreferenced layer, so a gc has something it may delete."""
    cache = GlobalCache.new(tmp_path / "cache")
    for ref, body in ((REF_A, b"a"), (REF_B, b"b")):
        image = TestImage([layer_tar([reg("f", body * 3000)])])
        archive = docker_archive(image, [ref], tmp_path / f"{body.decode()}.tar")
        trio.run(load, cache, archive)
    (cache.layer_erofs_path(FAKE)).write_bytes(
        cache.layer_erofs_path(cache.read_image_metadata(REF_A).diff_ids[0]).read_bytes())
    yield cache
    _chmod_all(cache.root, writable=True)


def _gc_stops(cache: GlobalCache, names: str, *, privileged: bool = False) -> None:
    before = _files(cache.root, locks=False)
    args = ("--cache", str(cache.root), "gc")
    proc = (subprocess.run([CACHEFS, *args], capture_output=True, text=True, timeout=120)
            if privileged else unprivileged(*args))
    line = assert_one_line_error(proc, 10)
    assert names in line and "nothing was deleted" in line, line
    assert _files(cache.root, locks=False) == before


@pytest.mark.system
def test_gc_stops_when_manifests_cannot_be_listed(ours: GlobalCache) -> None:
    ours.manifests_dir().chmod(0o300)  # writable and searchable, not listable
    try:
        _gc_stops(ours, str(ours.manifests_dir()))
    finally:
        ours.manifests_dir().chmod(0o755)


@pytest.mark.system
def test_gc_stops_when_a_metadata_file_cannot_be_read(ours: GlobalCache) -> None:
    json_a = ours.image_metadata_path(Reference.parse(REF_A))
    json_a.chmod(0o200)
    _gc_stops(ours, str(json_a))


def test_gc_stops_on_a_corrupt_metadata_file(ours: GlobalCache) -> None:
    json_a = ours.image_metadata_path(Reference.parse(REF_A))
    json_a.write_bytes(b'{"manifest_digest": ')
    _gc_stops(ours, str(json_a), privileged=True)


def test_gc_stops_on_a_corrupt_msb_database(ours: GlobalCache) -> None:
    db = ours.root.parent / "db" / "msb.db"
    db.parent.mkdir()
    db.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    _gc_stops(ours, str(db), privileged=True)


def test_gc_still_collects_when_everything_reads(ours: GlobalCache) -> None:
    """The control: the same cache, readable, loses exactly the unreferenced layer."""
    proc = subprocess.run([CACHEFS, "--cache", str(ours.root), "gc", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["path"] for r in json.loads(proc.stdout)["removed"]] == [
        str(ours.layer_erofs_path(FAKE))]
