"""``cachefs pull`` with EROFS artifacts against ``msb pull`` (issue 14).

The Debian images of :mod:`bench.pull` (1 and 3 gzip layers) are pushed to a
``docker-registry`` on 127.0.0.1; a cache "A" pulls each (converting) and pushes its EROFS
artifact (``push-erofs``), as a CI job would. Then, alternating, ``cachefs pull`` into a
fresh cache (which finds the artifact and downloads EROFS) and ``msb pull`` into a fresh
``HOME`` (which converts), on loopback and through :class:`bench.link.Link` (~40 MB/s,
~20 ms round trips). Rows print wall time, CPU seconds and peak RSS of each, the ratio and
its target (≤ 0.4× on loopback, ≤ 1.0× on the link; peak RSS ≤ msb's), and whether the
fetched layers and fsmeta are byte-identical to msb's.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .measure import Sample, median, run_measured
from .pull import (
    MEMORY_MEASURE,
    REPO,
    _artifact_hashes,
    debian_inputs,
    debian_registry,
    network_endpoint,
    tree_memory,
)

TARGETS = {"loopback": 0.4, "link": 1.0}


def _push(cache: Path, ref: str) -> None:
    import trio

    from cachefs.cache import GlobalCache
    from cachefs.oci.registry import RegistryClient
    from cachefs.pipeline.pull import pull
    from cachefs.share.push import push_erofs

    async def main() -> None:
        c = GlobalCache.new(cache)
        async with RegistryClient(insecure=True) as client:
            await pull(c, ref, client=client, erofs_artifacts="never")
            await push_erofs(c, ref, client)

    trio.run(main)


def _row(name: str, rounds: int, work: Path, ours: Callable[[Path], list[str]],
         theirs: list[str], target: float, extra: dict[str, object]) -> dict[str, object]:
    cachefs_runs: list[Sample] = []
    msb_runs: list[Sample] = []
    identical = None
    for r in range(rounds):
        cache, home = work / "cachefs-cache", work / "msb-home"
        for d in (cache, home):
            shutil.rmtree(d, ignore_errors=True)
        home.mkdir()
        os.sync()  # no writeback of the previous run's pages during this one (as bench.pull)
        cachefs_runs.append(run_measured(ours(cache)))
        os.sync()
        msb_runs.append(run_measured(theirs, env={**os.environ, "HOME": str(home)}))
        if r == rounds - 1:
            a = _artifact_hashes(cache)
            b = _artifact_hashes(home / ".microsandbox" / "cache")
            fetched = any((cache / "cachefs" / "provenance").glob("*.json"))
            identical = bool(a) and a == b and fetched
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    t_ours = median([s.seconds for s in cachefs_runs])
    t_msb = median([s.seconds for s in msb_runs])
    # the same measure as the pull rows: the whole process tree, so layer workers count
    rss_ours, rss_msb = tree_memory(work, ours, lambda home: theirs)
    ratio = t_ours / t_msb
    return {
        "benchmark": name,
        **extra,
        "rounds": rounds,
        "cachefs_s": round(t_ours, 2),
        "msb_s": round(t_msb, 2),
        "time_ratio_cachefs_over_msb": round(ratio, 2),
        "target_time_ratio": target,
        "cachefs_cpu_s": round(median([s.cpu_s for s in cachefs_runs]), 2),
        "msb_cpu_s": round(median([s.cpu_s for s in msb_runs]), 2),
        "cachefs_peak_rss_mib": round(rss_ours, 1),
        "msb_peak_rss_mib": round(rss_msb, 1),
        "rss_measure": MEMORY_MEASURE,
        "targets_met": ratio <= target and rss_ours <= rss_msb,
        "identical_artifacts_fetched_as_erofs": identical,
    }


def run(msb: str, *, quick: bool, rounds: int) -> list[dict[str, object]]:
    """``--quick``: the 3-layer image on loopback only."""
    counts = (3,) if quick else (1, 3)
    inputs = debian_inputs("artifacts", counts)
    if inputs is None:
        return []
    py = sys.executable
    results: list[dict[str, object]] = []
    with debian_registry("artifacts", inputs, counts) as (registry, work):
        for n in counts:
            _push(work / "ci-cache", f"{registry.host}/{REPO}:{n}layers")
        shutil.rmtree(work / "ci-cache", ignore_errors=True)
        networks: list[str] = ["loopback"] if quick else ["loopback", "link"]
        for network in networks:
            with network_endpoint(network, registry.port) as (host, describe):
                for n in counts:
                    ref = f"{host}/{REPO}:{n}layers"
                    results.append(_row(
                        f"pull with EROFS artifacts vs msb pull, debian minbase, {n} "
                        f"layer{'s' if n > 1 else ''}, {describe}",
                        rounds, work,
                        lambda cache, ref=ref: [py, "-m", "bench.worker", "pull",
                                                str(cache), ref],
                        [msb, "pull", "--quiet", "--insecure", ref],
                        TARGETS[network],
                        {"network": network,
                         "uncompressed_mb": round(inputs.uncompressed_mb, 1),
                         "msb_download_mb": round(inputs.compressed_mb[n], 1)},
                    ))
    return results


