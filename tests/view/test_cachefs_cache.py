"""The view over a cache that cachefs alone filled (no msb database at all)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.pipeline.pull import load
from tests.fixtures.images import docker_archive
from tests.fixtures.system import loop_mount_erofs, require_tool, run
from tests.view.conftest import artifacts, image_three, view_mount, write_concat

pytestmark = pytest.mark.system

REF = "127.0.0.1:5000/team/three:v3"


def test_view_of_a_cachefs_loaded_cache(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    cache = GlobalCache.new(tmp_path / "cache")
    archive = docker_archive(image_three(), [REF], tmp_path / "three.tar", compress=True)
    trio.run(load, cache, archive)
    assert not (cache.root.parent / "db").exists()  # names come from cachefs's records
    parts = artifacts(cache.root, REF)
    raw = write_concat(parts, tmp_path / "raw.img")
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        d = vm.image_dir(REF)
        found = run(["find", str(vm.mnt / "images"), "-mindepth", "1"]).stdout.split()
        assert str(d / "disk.vmdk") in found
        assert (d / "status").read_text() == "ready\n"
        assert run(["cat", str(d / "manifest.json")]).stdout == \
            cache.read_image_metadata(REF).raw_manifest_json  # type: ignore[union-attr]
        assert (d / "fsmeta.erofs").read_bytes() == parts[0].read_bytes()
        assert [(d / "layers" / n).read_bytes() for n in sorted(os.listdir(d / "layers"))] \
            == [p.read_bytes() for p in parts[1:]]
        doc = json.loads((d / "image.json").read_text())
        assert doc["reference"] == REF and doc["ready"] is True
        cmp = subprocess.run([qemu_img, "compare", str(d / "disk.vmdk"), str(raw)],
                             capture_output=True, text=True)
        assert "identical" in cmp.stdout, cmp.stderr
        assert run(["cmp", str(d / "rootfs.img"), str(raw)]).returncode == 0
        with loop_mount_erofs(d / "rootfs.img", tmp_path / "root") as root:
            assert (root / "data" / "a.txt").read_bytes() == b"a2 overwritten\n"
            assert (root / "srv" / "top").read_bytes() == b"top layer\n"
            assert (root / "data" / "big.bin").read_bytes() == bytes(range(256)) * 64
