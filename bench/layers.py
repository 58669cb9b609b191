"""Layer conversion: MB/s of uncompressed layer data and peak RSS, cachefs vs ``msb load``.

Two one-layer archives that stress different things: 1 GiB of large files (copy
throughput) and 100,000 small files (per-entry overhead and memory per entry). Both tools
do the same whole job — ``load`` of the archive into a fresh cache: layer EROFS, fsmeta,
VMDK, metadata — each in its own process; runs alternate so drift affects both alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from .measure import Sample, median, run_measured


def _large_files_tar(path: Path, total: int) -> None:
    rng = random.Random(1)
    chunk = 16 << 20
    block = rng.randbytes(1 << 20)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(max(1, total // chunk)):
            ti = tarfile.TarInfo(f"data/big-{i:04d}.bin")
            ti.size = chunk
            ti.mtime = 1700000000
            payload = (block[i % 7 :] + block[: i % 7]) * (chunk // len(block))
            tf.addfile(ti, io.BytesIO(payload))


def _small_files_tar(path: Path, count: int, *, top: str = "tree", seed: int = 2) -> None:
    """``count`` files of 0–9 KB in ``count // 1000`` directories under ``top``, visited
    round robin (file i in directory i mod n): a tar far from the image's walk order."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(count // 1000):
            ti = tarfile.TarInfo(f"{top}/d{d:03d}")
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
        for i in range(count):
            size = rng.choice((0, 12, 100, 700, 3000, 5000, 9000))
            ti = tarfile.TarInfo(f"{top}/d{i % max(1, count // 1000):03d}/file-{i:06d}")
            ti.size = size
            ti.mtime = 1700000000
            tf.addfile(ti, io.BytesIO(rng.randbytes(size)))


def _docker_archive(layer: Path, out: Path, tag: str) -> None:
    h = hashlib.sha256()
    with open(layer, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    diff_id = "sha256:" + h.hexdigest()
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    cfg_name = hashlib.sha256(cfg).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [tag],
                            "Layers": ["l0/layer.tar"]}]).encode()
    with tarfile.open(out, "w") as tf:
        for name, data in ((cfg_name, cfg), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        tf.add(str(layer), arcname="l0/layer.tar")


def run(msb: str, *, quick: bool, rounds: int) -> list[dict[str, object]]:
    results = []
    work = Path(tempfile.mkdtemp(prefix="cachefs-bench-layers-", dir="/var/tmp"))
    try:
        cases = [
            ("large files", _large_files_tar, (64 << 20) if quick else (1 << 30)),
            ("small files", _small_files_tar, 5_000 if quick else 100_000),
        ]
        for name, make, scale in cases:
            layer = work / "layer.tar"
            make(layer, scale)
            archive = work / "image.tar"
            _docker_archive(layer, archive, "bench.local/layers/x:1")
            size_mb = layer.stat().st_size / 1e6
            ours: list[Sample] = []
            theirs: list[Sample] = []
            for _ in range(rounds):
                cache = work / "cachefs-cache"
                shutil.rmtree(cache, ignore_errors=True)
                ours.append(run_measured([sys.executable, "-m", "bench.worker", "load",
                                          str(cache), str(archive)]))
                home = work / "msbhome"
                shutil.rmtree(home, ignore_errors=True)
                home.mkdir()
                env = {**os.environ, "HOME": str(home)}
                theirs.append(run_measured([msb, "load", "-i", str(archive)], env=env))
            t_ours = median([s.seconds for s in ours])
            t_msb = median([s.seconds for s in theirs])
            results.append({
                "benchmark": f"layer conversion (load of a 1-layer archive), {name}",
                "input_mb": round(size_mb, 1),
                "cachefs_mb_s": round(size_mb / t_ours, 1),
                "msb_mb_s": round(size_mb / t_msb, 1),
                "time_ratio_cachefs_over_msb": round(t_ours / t_msb, 2),
                "cachefs_peak_rss_mib": round(max(s.peak_rss_mib for s in ours), 1),
                "msb_peak_rss_mib": round(max(s.peak_rss_mib for s in theirs), 1),
            })
            layer.unlink()
            archive.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results
