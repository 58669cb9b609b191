"""Removal while ``rootfs.img`` is open: deleters are held off, and a reader survives."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.system import Msb
from tests.view.conftest import ViewMount, artifacts, concat, wait_for

pytestmark = pytest.mark.system

THREE = "docker.io/library/three:v3"


def test_msb_rm_keeps_the_files_of_an_open_rootfs_img(mounted: ViewMount, msb: Msb) -> None:
    """msb drops the reference, but its deleter takes exclusive leases without blocking,
    and the shared leases of the open handle make it leave every file in place."""
    files = artifacts(msb.cache, THREE)
    expected = concat(files)
    img = mounted.image_dir(THREE) / "rootfs.img"
    with open(img, "rb", buffering=0) as f:
        assert f.read(4096) == expected[:4096]
        msb("image", "rm", "three:v3")
        assert all(p.exists() for p in files)
        assert f.read() == expected[4096:]
    assert "three:v3" not in msb("image", "ls").stdout
    assert wait_for(lambda: not mounted.image_dir(THREE).exists())


def test_files_unlinked_under_an_open_reader(mounted: ViewMount, msb: Msb) -> None:
    """Something that ignores leases (rm -f) deletes the artifacts: the open handle keeps
    reading the old inodes, the image turns not-ready, and the daemon lives on."""
    files = artifacts(msb.cache, THREE)
    expected = concat(files)
    image_dir = mounted.image_dir(THREE)
    with open(image_dir / "rootfs.img", "rb", buffering=0) as f:
        assert f.read(10) == expected[:10]
        for p in files[1:]:
            os.unlink(p)
        assert f.read() == expected[10:]
    assert wait_for(lambda: "rootfs.img" not in os.listdir(image_dir))
    status = (image_dir / "status").read_text()
    assert "cachefs pull" in status
    with pytest.raises(FileNotFoundError):
        (image_dir / "rootfs.img").stat()
    assert mounted.alive()
    assert (mounted.mnt / "status.json").read_bytes().startswith(b"{")
