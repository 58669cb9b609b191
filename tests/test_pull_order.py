"""The order of a pull's layer builds (largest first) and the early end of its blobs (a
layer's downloaded blob goes once the layer is published, not when the pull ends)."""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache import GlobalCache
from cachefs.digest import Digest
from cachefs.erofs.reader import is_valid_erofs
from cachefs.errors import DigestMismatch
from cachefs.pipeline import materialize
from cachefs.pipeline import pull as pull_module
from cachefs.pipeline.admission import RankedAdmission, largest_first
from cachefs.pipeline.progress import Event, Finished, LayerProgress, Resolved, Stitching
from cachefs.pipeline.pull import load
from cachefs.reference import Reference
from tests.fixtures.hostile import Exchange, ServedImage, hostile  # noqa: F401  (fixture)
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout
from tests.fixtures.system import system_fixture, wait_until
from tests.test_pull import Pushed, assert_nothing_published, cachefs_pull

# random bytes: their gzip blobs keep the order of their sizes
SMALL = layer_tar([reg("small", os.urandom(30_000))])
BIG = layer_tar([reg("big", os.urandom(700_000))])
TINY = layer_tar([reg("tiny", b"t")])
MEDIUM = layer_tar([reg("medium", os.urandom(250_000))])
# the bottom layer repeated on top: built once
LAYERS = TestImage([SMALL, BIG, TINY, MEDIUM, SMALL])
SHARES_BIG = TestImage([BIG])


@pytest.fixture(scope="module")
@system_fixture
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("order")
    with LocalRegistry(d / "registry") as r:
        r.push_oci_layout(oci_layout(LAYERS, d / "layers").path, "order/layers", "v1")
        r.push_oci_layout(oci_layout(SHARES_BIG, d / "big").path, "order/big", "v1")
        yield Pushed(r)


def _expected_order(resolved: Resolved, skip: frozenset[int] = frozenset()) -> list[int]:
    """Distinct layers (first of each diff_id) by compressed size, largest first."""
    first: dict[str, int] = {}
    for i, (diff_id, _size) in enumerate(resolved.layers):
        first.setdefault(diff_id, i)
    sizes = {i: resolved.layers[i][1] or 0 for i in first.values() if i not in skip}
    assert len(set(sizes.values())) == len(sizes)  # no ties: the order is the sizes'
    return sorted(sizes, key=lambda i: -sizes[i])


async def _pull_recording(cache: GlobalCache, ref: str) -> list[Event]:
    events: list[Event] = []
    result = await cachefs_pull(cache, ref, progress=events.append)
    assert not result.cached and result.fsmeta.exists() and result.vmdk.exists()
    return events


def _admitted(events: list[Event]) -> list[int]:
    return [e.index for e in events if isinstance(e, LayerProgress) and e.phase == "materialize"]


@pytest.mark.parametrize("in_flight", ["", "1", "2"])
async def test_layers_are_built_largest_first(pushed: Pushed, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              in_flight: str) -> None:
    monkeypatch.setenv("CACHEFS_LAYERS_IN_FLIGHT", in_flight)
    cache = GlobalCache.new(tmp_path / "c")
    events = await _pull_recording(cache, pushed.ref("order/layers:v1"))
    resolved = next(e for e in events if isinstance(e, Resolved))
    assert _admitted(events) == _expected_order(resolved) == [1, 3, 0, 2]
    done = {e.index for e in events if isinstance(e, LayerProgress) and e.phase == "done"}
    assert done == {0, 1, 2, 3}  # the repeated top layer (4) is the bottom one's build
    for diff_id in LAYERS.diff_ids():
        assert is_valid_erofs(cache.layer_erofs_path(diff_id))
    assert list(cache.layers_dir().glob("*.tar.gz")) == []


async def test_a_cached_layer_gives_its_turn_to_the_next(pushed: Pushed, tmp_path: Path) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    await cachefs_pull(cache, pushed.ref("order/big:v1"))
    events = await _pull_recording(cache, pushed.ref("order/layers:v1"))
    resolved = next(e for e in events if isinstance(e, Resolved))
    cached = [e.index for e in events if isinstance(e, LayerProgress) and e.phase == "cached"]
    assert cached == [1]
    assert _admitted(events) == _expected_order(resolved, skip=frozenset({1})) == [3, 0, 2]


async def test_ranked_admission_waits_for_the_turn_and_skips_withdrawn_ranks() -> None:
    assert largest_first([10, None, 30, 10]) == [1, 3, 0, 2]
    gate = RankedAdmission(2, 4)
    admitted: list[int] = []

    async def take(rank: int, hold: trio.Event) -> None:
        await gate.acquire(rank)
        admitted.append(rank)
        await hold.wait()
        gate.release()

    holds = [trio.Event() for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for rank in (3, 2, 0):  # arriving in the wrong order
            nursery.start_soon(take, rank, holds[rank])
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [0]  # 2 waits for 1, though a slot is free
        gate.withdraw(1)  # 1 was cached
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [0, 2]  # both slots taken: 3 waits for one
        holds[2].set()
        await trio.testing.wait_all_tasks_blocked()
        assert admitted == [0, 2, 3]
        holds[0].set()
        holds[3].set()


async def test_ranked_admission_lends_the_spare_slot_only_while_asked() -> None:
    gate = RankedAdmission(1, 3)
    may = False
    assert await gate.acquire(0) is False
    spares: list[bool] = []

    async def take(rank: int) -> None:
        spares.append(await gate.acquire(rank, spare=lambda: may))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, 1)
        nursery.start_soon(take, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert spares == []  # the one slot is taken, and the spare not offered
        may = True  # turns true elsewhere: seen at the next recheck
        with trio.fail_after(30):
            while not spares:
                await trio.sleep(0.005)
        await trio.testing.wait_all_tasks_blocked()
        assert spares == [True]  # rank 1 in the spare; rank 2 finds none left
        gate.release()
        with trio.fail_after(30):
            while len(spares) < 2:
                await trio.sleep(0.005)
        assert spares == [True, True]  # slot 1 of 1 still held by rank 0: the spare again
        gate.release()
        gate.release()


# the blobs ---------------------------------------------------------------------------------

# the small layer is built and published while the big one's blob is held back
SMALL_FIRST = TestImage([layer_tar([reg("etc/small", b"s" * 5000)]),
                         layer_tar([reg("big.bin", os.urandom(3 << 20))])])


@dataclass
class HeldBlob:
    """An honest registry for ``image``, except that blob ``digest`` stops halfway until
    :attr:`release` is set, then comes whole; with ``lie``, its gzip header's OS byte is
    flipped (the same layer once inflated, not the blob the manifest names)."""

    image: ServedImage
    digest: str
    repo: str
    lie: bool = False
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self, ex: Exchange) -> None:
        if ex.path.split("?", 1)[0] != f"/v2/{self.repo}/blobs/{self.digest}":
            ex.serve_image(self.image, self.repo)
            return
        body = bytearray(self.image.blobs[self.digest])
        if self.lie:
            body[9] ^= 0xFF
        ex.send_response(200)
        ex.send_header("Content-Type", "application/octet-stream")
        ex.send_header("Content-Length", str(len(body)))
        ex.end_headers()
        half = len(body) // 2
        ex.raw(bytes(body[:half]))
        self.reached.set()
        while not self.release.is_set():
            if not ex.pause(0.05):
                return
        ex.raw(bytes(body[half:]))


def _slots(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(pull_module, "MATERIALIZE_PARALLELISM", n)
    monkeypatch.setattr(materialize, "BUILD_SLOTS", materialize.BuildSlots(n))


@pytest.fixture
def two_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both layers built at once whatever the core count: the small one must not wait
    for the big one, held back by the test."""
    _slots(monkeypatch, 2)


def _blob_files(cache: GlobalCache) -> list[str]:
    return sorted([p.name for p in cache.layers_dir().glob("*.tar.gz")]
                  + [p.name for p in cache.tmp_dir().glob("*.part")])


async def _hold_big_layer(cache: GlobalCache, held: HeldBlob, events: list[Event],
                          small_blob: Path) -> None:
    """While the big layer's blob is held back: the small layer is published and its
    blob gone, before the pull has got anywhere near its end."""
    small = cache.layer_erofs_path(SMALL_FIRST.diff_ids()[0])
    await trio.to_thread.run_sync(held.reached.wait, 60)
    await trio.to_thread.run_sync(wait_until, small.exists, "the small layer published")
    await trio.to_thread.run_sync(wait_until, lambda: not small_blob.exists(),
                                  "the small layer's blob removed")
    assert is_valid_erofs(small)
    assert not [e for e in events if isinstance(e, Stitching | Finished)]
    assert len(list(cache.tmp_dir().glob("*.part"))) == 1  # the big one, still arriving
    held.release.set()


async def test_a_published_layers_blob_is_gone_before_the_pull_ends(
        tmp_path: Path, hostile, two_slots: None) -> None:  # noqa: F811
    served = ServedImage.of(SMALL_FIRST)
    held = HeldBlob(served, served.layer_digests[1], "early/blob")
    server = hostile(held)
    cache = GlobalCache.new(tmp_path / "c")
    events: list[Event] = []
    small_blob = cache.tar_path(Digest.parse(served.layer_digests[0]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_big_layer, cache, held, events, small_blob)
        result = await cachefs_pull(cache, f"{server.host}/early/blob:v1",
                                    progress=events.append)
    assert not result.cached and isinstance(events[-1], Finished)
    assert _blob_files(cache) == []
    # the small layer's blob was on disk before it went (not streamed past the file)
    assert gzip.decompress(served.blobs[served.layer_digests[0]]) == SMALL_FIRST.layers[0]


async def test_a_failing_later_layer_leaves_the_published_one_and_no_blob(
        tmp_path: Path, hostile, two_slots: None) -> None:  # noqa: F811
    served = ServedImage.of(SMALL_FIRST)
    held = HeldBlob(served, served.layer_digests[1], "early/fail", lie=True)
    server = hostile(held)
    cache = GlobalCache.new(tmp_path / "c")
    events: list[Event] = []
    ref = f"{server.host}/early/fail:v1"
    small_blob = cache.tar_path(Digest.parse(served.layer_digests[0]))
    failed: list[BaseException] = []

    async def pull_failing() -> None:
        with pytest.raises(DigestMismatch) as info:
            await cachefs_pull(cache, ref, progress=events.append)
        failed.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_big_layer, cache, held, events, small_blob)
        await pull_failing()
    assert [type(e) for e in failed] == [DigestMismatch]
    assert str(served.layer_digests[1]) in str(failed[0])
    assert_nothing_published(cache, ref)
    assert is_valid_erofs(cache.layer_erofs_path(SMALL_FIRST.diff_ids()[0]))  # reusable
    assert not cache.layer_erofs_path(SMALL_FIRST.diff_ids()[1]).exists()
    assert _blob_files(cache) == []  # the published one's blob, and the lie's .part
    assert [p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []


async def test_a_complete_blob_takes_the_spare_slot_while_a_build_waits_for_the_network(
        tmp_path: Path, hostile, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """One build slot: the big layer (first, being larger) has it and its ingest waits for
    bytes the registry holds back; the small layer's blob is complete, so it is built in
    the spare slot meanwhile instead of waiting for the big one to end."""
    _slots(monkeypatch, 1)
    served = ServedImage.of(SMALL_FIRST)
    held = HeldBlob(served, served.layer_digests[1], "spare/slot")
    server = hostile(held)
    cache = GlobalCache.new(tmp_path / "c")
    events: list[Event] = []
    small_blob = cache.tar_path(Digest.parse(served.layer_digests[0]))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold_big_layer, cache, held, events, small_blob)
        await cachefs_pull(cache, f"{server.host}/spare/slot:v1", progress=events.append)
    assert _admitted(events) == [1, 0]
    assert _blob_files(cache) == []


def test_build_slots_lend_one_spare() -> None:
    slots = materialize.BuildSlots(1)
    slots.acquire()
    slots.acquire(spare=True)  # one beyond
    taken = threading.Event()

    def third() -> None:
        slots.acquire(spare=True)
        taken.set()

    waiter = threading.Thread(target=third)
    waiter.start()
    assert not taken.wait(0.2)  # a bound on a failure, not a synchronisation: no 3rd slot
    slots.release()
    assert taken.wait(30)
    waiter.join()


# the record beside the stitch ----------------------------------------------------------------


async def test_a_failing_stitch_takes_back_the_record_written_beside_it(tmp_path: Path) -> None:
    """cachefs's record of the reference is written while the fsmeta is: when the stitch
    then fails (here: the VMDK's name is taken by a directory, so its rename fails after
    the fsmeta is written), the record is taken back and the image is not published."""
    ref = "example.com/stitch/fails:1"
    archive = docker_archive(TestImage([layer_tar([reg("a", b"a")])]), [ref], tmp_path / "a.tar")
    (scratch,) = await load(GlobalCache.new(tmp_path / "scratch"), archive)
    cache = GlobalCache.new(tmp_path / "cache")
    in_the_way = cache.vmdk_path(scratch.manifest_digest)
    (in_the_way / "x").mkdir(parents=True)
    with pytest.raises(OSError) as info:
        await load(cache, archive)
    assert str(in_the_way) in str(info.value)
    assert cache.ref_records() == []
    assert not cache.image_metadata_path(Reference.parse(ref)).exists()
    (in_the_way / "x").rmdir()
    in_the_way.rmdir()
    (result,) = await load(cache, archive)
    assert result.vmdk.is_file()
    assert [r.reference for r in cache.ref_records()] == [str(Reference.parse(ref))]
