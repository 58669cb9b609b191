"""A real Debian image for the pull and view benchmarks, built with ``mmdebstrap``.

Synthetic layers do not show what real ones cost: a minbase rootfs has ~10,000 entries of
every kind (hard links, symlinks, devices-free /dev, setuid binaries, deep trees) and the
size distribution of real packages. ``mmdebstrap --variant=minbase bookworm`` builds one
from the host's own apt sources (no mirror is named here), as root. The tarball is cached
under ``/var/tmp/cachefs-bench/`` keyed by date, so a rerun on the same day costs nothing
and a new day picks up security updates.

From the rootfs tar this module makes the image shapes the benchmarks push or load: one
layer, or three layers split by path (``usr/lib`` | ``usr/share`` | the rest: ~70/60/35 MB),
each a valid tar on its own (parent directories are repeated where a layer needs them).
Why that split and not ``usr/`` | ``var``+``etc`` | rest: the latter puts 97% of the bytes
in one layer, so a 3-layer pull would measure nothing the 1-layer pull does not; layers of
similar size show whether the per-layer pipeline really runs in parallel.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

BENCH_DIR = Path("/var/tmp/cachefs-bench")
SUITE = "bookworm"


class Unavailable(Exception):
    """The image cannot be built here (not root, no mmdebstrap, no mirror): skip, say why."""


def rootfs_tar() -> Path:
    """The cached minbase tarball of today, built if missing."""
    if os.geteuid() != 0:
        raise Unavailable("mmdebstrap needs root")
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise Unavailable("mmdebstrap is not installed")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().strftime("%Y%m%d")
    out = BENCH_DIR / f"{SUITE}-minbase-{stamp}.tar"
    if out.exists():
        return out
    # --format=tar: the name of a temporary target would otherwise pick the format.
    part = out.with_name(out.name + ".part")
    log = BENCH_DIR / f"{SUITE}-minbase-{stamp}.log"
    with log.open("wb") as f:
        proc = subprocess.run(
            [mmdebstrap, "--variant=minbase", "--format=tar", SUITE, str(part)],
            stdout=f, stderr=subprocess.STDOUT, check=False,
        )
    if proc.returncode != 0:
        part.unlink(missing_ok=True)
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"mmdebstrap failed ({proc.returncode}): {tail[0]} (see {log})")
    os.replace(part, out)
    for old in BENCH_DIR.glob(f"{SUITE}-minbase-*.tar"):  # yesterday's tarballs
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _group(name: str) -> int:
    parts = name.removeprefix("./").split("/")
    if parts[0] == "usr" and len(parts) > 1 and parts[1] == "lib":
        return 0
    if parts[0] == "usr" and len(parts) > 1 and parts[1] == "share":
        return 1
    return 2


def _dir_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    ti.mtime = 0
    return ti


def split_layers(rootfs: Path, parts: int) -> list[bytes]:
    """``parts`` uncompressed layer tars (1 or 3), in memory (a minbase tar is ~200 MB).

    Hard links must stay in the layer of their target; Debian's minbase has few and they
    all live under ``usr/``, so a link whose target sits in another group is moved with
    the target's group. A layer repeats the entries of the parent directories it needs
    (``./usr`` in the ``usr/lib`` and ``usr/share`` layers), with their real attributes.
    """
    if parts not in (1, 3):
        raise ValueError("1 or 3 layers")
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(rootfs) as tf:
        for ti in tf:
            data = tf.extractfile(ti).read() if ti.isreg() else None  # type: ignore[union-attr]
            members.append((ti, data))
    group_of: dict[str, int] = {}
    dirs = {ti.name.rstrip("/"): ti for ti, _ in members if ti.isdir()}
    for ti, _ in members:
        g = 0 if parts == 1 else _group(ti.name)
        if ti.islnk():
            g = group_of.get(ti.linkname, g)
        group_of[ti.name] = g
    bufs = [io.BytesIO() for _ in range(parts)]
    present: list[set[str]] = [set() for _ in range(parts)]
    with contextlib.ExitStack() as stack:
        tars = [stack.enter_context(tarfile.open(fileobj=b, mode="w",
                                                 format=tarfile.PAX_FORMAT)) for b in bufs]
        for ti, data in members:
            g = group_of[ti.name]
            parent = os.path.dirname(ti.name.rstrip("/"))
            missing: list[str] = []
            while parent not in ("", ".", "./") and parent not in present[g]:
                missing.append(parent)
                parent = os.path.dirname(parent)
            for d in reversed(missing):
                tars[g].addfile(dirs.get(d) or _dir_info(d))
                present[g].add(d)
            tars[g].addfile(ti, io.BytesIO(data) if data is not None else None)
            present[g].add(ti.name.rstrip("/"))
    return [b.getvalue() for b in bufs]
