"""The view mounted for real over an msb-filled cache, read with ordinary tools."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cachefs.cache.locks import lease_is_busy
from cachefs.cache.store import GlobalCache
from cachefs.errors import MountError
from cachefs.view.daemon import check_mountpoint, mount, umount
from cachefs.vmdk import parse_descriptor
from tests.fixtures.system import Msb, loop_mount_erofs, require_fuse, require_tool, run
from tests.view.conftest import (
    ViewMount,
    artifacts,
    image_one,
    image_two,
    load,
    view_mount,
    wait_for,
    write_concat,
)

pytestmark = pytest.mark.system

ONE = "docker.io/library/one:1"
ONE_REG = "127.0.0.1:5000/team/one:latest"
THREE = "docker.io/library/three:v3"


def test_paths_by_reference_and_files(mounted: ViewMount, msb: Msb) -> None:
    mnt = mounted.mnt
    assert sorted(os.listdir(mnt)) == ["README", "by-digest", "images", "layers", "metrics",
                                       "status.json"]
    found = run(["find", str(mnt / "images"), "-name", "status"]).stdout.split()
    assert sorted(found) == sorted(str(mnt / "images" / r / "status")
                                   for r in (ONE, ONE_REG, THREE))
    d = mounted.image_dir(THREE)
    assert sorted(os.listdir(d)) == ["config.json", "disk.vmdk", "fsmeta.erofs", "image.json",
                                     "layers", "manifest.json", "rootfs.img", "status"]
    parts = artifacts(msb.cache, THREE)
    # Disk files are regular read-only files served by the view, never links into the
    # cache (a VMM running as another user could not follow them into a private cache).
    fm = os.lstat(d / "fsmeta.erofs")
    assert stat.S_ISREG(fm.st_mode) and fm.st_mode & 0o777 == 0o444
    assert (d / "fsmeta.erofs").read_bytes() == parts[0].read_bytes()
    links = sorted(os.listdir(d / "layers"))
    assert [n[:3] for n in links] == ["00-", "01-", "02-"]
    for name, part in zip(links, parts[1:], strict=True):
        assert name == f"{name[:2]}-{part.name}"
        assert stat.S_ISREG(os.lstat(d / "layers" / name).st_mode)
        assert (d / "layers" / name).read_bytes() == part.read_bytes()
        assert (mnt / "layers" / part.name).read_bytes() == part.read_bytes()
    assert (d / "status").read_text() == "ready\n"
    # Top-level layers/: every layer file, by diff_id.
    all_layers = sorted(p.name for p in (msb.cache / "layers").glob("*.erofs"))
    assert sorted(os.listdir(mnt / "layers")) == all_layers
    # by-digest names the same directory by manifest digest.
    meta = GlobalCache(msb.cache).read_image_metadata(THREE)
    assert meta is not None
    by_digest = mnt / "by-digest" / meta.manifest.path_safe()
    assert (by_digest / "disk.vmdk").read_bytes() == (d / "disk.vmdk").read_bytes()
    # Raw documents and image.json.
    assert (d / "manifest.json").read_text() == meta.raw_manifest_json
    assert (d / "config.json").read_text() == meta.raw_config_json
    doc = json.loads((d / "image.json").read_text())
    assert doc["reference"] == THREE and doc["ready"] is True
    assert doc["manifest_digest"] == meta.manifest_digest
    assert [layer["diff_id"] for layer in doc["layers"]] == [x.diff_id for x in meta.layers]
    assert [layer["erofs_size"] for layer in doc["layers"]] == [
        p.stat().st_size for p in parts[1:]]
    assert doc["config"]["config"]["Entrypoint"] == ["/srv/top"]


def test_stat_sizes_mtimes_nlink(mounted: ViewMount, msb: Msb, tmp_path: Path) -> None:
    d = mounted.image_dir(THREE)
    parts = artifacts(msb.cache, THREE)
    out = run(["stat", "-c", "%s %b %h %F", str(d / "rootfs.img")]).stdout.split(maxsplit=3)
    total = sum(p.stat().st_size for p in parts)
    assert out == [str(total), str(total // 512), "1", "regular file\n"]
    st = os.stat(d / "rootfs.img")
    assert st.st_mtime_ns >= max(p.stat().st_mtime_ns for p in parts)
    assert os.stat(d).st_nlink == 3  # itself, "." in it, and layers/
    assert os.stat(d / "status").st_size == len("ready\n")
    assert os.stat(d / "disk.vmdk").st_size == len((d / "disk.vmdk").read_bytes())
    # Inode numbers: one per entry, and unchanged entries keep theirs across a refresh
    # (another image loaded; the view rescans and invalidates the kernel's cached entries).
    names = (".", "status", "image.json", "disk.vmdk", "layers")
    before = {n: os.stat(d / n).st_ino for n in names}
    assert len(set(before.values())) == len(names)
    two = mounted.image_dir("docker.io/library/two:2")
    load(msb, tmp_path, image_two(), ["two:2"], "two")
    assert wait_for(lambda: (two / "status").exists()), "the new image never appeared"
    assert {n: os.stat(d / n).st_ino for n in names} == before
    assert os.stat(two / "status").st_ino not in before.values()


def test_disk_vmdk_and_rootfs_img(mounted: ViewMount, msb: Msb, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    d = mounted.image_dir(THREE)
    parts = artifacts(msb.cache, THREE)
    raw = write_concat(parts, tmp_path / "raw.img")
    extents = parse_descriptor((d / "disk.vmdk").read_text())
    assert extents[0].path == "fsmeta.erofs"
    assert all(e.path.startswith("layers/") for e in extents[1:])
    assert [e.sectors * 512 for e in extents] == [p.stat().st_size for p in parts]
    info = json.loads(run([qemu_img, "info", "--output=json", str(d / "disk.vmdk")]).stdout)
    assert info["virtual-size"] == raw.stat().st_size
    assert "identical" in run([qemu_img, "compare", str(d / "disk.vmdk"), str(raw)]).stdout
    run(["cmp", str(d / "rootfs.img"), str(raw)])
    with loop_mount_erofs(d / "rootfs.img", tmp_path / "root") as root:
        assert (root / "data" / "a.txt").read_bytes() == b"a2 overwritten\n"
        assert (root / "data" / "keep").read_bytes() == b"k\n"
        assert (root / "data" / "big.bin").read_bytes() == bytes(range(256)) * 64
        assert (root / "srv" / "top").read_bytes() == b"top layer\n"


def test_status_files(mounted: ViewMount) -> None:
    mnt = mounted.mnt
    doc = json.loads((mnt / "status.json").read_text())
    assert doc["images"]["total"] == 3 and doc["images"]["ready"] == 3
    assert doc["layers"]["total"] == 4
    assert doc["bytes"]["layers"] > 0 and doc["bytes"]["fsmeta"] > 0
    assert set(doc["bytes"]) == {"layers", "fsmeta", "vmdk", "manifests", "tmp"}
    assert doc["problems"] == [] and doc["downloads_in_flight"] == []
    metrics = run(["cat", str(mnt / "metrics")]).stdout
    assert "cachefs_images 3\n" in metrics
    assert "cachefs_layers 4\n" in metrics
    assert f'cachefs_image_ready{{reference="{THREE}"}} 1\n' in metrics
    assert 'cachefs_bytes{kind="layers"}' in metrics
    assert "disk.vmdk" in (mnt / "README").read_text()


def test_downloads_in_flight_are_fresh(mounted: ViewMount, msb: Msb) -> None:
    """In flight: a ``.part`` whose download lock is held (by another process, as a
    pull holds it); the same file with the lock free is a leftover, not a download."""
    from tests.cli.conftest import held_by_other_process

    part = msb.cache / "tmp" / f"sha256_{'a' * 64}.part"
    part.parent.mkdir(exist_ok=True)
    part.write_bytes(b"x" * 1000)
    lock = GlobalCache(msb.cache).download_lock_path(f"sha256:{'a' * 64}")
    with held_by_other_process(lock, shared=False):
        doc = json.loads((mounted.mnt / "status.json").read_text())
        assert doc["downloads_in_flight"] == [{"file": part.name, "bytes": 1000}]
        part.write_bytes(b"x" * 3000)
        assert "cachefs_download_bytes 3000\n" in (mounted.mnt / "metrics").read_text()
    doc = json.loads((mounted.mnt / "status.json").read_text())
    assert doc["downloads_in_flight"] == [] and doc["bytes"]["tmp"] == 3000


@pytest.mark.parametrize(
    "cmd",
    [
        ["touch", "{d}/new"],
        ["sh", "-c", "echo x > {d}/status"],
        ["mkdir", "{d}/sub"],
        ["rm", "-f", "{d}/status"],
        ["ln", "-s", "x", "{d}/lnk"],
        ["mv", "{d}/status", "{d}/status2"],
        ["chmod", "777", "{d}/status"],
    ],
)
def test_writes_fail_read_only(mounted: ViewMount, cmd: list[str]) -> None:
    d = mounted.image_dir(ONE)
    proc = subprocess.run([c.format(d=d) for c in cmd], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Read-only file system" in proc.stderr


def test_open_for_write_is_erofs(mounted: ViewMount) -> None:
    for name in ("rootfs.img", "status", "image.json"):
        with pytest.raises(OSError) as info:
            os.open(mounted.image_dir(ONE) / name, os.O_RDWR)
        assert info.value.errno == errno.EROFS
    # No xattrs at all: "not supported" (which makes `ls -l` stop probing ACLs, each probe
    # a walk through an image directory and so a round trip to the daemon).
    for _ in range(2):
        with pytest.raises(OSError) as info:
            os.getxattr(mounted.image_dir(ONE) / "status", "user.x")
        assert info.value.errno == errno.EOPNOTSUPP


def test_live_add_break_remove(mounted: ViewMount, msb: Msb, tmp_path: Path) -> None:
    two = "docker.io/library/two:2"
    d = mounted.image_dir(two)
    assert not d.exists()
    load(msb, tmp_path, image_two(), ["two:2"], "two")
    assert wait_for(lambda: (d / "status").exists()), "new image never appeared"
    assert (d / "status").read_text() == "ready\n"
    assert (d / "disk.vmdk").exists()

    # Its top layer vanishes (the layers are its own): status says what and how to fix it.
    meta = GlobalCache(msb.cache).read_image_metadata(two)
    assert meta is not None
    top = GlobalCache(msb.cache).layer_erofs_path(meta.diff_ids[-1])
    top.unlink()
    assert wait_for(lambda: (d / "status").read_text() != "ready\n")
    status = (d / "status").read_text()
    assert "missing" in status and top.name in status and f"cachefs pull {two}" in status
    assert not (d / "disk.vmdk").exists() and not (d / "rootfs.img").exists()
    assert wait_for(lambda: not (mounted.mnt / "layers" / top.name).exists())

    # Corrupt the fsmeta: the fix is a repair, not a download.
    load(msb, tmp_path, image_two(), ["two:2"], "two-again")  # restores the layer
    assert wait_for(lambda: (d / "status").read_text() == "ready\n")
    fsmeta = GlobalCache(msb.cache).fsmeta_erofs_path(meta.manifest_digest)
    with open(fsmeta, "r+b") as f:
        f.seek(1024)
        f.write(b"\0\0\0\0")
    os.utime(fsmeta.parent)  # in-place writes do not touch directory mtimes
    assert wait_for(lambda: "corrupt" in (d / "status").read_text())
    assert f"cachefs verify --repair {two}" in (d / "status").read_text()
    metrics = (mounted.mnt / "metrics").read_text()
    assert f'cachefs_image_ready{{reference="{two}"}} 0' in metrics

    # msb removes it: the directory disappears.
    msb("image", "rm", "two:2")
    assert wait_for(lambda: not d.exists()), "removed image stays visible"
    assert mounted.image_dir(ONE).exists()

    # Its metadata json goes while msb still lists it: still shown, with a status.
    GlobalCache(msb.cache).image_metadata_path(THREE).unlink()
    d3 = mounted.image_dir(THREE)
    assert wait_for(lambda: "metadata missing" in (d3 / "status").read_text())
    assert not (d3 / "rootfs.img").exists()


def test_moved_cache_keeps_disk_vmdk_working(msb: Msb, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    load(msb, tmp_path, image_one(), ["one:1"], "one")
    moved = tmp_path / "elsewhere"
    shutil.move(str(msb.root), str(moved))
    cache = moved / "cache"
    parts = artifacts(cache, ONE)
    raw = write_concat(parts, tmp_path / "raw.img")
    msb_vmdk = next((cache / "vmdk").glob("*.vmdk"))
    stale = subprocess.run([qemu_img, "info", str(msb_vmdk)], capture_output=True, text=True)
    assert stale.returncode != 0  # msb's own descriptor still names the old paths
    with view_mount(cache, tmp_path / "mnt") as vm:
        vmdk = vm.image_dir(ONE) / "disk.vmdk"
        assert "identical" in run([qemu_img, "compare", str(vmdk), str(raw)]).stdout
        assert (vm.image_dir(ONE) / "fsmeta.erofs").read_bytes() == parts[0].read_bytes()


def test_concurrent_readers_and_leases(mounted: ViewMount, msb: Msb) -> None:
    parts = artifacts(msb.cache, THREE)
    expected = b"".join(p.read_bytes() for p in parts)
    img = mounted.image_dir(THREE) / "rootfs.img"
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with open(img, "rb", buffering=0) as f:
                if f.read() != expected:
                    errors.append(f"reader {seed}: full read differs")
                for _ in range(50):
                    off = rng.randrange(len(expected))
                    n = rng.randrange(1, 20000)
                    if os.pread(f.fileno(), n, off) != expected[off : off + n]:
                        errors.append(f"reader {seed}: pread({n}, {off}) differs")
        except OSError as err:
            errors.append(f"reader {seed}: {err}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []

    # An open rootfs.img holds shared leases on what it reads; release() drops them
    # (the kernel sends RELEASE after close() returns, hence the bounded wait).
    assert wait_for(lambda: not any(lease_is_busy(p) for p in parts))
    with open(img, "rb") as f:
        f.read(1)
        assert all(lease_is_busy(p) for p in parts)
    assert wait_for(lambda: not any(lease_is_busy(p) for p in parts))


def test_refresh_keeps_rootfs_img_pages(mounted: ViewMount, msb: Msb) -> None:
    """A rescan that changes nothing of the disk (here: its metadata file is touched, as a
    retag does) leaves the kernel's cached pages of rootfs.img alone."""
    fincore = require_tool("fincore")
    d = mounted.image_dir(THREE)
    img = d / "rootfs.img"
    size = img.stat().st_size
    assert len(img.read_bytes()) == size

    def resident() -> int:
        out = run([fincore, "--bytes", "--noheadings", "--output", "RES", str(img)]).stdout
        return int(out.strip())

    assert resident() == size
    before = os.stat(d).st_mtime_ns
    metadata = GlobalCache(msb.cache).image_metadata_path(THREE)
    os.utime(metadata)
    os.utime(metadata.parent)
    assert wait_for(lambda: os.stat(d).st_mtime_ns != before), "no refresh seen"
    assert resident() == size
    assert img.read_bytes() == b"".join(p.read_bytes() for p in artifacts(msb.cache, THREE))


def test_sigterm_during_reads_unmounts(mounted: ViewMount) -> None:
    img = mounted.image_dir(THREE) / "rootfs.img"
    stop = threading.Event()
    started = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                with open(img, "rb", buffering=0) as f:
                    while f.read(4096):
                        started.set()
            except OSError:
                return

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert started.wait(10)
        mounted.proc.send_signal(signal.SIGTERM)
        mounted.proc.wait(timeout=15)
        assert mounted.proc.returncode == 0, "".join(mounted.stderr_lines)
        assert not os.path.ismount(mounted.mnt)
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def test_mountpoint_checks(mounted: ViewMount, tmp_path: Path) -> None:
    require_fuse()
    with pytest.raises(MountError, match="already a mount point"):
        mount(GlobalCache(tmp_path), mounted.mnt)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(MountError, match="not empty"):
        mount(GlobalCache(tmp_path), full)
    with pytest.raises(MountError, match="not a directory"):
        check_mountpoint(full / "something")
    with pytest.raises(MountError, match="not mounted"):
        umount(full)


def test_umount_and_stale_mount(msb: Msb, tmp_path: Path) -> None:
    load(msb, tmp_path, image_one(), ["one:1"], "one")
    with view_mount(msb.cache, tmp_path / "mnt") as vm:
        vm.proc.kill()  # a crashed daemon leaves "Transport endpoint is not connected"
        vm.proc.wait(10)
        with pytest.raises(MountError, match="stale mount"):
            check_mountpoint(vm.mnt)
        umount(vm.mnt)  # falls back to a lazy unmount
        assert not os.path.ismount(vm.mnt)
    with view_mount(msb.cache, tmp_path / "mnt2") as vm:
        umount(vm.mnt)
        assert not os.path.ismount(vm.mnt)
        vm.proc.wait(10)
        assert vm.proc.returncode == 0


def test_background_mount_and_cli_errors(msb: Msb, tmp_path: Path) -> None:
    require_fuse()
    load(msb, tmp_path, image_one(), ["one:1"], "one")
    mnt = tmp_path / "bg"
    mnt.mkdir()
    calls: list[str] = []
    mount(GlobalCache(msb.cache), mnt, foreground=False, ready=lambda: calls.append("ready"))
    try:
        assert calls == ["ready"]
        assert (mnt / "images" / ONE / "status").read_text() == "ready\n"
        # The entry point refuses a busy mountpoint with MountError's exit code.
        proc = subprocess.run(
            [sys.executable, "-m", "cachefs.view.daemon", "--cache", str(msb.cache), str(mnt)],
            capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == MountError.exit_code
        assert "already a mount point" in proc.stderr
    finally:
        umount(mnt)
    assert not os.path.ismount(mnt)
