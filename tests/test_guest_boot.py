"""A real kernel mounts our disks: QEMU (TCG) boots Debian's kernel with a busybox initramfs,
mounts ``/dev/vda`` as EROFS and prints files of the image, which the test compares.

This is the end-to-end check of FORMATS.md §4.6 (fsmeta ‖ layers as one flat device) for
cachefs's own layer writer + stitch, for msb's artifacts, and through the FUSE view
(``disk.vmdk`` with relative extents, ``rootfs.img`` served by FUSE reads).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.cache.store import GlobalCache
from cachefs.digest import Digest
from cachefs.errors import CachefsError, GuestError
from cachefs.guest import (
    READY,
    build_initramfs,
    find_guest_kernel,
    guest_module_files,
    kernel_version,
    qemu_command,
)
from cachefs.pipeline.materialize import materialize_layer, stitch_image
from tests.fixtures.guest import boot_and_run
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg, symlink
from tests.fixtures.system import Msb, missing, msb_binary, require_tool
from tests.view.conftest import OtherUser, find_other_user, shared_tmpdir, view_mount

pytestmark = pytest.mark.system

BOOT_TIMEOUT_S = 30.0
TAG = "cachefs-guest:v1"
REF = "docker.io/library/cachefs-guest:v1"
SEP = "--cachefs-sep--"

TOP_HELLO = b"top layer wins \x01\xff\n"  # not UTF-8: the bytes must survive the console
BIG = bytes(i * 7 % 251 for i in range(3 * 4096 + 123))  # crosses block boundaries
TOP_BIN = b"\xa5" * 5000


def guest_image() -> TestImage:
    """Three layers: etc/hello overridden twice, etc/gone whited out, data in every layer.

    The static busybox as ``/bin/sh`` lets the interactive guest chroot into the image.
    """
    return TestImage([
        layer_tar([dir_("bin"), reg("bin/sh", Path("/bin/busybox").read_bytes(), mode=0o755),
                   dir_("etc"), reg("etc/hello", b"bottom\n"), reg("etc/gone", b"vanish\n"),
                   reg("etc/keep", b"kept from the bottom\n"), dir_("data"),
                   reg("data/big.bin", BIG)]),
        layer_tar([reg("etc/hello", b"middle\n"), reg("etc/.wh.gone"),
                   symlink("etc/link", "keep")]),
        layer_tar([reg("etc/hello", TOP_HELLO), reg("data/top.bin", TOP_BIN)]),
    ])


#: One boot prints everything the checks need, separated by SEP lines.
PROBE = (f"cat etc/hello; echo {SEP}; ls -1A etc; echo {SEP}; cat etc/link; echo {SEP}; "
         "sha256sum data/big.bin data/top.bin")


def check_probe(out: str) -> None:
    """The guest saw the merged image: top layer's bytes, no whiteout, intact file data."""
    hello, listing, link, sums = out.encode("utf-8", "surrogateescape").split(
        b"\n" + SEP.encode() + b"\n")
    assert hello == TOP_HELLO.rstrip(b"\n")
    assert listing.decode().split() == ["hello", "keep", "link"]  # no "gone"
    assert link == b"kept from the bottom"
    assert sums.decode().split() == [hashlib.sha256(BIG).hexdigest(), "data/big.bin",
                                     hashlib.sha256(TOP_BIN).hexdigest(), "data/top.bin"]


@dataclass
class Guest:
    kernel: Path
    initrd: Path

    def run(self, disk: Path, command: str = PROBE, fmt: str = "vmdk") -> str:
        return boot_and_run(disk, command, BOOT_TIMEOUT_S, fmt=fmt, kernel=self.kernel,
                            initrd=self.initrd)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The host's kernel (>= 6.6) and one initramfs for every boot in this module."""
    require_tool("qemu-system-x86_64")
    if not Path("/bin/busybox").exists():
        missing("/bin/busybox (busybox-static)")
    try:
        kernel = find_guest_kernel()
    except CachefsError as e:
        missing(f"guest kernel: {e}")
    initrd = build_initramfs(tmp_path_factory.mktemp("guest") / "initrd.gz",
                             kernel_version=kernel_version(kernel), run="true")
    return Guest(kernel, initrd)


@dataclass
class Loaded:
    msb: Msb
    manifest: Digest
    diff_ids: list[Digest]


@pytest.fixture(scope="module")
def loaded(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """``guest_image`` loaded by the real msb into its own cache (shared, read-only after)."""
    tmp = tmp_path_factory.mktemp("msb")
    msb = Msb(msb_binary(), tmp / "home")
    msb.load(docker_archive(guest_image(), [TAG], tmp / "image.tar"))
    meta = GlobalCache(msb.cache).read_image_metadata(REF)
    assert meta is not None
    return Loaded(msb, Digest.parse(str(meta.manifest_digest)),
                  [Digest.parse(str(d)) for d in meta.diff_ids])


def test_kernel_choice(tmp_path: Path) -> None:
    """The newest kernel >= 6.6 by version (not by name order); none is a clear error."""
    for name in ("vmlinuz-5.10.0-30-amd64", "vmlinuz-6.1.0-9-amd64"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(GuestError, match=r"kernels before 6\.6 cannot mount fsmeta\+layers"):
        find_guest_kernel(tmp_path)
    for name in ("vmlinuz-6.6.0", "vmlinuz-6.12.117+deb12-amd64", "vmlinuz-6.10.1-amd64"):
        (tmp_path / name).write_bytes(b"")
    assert find_guest_kernel(tmp_path).name == "vmlinuz-6.12.117+deb12-amd64"


def test_timeout_kills_qemu(guest: Guest, tmp_path: Path) -> None:
    """A guest that does not report in time is an error carrying the console, not a hang."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 4096)
    with pytest.raises(GuestError, match="timed out after 1s"):
        boot_and_run(disk, "true", 1.0, fmt="raw", kernel=guest.kernel, initrd=guest.initrd)


def test_modules_and_command_line(guest: Guest) -> None:
    """Only modules the kernel lacks go in, dependencies before users; argv is bootable."""
    names = [p.name.split(".ko")[0].replace("-", "_")
             for p in guest_module_files(kernel_version(guest.kernel))]
    if "erofs" in names:
        assert names.index("libcrc32c") < names.index("erofs")
        assert names.index("crc32c_generic") < names.index("libcrc32c")
    argv = qemu_command(Path("/d/x.vmdk"), kernel=guest.kernel, initrd=guest.initrd,
                        append="cachefs.run=dHJ1ZQ==")
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "file=/d/x.vmdk,format=vmdk,if=virtio,readonly=on" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1 quiet cachefs.run=dHJ1ZQ=="


def test_boot_cachefs_stitched_vmdk(guest: Guest, loaded: Loaded, tmp_path: Path) -> None:
    """cachefs's own layer images + fsmeta + VMDK (nothing of msb's but the manifest digest)."""
    cache = GlobalCache.new(tmp_path / "ours")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for i, (tar, diff) in enumerate(zip(guest_image().layers, loaded.diff_ids, strict=True)):
        (blobs / str(i)).write_bytes(tar)
        materialize_layer(cache, blobs / str(i), compression=None, diff_id=diff,
                          layer_label=f"#{i}")
    _, vmdk = stitch_image(cache, loaded.manifest, loaded.diff_ids)
    assert vmdk == cache.vmdk_path(loaded.manifest)
    check_probe(guest.run(vmdk))


def test_boot_msb_vmdk(guest: Guest, loaded: Loaded) -> None:
    """msb's own cache artifacts boot the same way (and so are a fair reference)."""
    check_probe(guest.run(loaded.msb.cache / "vmdk" / f"{loaded.manifest.path_safe()}.vmdk"))


def test_guest_reports_failures(guest: Guest, tmp_path: Path) -> None:
    """A disk that is not EROFS fails fast with the guest's reason, not a timeout."""
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(GuestError, match="mount -t erofs"):
        guest.run(junk, "true", fmt="raw")


def test_interactive_shell_in_the_image(guest: Guest, loaded: Loaded, tmp_path: Path) -> None:
    """The demo's mode: no ``cachefs.run``, so the guest gives a shell chrooted into the image."""
    initrd = build_initramfs(tmp_path / "sh.gz", kernel_version=kernel_version(guest.kernel))
    vmdk = loaded.msb.cache / "vmdk" / f"{loaded.manifest.path_safe()}.vmdk"
    argv = qemu_command(vmdk, kernel=guest.kernel, initrd=initrd, interactive=True)
    assert "-monitor" not in argv  # Ctrl-A x reaches QEMU's monitor mux
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    typed = b'read -r l </etc/keep; echo "$l"; echo answer-$((40+2)); exit\n'
    seen: list[bytes] = []
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            buf = b""
            while b"answer-42" not in seen and time.monotonic() < deadline:
                if not sel.select(deadline - time.monotonic()):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                *lines, buf = (buf + chunk).split(b"\n")
                for line in (raw.strip(b"\r") for raw in lines):
                    seen.append(line)
                    if line == READY.encode():
                        # Typed at the image's shell (builtins only: the image has no cat).
                        proc.stdin.write(typed)
                        proc.stdin.flush()
        assert b"answer-42" in seen, b"\n".join(seen[-20:]).decode(errors="replace")
        assert b"kept from the bottom" in seen, b"\n".join(seen[-20:]).decode(errors="replace")
        assert proc.wait(timeout=BOOT_TIMEOUT_S) == 0  # `exit` → init powers off
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- via the view


@pytest.fixture
def view(loaded: Loaded, tmp_path: Path) -> Iterator[Path]:
    """The FUSE view mounted over msb's cache; the image directory of ``REF``."""
    mnt = tmp_path / "mnt"
    # view_mount's own try/finally stops the daemon and unmounts, whatever the test did.
    with view_mount(loaded.msb.cache, mnt) as vm:
        yield vm.image_dir(REF)


def test_boot_view_disk_vmdk(guest: Guest, view: Path) -> None:
    """The acceptance test: ``-drive file=<mnt>/images/<ref>/disk.vmdk,format=vmdk``."""
    assert (view / "status").read_text() == "ready\n"
    check_probe(guest.run(view / "disk.vmdk"))


def test_boot_view_rootfs_img(guest: Guest, view: Path) -> None:
    """``rootfs.img`` (fsmeta ‖ layers served by FUSE reads) as a raw disk."""
    check_probe(guest.run(view / "rootfs.img", fmt="raw"))


# --------------------------------------------- a VMM as another user, and what it protects


@pytest.fixture
def other_user() -> OtherUser:
    return find_other_user()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with shared_tmpdir() as path:
        yield path


def _readable_initrd(guest: Guest, where: Path) -> Path:
    """The module's initrd lives in a root-only tmp dir: a copy QEMU-as-nobody can read."""
    copy = where / "initrd.gz"
    copy.write_bytes(guest.initrd.read_bytes())
    copy.chmod(0o644)
    return copy


def test_guest_as_another_user_boots_the_view_of_a_private_cache(
        guest: Guest, loaded: Loaded, shared_dir: Path, other_user: OtherUser) -> None:
    """Issue 11.1, as deployed: root's cache behind 0700 directories, the view mounted
    with --allow-other, QEMU running as ``nobody`` (like libvirt's ``libvirt-qemu``)."""

    fsmeta = loaded.msb.cache / "fsmeta" / f"{loaded.manifest.path_safe()}.erofs"
    assert other_user.run("cat", str(fsmeta), home=shared_dir).returncode != 0  # private
    initrd = _readable_initrd(guest, shared_dir)
    with view_mount(loaded.msb.cache, shared_dir / "mnt", allow_other=True) as vm:
        d = vm.image_dir(REF)
        for disk, fmt in ((d / "disk.vmdk", "vmdk"), (d / "rootfs.img", "raw")):
            check_probe(boot_and_run(disk, PROBE, BOOT_TIMEOUT_S, fmt=fmt, kernel=guest.kernel,
                                     initrd=initrd, user=other_user.name))


class _Checked(Exception):
    """Raised from the console callback once the checks ran: stops (kills) the guest."""


def _cachefs(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachefs.cli", "--cache", str(cache), *args],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])


def test_running_guest_protects_its_image(guest: Guest, tmp_path: Path, shared_dir: Path,
                                          other_user: OtherUser) -> None:
    """Issue 11.2: a guest booted from disk.vmdk (as nobody) holds leases through the
    view on every file it reads: ``cachefs rm`` refuses naming QEMU, msb's prune drops
    the reference but leaves the leased files, ``cachefs gc`` skips them naming QEMU;
    once the guest is gone, ``cachefs gc`` removes them."""
    from tests.view.conftest import artifacts

    msb = Msb(msb_binary(), tmp_path / "home")
    msb.load(docker_archive(guest_image(), [TAG], tmp_path / "image.tar"))
    files = artifacts(msb.cache, REF)
    initrd = _readable_initrd(guest, shared_dir)
    seen: dict[str, subprocess.CompletedProcess[str]] = {}

    def while_running(line: str) -> None:
        if line != READY:
            return
        # The guest mounted /dev/vda: QEMU has disk.vmdk and its extents open.
        seen["rm"] = _cachefs(msb.cache, "rm", "--force", REF)
        seen["prune"] = msb("image", "prune", "-y", check=False)
        seen["ls"] = msb("image", "ls", check=False)
        seen["gc"] = _cachefs(msb.cache, "gc", "--json")
        raise _Checked

    with view_mount(msb.cache, shared_dir / "mnt", allow_other=True) as vm, \
            pytest.raises(_Checked):
        boot_and_run(vm.image_dir(REF) / "disk.vmdk", "sleep 120", 120.0,
                         kernel=guest.kernel, initrd=initrd, on_line=while_running,
                         user=other_user.name)
    rm = seen["rm"]
    assert rm.returncode != 0, rm.stdout
    assert "lease held by qemu-system-x86" in rm.stderr, rm.stderr
    assert "via the cachefs view" in rm.stderr, rm.stderr
    assert seen["prune"].returncode == 0, seen["prune"].stderr
    assert TAG.split(":")[0] not in seen["ls"].stdout  # msb dropped its reference...
    assert all(p.exists() for p in files)  # ...but left the files the guest holds
    gc = json.loads(seen["gc"].stdout)
    skipped = {Path(s["path"]).name: s["reason"] for s in gc["skipped"]}
    for p in files:
        assert p.name in skipped, (p, skipped)
        assert skipped[p.name].startswith("lease held by qemu-system-x86"), skipped[p.name]
    # The guest is gone (QEMU killed, the view unmounted): nothing holds the files now.
    after = _cachefs(msb.cache, "gc")
    assert after.returncode == 0, after.stderr
    assert not any(p.exists() for p in files)
