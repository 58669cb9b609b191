"""``make demo`` / ``make demo-stop``: the module they run, against a private cache."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cachefs.demo import DEMO_REFERENCE, MOTD
from cachefs.view.daemon import is_mountpoint
from tests.cli.conftest import run
from tests.fixtures import guest
from tests.fixtures.system import require_fuse, require_tool


def _demo(action: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CACHEFS_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "cachefs.demo", action, "--mountpoint", str(tmp_path / "mnt"),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.system
def test_demo_start_shows_a_bootable_image_then_stop_unmounts(tmp_path: Path) -> None:
    require_fuse()
    qemu_img = require_tool("qemu-img")
    require_tool("qemu-system-x86_64")
    mnt = tmp_path / "mnt"
    try:
        start = _demo("start", tmp_path)
        assert start.returncode == 0, start.stdout + start.stderr
        out = start.stdout
        image_dir = mnt / "images" / DEMO_REFERENCE
        assert is_mountpoint(mnt)
        # fsmeta.erofs is a file served by the view (not a symlink into the cache).
        assert f"{image_dir}/" in out and "    disk.vmdk  (" in out and "fsmeta.erofs  (" in out
        assert "virtual size: " in out and "create type: twoGbMaxExtentFlat" in out
        assert "make demo-stop" in out
        [qemu_line] = [line for line in out.splitlines()
                       if line.startswith("qemu-system-x86_64 ")]
        argv = shlex.split(qemu_line)
        kernel = Path(argv[argv.index("-kernel") + 1])
        initrd = Path(argv[argv.index("-initrd") + 1])
        assert kernel.name.startswith("vmlinuz-6.12") and initrd.is_file()
        assert f"file={image_dir / 'disk.vmdk'},format=vmdk" in argv[argv.index("-drive") + 1]

        info = json.loads(subprocess.run([qemu_img, "info", "--output=json",
                                          str(image_dir / "disk.vmdk")],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["virtual-size"] == (image_dir / "rootfs.img").stat().st_size
        cache = tmp_path / "cache"
        rows = json.loads(run(cache, "images", "--json").stdout)
        assert [(r["reference"], r["state"]) for r in rows] == [(DEMO_REFERENCE, "ready")]
        assert run(cache, "verify").returncode == 0

        # The kernel and initramfs it printed boot the disk and reach the image's shell.
        output = guest.boot_and_run(
            image_dir / "disk.vmdk",
            "cat etc/motd; chroot . /bin/sh -c 'cat /etc/hostname; echo $((6*7))'",
            timeout=120, kernel=kernel, initrd=initrd)
        assert output.splitlines() == [MOTD.strip(), "cachefs-demo", "42"]

        again = _demo("start", tmp_path)  # idempotent: reuses the running view
        assert again.returncode == 0 and "already mounted" in again.stdout
    finally:
        stop = _demo("stop", tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert not is_mountpoint(mnt)
    assert "not mounted" in _demo("stop", tmp_path).stdout
