"""gc against leftovers real processes leave, and msb's own publication gate.

The garbage here is not named by our code: a ``cachefs pull`` and an ``msb pull`` are
SIGKILLed in the middle of a download (a registry on 127.0.0.1 stalls one blob), an
``msb load`` is SIGKILLed while it waits for a layer lock with its ``tmp/load-*.blob``
staged, and whatever they left is what ``gc`` must remove, exactly. msb holding its
publication gate (blocked inside it on a FIFO where its ``<key>.json.part`` goes) must
make ``cachefs rm`` refuse and ``gc`` keep its hands off.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefs.cache.locks import publication_gate_path
from tests.cli.conftest import CACHEFS, REF_A, LoadedCache, held_by_other_process, run
from tests.fixtures.hostile import HostileServer, ServedImage, hostile  # noqa: F401
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.stalling import StalledBlob
from tests.fixtures.system import flock_holders, wait_until

pytestmark = pytest.mark.system

HOSTILE = Callable[[Callable[..., None]], HostileServer]


def _two_layers(seed: bytes) -> TestImage:
    """Incompressible content, so the stalled blob is big and its half is a real prefix."""
    def noise(n: int, tag: bytes) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(seed + tag + len(out).to_bytes(8, "big")).digest()
        return bytes(out[:n])
    return TestImage([layer_tar([reg("bottom.bin", noise(300_000, b"b"))]),
                      layer_tar([reg("top.bin", noise(400_000, b"t"))])])


def _is_lock(rel: str) -> bool:
    """Lock and lease files are kept by design (their inodes must stay stable)."""
    return rel.endswith(".lock")


def _leftovers(loaded: LoadedCache, before: dict[str, int]) -> set[Path]:
    """Every file the killed process left behind, as gc reports it (a work dir as one)."""
    out: set[Path] = set()
    for rel in loaded.files().keys() - before.keys():
        if _is_lock(rel):
            continue
        path = loaded.root / rel
        work = next((p for p in path.parents if p.name.endswith(".work")), None)
        out.add(work if work is not None else path)
    return out


def _gc(loaded: LoadedCache) -> dict:
    proc = run(loaded.root, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _assert_gc_removes_exactly(loaded: LoadedCache, before: dict[str, int],
                               left: set[Path]) -> None:
    report = _gc(loaded)
    assert {Path(r["path"]) for r in report["removed"]} == left
    assert report["skipped"] == []
    after = loaded.files()
    assert {k for k in after.keys() - before.keys() if not _is_lock(k)} == set()
    assert {k: v for k, v in after.items() if k in before} == before  # nothing else touched
    assert run(loaded.root, "verify").returncode == 0
    assert _gc(loaded)["removed"] == []


@pytest.fixture
def stalled(hostile: HOSTILE) -> Iterator[tuple[StalledBlob, HostileServer, TestImage]]:  # noqa: F811
    image = _two_layers(b"killed")
    served = ServedImage.of(image)
    stall = StalledBlob(served, served.layer_digests[1])
    server = hostile(stall)
    yield stall, server, image
    stall.release.set()


def _kill_mid_download(proc: subprocess.Popen[bytes], stall: StalledBlob, part: Path) -> None:
    """SIGKILL ``proc`` once it has written every byte the registry sent of the stalled
    blob to ``part``: a download cut at a point the test chose."""
    try:
        wait_until(lambda: stall.reached.is_set() and proc.poll() is None, "the stalled blob")
        wait_until(lambda: part.exists() and part.stat().st_size == stall.head,
                   f"{part.name} holding the {stall.head} bytes sent")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _part_of(loaded: LoadedCache, digest: str) -> Path:
    return loaded.root / "tmp" / f"{digest.replace(':', '_')}.part"


def test_gc_removes_exactly_what_a_killed_cachefs_pull_left(
        loaded: LoadedCache, stalled: tuple[StalledBlob, HostileServer, TestImage]) -> None:
    stall, server, _ = stalled
    before = loaded.files()
    proc = subprocess.Popen([CACHEFS, "--cache", str(loaded.root), "pull",
                             f"{server.host}/{stall.repo}:v1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = _part_of(loaded, stall.digest)
    _kill_mid_download(proc, stall, part)
    left = _leftovers(loaded, before)
    assert part in left
    _assert_gc_removes_exactly(loaded, before, left)


def test_gc_removes_exactly_what_a_killed_msb_pull_left(
        loaded: LoadedCache, stalled: tuple[StalledBlob, HostileServer, TestImage]) -> None:
    stall, server, _ = stalled
    before = loaded.files()
    proc = subprocess.Popen([loaded.msb.binary, "pull", "--insecure", "--quiet",
                             f"{server.host}/{stall.repo}:v1"], env=loaded.msb.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = _part_of(loaded, stall.digest)
    _kill_mid_download(proc, stall, part)
    left = _leftovers(loaded, before)
    assert part in left
    _assert_gc_removes_exactly(loaded, before, left)


def test_gc_removes_the_staged_blobs_of_a_killed_msb_load(
        loaded: LoadedCache, tmp_path: Path) -> None:
    image = _two_layers(b"load")
    archive = docker_archive(image, ["example.com/killed/load:1"], tmp_path / "l.tar",
                             compress=True)
    top_lock = loaded.root / "layers" / f"{image.diff_ids()[1].replace(':', '_')}.erofs.lock"
    bottom = loaded.root / "layers" / f"{image.diff_ids()[0].replace(':', '_')}.erofs"
    before = loaded.files()
    with held_by_other_process(top_lock, shared=False):
        proc = subprocess.Popen([loaded.msb.binary, "load", "-i", str(archive)],
                                env=loaded.msb.env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # msb wrote the bottom layer and now waits for the top one's lock, which we hold.
            wait_until(lambda: bottom.exists() and len(_load_blobs(loaded)) == 2,
                       "msb load staged both layers and wrote the bottom one")
            staged = _load_blobs(loaded)
            assert all(f"-{proc.pid}-" in p.name for p in staged)
            assert proc.poll() is None
            # While msb lives, its staged blobs are its own.
            report = _gc(loaded)
            assert not {Path(r["path"]) for r in report["removed"]} & set(staged)
            assert all(p.exists() for p in staged)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    left = _leftovers(loaded, before)
    assert set(staged) <= left
    _assert_gc_removes_exactly(loaded, before, left)


def _load_blobs(loaded: LoadedCache) -> list[Path]:
    return sorted((loaded.root / "tmp").glob("load-*.blob"))


def test_msb_inside_its_publication_gate_makes_rm_refuse_and_gc_keep_off(
        loaded: LoadedCache, tmp_path: Path) -> None:
    """msb re-tags REF_A to a new image; where its ``<key>.json.part`` goes is a FIFO, so
    msb blocks in the open with the gate held exclusively (observed in /proc/locks)."""
    key = hashlib.sha256(REF_A.encode()).hexdigest()
    manifests = loaded.root / "manifests"
    assert (manifests / f"{key}.json").exists()
    gate = manifests / ".msb-leases" / (hashlib.sha256(f"{key}.publication".encode())
                                        .hexdigest() + ".lock")
    published = (manifests / f"{key}.json").read_bytes()
    new = TestImage([layer_tar([reg("new.txt", b"republished\n" * 500)])])
    new_layer = loaded.root / "layers" / f"{new.diff_ids()[0].replace(':', '_')}.erofs"
    archive = docker_archive(new, [REF_A], tmp_path / "new.tar")
    before = loaded.files()
    fifo = manifests / f"{key}.json.part"
    os.mkfifo(fifo)
    proc = subprocess.Popen([loaded.msb.binary, "load", "-i", str(archive)],
                            env=loaded.msb.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: gate.exists() and flock_holders(gate).get(proc.pid) == "WRITE",
                   "msb holding its publication gate")
        assert publication_gate_path(manifests, key) == gate  # our name is the one msb locks
        rm = run(loaded.root, "rm", "--force", REF_A)
        assert rm.returncode == 11, rm.stderr
        assert rm.stderr.strip().splitlines()[0].endswith(
            f"{REF_A} is being published by another process"), rm.stderr
        report = _gc(loaded)
        assert report["removed"] == []
        skipped = {Path(s["path"]) for s in report["skipped"]}
        assert {fifo, new_layer} <= skipped  # the gate guards the one, msb's lease the other
        assert fifo.exists() and new_layer.exists()
        assert (manifests / f"{key}.json").read_bytes() == published
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert flock_holders(gate) == {}
    left = _leftovers(loaded, before)
    assert {fifo, new_layer} <= left
    _assert_gc_removes_exactly(loaded, before, left)
