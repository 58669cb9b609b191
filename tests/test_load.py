"""``load``: docker archives and OCI layouts give the same cache as ``msb load``."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from cachefs.cache import GlobalCache
from cachefs.errors import ArchiveError, DigestMismatch
from cachefs.pipeline.pull import load
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg, symlink
from tests.fixtures.registry import oci_layout
from tests.fixtures.system import Msb
from tests.test_pull import artifacts

IMAGE = TestImage(
    [layer_tar([dir_("etc"), reg("etc/a", b"a\n"), symlink("etc/l", "a")]),
     layer_tar([reg("etc/.wh.a", b""), reg("big", os.urandom(100_000))])],
    config={"Env": ["A=1"], "Cmd": ["sh"]},
)


@pytest.mark.parametrize("compress", [False, True])
async def test_docker_archive_equals_msb_load(tmp_path: Path, msb: Msb, compress: bool) -> None:
    archive = docker_archive(IMAGE, ["example.com/load/app:v1", "example.com/load/app:v2"],
                             tmp_path / "img.tar", compress=compress)
    cache = GlobalCache.new(tmp_path / "ours")
    results = await load(cache, archive, tag="example.com/load/extra:1")
    msb("load", "-i", str(archive), "-t", "example.com/load/extra:1")
    ours, theirs = artifacts(cache.root), artifacts(msb.cache)
    assert ours == theirs
    assert [str(r.reference) for r in results] == [
        "example.com/load/app:v1", "example.com/load/app:v2", "example.com/load/extra:1"]
    assert {r.source for r in cache.ref_records()} == {"load"}
    assert [p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []


async def test_oci_layout_tar_equals_msb_load(tmp_path: Path, msb: Msb) -> None:
    layout = oci_layout(IMAGE, tmp_path / "layout", tag="example.com/load/oci:v1",
                        compression="zstd")
    tar = tmp_path / "layout.tar"
    with tarfile.open(tar, "w") as tf:
        for p in sorted(layout.path.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout.path)), recursive=False)
    cache = GlobalCache.new(tmp_path / "ours")
    await load(cache, tar)
    msb("load", "-i", str(tar))
    assert artifacts(cache.root) == artifacts(msb.cache)
    # a layout directory works too (msb only takes tars)
    other = GlobalCache.new(tmp_path / "dir")
    await load(other, layout.path)
    assert artifacts(other.root).keys() == artifacts(cache.root).keys()


async def test_untagged_archive_needs_a_tag(tmp_path: Path) -> None:
    archive = docker_archive(IMAGE, [], tmp_path / "img.tar")
    cache = GlobalCache.new(tmp_path / "c")
    with pytest.raises(ArchiveError, match="no tag") as info:
        await load(cache, archive)
    assert "--tag" in info.value.one_line()
    assert not list(cache.layers_dir().glob("*.erofs"))
    results = await load(cache, archive, tag="local/untagged:1")
    assert str(results[0].reference) == "docker.io/local/untagged:1"


async def test_layer_not_matching_its_diff_id_publishes_nothing(tmp_path: Path) -> None:
    bad = TestImage(IMAGE.layers)
    good_cfg = bad.config_json()
    bad.config_json = lambda: good_cfg.replace(  # type: ignore[method-assign]
        IMAGE.diff_ids()[1].encode(), b"sha256:" + b"1" * 64)
    archive = docker_archive(bad, ["example.com/load/bad:1"], tmp_path / "bad.tar")
    cache = GlobalCache.new(tmp_path / "c")
    with pytest.raises((DigestMismatch, ArchiveError)) as info:
        await load(cache, archive)
    assert "1" * 64 in info.value.one_line()
    assert not cache.image_metadata_path("example.com/load/bad:1").exists()
    assert not list(cache.fsmeta_dir().glob("*.erofs"))
    assert [p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []


async def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="no such"):
        await load(GlobalCache.new(tmp_path / "c"), tmp_path / "absent.tar")
