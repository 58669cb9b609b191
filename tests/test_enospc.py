"""A full filesystem and an unwritable record: the error names the path, and nothing is
published half-way. The cache lives on a small tmpfs this test mounts."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.cache import GlobalCache
from cachefs.reference import Reference
from tests.cli.conftest import CACHEFS, assert_one_line_error
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.system import require_root

REF = "example.com/full/app:1"


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    require_root()
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def _load(cache: Path, archive: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CACHEFS, "--cache", str(cache), "-q", "load", str(archive)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("size", ["3m", "7m"], ids=["spool-fills", "layer-image-fills"])
@pytest.mark.system
def test_enospc_names_the_file_and_publishes_nothing(tmp_path: Path, size: str) -> None:
    """4 MiB of incompressible file: the spool (3 MiB fs) or the layer image (7 MiB fs,
    after the 4 MiB spool) does not fit."""
    image = TestImage([layer_tar([reg("blob", os.urandom(4 << 20))])])
    archive = docker_archive(image, [REF], tmp_path / "a.tar")
    with small_tmpfs(tmp_path / "fs", size) as fs:
        cache = fs / "cache"
        proc = _load(cache, archive)
        line = assert_one_line_error(proc, 1)
        assert "No space left on device" in line
        assert f": {cache}/tmp/" in line, line  # the file being written, not just errno
        assert not list((cache / "layers").glob("*.erofs"))
        assert not GlobalCache(cache).image_metadata_path(Reference.parse(REF)).exists()
        leftovers = [p.name for p in (cache / "tmp").iterdir() if not p.name.endswith(".lock")]
        assert leftovers == []


def test_record_failure_comes_before_the_metadata_commit_point(tmp_path: Path) -> None:
    """cachefs's record is written before msb's json: when it fails, the image is not
    published (and the error names the path), rather than published and reported failed."""
    archive = docker_archive(TestImage([layer_tar([reg("a", b"a")])]), [REF], tmp_path / "a.tar")
    cache = GlobalCache.new(tmp_path / "cache")
    (cache.root / "cachefs").mkdir()
    (cache.root / "cachefs" / "refs").write_bytes(b"not a directory")
    line = assert_one_line_error(_load(cache.root, archive), 1)
    assert str(cache.root / "cachefs" / "refs") in line
    assert not cache.image_metadata_path(Reference.parse(REF)).exists()
    (cache.root / "cachefs" / "refs").unlink()
    assert _load(cache.root, archive).returncode == 0
    assert cache.image_metadata_path(Reference.parse(REF)).exists()
    assert [r.reference for r in cache.ref_records()] == [str(Reference.parse(REF))]


@pytest.mark.system
def test_enospc_while_downloading_names_the_part_file(tmp_path: Path) -> None:
    """A blob larger than the cache's filesystem: the download's own write fails, and the
    one-line error names the ``.part`` being written, not just errno."""
    from tests.fixtures.registry import LocalRegistry, oci_layout

    image = TestImage([layer_tar([reg("blob", os.urandom(4 << 20))])])
    with LocalRegistry(tmp_path / "registry") as registry:
        layout = oci_layout(image, tmp_path / "layout", compression="none")
        registry.push_oci_layout(layout.path, "full/app", "1")
        ref = f"{registry.host}/full/app:1"
        with small_tmpfs(tmp_path / "fs", "2m") as fs:
            cache = fs / "cache"
            proc = subprocess.run([CACHEFS, "--cache", str(cache), "-q", "pull", "--insecure",
                                   ref], capture_output=True, text=True, timeout=300)
            line = assert_one_line_error(proc, 1)
            assert "No space left on device" in line
            assert f": {cache}/tmp/" in line and ".part" in line, line
            assert not GlobalCache(cache).image_metadata_path(Reference.parse(ref)).exists()
