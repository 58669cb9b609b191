"""The largest layer's download starts beside the config request (cachefs/pipeline/early.py).

A real registry behind a proxy that holds the config's answer until the blob request has
arrived proves the request goes out before the config is known. Recording servers on
127.0.0.1 then check what an early download leaves behind when its layer is not needed
(already converted) or the config fails: no ``.part``, no held download lock, and the
next pull works; and that two pulls racing for one blob still download it once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.cache.locks import FileLock
from cachefs.digest import Digest
from cachefs.errors import DigestMismatch, RegistryError
from cachefs.models import Descriptor
from cachefs.pipeline import early as early_module
from cachefs.pipeline.pull import PullResult, _Download, pull
from cachefs.reference import Reference
from tests.fixtures.hostile import (  # noqa: F401  (fixture)
    Exchange,
    HostileServer,
    ServedImage,
    hostile,
)
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import (  # noqa: F401  (fixtures)
    flaky_proxy_factory,
    oci_layout,
    registry_factory,
)
from tests.fixtures.registry import test_client as client

Hostile = Callable[[Callable[[Exchange], None]], HostileServer]

BOUND_S = 30.0  # every wait in these tests, far above what they take
# the largest layer: random bytes, so its gzip blob stays ~1 MiB, more than a first chunk
BIG = layer_tar([reg("data.bin", os.urandom(1 << 20))])
SMALL = layer_tar([reg("etc/hello", b"hello\n")])
IMAGE = TestImage([SMALL, BIG])
OTHER = TestImage([BIG, layer_tar([reg("etc/other", b"other\n")])])  # shares the big one
FIRST_CHUNK = 64 << 10  # what a held blob answer sends before waiting


@pytest.fixture(autouse=True)
def early_on_loopback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mechanism's tests run against a registry on loopback, whose manifest comes back
    sooner than an early start is worth (``EARLY_MIN_MANIFEST_S``): allow it there."""
    if "fast_registry" not in request.keywords:
        monkeypatch.setattr(early_module, "EARLY_MIN_MANIFEST_S", 0.0)


async def pull_ref(cache: GlobalCache, ref: str) -> PullResult:
    with trio.fail_after(BOUND_S):
        async with client() as c:
            return await pull(cache, ref, client=c, erofs_artifacts="never")


def lock_is_free(cache: GlobalCache, blob: str) -> bool:
    lock = FileLock(cache.download_lock_path(Digest.parse(blob)))
    if not lock.acquire(blocking=False):
        return False
    lock.release()
    return True


def leftovers(cache: GlobalCache) -> list[str]:
    """Downloaded or partial blob files in the cache's tmp/ (lock files aside)."""
    return sorted(p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock"))


class Events:
    """Which requests arrived, and what the held blob answers saw; waits are bounded."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.paths: list[str] = []
        self.client_closed: list[bool] = []  # per held blob answer: the client hung up

    def arrived(self, path: str) -> None:
        with self.cond:
            self.paths.append(path)
            self.cond.notify_all()

    def wait_for(self, part: str, count: int = 1) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: sum(part in p for p in self.paths) >= count, BOUND_S)

    def count(self, part: str) -> int:
        with self.cond:
            return sum(part in p for p in self.paths)


def send_part_then_wait_for_hang_up(ex: Exchange, body: bytes, events: Events) -> None:
    """Announce the whole blob, send its first chunk, then wait (bounded) for the client to
    close the connection: it must give the download up without reading the rest."""
    ex.send_response(200)
    ex.send_header("Content-Length", str(len(body)))
    ex.send_header("Content-Type", "application/octet-stream")
    ex.end_headers()
    ex.raw(body[:FIRST_CHUNK])
    ex.connection.settimeout(BOUND_S)
    try:
        closed = ex.connection.recv(1) == b""
    except (TimeoutError, OSError):
        closed = False
    with events.cond:
        events.client_closed.append(closed)
    ex.hang_up()


def test_the_largest_blob_is_requested_before_the_config_is_answered(
    tmp_path: Path, registry_factory: Any, flaky_proxy_factory: Any  # noqa: F811
) -> None:
    """The real registry behind a proxy that forwards the config request only once the
    largest blob's request has arrived (or after BOUND_S): a pull that asked for the blob
    only after the config would be held to the deadline (``held_released`` False)."""
    r = registry_factory()
    layout = oci_layout(IMAGE, tmp_path / "l", compression="gzip")
    r.push_oci_layout(layout.path, "early/app", "v1")
    cache = GlobalCache.new(tmp_path / "c")
    meta = trio.run(pull_ref, cache, f"{r.host}/early/app:v1")
    largest = max(meta.metadata.layers, key=lambda layer: layer.size_bytes or 0)
    config = meta.metadata.config_digest
    proxy = flaky_proxy_factory(r, hold=(f"/blobs/{config}", f"/blobs/{largest.digest}"),
                                hold_s=BOUND_S)
    fresh = GlobalCache.new(tmp_path / "fresh")
    result = trio.run(pull_ref, fresh, f"{proxy.host}/early/app:v1")
    assert proxy.held_released == [True]
    gets = [(path, status) for method, path, _, status in proxy.log
            if method == "GET" and "/blobs/" in path]
    assert gets.count((f"/v2/early/app/blobs/{largest.digest}", 200)) == 1  # adopted
    assert len(gets) == 1 + len(IMAGE.layers)  # the config and each layer, once
    assert [layer.diff_id for layer in result.metadata.layers] == IMAGE.diff_ids()
    assert all(fresh.is_layer_materialized(Digest.parse(d)) for d in IMAGE.diff_ids())
    assert leftovers(fresh) == []
    assert lock_is_free(fresh, largest.digest)


def test_a_layer_already_converted_stops_its_early_download(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """A second tag of an image whose layers are converted: the largest blob's download
    starts beside the config (held until the blob request arrives), and is given up once
    the config shows its layer converted: the connection is closed before the body ends,
    nothing is left in tmp/ and the download lock is free."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    config = image.manifest_doc["config"]["digest"]
    events = Events()
    honest = threading.Event()
    honest.set()

    def registry(ex: Exchange) -> None:
        events.arrived(ex.path)
        if honest.is_set():
            ex.serve_image(image)
        elif ex.path.endswith(config):
            events.wait_for(f"/blobs/{largest}")
            ex.serve_image(image)
        elif ex.path.endswith(largest):
            send_part_then_wait_for_hang_up(ex, image.blobs[largest], events)
        else:
            ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    trio.run(pull_ref, cache, f"{server.host}/evil/app:v1")
    assert events.count(f"/blobs/{largest}") == 1
    honest.clear()
    trio.run(pull_ref, cache, f"{server.host}/evil/app:v2")
    assert events.count(f"/blobs/{largest}") == 2  # started early, then given up
    assert events.client_closed == [True]
    assert leftovers(cache) == []
    assert lock_is_free(cache, largest)
    assert cache.read_image_metadata(f"{server.host}/evil/app:v2") is not None


@pytest.mark.parametrize("failure", ["404", "bad digest"])
def test_a_failed_config_leaves_no_partial_blob_and_no_lock(
    hostile: Hostile, tmp_path: Path, failure: str  # noqa: F811
) -> None:
    """The config fails (answered once the early blob request arrived): the pull reports
    it, the early download is cancelled with its ``.part`` removed and its lock released,
    and the next pull of the same image works."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    config = image.manifest_doc["config"]["digest"]
    events = Events()
    broken = threading.Event()
    broken.set()

    def registry(ex: Exchange) -> None:
        events.arrived(ex.path)
        if not broken.is_set():
            ex.serve_image(image)
        elif ex.path.endswith(config):
            events.wait_for(f"/blobs/{largest}")
            if failure == "404":
                ex.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}')
            else:
                ex.send(200, image.config.replace(b"amd64", b"AMD64"))
        elif ex.path.endswith(largest):
            send_part_then_wait_for_hang_up(ex, image.blobs[largest], events)
        else:
            ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    ref = f"{server.host}/evil/app:v1"
    expected = DigestMismatch if failure == "bad digest" else RegistryError
    with pytest.raises(expected):
        trio.run(pull_ref, cache, ref)
    assert events.count(f"/blobs/{largest}") == 1
    assert events.client_closed == [True]
    assert leftovers(cache) == []
    assert lock_is_free(cache, largest)
    broken.clear()
    result = trio.run(pull_ref, cache, ref)
    assert [layer.diff_id for layer in result.metadata.layers] == IMAGE.diff_ids()
    assert events.count(f"/blobs/{largest}") == 2
    assert leftovers(cache) == []


def test_two_pulls_racing_for_one_early_blob_download_it_once(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """Two images whose largest layer is the same blob, pulled at once into one cache.
    The blob's answer is held until both configs were asked for, that is until both
    pulls tried to start it early: one holds the download lock, the other must find it
    taken and wait for it, so the blob is requested once."""
    a, b = ServedImage.of(IMAGE), ServedImage.of(OTHER)
    shared = max(a.layer_digests, key=lambda d: len(a.blobs[d]))
    assert shared in b.layer_digests
    configs = (a.manifest_doc["config"]["digest"], b.manifest_doc["config"]["digest"])
    events = Events()

    def registry(ex: Exchange) -> None:
        events.arrived(ex.path)
        if ex.path.endswith(shared):
            with events.cond:
                both = events.cond.wait_for(
                    lambda: all(any(p.endswith(c) for p in events.paths) for c in configs),
                    BOUND_S)
                events.client_closed.append(both)  # here: whether both configs came first
        ex.serve_image(a if "/evil/a/" in ex.path else b,
                       repo="evil/a" if "/evil/a/" in ex.path else "evil/b")

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    results: list[PullResult] = []

    async def both() -> None:
        async def one(ref: str) -> None:
            results.append(await pull_ref(cache, ref))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, f"{server.host}/evil/a:v1")
            nursery.start_soon(one, f"{server.host}/evil/b:v1")

    trio.run(both)
    assert len(results) == 2
    assert events.client_closed == [True]  # the one request waited for both configs
    assert events.count(f"/blobs/{shared}") == 1
    assert leftovers(cache) == []
    assert lock_is_free(cache, shared)


def test_a_failed_early_download_is_the_pulls_error(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """The early request of a blob the pull needs fails (404): the adopted download's
    error is the one reported, as a download started later would report it, and its lock
    is released."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))

    def registry(ex: Exchange) -> None:
        if ex.path.endswith(largest):
            ex.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}')
            return
        ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    with pytest.raises(RegistryError) as info:
        trio.run(pull_ref, cache, f"{server.host}/evil/app:v1")
    assert largest in str(info.value)
    assert lock_is_free(cache, largest)
    assert not cache.tar_path(Digest.parse(largest)).exists()


def test_a_pull_cancelled_before_the_plan_leaves_no_partial_blob_and_no_lock(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """Cancelled (as Ctrl-C cancels it) while the early download runs and the config is
    still unanswered: the download is given up, its ``.part`` removed, its lock released."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    config = image.manifest_doc["config"]["digest"]
    events = Events()
    sent_part = threading.Event()
    finished = threading.Event()

    def registry(ex: Exchange) -> None:
        events.arrived(ex.path)
        if ex.path.endswith(config):
            finished.wait(BOUND_S)  # never answered while the pull runs
            ex.hang_up()
        elif ex.path.endswith(largest):
            ex.send_response(200)
            ex.send_header("Content-Length", str(len(image.blobs[largest])))
            ex.end_headers()
            ex.raw(image.blobs[largest][:FIRST_CHUNK])
            sent_part.set()
            send_rest_never = ex.connection.recv(1) == b""  # the client hangs up
            with events.cond:
                events.client_closed.append(send_rest_never)
        else:
            ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")

    async def cancelled_pull() -> None:
        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull_ref, cache, f"{server.host}/evil/app:v1")
                assert await trio.to_thread.run_sync(sent_part.wait, BOUND_S)
                # the first chunk is on its way: wait (bounded) until it is on disk
                part = cache.part_path(Digest.parse(largest))
                while not (part.exists() and part.stat().st_size > 0):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    try:
        trio.run(cancelled_pull)
        with events.cond:
            assert events.cond.wait_for(lambda: events.client_closed, BOUND_S)
        assert events.client_closed == [True]
        assert leftovers(cache) == []
        assert lock_is_free(cache, largest)
    finally:
        finished.set()


@pytest.mark.fast_registry
def test_a_manifest_answered_at_once_starts_nothing_early(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """On a registry whose manifest comes back within ``EARLY_MIN_MANIFEST_S`` (this one,
    on loopback) the early start would gain a few ms: no blob is asked for while the
    config's answer is held back (for a second: a blob request started early arrives in
    milliseconds, see the first test), only once the plan is made."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    config = image.manifest_doc["config"]["digest"]
    events = Events()
    early_requests: list[bool] = []

    def registry(ex: Exchange) -> None:
        events.arrived(ex.path)
        if ex.path.endswith(config):
            with events.cond:
                early_requests.append(events.cond.wait_for(
                    lambda: any(p.endswith(largest) for p in events.paths), 1.0))
        ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    trio.run(pull_ref, cache, f"{server.host}/evil/app:v1")
    assert early_requests == [False]
    assert events.count(f"/blobs/{largest}") == 1


def test_a_failed_early_download_is_followed_by_its_error_even_when_cancelled(
    hostile: Hostile, tmp_path: Path  # noqa: F811
) -> None:
    """The early download failed on its own, so its reader raised ``DownloadFailed`` and
    the failed ingest cancelled the layer's ``follow()`` before it had raised the
    download's error: the pull then saw only ``DownloadFailed`` and a cancellation, and
    reported "download of … failed" instead of the registry's answer (seen under load in
    test_redirect_target_answering_401_gets_no_credentials, where the manifest's auth
    round trip took over EARLY_MIN_MANIFEST_S). Cancelled, it now raises the download's
    own error."""
    image = ServedImage.of(IMAGE)
    largest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))

    def registry(ex: Exchange) -> None:
        if ex.path.endswith(largest):
            ex.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}')
            return
        ex.serve_image(image)

    server = hostile(registry)
    cache = GlobalCache.new(tmp_path / "c")
    cache.tmp_dir().mkdir(parents=True, exist_ok=True)
    descriptor = Descriptor(media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                            digest=largest, size=len(image.blobs[largest]))

    async def main() -> None:
        with trio.fail_after(BOUND_S):
            async with client() as c:
                ref = Reference.parse(f"{server.host}/evil/app:v1")
                await c.resolve(ref)  # as the pull does first: the registry's scheme known
                download = _Download.of(cache, c, ref, descriptor,
                                        contextlib.AsyncExitStack(), lambda *_: None)
                early = early_module.EarlyDownload(descriptor)
                early.download = download
                await early_module.EarlyDownloads._run(early)
                assert isinstance(early.error, RegistryError) and early.done.is_set()
                raised: list[RegistryError] = []
                with trio.CancelScope() as scope:  # the failed ingest's cancellation
                    scope.cancel()
                    try:
                        await early.follow()
                    except RegistryError as err:
                        raised.append(err)
                assert len(raised) == 1 and largest in str(raised[0])

    trio.run(main)
