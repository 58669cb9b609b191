"""The next layer's download requested while the last bytes of one still cross a slow
link (:mod:`cachefs.pipeline.handover`), and its bound: ``layers_in_flight() + 1``."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache import GlobalCache
from cachefs.erofs.reader import is_valid_erofs
from cachefs.pipeline import admission
from cachefs.pipeline.admission import RankedAdmission
from cachefs.pipeline.growing import GrowingBlob
from cachefs.pipeline.handover import Pace, ingest_keeps_up
from tests.fixtures.hostile import Exchange, ServedImage, hostile  # noqa: F401  (fixture)
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.test_pull import cachefs_pull

CHUNK = 16 << 10
TAIL = 32 << 10  # what a held blob keeps back: far less than its first byte's worth


@dataclass
class SlowLink:
    """A registry behind a slow link: every blob's first byte comes ``latency`` after its
    request and its body in ``CHUNK``s at about ``CHUNK / gap`` bytes/s (the link's
    misbehaviour, not the test's synchronisation). Every blob but the smallest keeps its
    last ``TAIL`` bytes back until the smallest blob is requested or ``hold_s`` passed; it
    records what released each and how many blob answers were open at once."""

    image: ServedImage
    repo: str
    hold_s: float
    latency: float = 0.1
    gap: float = 0.002
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    requested: list[str] = field(default_factory=list)
    released_by: dict[str, str] = field(default_factory=dict)
    open_at_request: dict[str, int] = field(default_factory=dict)  # others open then
    open_now: int = 0
    open_max: int = 0

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    @property
    def layers(self) -> list[str]:
        """Layer digests, largest first."""
        return sorted(self.image.layer_digests, key=lambda d: -len(self.image.blobs[d]))

    def __call__(self, ex: Exchange) -> None:
        prefix = f"/v2/{self.repo}/blobs/"
        path = ex.path.split("?", 1)[0]
        digest = path[len(prefix):] if path.startswith(prefix) else ""
        if digest not in self.layers:
            ex.serve_image(self.image, self.repo)
            return
        with self.changed:
            self.requested.append(digest)
            self.open_at_request[digest] = self.open_now
            self.open_now += 1
            self.open_max = max(self.open_max, self.open_now)
            self.changed.notify_all()
        try:
            self._answer(ex, digest)
        finally:
            with self.changed:
                self.open_now -= 1

    def _answer(self, ex: Exchange, digest: str) -> None:
        body = self.image.blobs[digest]
        if not ex.pause(self.latency):
            return
        ex.send_response(200)
        ex.send_header("Content-Type", "application/octet-stream")
        ex.send_header("Content-Length", str(len(body)))
        ex.end_headers()
        held = digest != self.layers[-1]
        head = len(body) - TAIL if held else len(body)
        for at in range(0, head, CHUNK):
            ex.raw(body[at:min(at + CHUNK, head)])
            if not ex.pause(self.gap):
                return
        if held:
            self.released_by[digest] = self._hold(digest)
            ex.raw(body[head:])

    def _hold(self, digest: str) -> str:
        """Until the smallest blob is requested: its digest; "deadline" after ``hold_s``."""
        with self.changed:
            if self.changed.wait_for(lambda: self.layers[-1] in self.requested,
                                     timeout=self.hold_s):
                return self.layers[-1]
            return "deadline"


def _image(*sizes: int) -> TestImage:
    # random bytes: their gzip blobs keep the order of their sizes
    return TestImage([layer_tar([reg(f"f{i}", os.urandom(n))]) for i, n in enumerate(sizes)])


@pytest.fixture
def two_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two layers in flight, built in threads: a reader in a worker process is not seen,
    and the handover never counts it as keeping up."""
    monkeypatch.setenv("CACHEFS_LAYERS_IN_FLIGHT", "2")
    monkeypatch.setenv("CACHEFS_LAYER_WORKERS", "never")


async def _pull(tmp_path: Path, hostile, link: SlowLink, image: TestImage) -> None:  # noqa: F811
    server = hostile(link)
    cache = GlobalCache.new(tmp_path / "c")
    result = await cachefs_pull(cache, f"{server.host}/{link.repo}:v1")
    assert not result.cached
    for diff_id in image.diff_ids():
        assert is_valid_erofs(cache.layer_erofs_path(diff_id))


async def test_the_next_blob_is_requested_before_the_last_bytes_of_the_previous(
        tmp_path: Path, hostile, two_in_flight: None) -> None:  # noqa: F811
    """Two layers in flight, both of their blobs withholding their last bytes: the third
    layer's request comes while they are withheld (without the handover it comes only once
    a layer in flight has its whole blob, and both hold out to the deadline)."""
    image = _image(1_200_000, 900_000, 300_000)
    link = SlowLink(ServedImage.of(image), "handover/next", hold_s=10)
    await _pull(tmp_path, hostile, link, image)
    big, medium, small = link.layers
    assert link.requested[2] == small
    assert link.released_by == {big: small, medium: small}
    assert link.open_max == 3


async def test_no_more_than_one_download_beyond_the_layers_in_flight(
        tmp_path: Path, hostile, two_in_flight: None) -> None:  # noqa: F811
    """Four layers, two in flight: every blob but the smallest withholds its end until the
    smallest is asked for. The third is admitted beside the first two near their ends (3
    answers open at once), but while all three hold out the fourth is not asked for: it
    comes only once the deadline released one of them and its layer ended."""
    image = _image(1_200_000, 1_000_000, 800_000, 100_000)
    link = SlowLink(ServedImage.of(image), "handover/bound", hold_s=2)
    await _pull(tmp_path, hostile, link, image)
    big, medium, third, small = link.layers
    assert set(link.requested[:2]) == {big, medium}
    assert link.requested[2:] == [third, small]
    assert link.open_at_request[third] == 2  # one beyond the two in flight
    assert "deadline" in (link.released_by[big], link.released_by[medium])
    assert link.open_max == 3


# the rule --------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_download_is_near_its_end_within_its_own_first_byte_latency() -> None:
    clock = _Clock()
    pace = Pace(1_000_000, clock)
    told: list[int] = []
    pace.near_end = lambda: told.append(1)
    pace.wanted()  # admitted at 100.0
    clock.now = 100.05
    pace.wanted()  # the download itself starts later: the earlier moment counts
    pace.written(0)  # nothing kept: the request goes out
    clock.now = 100.2  # first byte 200 ms after admission
    pace.written(100_000)
    assert pace.window() is None and not pace.is_near_end()  # no rate yet
    clock.now = 100.3
    pace.written(200_000)  # 1 MB/s since the first byte: 200 KB in 200 ms
    assert pace.window() == pytest.approx(200_000)
    assert not pace.is_near_end() and told == []
    clock.now = 100.9
    pace.written(800_000)  # 200 KB left, at 1 MB/s they arrive within 200 ms
    assert pace.is_near_end() and told == [1]
    clock.now = 101.0
    pace.written(0)  # a restart: measured afresh
    assert pace.window() is None and not pace.is_near_end()


def test_a_download_of_unknown_size_is_never_near_its_end() -> None:
    clock = _Clock()
    pace = Pace(None, clock)
    pace.wanted()
    for n in (0, 10, 20, 30):
        clock.now += 1
        pace.written(n)
    assert pace.window() == pytest.approx(20) and not pace.is_near_end()


def test_the_ingest_keeps_up_only_when_its_reader_is_within_the_window(tmp_path: Path) -> None:
    clock = _Clock()
    pace = Pace(1_000_000, clock)
    pace.wanted()
    blob = GrowingBlob(tmp_path / "b.part", tmp_path / "b")
    for t, n in ((100.0, 0), (100.5, 100_000), (101.5, 900_000)):  # window 400 KB, 100 left
        clock.now = t
        pace.written(n)
        blob.written(n)
    assert pace.is_near_end()
    assert blob.backlog is None and not ingest_keeps_up(pace, blob)  # no reader here
    assert blob.wait(0) == 900_000  # a reader at the start: 900 KB behind
    assert blob.backlog == 900_000 and not ingest_keeps_up(pace, blob)  # loopback's case
    assert blob.wait(700_000) == 200_000
    assert blob.backlog == 200_000 and ingest_keeps_up(pace, blob)
    assert not ingest_keeps_up(pace, None)
    blob.written(1_000_000)
    blob.finish(True)  # ended: the slot waits for the ingest alone now, not for the link
    assert blob.backlog == 300_000 and not ingest_keeps_up(pace, blob)


async def test_the_handover_is_looked_at_when_nudged_never_polled(
        autojump_clock: trio.testing.MockClock) -> None:
    """The layers in flight are waited for without a timer: on loopback, where nothing
    nudges, the waiting layer costs no wake-ups (the build slots' spare polls)."""
    gate = RankedAdmission(1, 2)
    await gate.acquire(0)
    asked: list[bool] = []
    may = False
    spares: list[bool] = []

    def spare() -> bool:
        asked.append(may)
        return may

    async def take() -> None:
        spares.append(await gate.acquire(1, spare=spare, polled=False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.sleep(10 * admission.SPARE_RECHECK_S)  # on the mock clock: no waiting
        assert asked == [False]  # once, when it began to wait; not every recheck
        may = True
        await trio.testing.wait_all_tasks_blocked()
        assert spares == []  # turned true, but nobody looked
        gate.nudge()
        await trio.testing.wait_all_tasks_blocked()
        assert spares == [True] and asked == [False, True]
        gate.release()
        gate.release()
