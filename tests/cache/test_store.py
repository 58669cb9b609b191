from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest

from cachefs.cache import GlobalCache, default_cache_dir
from cachefs.digest import Digest
from cachefs.errors import UsageError
from cachefs.models import CachedImageMetadata
from cachefs.reference import Reference
from tests.test_models import WH1

D = Digest("sha256", "ab" * 32)
M = Digest("sha256", "cd" * 32)


def test_new_creates_every_subdirectory(tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    for sub in ("layers", "fsmeta", "vmdk", "manifests", "tmp"):
        assert (tmp_path / "c" / sub).is_dir()
    assert cache.root == tmp_path / "c"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        GlobalCache.new(tmp_path / "file")


async def test_new_async(tmp_path: Path) -> None:
    cache = await GlobalCache.new_async(tmp_path / "c")
    assert cache.tmp_dir().is_dir()


def test_paths_match_formats(tmp_path: Path) -> None:
    c = GlobalCache(tmp_path)
    safe_d, safe_m = f"sha256_{'ab' * 32}", f"sha256_{'cd' * 32}"
    assert c.layers_dir() == tmp_path / "layers"
    assert c.layer_erofs_path(D) == tmp_path / "layers" / f"{safe_d}.erofs"
    assert c.layer_erofs_path(str(D)) == c.layer_erofs_path(D)
    assert c.layer_erofs_lock_path(D) == tmp_path / "layers" / f"{safe_d}.erofs.lock"
    assert c.tar_path(D) == tmp_path / "layers" / f"{safe_d}.tar.gz"
    assert c.fsmeta_dir() == tmp_path / "fsmeta"
    assert c.fsmeta_erofs_path(M) == tmp_path / "fsmeta" / f"{safe_m}.erofs"
    assert c.fsmeta_erofs_lock_path(M) == tmp_path / "fsmeta" / f"{safe_m}.erofs.lock"
    assert c.vmdk_dir() == tmp_path / "vmdk"
    assert c.vmdk_path(M) == tmp_path / "vmdk" / f"{safe_m}.vmdk"
    assert c.vmdk_lock_path(M) == tmp_path / "vmdk" / f"{safe_m}.vmdk.lock"
    assert c.tmp_dir() == tmp_path / "tmp"
    assert c.part_path(D) == tmp_path / "tmp" / f"{safe_d}.part"
    assert c.download_lock_path(D) == tmp_path / "tmp" / f"{safe_d}.download.lock"
    assert c.spool_path(D) == tmp_path / "tmp" / f"{safe_d}.spool"
    assert c.layer_part_path(D) == tmp_path / "tmp" / f"{safe_d}.erofs.part"
    assert c.work_dir(M) == tmp_path / "tmp" / f"{safe_m}.work"
    key = Reference.parse("alpine").cache_key
    assert c.manifests_dir() == tmp_path / "manifests"
    assert c.image_lock_path("alpine") == tmp_path / "manifests" / f"{key}.lock"
    assert c.image_metadata_path(Reference.parse("alpine")) == (
        tmp_path / "manifests" / f"{key}.json"
    )


def test_default_cache_dir() -> None:
    assert default_cache_dir({"CACHEFS_CACHE_DIR": "/x", "MSB_HOME": "/m"}) == Path("/x")
    assert default_cache_dir({"MSB_HOME": "/m", "HOME": "/h"}) == Path("/m/cache")
    assert default_cache_dir({"HOME": "/h"}) == Path("/h/.microsandbox/cache")


def test_metadata_write_read_delete(tmp_path: Path) -> None:
    c = GlobalCache.new(tmp_path)
    meta = CachedImageMetadata.from_json_bytes(WH1)
    assert c.read_image_metadata("example.com/fmt/wh1:v1") is None
    path = c.write_image_metadata("example.com/fmt/wh1:v1", meta)
    assert path.read_bytes() == WH1
    assert not list(c.manifests_dir().glob("*.part"))
    assert c.read_image_metadata("example.com/fmt/wh1:v1") == meta
    assert c.delete_image_metadata("example.com/fmt/wh1:v1") is True
    assert c.delete_image_metadata("example.com/fmt/wh1:v1") is False
    assert c.read_image_metadata("example.com/fmt/wh1:v1") is None


async def test_metadata_async(tmp_path: Path) -> None:
    c = GlobalCache.new(tmp_path)
    meta = CachedImageMetadata.from_json_bytes(WH1)
    await c.write_image_metadata_async("a/b:c", meta)
    assert await c.read_image_metadata_async("a/b:c") == meta
    assert await c.delete_image_metadata_async("a/b:c")


def test_corrupt_metadata_is_a_logged_miss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = GlobalCache.new(tmp_path)
    path = c.image_metadata_path("a/b:c")
    doc = json.loads(WH1)
    doc["config"]["env"] = None
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert c.read_image_metadata("a/b:c") is None
    assert "corrupt" in caplog.text
    path.write_bytes(b"\xff not json")
    assert c.read_image_metadata("a/b:c") is None


def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = GlobalCache.new(tmp_path)
    meta = CachedImageMetadata.from_json_bytes(WH1)

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("cachefs.cache.store.publish_file", boom)
    with pytest.raises(OSError, match="disk full"):
        c.write_image_metadata("a/b:c", meta)
    assert os.listdir(c.manifests_dir()) == []


def _erofs_like(path: Path, *, size: int = 8192, magic: int = 0xE0F5E1E2,
                mode: int = 0o040755) -> None:
    data = bytearray(size)
    if size >= 1024 + 4:
        struct.pack_into("<I", data, 1024, magic)
    if size >= 1024 + 0x2C:
        struct.pack_into("<I", data, 1024 + 0x28, 1)  # meta_blkaddr
    if size >= 4096 + 6:
        struct.pack_into("<HHH", data, 4096, 1, 0, mode)
    path.write_bytes(bytes(data))


def test_validity_rules(tmp_path: Path) -> None:
    """FORMATS.md §1.7: size, magic and a directory root; vmdk merely exists."""
    c = GlobalCache.new(tmp_path)
    p = c.layer_erofs_path(D)
    assert not c.is_layer_materialized(D)
    _erofs_like(p)
    assert c.is_layer_materialized(D)
    assert c.all_layers_materialized([D, str(D)])
    assert not c.all_layers_materialized([D, M])
    _erofs_like(p, size=8192 - 512)
    assert not c.is_layer_materialized(D)
    _erofs_like(p, magic=0x12345678)
    assert not c.is_layer_materialized(D)
    _erofs_like(p, mode=0o100644)
    assert not c.is_layer_materialized(D)
    p.write_bytes(b"")
    assert not c.is_layer_materialized(D)
    _erofs_like(c.fsmeta_erofs_path(M))
    assert c.is_fsmeta_materialized(M)
    assert not c.is_vmdk_materialized(M)
    c.vmdk_path(M).write_text("garbage")
    assert c.is_vmdk_materialized(M)


def test_ref_records(tmp_path: Path) -> None:
    c = GlobalCache.new(tmp_path)
    c.record_reference("alpine:3.20", "alpine:3.20", M, "pull")
    c.record_reference(Reference.parse("x/y"), "x/y", str(M), "load")
    recs = {r.reference: r for r in c.ref_records()}
    assert set(recs) == {"docker.io/library/alpine:3.20", "docker.io/x/y:latest"}
    assert recs["docker.io/x/y:latest"].source == "load"
    (c.refs_dir() / "junk.json").write_text("{")
    assert len(c.ref_records()) == 2
    assert c.forget_reference("alpine:3.20")
    assert [r.typed for r in c.ref_records()] == ["x/y"]


def test_opens_an_msb_cache_and_reads_its_metadata(tmp_path: Path, msb) -> None:  # type: ignore[no-untyped-def]
    """msb writes, cachefs reads: every field equal to the file msb wrote."""
    from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg

    image = TestImage(
        layers=[layer_tar([dir_("etc"), reg("etc/hello", b"hi\n")]),
                layer_tar([reg("bin/tool", b"#!/bin/sh\n", mode=0o755)])],
        config={"Env": ["PATH=/bin", "LANG=C.UTF-8"], "Cmd": ["/bin/tool"],
                "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}, "WorkingDir": "/w",
                "User": "7"},
    )
    archive = docker_archive(image, ["example.com/team/app:v1"], tmp_path / "img.tar")
    msb.load(archive)
    cache = GlobalCache(msb.cache)
    meta = cache.read_image_metadata("example.com/team/app:v1")
    assert meta is not None
    raw = json.loads(cache.image_metadata_path("example.com/team/app:v1").read_bytes())
    assert meta.model_dump() == raw
    assert meta.to_json_bytes() == cache.image_metadata_path("example.com/team/app:v1").read_bytes()
    assert [str(d) for d in meta.diff_ids] == image.diff_ids()
    assert meta.config.env == ["PATH=/bin", "LANG=C.UTF-8"] and meta.config.user == "7"
    assert cache.all_layers_materialized(meta.diff_ids)
    assert cache.is_fsmeta_materialized(meta.manifest)
    assert cache.is_vmdk_materialized(meta.manifest)


def test_msb_reads_metadata_written_by_cachefs(tmp_path: Path, msb) -> None:  # type: ignore[no-untyped-def]
    """cachefs writes the json into a cache that has no database; msb's pull is a cache hit.

    The reference names a registry port nothing listens on, so any network use would fail.
    """
    from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
    from tests.fixtures.system import Msb

    ref = "127.0.0.1:9/cachefs/roundtrip:v1"
    image = TestImage(layers=[layer_tar([reg("f", b"data")])], config={"Cmd": ["/f"]})
    msb.load(docker_archive(image, [ref], tmp_path / "img.tar"))
    source = GlobalCache(msb.cache)
    meta = source.read_image_metadata(ref)
    assert meta is not None

    other = Msb(msb.binary, tmp_path / "other")
    target = GlobalCache.new(other.cache)
    for sub in ("layers", "fsmeta", "vmdk"):
        for f in (msb.cache / sub).glob("sha256_*"):
            if f.suffix in (".erofs", ".vmdk"):
                shutil.copy2(f, target.root / sub / f.name)
    # the vmdk names absolute paths of the source cache: still valid (msb checks existence)
    written = target.write_image_metadata(ref, CachedImageMetadata.from_json_bytes(
        meta.to_json_bytes()))
    assert written.read_bytes() == source.image_metadata_path(ref).read_bytes()

    proc = other("pull", "--insecure", ref)
    assert "already cached" in proc.stdout + proc.stderr
    listing = other("image", "ls").stdout
    assert ref in listing

    # and a file msb would call corrupt sends it to the (absent) network
    doc = json.loads(written.read_bytes())
    del doc["config"]["env"]
    written.write_text(json.dumps(doc))
    failed = Msb(msb.binary, tmp_path / "third")
    shutil.copytree(other.cache, failed.cache)
    proc = failed("pull", "--insecure", ref, check=False)
    assert proc.returncode != 0
    assert target.read_image_metadata(ref) is None
