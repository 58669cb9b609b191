"""``make demo``: from nothing to a bootable image served by the view, in one command.

``start`` builds a small real image from Debian's static busybox (a working shell and
its applets) as an OCI layout, loads it into the cache with ``cachefs load``, mounts the
view, shows the image's directory and ``qemu-img info`` of its ``disk.vmdk``, builds an
initramfs (``cachefs.guest``) that mounts ``/dev/vda`` as EROFS and runs the image's
shell, and prints the QEMU command line that boots it. The view stays mounted; ``stop``
unmounts it.

Everything goes through the public CLI (subprocesses), so the demo shows the commands a
user would type and exercises exactly what they would run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

from .errors import CachefsError, UsageError

DEMO_REFERENCE = "localhost/cachefs-demo:busybox"
MTIME = 1700000000  # fixed, so the image (and its digests) are the same on every run
MOTD = "cachefs demo: busybox from an EROFS image, read by the guest through disk.vmdk\n"


# -- the image ------------------------------------------------------------------------


def find_busybox() -> Path:
    """Debian's busybox-static: a static binary, so the image needs no libc."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file() and _is_static(Path(candidate)):
            return Path(candidate)
    raise UsageError("no static busybox found", hint="apt-get install busybox-static")


def _is_static(path: Path) -> bool:
    """An ELF64 with no PT_INTERP program header needs no dynamic loader."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _applets(busybox: Path) -> list[str]:
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted(set(out.stdout.split()) - {"busybox"})


def _add(tf: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes | None = None,
         target: str = "") -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = kind, mode, MTIME, "root", "root"
    ti.linkname = target
    ti.size = len(data) if data is not None else 0
    tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def rootfs_tar(busybox: Path) -> bytes:
    """The image's single layer: busybox, a symlink per applet, and a minimal /etc."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin", "var"):
            _add(tf, d, tarfile.DIRTYPE, 0o755)
        _add(tf, "tmp", tarfile.DIRTYPE, 0o1777)
        _add(tf, "bin/busybox", tarfile.REGTYPE, 0o755, busybox.read_bytes())
        for applet in _applets(busybox):
            if "/" not in applet:
                _add(tf, f"bin/{applet}", tarfile.SYMTYPE, 0o777, target="busybox")
        _add(tf, "etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tf, "etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
        _add(tf, "etc/hostname", tarfile.REGTYPE, 0o644, b"cachefs-demo\n")
        _add(tf, "etc/motd", tarfile.REGTYPE, 0o644, MOTD.encode())
    return buf.getvalue()


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_oci_layout(layout: Path, busybox: Path, reference: str) -> Path:
    """An OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) of one image.

    The ``ref.name`` annotation holds the full reference: a bare tag would be read as a
    Docker Hub name by loaders (``busybox`` → ``docker.io/library/busybox:latest``) and
    could shadow a real image of that name in the cache.
    """
    shutil.rmtree(layout, ignore_errors=True)
    layout.mkdir(parents=True)
    tar = rootfs_tar(busybox)
    layer = _blob(layout, gzip.compress(tar, mtime=0))
    config = _blob(layout, json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/root",
                   "Labels": {"org.opencontainers.image.description": "cachefs demo"}},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(tar).hexdigest()}"]},
    }, sort_keys=True).encode())
    manifest = _blob(layout, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }, sort_keys=True).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
                       "annotations": {"org.opencontainers.image.ref.name": reference}}],
    }))
    return layout


# -- orchestration ------------------------------------------------------------------------


def _cachefs(cache: Path | None, *args: str) -> list[str]:
    prefix = ["--cache", str(cache)] if cache is not None else []
    return [sys.executable, "-m", "cachefs.cli", *prefix, *args]


def _run(cmd: list[str], shown: str) -> str:
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        raise CachefsError(f"`{shown}` failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def tree(root: Path) -> list[str]:
    """``root`` as an indented tree: sizes for files, targets for symlinks."""
    lines = [f"{root}/"]

    def walk(d: Path, depth: int) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            indent = "    " * depth
            path = Path(entry.path)
            if entry.is_symlink():
                lines.append(f"{indent}{entry.name} -> {os.readlink(path)}")
            elif entry.is_dir():
                lines.append(f"{indent}{entry.name}/")
                walk(path, depth + 1)
            else:
                lines.append(f"{indent}{entry.name}  ({entry.stat().st_size} bytes)")

    walk(root, 1)
    return lines


def start(mountpoint: Path, workdir: Path, cache: Path | None, reference: str) -> None:
    from .reference import Reference
    from .view.daemon import is_mountpoint

    mountpoint, workdir = mountpoint.absolute(), workdir.absolute()
    from . import guest

    busybox = find_busybox()
    kernel = guest.find_guest_kernel()
    print(f"building an OCI layout of {busybox} in {workdir / 'oci'}", flush=True)
    layout = build_oci_layout(workdir / "oci", busybox, reference)
    _run(_cachefs(cache, "-q", "load", str(layout)), f"cachefs load {layout}")
    if is_mountpoint(mountpoint):
        print(f"{mountpoint} is already mounted; using the running view", flush=True)
    else:
        mountpoint.mkdir(parents=True, exist_ok=True)
        _run(_cachefs(cache, "mount", str(mountpoint)), f"cachefs mount {mountpoint}")
    image_dir = mountpoint / "images" / str(Reference.parse(reference))
    print("\nthe image in the view:", flush=True)
    print("\n".join(tree(image_dir)), flush=True)
    vmdk = image_dir / "disk.vmdk"
    print(flush=True)
    _run(["qemu-img", "info", str(vmdk)], f"qemu-img info {vmdk}")
    initramfs = guest.build_initramfs(workdir / "initramfs.gz",
                                      kernel_version=guest.kernel_version(kernel), run="sh")
    print(f"\ninitramfs (busybox, virtio and erofs modules, an /init that mounts /dev/vda): "
          f"{initramfs}")
    print("boot the image (its shell on this terminal; `poweroff -f` or Ctrl-A X to leave):")
    print(shlex.join(guest.qemu_command(vmdk, kernel=kernel, initrd=initramfs,
                                        interactive=True)))
    print(f"\nthe view stays mounted at {mountpoint}; unmount with: make demo-stop", flush=True)


def stop(mountpoint: Path, cache: Path | None) -> None:
    from .view.daemon import is_mountpoint

    mountpoint = mountpoint.absolute()
    if not is_mountpoint(mountpoint):
        print(f"{mountpoint} is not mounted; nothing to do")
        return
    _run(_cachefs(cache, "umount", str(mountpoint)), f"cachefs umount {mountpoint}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachefs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--mountpoint", type=Path, default=Path("mnt"))
    parser.add_argument("--workdir", type=Path, default=Path("build/demo"),
                        help="where the OCI layout and the initramfs are built")
    parser.add_argument("--cache", type=Path, default=None,
                        help="default: $CACHEFS_CACHE_DIR, else msb's default cache")
    parser.add_argument("--reference", default=DEMO_REFERENCE)
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            start(args.mountpoint, args.workdir, args.cache, args.reference)
        else:
            stop(args.mountpoint, args.cache)
    except CachefsError as err:
        print(f"cachefs demo: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
