"""Layers built in worker processes (issue 15): a worker's error reaches the user exactly
as a thread's would, and a cancelled or killed worker leaves no process and no temp file.

Every pull here is real (a docker-registry, or a scripted server on 127.0.0.1) and so are
its workers; ``CACHEFS_LAYER_WORKERS`` chooses threads (``never``) or workers
(``always``) so the two can be compared on the same input.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.digest import Digest
from cachefs.errors import (
    CachefsError,
    DigestMismatch,
    LayerFormatError,
    UsageError,
    WorkerFailed,
)
from cachefs.pipeline import worker_spawn
from cachefs.pipeline.pull import pull
from tests.cli.conftest import CACHEFS
from tests.fixtures.hostile import Exchange, ServedImage, hostile  # noqa: F401  (fixture)
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import oci_layout, registry_factory  # noqa: F401  (fixture)
from tests.fixtures.registry import test_client as client
from tests.fixtures.system import wait_until
from tests.test_enospc import small_tmpfs

WORKERS = worker_spawn.WORKERS_ENV
BASE = layer_tar([reg("etc/os-release", b"ID=test\n"), reg("bin/sh", b"\x7fELF" * 100)])
# incompressible: its download can be held half-way, with its worker already reading it
BIG = layer_tar([reg("big", os.urandom(2 << 20))])


async def cachefs_pull(cache: GlobalCache, ref: str) -> Any:
    async with client() as c:
        return await pull(cache, ref, client=c)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every worker process started during the test: the real spawn, recorded."""
    procs: list[subprocess.Popen[bytes]] = []
    real = worker_spawn.spawn

    def record() -> subprocess.Popen[bytes]:
        proc = real()
        procs.append(proc)
        return proc

    monkeypatch.setattr(worker_spawn, "spawn", record)
    yield procs
    for proc in procs:  # a failing test must not leave them either
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_no_worker_left(procs: list[subprocess.Popen[bytes]]) -> None:
    """Ended and reaped by the pull itself (no zombie: its /proc entry is gone)."""
    assert procs, "the pull started no worker: the test would prove nothing"
    for proc in procs:
        assert proc.returncode is not None, f"worker {proc.pid} still running"
        assert not Path(f"/proc/{proc.pid}").exists(), f"worker {proc.pid} not reaped"


def temp_files(cache: GlobalCache) -> list[str]:
    """Spools and layer images under construction (download ``.part`` files are kept for
    a resume by design, and are not what a worker writes)."""
    if not cache.tmp_dir().exists():
        return []
    return sorted(p.name for p in cache.tmp_dir().iterdir()
                  if p.name.endswith((".spool", ".erofs.part")))


def error_facts(err: BaseException, cache_root: Path) -> dict[str, Any]:
    """What a user or a script sees of an error, with the cache's path made relative."""
    facts: dict[str, Any] = {"type": type(err), "text": str(err).replace(str(cache_root), "<C>")}
    if isinstance(err, CachefsError):
        facts.update(one_line=err.one_line(), exit_code=err.exit_code, hint=err.hint,
                     attrs={k: v for k, v in vars(err).items()})
    if isinstance(err, OSError):
        facts.update(errno=err.errno,
                     filename=str(err.filename).replace(str(cache_root), "<C>"))
    return facts


async def pull_error(monkeypatch: pytest.MonkeyPatch, mode: str, cache: GlobalCache,
                     ref: str) -> BaseException:
    monkeypatch.setenv(WORKERS, mode)
    with pytest.raises(Exception) as info:
        await cachefs_pull(cache, ref)
    return info.value


def _bad_entry(tmp: Path) -> tuple[TestImage, type[BaseException]]:
    return TestImage([BASE, layer_tar([reg("usr/../../etc/passwd", b"x")])]), LayerFormatError


def _bad_diff_id(tmp: Path) -> tuple[TestImage, type[BaseException]]:
    image = TestImage([BASE, BIG])
    cfg = json.loads(image.config_json())
    cfg["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    image.config_json = lambda: json.dumps(cfg).encode()  # type: ignore[method-assign]
    return image, DigestMismatch


@pytest.mark.parametrize("case", [_bad_entry, _bad_diff_id], ids=["entry", "diff_id"])
async def test_a_workers_error_is_the_error_a_thread_gives(
        case: Callable[[Path], tuple[TestImage, type[BaseException]]], tmp_path: Path,
        registry_factory: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """Same class, message, exit code, hint and attributes (``layer``, ``entry``,
    ``expected``, ...), whether the layer was built in a thread or in a worker."""
    image, kind = case(tmp_path)
    r = registry_factory()
    r.push_oci_layout(oci_layout(image, tmp_path / "l", compression="gzip").path, "bad/app", "1")
    ref = f"{r.host}/bad/app:1"
    seen = {}
    for mode in ("never", "always"):
        cache = GlobalCache.new(tmp_path / mode)
        err = await pull_error(monkeypatch, mode, cache, ref)
        assert isinstance(err, kind), err
        seen[mode] = error_facts(err, cache.root)
        assert temp_files(cache) == []
        assert not cache.layer_erofs_path(image.diff_ids()[1]).exists()
    assert seen["always"] == seen["never"]
    assert_no_worker_left(spawned)


async def test_enospc_in_a_worker_names_its_file(
        tmp_path: Path, registry_factory: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """A layer image that does not fit (10 MiB: after its 4 MiB blob and 4 MiB spool, written
    before it: deterministic): the worker's ``OSError`` arrives with its errno and the
    image part's path, as in a thread, and nothing is left in ``tmp/``."""
    image = TestImage([BASE, layer_tar([reg("blob", os.urandom(4 << 20))])])
    r = registry_factory()
    r.push_oci_layout(oci_layout(image, tmp_path / "l", compression="gzip").path, "full/app", "1")
    ref = f"{r.host}/full/app:1"
    seen = {}
    for mode in ("never", "always"):
        with small_tmpfs(tmp_path / f"fs-{mode}", "10m") as fs:
            cache = GlobalCache.new(fs / "cache")
            err = await pull_error(monkeypatch, mode, cache, ref)
            assert isinstance(err, OSError) and err.errno == errno.ENOSPC, err
            seen[mode] = error_facts(err, cache.root)
            assert temp_files(cache) == []
    assert seen["always"] == seen["never"]
    assert seen["always"]["filename"].startswith("<C>/tmp/")
    assert seen["always"]["filename"].endswith(".erofs.part")
    assert_no_worker_left(spawned)


class HeldThenBad:
    """Serves an image honestly except two blobs, each stopping half-way until the server
    stops: ``held``, and ``bad`` (not gzip), sent only once ``ready()`` holds, so the
    other layer's worker is mid-build when this one fails."""

    def __init__(self, served: ServedImage, held: str, bad: str | None,
                 ready: Callable[[], bool], repo: str) -> None:
        self.served, self.held, self.bad, self.ready, self.repo = served, held, bad, ready, repo
        self.reached = threading.Event()
        self.bad_sent = threading.Event()

    def __call__(self, ex: Exchange) -> None:
        path = ex.path.split("?", 1)[0]
        digest = path.rsplit("/", 1)[1]
        if path == f"/v2/{self.repo}/blobs/{self.held}":
            self._half(ex, digest, self.reached)
        elif path == f"/v2/{self.repo}/blobs/{self.bad}":
            wait_until(self.ready, "the held layer's worker building")
            self._half(ex, digest, self.bad_sent)  # held too: ingest fails, not the digest
        else:
            ex.serve_image(self.served, self.repo)

    def _half(self, ex: Exchange, digest: str, sent: threading.Event) -> None:
        """The blob's first half, then nothing until the server stops."""
        body = self.served.blobs[digest]
        ex.send_response(200)
        ex.send_header("Content-Length", str(len(body)))
        ex.end_headers()
        ex.raw(body[: len(body) // 2])
        sent.set()
        while ex.pause(0.1):
            pass
        ex.hang_up()


async def test_a_failing_layer_stops_the_other_layers_worker(
        tmp_path: Path, hostile: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """Layer 2 fails while layer 1's worker is reading its half-downloaded blob: the pull
    reports layer 2's error, layer 1's worker is stopped and reaped, and neither layer
    leaves a spool or an image part behind."""
    image = TestImage([BIG, BASE])
    served = ServedImage.of(image)
    held, bad = served.layer_digests
    served.blobs[bad] = b"\x00\x00" + served.blobs[bad][2:]  # same size, not gzip
    cache = GlobalCache.new(tmp_path / "c")
    big_spool = cache.spool_path(image.diff_ids()[0])
    server = hostile(HeldThenBad(served, held, bad, big_spool.exists, "held/app"))
    monkeypatch.setenv(WORKERS, "always")
    with pytest.raises(LayerFormatError) as info:
        await cachefs_pull(cache, f"{server.host}/held/app:1")
    assert server.handler.reached.is_set() and server.handler.bad_sent.is_set()
    assert info.value.layer == bad and "corrupt gzip stream" in str(info.value)
    assert len(spawned) == 2
    assert_no_worker_left(spawned)
    assert temp_files(cache) == []
    assert not cache.part_path(bad).exists()  # the failed blob's bytes are not kept
    assert not list(cache.layers_dir().glob("*.erofs"))


def _holder_of(path: Path, procs: list[subprocess.Popen[bytes]]) -> int | None:
    for proc in procs:
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(path):
                    return proc.pid
            except OSError:
                continue
    return None


async def test_a_worker_killed_by_a_signal_fails_the_pull_clearly(
        tmp_path: Path, hostile: Any, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        spawned: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL to the worker building layer 1 (mid-build, its blob half-downloaded): the
    pull fails with WorkerFailed naming the layer and the signal, exit code 26, publishes
    no layer 1, and leaves no process and no temp file."""
    image = TestImage([BIG, BASE])
    served = ServedImage.of(image)
    held = served.layer_digests[0]
    cache = GlobalCache.new(tmp_path / "c")
    big_spool = cache.spool_path(image.diff_ids()[0])
    server = hostile(HeldThenBad(served, held, None, lambda: True, "kill/app"))
    monkeypatch.setenv(WORKERS, "always")
    killed: list[int] = []

    def kill_the_builder() -> None:
        wait_until(lambda: _holder_of(big_spool, spawned) is not None,
                   "a worker building layer 1")
        pid = _holder_of(big_spool, spawned)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    caught: list[BaseException] = []

    async def pulling() -> None:
        try:
            await cachefs_pull(cache, f"{server.host}/kill/app:1")
        except Exception as err:
            caught.append(err)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, kill_the_builder)
        nursery.start_soon(pulling)
    assert killed and len(caught) == 1
    err = caught[0]
    assert isinstance(err, WorkerFailed), err
    assert err.exit_code == 26
    assert err.one_line().startswith(
        f"layer {held}: the worker process building it was killed by SIGKILL (")
    assert not cache.layer_erofs_path(image.diff_ids()[0]).exists()
    assert not cache.image_metadata_path(f"{server.host}/kill/app:1").exists()
    assert_no_worker_left(spawned)
    assert temp_files(cache) == []


def test_cli_pull_in_workers_gives_the_same_bytes_as_threads(
        tmp_path: Path, registry_factory: Any) -> None:  # noqa: F811
    """``cachefs pull`` of a 3-layer image with its layers in workers (prestarted before
    the imports, adopted by the pull) writes exactly the layer and fsmeta bytes the
    threads write."""
    image = TestImage([BASE, BIG, layer_tar([reg("etc/os-release", b"ID=top\n"),
                                             reg(".wh.big", b"")])])
    r = registry_factory()
    r.push_oci_layout(oci_layout(image, tmp_path / "l", compression="gzip").path, "ok/app", "1")
    got = {}
    for mode in ("never", "always"):
        cache = tmp_path / mode
        proc = subprocess.run([CACHEFS, "--cache", str(cache), "-q", "pull", "--no-msb-db",
                               f"{r.host}/ok/app:1"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, WORKERS: mode})
        assert proc.returncode == 0, proc.stderr
        got[mode] = {f"{sub}/{p.name}": p.read_bytes() for sub in ("layers", "fsmeta")
                     for p in sorted((cache / sub).glob("*.erofs"))}
    assert len(got["always"]) == 4  # three layers and the fsmeta
    assert got["always"] == got["never"]


def test_auto_uses_workers_from_four_cores_and_two_layers() -> None:
    """Measured on 2 cores: no gain there (issue 15), so ``auto`` keeps threads below 4."""
    assert worker_spawn.workers_for(3, 2, {}, cores=2) == 0
    assert worker_spawn.workers_for(1, 4, {}, cores=8) == 0
    assert worker_spawn.workers_for(3, 4, {}, cores=4) == 3  # the pull builds one itself
    assert worker_spawn.workers_for(3, 2, {WORKERS: "always"}, cores=2) == 2
    assert worker_spawn.workers_for(3, 4, {WORKERS: "never"}, cores=8) == 0
    with pytest.raises(UsageError, match="CACHEFS_LAYER_WORKERS='many': expected auto"):
        worker_spawn.workers_for(3, 4, {WORKERS: "many"})


async def test_a_blob_file_is_built_in_a_worker_as_in_a_thread(
        tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    """A blob already on disk (a kept download) goes to the worker by path, its
    compression sniffed there; the image and tree are the thread's, byte for byte."""
    import gzip

    from cachefs.erofs.tree import walk
    from cachefs.pipeline.materialize import materialize_layer
    from cachefs.pipeline.workers import LayerWorkers

    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(BIG, mtime=0))
    diff = Digest.parse(TestImage([BIG]).diff_ids()[0])
    built = {}
    for mode in ("thread", "worker"):
        cache = GlobalCache.new(tmp_path / mode)
        workers = LayerWorkers(1)
        try:
            kw: dict[str, Any] = {} if mode == "thread" else {"build": workers.builder}
            layer = await trio.to_thread.run_sync(functools.partial(
                materialize_layer, cache, blob, compression=None, diff_id=diff,
                layer_label="L", **kw))
        finally:
            await workers.aclose()
        assert layer.root is not None and layer.block_map is not None
        built[mode] = (layer.path.read_bytes(), layer.block_map,
                       [(p, n.size, n.block) for p, n in walk(layer.root)])
        assert temp_files(cache) == []
    assert built["worker"] == built["thread"]
    assert len(spawned) == 1
    assert_no_worker_left(spawned)


def _workers_of(pid: int) -> list[int]:
    """Worker processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"worker_main" in cmdline:
            out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_end_when_the_pull_is_killed(tmp_path: Path, hostile: Any) -> None:  # noqa: F811
    """SIGKILL to ``cachefs pull`` while its workers read a held download: they see their
    stdin end and exit at once, so no worker outlives even a pull that had no say."""
    image = TestImage([BIG, BASE])
    served = ServedImage.of(image)
    cache = tmp_path / "c"
    spool = GlobalCache(cache).spool_path(image.diff_ids()[0])
    server = hostile(HeldThenBad(served, served.layer_digests[0], None, lambda: True,
                                 "kill/cli"))
    proc = subprocess.Popen([CACHEFS, "--cache", str(cache), "-q", "pull",
                             f"{server.host}/kill/cli:1"], env={**os.environ, WORKERS: "always"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(spool.exists, "layer 1's worker building")
        workers = _workers_of(proc.pid)
        assert workers
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: not any(_running(w) for w in workers), "the workers exiting")
