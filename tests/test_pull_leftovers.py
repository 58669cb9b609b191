"""Blobs left by interrupted pulls: removed by the run that completes the image, and never
trusted without their digest."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from cachefs.cache import GlobalCache
from cachefs.digest import Digest
from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout
from tests.fixtures.system import system_fixture
from tests.test_pull import Pushed, StallingProxy, cachefs_pull, pull_process

# bottom: small, built while the big top layer is still downloading
IMAGE = TestImage([layer_tar([reg("small", b"s" * 1000)]),
                   layer_tar([reg("big.bin", os.urandom(6 << 20))])])


@pytest.fixture(scope="module")
@system_fixture
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    d = tmp_path_factory.mktemp("leftovers")
    with LocalRegistry(d / "registry") as r:
        r.push_oci_layout(oci_layout(IMAGE, d / "img", compression="none").path, "app/two", "v1")
        yield Pushed(r)


def _wait_for(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _leftovers(cache: GlobalCache) -> list[str]:
    return sorted([p.name for p in cache.layers_dir().glob("*.tar.gz")]
                  + [p.name for p in cache.tmp_dir().glob("*.part")])


def test_repull_after_sigkill_removes_the_blobs_the_killed_pull_left(
    pushed: Pushed, tmp_path: Path
) -> None:
    proxy = StallingProxy(pushed.registry.port, stall_after=2 << 20)
    try:
        cache = GlobalCache.new(tmp_path / "c")
        ref = f"{proxy.host}/app/two:v1"
        proc = pull_process(cache.root, ref)
        assert proxy.stalled.wait(60)
        small = cache.layer_erofs_path(Digest.sha256_of(IMAGE.layers[0]))
        _wait_for(small.exists, "the small layer's image")
        # a published layer's blob goes at once (uncompressed: blob digest = diff_id)
        small_blob = cache.tar_path(Digest.sha256_of(IMAGE.layers[0]))
        _wait_for(lambda: not small_blob.exists(), "the small layer's blob to go")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(_leftovers(cache)) == 1  # the big one's .part
        # as if killed between the small layer's publish and its blob's unlink
        small_blob.write_bytes(IMAGE.layers[0])
        assert len(_leftovers(cache)) == 2
        proxy.release.set()
        again = pull_process(cache.root, ref)
        _out, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        assert _leftovers(cache) == []
    finally:
        proxy.close()


def test_a_same_size_corrupt_blob_is_dropped_and_downloaded_again(
    pushed: Pushed, tmp_path: Path
) -> None:
    cache = GlobalCache.new(tmp_path / "c")
    ref = pushed.ref("app/two:v1")
    first = trio.run(cachefs_pull, cache, ref)
    wanted = cache.layer_erofs_path(first.metadata.layers[1].diff_id).read_bytes()
    for layer in first.metadata.layers:
        cache.layer_erofs_path(layer.diff_id).unlink()
    top = first.metadata.layers[1]
    assert top.size_bytes is not None
    cache.tar_path(top.digest).write_bytes(b"\0" * top.size_bytes)  # right size, wrong bytes
    again = trio.run(cachefs_pull, cache, ref)
    assert not again.cached
    assert cache.layer_erofs_path(top.diff_id).read_bytes() == wanted
    assert _leftovers(cache) == []
