"""The QEMU guest that boots a cached image: the host's kernel, an initramfs, the argv.

The fsmeta + layers concatenation (FORMATS.md §4.6) only matters if a *kernel* mounts it
as one EROFS device, so ``make demo`` (and the tests, whose console harness is
``tests/fixtures/guest.py``) boot the host's own Debian kernel under QEMU (TCG; no KVM
needed) with a tiny busybox initramfs built here in pure Python:

* ``/init`` mounts proc/sys/devtmpfs, ``insmod``\\ s exactly the modules the kernel did not
  build in (virtio, virtio_blk, erofs and their dependencies and soft dependencies), mounts
  ``/dev/vda`` read-only as EROFS at ``/mnt/root`` and prints ``CACHEFS-GUEST-READY``;
* it then runs the command given on the kernel command line as ``cachefs.run=<base64>``
  (base64 because the kernel splits its command line at spaces), in ``/mnt/root``, and prints
  its output between ``CACHEFS-OUT-BEGIN`` and ``CACHEFS-OUT-END``. The output travels
  base64-encoded so the serial line's ``\\n`` → ``\\r\\n`` mapping cannot change the bytes;
* without ``cachefs.run`` it runs the initramfs's default (``run=``): ``"sh"`` is an
  interactive shell, chrooted into the image when the image has ``/bin/sh``;
* finally ``poweroff -f``; with ``-no-reboot`` and ``panic=-1`` QEMU exits even if init dies.

The cpio is written here (not by ``cpio -o``) so it can hold ``/dev/console`` without root.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .errors import GuestError

READY = "CACHEFS-GUEST-READY"
OUT_BEGIN = "CACHEFS-OUT-BEGIN"
OUT_END = "CACHEFS-OUT-END"
FAILED = "CACHEFS-GUEST-FAILED"
RC_PREFIX = "CACHEFS-RC="
RUN_PARAM = "cachefs.run"

MIN_KERNEL = (6, 6)
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
MODULES_ROOT = Path("/lib/modules")

#: What the guest needs to see a virtio disk and mount EROFS, in load order. Entries the
#: kernel builds in are skipped; dependencies are added from ``modules.dep``.
GUEST_MODULES = ("virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
                 "virtio_pci", "virtio_blk", "erofs")

_S_IFDIR, _S_IFREG, _S_IFLNK, _S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


# --------------------------------------------------------------------------- kernel


def _version_tuple(version: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(x or 0) for x in m.groups()) if m else None


def find_guest_kernel(boot: Path = Path("/boot")) -> Path:
    """The newest ``vmlinuz-*`` in ``boot`` whose version is at least 6.6.

    Why 6.6: older kernels reject (or mis-map) an EROFS whose device table names extra
    devices when none are passed at mount time, i.e. the flat-device mode §4.6 relies on.
    """
    found: list[tuple[tuple[int, ...], Path]] = []
    for path in boot.glob("vmlinuz-*"):
        version = _version_tuple(path.name.removeprefix("vmlinuz-"))
        if version is not None and version[:2] >= MIN_KERNEL and os.access(path, os.R_OK):
            found.append((version, path))
    if not found:
        raise GuestError(
            f"no readable kernel >= 6.6 in {boot}: kernels before 6.6 cannot mount "
            "fsmeta+layers as one device",
            hint="install linux-image-6.12-amd64 (or newer)",
        )
    return max(found)[1]


def kernel_version(kernel: Path) -> str:
    """``/boot/vmlinuz-6.12.1-amd64`` → ``6.12.1-amd64`` (the ``/lib/modules`` directory)."""
    return kernel.name.removeprefix("vmlinuz-")


# --------------------------------------------------------------------------- modules


def _modname(path_or_name: str) -> str:
    base = path_or_name.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def guest_module_files(kernel_version: str, names: Iterable[str] = GUEST_MODULES,
                       modules_root: Path = MODULES_ROOT) -> list[Path]:
    """Module files to insmod, dependencies first, for the ``names`` not built in.

    ``modules.dep`` gives hard dependencies; ``modules.softdep`` "pre:" entries resolved
    through ``modules.alias`` give the rest (erofs → libcrc32c, whose init fails unless a
    crc32c implementation is loaded first). Unresolvable softdeps are skipped.
    """
    moddir = modules_root / kernel_version
    try:
        dep_text = (moddir / "modules.dep").read_text()
    except OSError as e:
        raise GuestError(f"cannot read {moddir / 'modules.dep'}: {e.strerror}",
                         hint="is the kernel's modules package installed?") from e
    builtin = {_modname(line) for line in _read_lines(moddir / "modules.builtin")}
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_text.splitlines():
        if ":" in line:
            path, rest = line.split(":", 1)
            deps[_modname(path)] = (path, [_modname(d) for d in rest.split()])
    aliases: dict[str, list[str]] = {}
    for line in _read_lines(moddir / "modules.alias"):
        parts = line.split()
        if len(parts) == 3 and parts[0] == "alias":
            aliases.setdefault(parts[1].replace("-", "_"), []).append(_modname(parts[2]))
    softpre: dict[str, list[str]] = {}
    for line in _read_lines(moddir / "modules.softdep"):
        m = re.match(r"softdep\s+(\S+)\s+pre:\s*(.*?)(?:\s+post:.*)?$", line)
        if m:
            softpre[_modname(m.group(1))] = [w.replace("-", "_") for w in m.group(2).split()]

    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in order or name in builtin or name in stack:
            return
        if name not in deps:
            for target in aliases.get(name, []):
                visit(target, (*stack, name))
            return
        for pre in softpre.get(name, []):
            visit(pre, (*stack, name))
        for dep in reversed(deps[name][1]):  # modules.dep lists the deepest dependency last
            visit(dep, (*stack, name))
        order.append(name)

    for name in names:
        name = _modname(name)
        if name not in deps and name not in builtin and name not in aliases:
            continue  # not part of this kernel at all (e.g. virtio_pci_legacy_dev on 5.x)
        visit(name, ())
    return [moddir / deps[n][0] for n in order]


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _module_bytes(path: Path) -> bytes:
    """A module uncompressed (busybox insmod takes plain ``.ko`` files)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestError(f"cannot decompress kernel module {path}: unsupported compression")


# --------------------------------------------------------------------------- initramfs


class _Cpio:
    """A newc ("070701") archive writer: enough for files, dirs, symlinks and devices."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._buf.write(head + b"\0" * (-len(head) % 4))
        self._buf.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, _S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, _S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, _S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, _S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def _init_script(module_names: list[str], default_run: str) -> str:
    """The guest's ``/init``. Busybox ash; every failure ends in a marker, then poweroff."""
    interactive = default_run == "sh"
    default = (
        # Not exec'd: when the user leaves the shell, init goes on to power off cleanly.
        "if [ -x /mnt/root/bin/sh ]; then setsid cttyhack chroot /mnt/root /bin/sh; "
        "else setsid cttyhack sh; fi" if interactive
        else f"run_cmd {shlex.quote(default_run)}"
    )
    mods = " ".join(module_names)
    return f"""#!/bin/busybox sh
export PATH=/bin:/sbin
fail() {{ echo "{FAILED} $*"; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {mods}; do
  insmod /lib/modules/$m.ko 2>/dev/null || echo "cachefs-guest: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 100 ] && fail "no /dev/vda (virtio disk)"; usleep 50000
done
mkdir -p /mnt/root
mount -t erofs -o ro /dev/vda /mnt/root || fail "mount -t erofs /dev/vda"
# Keep kernel messages from interleaving with the command's output on the console.
echo 1 > /proc/sys/kernel/printk
echo {READY}
run_cmd() {{
  (cd /mnt/root && sh -c "$1") > /tmp/out 2>&1
  rc=$?
  echo {OUT_BEGIN}
  base64 /tmp/out
  echo {OUT_END}
  echo {RC_PREFIX}$rc
}}
enc=
for w in $(cat /proc/cmdline); do
  case "$w" in {RUN_PARAM}=*) enc="${{w#{RUN_PARAM}=}}";; esac
done
if [ -n "$enc" ]; then
  run_cmd "$(echo "$enc" | base64 -d)"
else
  {default}
fi
poweroff -f
"""


def build_initramfs(out: Path, *, kernel_version: str, run: str = "sh",
                    busybox: Path = BUSYBOX, modules_root: Path = MODULES_ROOT) -> Path:
    """Write a gzip'd newc cpio to ``out``: static busybox, the needed modules, ``/init``.

    ``run`` is what the guest does when its command line has no ``cachefs.run=``: ``"sh"``
    (an interactive shell for the demo), or any shell command, run like ``cachefs.run``.
    """
    try:
        bb = busybox.read_bytes()
    except OSError as e:
        raise GuestError(f"cannot read busybox at {busybox}: {e.strerror}",
                         hint="install busybox-static") from e
    modules = guest_module_files(kernel_version, modules_root=modules_root)
    cpio = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "mnt/root", "lib",
              "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", bb, 0o755)
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                             check=False).stdout.split()
    for applet in applets or ["sh"]:
        if applet != "busybox":
            cpio.symlink(f"bin/{applet}", "busybox")
    names = []
    for path in modules:
        name = _modname(path.name)
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", _module_bytes(path))
    cpio.file("init", _init_script(names, run).encode(), 0o755)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=1, mtime=0))
    return out


# --------------------------------------------------------------------------- qemu


def qemu_command(disk: Path, *, kernel: Path, initrd: Path, fmt: str = "vmdk",
                 append: str = "", interactive: bool = False,
                 memory_mb: int = 256) -> list[str]:
    """The QEMU argv booting ``kernel``+``initrd`` with ``disk`` as read-only virtio ``vda``.

    TCG so it runs without KVM; serial console on stdio; ``-no-reboot`` + ``panic=-1`` so a
    dying guest ends QEMU instead of looping. Non-interactive runs detach the monitor so
    nothing typed on stdin can reach it.
    """
    cmdline = " ".join(w for w in ("console=ttyS0 panic=-1 quiet", append) if w)
    argv = [QEMU, "-accel", "tcg", "-m", str(memory_mb), "-nographic", "-no-reboot",
            "-nic", "none", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", cmdline,
            "-drive", f"file={disk},format={fmt},if=virtio,readonly=on"]
    if not interactive:
        argv[argv.index("-nographic") + 1:argv.index("-nographic") + 1] = [
            "-serial", "stdio", "-monitor", "none"]
    return argv
