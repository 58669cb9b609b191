"""``cache.health``: one verdict per image (typed problems with the command that fixes
them), over caches our own ``load`` filled, damaged the ways users damage them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from cachefs.cache.catalog import list_images
from cachefs.cache.health import Problem, info_problems, missing_labels
from cachefs.cache.store import GlobalCache
from cachefs.pipeline.pull import load
from tests.cli.conftest import cli
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg

REF = "example.com/health/img:1"


@pytest.fixture
def cache(tmp_path: Path) -> GlobalCache:
    image = TestImage([layer_tar([reg("a", b"a" * 6000)]), layer_tar([reg("b", b"b" * 9000)])])
    cache = GlobalCache.new(tmp_path / "cache")
    trio.run(load, cache, docker_archive(image, [REF], tmp_path / "img.tar"))
    return cache


def _problems(cache: GlobalCache) -> list[Problem]:
    [info] = list_images(cache)
    return info_problems(cache, info)


def test_a_sound_image_has_no_problems(cache: GlobalCache) -> None:
    assert _problems(cache) == []


def _flip_reserved_device_byte(cache: GlobalCache) -> Path:
    """A reserved byte of device slot 0: msb's rule (magic, root inode) still holds; only
    the superblock checksum notices, and the kernel refuses the image."""
    meta = cache.read_image_metadata(REF)
    assert meta is not None
    fsmeta = cache.fsmeta_erofs_path(meta.manifest_digest)
    data = bytearray(fsmeta.read_bytes())
    data[1152 + 0x48] ^= 0xFF
    fsmeta.write_bytes(bytes(data))
    assert cache.is_fsmeta_materialized(meta.manifest_digest)  # msb would use it
    return fsmeta


def test_a_flipped_reserved_byte_is_a_repairable_fsmeta_problem(cache: GlobalCache) -> None:
    fsmeta = _flip_reserved_device_byte(cache)
    [problem] = _problems(cache)
    assert (problem.artifact, problem.path, problem.repairable) == ("fsmeta", fsmeta, True)
    assert "checksum" in problem.message
    assert problem.fix(REF) == f"cachefs verify --repair {REF}"


def test_images_and_status_agree_on_a_flipped_reserved_byte(cache: GlobalCache) -> None:
    """``cachefs images`` judged by msb's rule alone and said ready; status did not."""
    _flip_reserved_device_byte(cache)
    images = json.loads(cli(cache.root, "images", "--json").stdout)
    status = json.loads(cli(cache.root, "status", "--json").stdout)
    [row] = images
    [img] = status["images"]["list"]
    assert (row["state"], row["missing"]) == ("incomplete", ["fsmeta"])
    assert img["ready"] is False
    assert any("checksum" in p["problem"] for p in status["problems"])


def test_a_deleted_vmdk_is_a_repairable_problem(cache: GlobalCache) -> None:
    meta = cache.read_image_metadata(REF)
    assert meta is not None
    vmdk = cache.vmdk_path(meta.manifest_digest)
    vmdk.unlink()
    assert [(p.artifact, p.path, p.message, p.repairable) for p in _problems(cache)] == [
        ("vmdk", vmdk, "missing", True)]


def test_a_corrupt_layer_needs_the_image_again(cache: GlobalCache) -> None:
    """A layer is made from its blob, which the cache does not keep: only pull/load fixes
    it, and the fsmeta/VMDK measured against it are not repairable until then."""
    meta = cache.read_image_metadata(REF)
    assert meta is not None
    layer = cache.layer_erofs_path(meta.diff_ids[1])
    with open(layer, "r+b") as f:
        f.seek(1024)
        f.write(b"\0\0\0\0")  # bad magic
    problems = _problems(cache)
    assert problems[0].artifact == "layer" and problems[0].diff_id == str(meta.diff_ids[1])
    assert not any(p.repairable for p in problems)
    assert problems[0].fix(REF).startswith(f"cachefs pull {REF}")
    assert missing_labels(problems)[0] == f"layer {meta.diff_ids[1]}"
