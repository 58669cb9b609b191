"""``cachefs images``, ``cachefs status`` and the view agree on whether an image is ready
(issue 12): the fsmeta/VMDK checks are ``cachefs.derived_check``'s, in one place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.pipeline.pull import load
from tests.fixtures.images import docker_archive
from tests.view.conftest import image_one, view_mount, wait_for

pytestmark = pytest.mark.system

REF = "docker.io/library/one:1"
REPO = Path(__file__).resolve().parents[2]


def _cachefs_json(cache: Path, *args: str) -> object:
    proc = subprocess.run([sys.executable, "-m", "cachefs.cli", "--cache", str(cache), *args,
                           "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _verdicts(cache: Path, mnt_status: Path) -> tuple[bool, bool, bool]:
    """(cachefs images says ready, cachefs status says ready, the view says ready)."""
    rows = _cachefs_json(cache, "images")
    assert isinstance(rows, list)
    [row] = [r for r in rows if r["reference"] == REF]
    doc = _cachefs_json(cache, "status")
    assert isinstance(doc, dict)
    [img] = [i for i in doc["images"]["list"] if i["reference"] == REF]
    return row["state"] == "ready", img["ready"], mnt_status.read_text() == "ready\n"


def _loaded(tmp_path: Path) -> tuple[GlobalCache, str]:
    cache = GlobalCache.new(tmp_path / "cache")
    trio.run(load, cache, docker_archive(image_one(), ["one:1"], tmp_path / "one.tar"))
    meta = cache.read_image_metadata(REF)
    assert meta is not None
    return cache, meta.manifest


def test_a_flipped_reserved_byte_in_a_device_slot(tmp_path: Path) -> None:
    """msb's rule (magic, root directory) still passes; the kernel refuses the crc."""
    cache, manifest = _loaded(tmp_path)
    fsmeta = cache.fsmeta_erofs_path(manifest)
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        status = vm.image_dir(REF) / "status"
        assert _verdicts(cache.root, status) == (True, True, True)
        data = bytearray(fsmeta.read_bytes())
        data[1152 + 0x48] ^= 0xFF  # a reserved byte of device slot 0: only the crc notices
        fsmeta.write_bytes(bytes(data))
        assert wait_for(lambda: status.read_text() != "ready\n", 5.0), status.read_text()
        assert _verdicts(cache.root, status) == (False, False, False)
        text = status.read_text()
        assert "checksum" in text and f"fix: cachefs verify --repair {REF}" in text
        assert not (vm.image_dir(REF) / "disk.vmdk").exists()
        assert not (vm.image_dir(REF) / "rootfs.img").exists()


def test_a_deleted_vmdk(tmp_path: Path) -> None:
    """msb needs its VMDK (it would stitch again before using the image), so no one calls
    the image ready; the view's own disks do not use that file and stay served."""
    cache, manifest = _loaded(tmp_path)
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        status = vm.image_dir(REF) / "status"
        assert _verdicts(cache.root, status) == (True, True, True)
        cache.vmdk_path(manifest).unlink()
        assert wait_for(lambda: status.read_text() != "ready\n", 5.0), status.read_text()
        assert _verdicts(cache.root, status) == (False, False, False)
        text = status.read_text()
        assert f"vmdk missing: vmdk/{cache.vmdk_path(manifest).name}" in text
        assert f"fix: cachefs verify --repair {REF}" in text
        assert (vm.image_dir(REF) / "disk.vmdk").read_text().startswith("# Disk Descriptor")


def test_a_corrupt_layer_names_the_command_that_fixes_it(tmp_path: Path) -> None:
    """``verify --repair`` rebuilds fsmeta and VMDK from the layers, never a layer: the
    hint is to fetch it again, and it does fix it."""
    cache, _ = _loaded(tmp_path)
    meta = cache.read_image_metadata(REF)
    assert meta is not None
    layer = cache.layer_erofs_path(meta.diff_ids[0])
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        status = vm.image_dir(REF) / "status"
        assert status.read_text() == "ready\n"
        with open(layer, "r+b") as f:
            f.seek(1024)
            f.write(b"\0\0\0\0")  # the EROFS magic: invalid by msb's own rule
        assert wait_for(lambda: status.read_text() != "ready\n", 5.0), status.read_text()
        assert _verdicts(cache.root, status) == (False, False, False)
        text = status.read_text()
        assert f"fix: cachefs pull {REF} (or cachefs load <archive> again" in text, text
        assert "verify --repair" not in text
        trio.run(load, cache, tmp_path / "one.tar")  # what the hint says: load it again
        assert wait_for(lambda: status.read_text() == "ready\n", 5.0), status.read_text()
        assert _verdicts(cache.root, status) == (True, True, True)
