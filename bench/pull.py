"""``cachefs pull`` / ``load`` against ``msb pull --insecure`` / ``msb load`` (issue 5).

A real Debian minbase rootfs (:mod:`bench.debian`) as a 1-layer and a 3-layer image with
gzip layers, pushed to a ``docker-registry`` on 127.0.0.1, then pulled by each tool into a
fresh cache (cachefs) or a fresh ``HOME`` (msb), alternating so drift (page cache, CPU
frequency, the registry warming up) hits both alike. The registry's blobs are in the page
cache after the first run: both tools then measure their own pipeline, not the disk.
The ``load`` row does the same with a docker archive of the 3 layers.

Each row also says whether both tools produced byte-identical layer and fsmeta EROFS files:
a faster pull that writes something else would be no win.

Issue 15 adds the pulls through a modelled link (:class:`bench.link.Link`: ~40 MB/s, ~20 ms
round trips, a proxy on 127.0.0.1), the CPU seconds (user + system, from ``wait4``) beside
the wall time (on a machine shared with other work the CPU ratio is the steadier one), and
each row's target ratio: ≤ 1.0× msb on loopback and for ``load``, ≤ 0.9× on the link, peak
RSS ≤ msb's. A last pull row (not with ``--quick``) is an image of 60,000 small files,
where per-entry work, not bytes, sets the pace.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import debian
from .link import Link
from .measure import Sample, median, peak_tree_memory, run_measured

if TYPE_CHECKING:
    from tests.fixtures.registry import LocalRegistry

REPO = "bench/debian"
# Issue 15: time ratio cachefs/msb to reach per row (peak RSS ≤ msb's as well).
TARGETS = {"loopback": 1.0, "link": 0.9, "load": 1.0}
# Part of the cached inputs' names: bump it when debian.split_layers changes.
INPUTS_VERSION = 2


@dataclass(frozen=True)
class DebianInputs:
    """The on-disk forms of the Debian image, cached beside the rootfs tarball."""

    layouts: dict[int, Path]  # number of layers → OCI layout dir (gzip layers)
    archive: Path  # docker archive of the 3-layer image (uncompressed layers)
    uncompressed_mb: float
    compressed_mb: dict[int, float]

    @staticmethod
    def archive_tag() -> str:
        return "bench.local/debian:3layers"


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def prepare_inputs(layer_counts: tuple[int, ...] = (1, 3)) -> DebianInputs:
    """Build (or reuse today's) OCI layouts and docker archive from the minbase rootfs.

    Raises :class:`bench.debian.Unavailable` when the rootfs cannot be built. The test
    fixtures write them (``oci_layout`` gzips in memory at level 9, ~20 s for 170 MB), so
    the results are kept under ``/var/tmp/cachefs-bench`` next to the tarball they come
    from and rebuilt only when that changes.
    """
    from tests.fixtures.images import TestImage, docker_archive
    from tests.fixtures.registry import oci_layout

    rootfs = debian.rootfs_tar()
    base = debian.BENCH_DIR / f"{rootfs.stem}-v{INPUTS_VERSION}"
    for old in [*debian.BENCH_DIR.glob("*-oci-*"), *debian.BENCH_DIR.glob("*-docker-*")]:
        if not old.name.startswith(base.name + "-"):  # another day's or version's
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    layouts: dict[int, Path] = {}
    compressed: dict[int, float] = {}
    for n in layer_counts:
        out = base.with_name(f"{base.name}-oci-{n}")
        if not (out / "index.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            tmp = out.with_name(out.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            oci_layout(TestImage(debian.split_layers(rootfs, n)), tmp)
            os.replace(tmp, out)
        layouts[n] = out
        compressed[n] = _dir_mb(out / "blobs")
    archive = base.with_name(f"{base.name}-docker-3.tar")
    if not archive.exists():
        tmp = archive.with_name(archive.name + ".part")
        docker_archive(TestImage(debian.split_layers(rootfs, 3)), [DebianInputs.archive_tag()],
                       tmp)
        os.replace(tmp, archive)
    return DebianInputs(layouts, archive, rootfs.stat().st_size / 1e6, compressed)


def _artifact_hashes(cache: Path) -> dict[str, str]:
    """sha256 of every layer and fsmeta EROFS (VMDKs hold absolute paths: not compared)."""
    out = {}
    for sub in ("layers", "fsmeta"):
        for p in sorted((cache / sub).glob("*.erofs")):
            h = hashlib.sha256()
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[f"{sub}/{p.name}"] = h.hexdigest()
    return out


def _compare(
    name: str, rounds: int, work: Path, ours: Callable[[Path], list[str]],
    theirs: Callable[[Path], list[str]], extra: dict[str, object], target: float | None = None,
) -> dict[str, object]:
    """Alternate cachefs and msb ``rounds`` times, each into a fresh cache; one result row."""
    cachefs_runs: list[Sample] = []
    msb_runs: list[Sample] = []
    identical = None
    for r in range(rounds):
        cache = work / "cachefs-cache"
        home = work / "msb-home"
        for d in (cache, home):
            shutil.rmtree(d, ignore_errors=True)
        home.mkdir()
        # Each run starts with no dirty pages: the ~400 MB the previous run wrote would
        # otherwise be written back (kworker CPU, disk) during this one, whichever tool.
        os.sync()
        cachefs_runs.append(run_measured(ours(cache)))
        env = {**os.environ, "HOME": str(home)}
        os.sync()
        msb_runs.append(run_measured(theirs(home), env=env))
        if r == rounds - 1:
            a = _artifact_hashes(cache)
            b = _artifact_hashes(home / ".microsandbox" / "cache")
            identical = bool(a) and a == b
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    t_ours = median([s.seconds for s in cachefs_runs])
    t_msb = median([s.seconds for s in msb_runs])
    mem_ours, mem_msb = tree_memory(work, ours, theirs)
    row: dict[str, object] = {
        "benchmark": name,
        **extra,
        "rounds": rounds,
        "cachefs_s": round(t_ours, 2),
        "msb_s": round(t_msb, 2),
        "time_ratio_cachefs_over_msb": round(t_ours / t_msb, 2),
        **_startup_split(cachefs_runs),
        "cachefs_cpu_s": round(median([s.cpu_s for s in cachefs_runs]), 2),
        "msb_cpu_s": round(median([s.cpu_s for s in msb_runs]), 2),
        "cpu_ratio_cachefs_over_msb": round(
            median([s.cpu_s for s in cachefs_runs]) / max(median([s.cpu_s for s in msb_runs]),
                                                          1e-9), 2),
        # the whole process tree (cachefs's layer workers too): see tree_memory
        "cachefs_peak_rss_mib": round(mem_ours, 1),
        "msb_peak_rss_mib": round(mem_msb, 1),
        "rss_measure": MEMORY_MEASURE,
        "identical_artifacts": identical,
    }
    if target is not None:
        row["target_time_ratio"] = target
        row["targets_met"] = t_ours / t_msb <= target and mem_ours <= mem_msb and bool(identical)
    return row


def _startup_split(runs: list[Sample]) -> dict[str, float]:
    """cachefs's wall time split at the pull's first connection to the registry (medians):
    the start-up before it (interpreter, trio, httpx, cachefs imports) runs on one core
    before any byte is asked for, while msb's is a few ms. Issue 15's 3-layer loopback row
    is decided by it, so the row shows it rather than a note alone."""
    starts = [s.startup_s for s in runs if s.startup_s is not None]
    if len(starts) != len(runs):
        return {}
    return {"cachefs_startup_s": round(median(starts), 3),
            "cachefs_after_startup_s": round(median([s.seconds - (s.startup_s or 0.0)
                                                     for s in runs]), 3)}


MEMORY_MEASURE = "peak sum of PSS over the process tree, sampled every 5 ms, one untimed run"


def tree_memory(work: Path, ours: Callable[[Path], list[str]],
                 theirs: Callable[[Path], list[str]]) -> tuple[float, float]:
    """Peak memory of each tool's whole process tree, in one extra run each (fresh cache
    or HOME) that is not timed: the sampling costs CPU (:func:`bench.measure.peak_tree_memory`).

    ``wait4``'s ``ru_maxrss`` is the largest single process: it would hide cachefs's layer
    workers, so the same tree measure is applied to both tools (msb is one process with
    threads; its tree is itself).
    """
    cache, home = work / "cachefs-cache", work / "msb-home"
    out = []
    for cmd, env_home in ((ours(cache), None), (theirs(home), home)):
        for d in (cache, home):
            shutil.rmtree(d, ignore_errors=True)
        home.mkdir()
        env = {**os.environ, "HOME": str(env_home)} if env_home is not None else None
        out.append(peak_tree_memory(cmd, env))
    for d in (cache, home):
        shutil.rmtree(d, ignore_errors=True)
    return out[0], out[1]


def _missing_tools() -> list[str]:
    return [t for t in ("docker-registry", "skopeo")
            if shutil.which(t) is None and not os.path.exists(f"/usr/bin/{t}")]


def run(msb: str, *, quick: bool, rounds: int) -> list[dict[str, object]]:
    """``--quick`` drops the 1-layer image and the load row (the 3-layer pull remains)."""
    counts = (3,) if quick else (1, 3)
    inputs = debian_inputs("pull", counts)
    if inputs is None:
        return []
    py = sys.executable
    results: list[dict[str, object]] = []
    with debian_registry("pull", inputs, counts) as (registry, work):
        networks = ["loopback"] if quick else ["loopback", "link"]
        for network in networks:
            with network_endpoint(network, registry.port) as (host, describe):
                for n in counts:
                    ref = f"{host}/{REPO}:{n}layers"
                    layers = f"{n} gzip layer{'s' if n > 1 else ''}"
                    results.append(_compare(
                        f"pull, debian bookworm minbase, {layers}"
                        + ("" if network == "loopback" else f", {describe}"),
                        rounds, work,
                        lambda cache, ref=ref: [py, "-m", "bench.worker", "pull",
                                                str(cache), ref],
                        lambda _home, ref=ref: [msb, "pull", "--quiet", "--insecure", ref],
                        {"network": describe,
                         "uncompressed_mb": round(inputs.uncompressed_mb, 1),
                         "download_mb": round(inputs.compressed_mb[n], 1)},
                        TARGETS[network],
                    ))
        if not quick:
            results.append(_small_files_row(registry, work, msb, rounds))
            archive = str(inputs.archive)
            results.append(_compare(
                "load, debian bookworm minbase, docker archive, 3 layers",
                rounds, work,
                lambda cache: [py, "-m", "bench.worker", "load", str(cache), archive],
                lambda _home: [msb, "load", "--quiet", "-i", archive],
                {"archive_mb": round(inputs.archive.stat().st_size / 1e6, 1)},
                TARGETS["load"],
            ))
    return results


SMALL_FILES = (2, 30_000)  # layers, files per layer


def small_files_layout() -> Path:
    """An OCI layout of SMALL_FILES (gzip layers of 0–9 KB files, tar order round robin
    over directories: :func:`bench.layers._small_files_tar`), cached beside the Debian
    inputs. Why: the Debian image has 8,743 entries; images of many small files (a
    node_modules, a site-packages) weigh per-entry work far more."""
    from tests.fixtures.images import TestImage
    from tests.fixtures.registry import oci_layout

    from .layers import _small_files_tar

    layers, files = SMALL_FILES
    out = debian.BENCH_DIR / f"smallfiles-{layers}x{files}-v1-oci"
    if not (out / "index.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        tmp = out.with_name(out.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tars = []
        with tempfile.TemporaryDirectory(dir=debian.BENCH_DIR) as scratch:
            for n in range(layers):
                tar = Path(scratch) / f"{n}.tar"
                _small_files_tar(tar, files, top=f"tree{n}", seed=n + 1)
                tars.append(tar.read_bytes())
        oci_layout(TestImage(tars), tmp)
        os.replace(tmp, out)
    return out


def _small_files_row(registry: LocalRegistry, work: Path, msb: str,
                     rounds: int) -> dict[str, object]:
    layers, files = SMALL_FILES
    layout = small_files_layout()
    registry.push_oci_layout(layout, "bench/smallfiles", f"{layers}layers")
    ref = f"127.0.0.1:{registry.port}/bench/smallfiles:{layers}layers"
    py = sys.executable
    return _compare(
        f"pull, {layers * files} small files, {layers} gzip layers", rounds, work,
        lambda cache: [py, "-m", "bench.worker", "pull", str(cache), ref],
        lambda _home: [msb, "pull", "--quiet", "--insecure", ref],
        {"network": "loopback", "entries": layers * files,
         "download_mb": round(_dir_mb(layout / "blobs"), 1)},
        TARGETS["loopback"],
    )


@contextlib.contextmanager
def debian_registry(section: str, inputs: DebianInputs,
                    counts: tuple[int, ...]) -> Iterator[tuple[LocalRegistry, Path]]:
    """A fresh local registry holding the Debian images as ``REPO:<n>layers``, and a work
    directory under /var/tmp for the section's caches; both are gone afterwards."""
    from tests.fixtures.registry import LocalRegistry

    work = Path(tempfile.mkdtemp(prefix=f"cachefs-bench-{section}-", dir="/var/tmp"))
    try:
        with LocalRegistry(work / "registry") as registry:
            for n in counts:
                registry.push_oci_layout(inputs.layouts[n], REPO, f"{n}layers")
            yield registry, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def debian_inputs(section: str, counts: tuple[int, ...]) -> DebianInputs | None:
    """The Debian images of ``counts`` layers, or None after a ``# section: skipped`` line
    saying which tool or input is missing (a benchmark that cannot run says so, never fakes)."""
    missing = _missing_tools()
    if missing:
        print(f"# {section}: skipped: {', '.join(missing)} not installed", flush=True)
        return None
    try:
        return prepare_inputs(counts)
    except debian.Unavailable as err:
        print(f"# {section}: skipped: {err}", flush=True)
        return None


@contextlib.contextmanager
def network_endpoint(network: str, port: int) -> Iterator[tuple[str, str]]:
    """``(host, description)``: the registry directly, or behind the modelled link of
    :mod:`bench.link` (~40 MB/s, ~20 ms round trips)."""
    if network == "loopback":
        yield f"127.0.0.1:{port}", "loopback"
        return
    with Link(port, bandwidth=40e6, rtt=0.020) as link:
        yield link.host, f"link {link.describe()}"
