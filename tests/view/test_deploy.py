"""The view as deployed: a VMM as another user, private and read-only caches, relative
paths, fresh after every pull/rm, and a daemon that says why it failed (issue 11, 10)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.maintenance.remove import remove_images
from cachefs.pipeline.pull import load
from cachefs.view.daemon import umount
from tests.fixtures.images import docker_archive
from tests.fixtures.system import Msb, msb_binary, require_fuse, require_tool
from tests.view.conftest import (
    OtherUser,
    artifacts,
    concat,
    image_one,
    image_three,
    view_mount,
    wait_for,
)
from tests.view.conftest import (
    load as msb_load,
)

pytestmark = pytest.mark.system

ONE = "docker.io/library/one:1"
THREE = "docker.io/library/three:v3"
REPO = Path(__file__).resolve().parents[2]


def _cachefs(*args: str, cwd: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachefs.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


# -- 1. a VMM running as another user, over a root-only cache ------------------------------


def test_other_user_reads_every_disk_file_of_a_private_cache(
        msb: Msb, tmp_path: Path, shared_dir: Path, other_user: OtherUser) -> None:
    """The system unit's setup: root's cache behind a 0700 directory, mounted with
    --allow-other; QEMU as ``nobody`` opens disk.vmdk (its extents fsmeta.erofs and
    layers/* included) and rootfs.img through the view, never a path into the cache."""
    qemu_img = require_tool("qemu-img")
    tmp_path.chmod(0o700)
    msb_load(msb, tmp_path, image_three(), ["three:v3"], "three")
    parts = artifacts(msb.cache, THREE)
    expected = concat(parts)
    out = shared_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    assert other_user.run("cat", str(parts[0]), home=out).returncode != 0  # private cache
    with view_mount(msb.cache, shared_dir / "mnt", allow_other=True) as vm:
        d = vm.image_dir(THREE)
        conv = other_user.run(qemu_img, "convert", "-O", "raw", str(d / "disk.vmdk"),
                              str(out / "disk.raw"), home=out)
        assert conv.returncode == 0, conv.stderr
        assert (out / "disk.raw").read_bytes() == expected
        want = {"rootfs.img": expected, "fsmeta.erofs": parts[0].read_bytes()}
        for name, part in zip(sorted(os.listdir(d / "layers")), parts[1:], strict=True):
            want[f"layers/{name}"] = part.read_bytes()
        want[f"../../../../layers/{parts[1].name}"] = parts[1].read_bytes()
        for name, data in want.items():
            got = other_user.run("sha256sum", str(d / name), home=out)
            assert got.returncode == 0, (name, got.stderr)
            assert got.stdout.split()[0] == hashlib.sha256(data).hexdigest(), name


# -- 4. after a pull (load) returns, the image is in the view; after rm it is gone --------


def test_load_then_stat_and_rm_then_stat_50_times(tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "cache")
    archive = docker_archive(image_one(), ["base:0"], tmp_path / "one.tar")
    trio.run(load, cache, archive)
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        for i in range(50):
            ref = f"docker.io/library/base:t{i}"
            trio.run(lambda: load(cache, archive, tag=f"base:t{i}"))  # noqa: B023
            st = os.stat(vm.image_dir(ref) / "disk.vmdk")  # no wait, no retry
            assert st.st_size > 0, i
            assert (vm.image_dir(ref) / "status").read_text() == "ready\n"
            remove_images(cache, [ref])
            assert not vm.image_dir(ref).exists(), f"round {i}: {ref} still in the view"
        assert vm.alive()


def test_msb_load_and_rm_seen_at_once(msb: Msb, tmp_path: Path) -> None:
    msb_load(msb, tmp_path, image_one(), ["one:1"], "one")
    with view_mount(msb.cache, tmp_path / "mnt") as vm:
        for i in range(3):
            msb_load(msb, tmp_path, image_three(), [f"three:r{i}"], f"three{i}")
            assert (vm.image_dir(f"docker.io/library/three:r{i}") / "disk.vmdk").is_file()
            msb("image", "rm", f"three:r{i}")
            assert not vm.image_dir(f"docker.io/library/three:r{i}").exists()


# -- issue 10: in-place edits and permission changes follow the poll, not a 60 s rescan ------


def test_in_place_edit_of_metadata_is_seen_within_the_poll(msb: Msb, tmp_path: Path) -> None:
    msb_load(msb, tmp_path, image_one(), ["one:1"], "one")
    meta_path = GlobalCache(msb.cache).image_metadata_path(ONE)
    with view_mount(msb.cache, tmp_path / "mnt") as vm:
        status = vm.image_dir(ONE) / "status"
        assert status.read_text() == "ready\n"
        with open(meta_path, "r+b") as f:  # same inode, same directory mtime
            f.write(b"\0garbage")
        assert wait_for(lambda: status.read_text().startswith("not ready")), \
            status.read_text()


# -- 3. a relative cache path is made absolute once, at the edge --------------------------


def test_relative_cache_dir_everywhere(tmp_path: Path) -> None:
    require_fuse()
    qemu_img = require_tool("qemu-img")
    work = tmp_path / "work"
    work.mkdir()
    docker_archive(image_one(), ["one:1"], work / "one.tar")
    env = {**os.environ, "CACHEFS_CACHE_DIR": "./cache", "PYTHONPATH": str(REPO),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    assert _cachefs("load", "one.tar", cwd=work, env=env).returncode == 0
    (work / "mnt").mkdir()
    started = _cachefs("mount", "mnt", cwd=work, env=env)
    assert started.returncode == 0, started.stderr
    try:
        doc = json.loads((work / "mnt" / "status.json").read_text())
        assert doc["cache"] == str(work / "cache")
        info = subprocess.run([qemu_img, "info", "--output=json",
                               str(work / "mnt" / "images" / ONE / "disk.vmdk")],
                              capture_output=True, text=True, cwd="/")
        assert info.returncode == 0, info.stderr
        listed = _cachefs("--cache", "cache", "images", "--json", cwd=work, env=env)
        assert listed.returncode == 0 and ONE in listed.stdout
    finally:
        umount(work / "mnt", lazy=True)


# -- 5. the background daemon says why it failed, and where it logs ------------------------


def test_failed_background_mount_prints_the_childs_reason(
        shared_dir: Path, other_user: OtherUser) -> None:
    """Non-root with --allow-other and no user_allow_other: fusermount3's own message."""
    fuse_conf = Path("/etc/fuse.conf")
    if fuse_conf.exists() and any(line.strip() == "user_allow_other"
                                  for line in fuse_conf.read_text().splitlines()):
        pytest.fail("/etc/fuse.conf allows allow_other: this test needs it off")
    for d in ("cache", "mnt", "home"):
        (shared_dir / d).mkdir()
        os.chown(shared_dir / d, other_user.uid, other_user.gid)
    res = other_user.cachefs("--cache", str(shared_dir / "cache"), "mount", "--allow-other",
                             str(shared_dir / "mnt"), home=shared_dir / "home")
    assert res.returncode != 0
    assert "user_allow_other" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1  # one line
    assert "Traceback" not in res.stderr


def test_background_daemon_logs_to_a_file_that_status_names(tmp_path: Path) -> None:
    require_fuse()
    cache = GlobalCache.new(tmp_path / "cache")
    trio.run(load, cache, docker_archive(image_one(), ["one:1"], tmp_path / "one.tar"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("JOURNAL_STREAM", None)
    env.pop("INVOCATION_ID", None)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = _cachefs("--cache", str(cache.root), "mount", str(mnt), cwd=tmp_path, env=env)
    assert started.returncode == 0, started.stderr
    try:
        shown = _cachefs("status", "--mountpoint", str(mnt), cwd=tmp_path, env=env)
        line = next(x for x in shown.stdout.splitlines() if x.startswith("view log: "))
        log_file = Path(line.removeprefix("view log: "))
        assert log_file.parent == tmp_path / "state" / "cachefs"
        assert wait_for(lambda: f"serving {cache.root} at {mnt}" in log_file.read_text())
    finally:
        umount(mnt, lazy=True)


# -- issue 10 #6 / 11.5: a cache the daemon may not write is served, and says so ------------


@pytest.fixture
def readable_msb(shared_dir: Path) -> Iterator[Msb]:
    """An msb cache owned by root that every user may read but not write."""
    m = Msb(msb_binary(), shared_dir / "msbhome")
    (shared_dir / "msbhome").chmod(0o755)
    yield m


def test_unwritable_cache_is_served_without_leases(
        readable_msb: Msb, shared_dir: Path, other_user: OtherUser) -> None:
    msb_load(readable_msb, shared_dir, image_three(), ["three:v3"], "three")
    for dirpath, dirnames, filenames in os.walk(readable_msb.home):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    parts = artifacts(readable_msb.cache, THREE)
    home = shared_dir / "daemon-home"
    mnt = shared_dir / "mnt"
    for d in (home, mnt):
        d.mkdir()
        os.chown(d, other_user.uid, other_user.gid)
    started = other_user.cachefs("--cache", str(readable_msb.cache), "mount", str(mnt),
                                 home=home)
    assert started.returncode == 0, started.stderr
    # The mount is nobody's, without allow_other: even root may not look; read as nobody.
    def read(path: Path) -> str:
        return other_user.run("cat", str(path), home=home).stdout

    try:
        d = mnt / "images" / THREE
        status = read(d / "status")
        assert status.startswith("ready\nnote: cannot create leases"), status
        got = other_user.run("sha256sum", str(d / "rootfs.img"), home=home)
        assert got.returncode == 0, got.stderr  # was EIO
        assert got.stdout.split()[0] == hashlib.sha256(concat(parts)).hexdigest()
        doc = json.loads(read(mnt / "status.json"))
        assert doc["leases"].startswith("cannot create leases")
        assert "serving" in Path(doc["log"]).read_text()  # the daemon logs to a file
        # A permission change is seen by the next poll: a layer the daemon cannot read
        # makes the image not ready (never "ready" for what it cannot serve).
        parts[2].chmod(0o600)
        assert wait_for(lambda: read(d / "status").startswith("not ready"))
        assert "not readable by the view (user nobody)" in read(d / "status")
        assert other_user.run("test", "-e", str(d / "rootfs.img"), home=home).returncode == 1
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)


# -- the same-user opt-in: symlinks into the cache --------------------------------------


def test_symlinks_opt_in(msb: Msb, tmp_path: Path) -> None:
    require_fuse()
    qemu_img = require_tool("qemu-img")
    msb_load(msb, tmp_path, image_three(), ["three:v3"], "three")
    parts = artifacts(msb.cache, THREE)
    raw = tmp_path / "raw.img"
    raw.write_bytes(concat(parts))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_STATE_HOME": str(tmp_path / "state")}
    started = _cachefs("--cache", str(msb.cache), "mount", "--symlinks", str(mnt),
                       cwd=tmp_path, env=env)
    assert started.returncode == 0, started.stderr
    try:
        d = mnt / "images" / THREE
        assert os.readlink(d / "fsmeta.erofs") == str(parts[0])
        layer_links = sorted(os.listdir(d / "layers"))
        assert [os.readlink(d / "layers" / n) for n in layer_links] == [str(p)
                                                                      for p in parts[1:]]
        cmp = subprocess.run([qemu_img, "compare", str(d / "disk.vmdk"), str(raw)],
                             capture_output=True, text=True)
        assert "identical" in cmp.stdout, cmp.stderr
        assert (d / "rootfs.img").read_bytes() == raw.read_bytes()  # still a FUSE file
    finally:
        umount(mnt, lazy=True)
