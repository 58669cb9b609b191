"""Publishing into the cache: same bytes and names as msb, msb's locks, nothing left in tmp/."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from cachefs.cache import GlobalCache
from cachefs.cache.locks import flock_exclusive
from cachefs.digest import Digest
from cachefs.errors import DigestMismatch, LayerFormatError, NotCachedError
from cachefs.ingest.layer import Compression
from cachefs.pipeline.image_write import LayerTree
from cachefs.pipeline.materialize import (
    MaterializedLayer,
    materialize_layer,
    start_layer,
    stitch_image,
)
from tests.erofs.layer_cases import overlay_tars
from tests.fixtures.images import TestImage, docker_archive, sha256
from tests.fixtures.system import Msb, msb_binary


def write_blobs(tars: list[bytes], where: Path) -> list[Path]:
    """Layer blobs as a registry would serve them: gzip for even layers, plain for odd."""
    where.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i, tar in enumerate(tars):
        blob = where / f"blob{i}"
        blob.write_bytes(gzip.compress(tar, mtime=0) if i % 2 == 0 else tar)
        blobs.append(blob)
    return blobs


def materialize_all(cache: GlobalCache, tars: list[bytes], blobs: list[Path]) -> list[Digest]:
    diff_ids = [Digest.parse(sha256(t)) for t in tars]
    for i, (blob, d) in enumerate(zip(blobs, diff_ids, strict=True)):
        got = materialize_layer(cache, blob, compression=None, diff_id=d, layer_label=f"#{i}")
        assert got.created and got.path == cache.layer_erofs_path(d)
    return diff_ids


@pytest.fixture
def msb_image(msb: Msb, tmp_path: Path) -> tuple[Msb, Digest, list[bytes]]:
    tars = overlay_tars()
    msb.load(docker_archive(TestImage(tars), ["example.com/t/mat:1"], tmp_path / "a.tar"))
    meta = json.loads(next((msb.cache / "manifests").glob("*.json")).read_text())
    return msb, Digest.parse(meta["manifest_digest"]), tars


def test_cache_artifacts_equal_msb(tmp_path: Path, msb_image: tuple[Msb, Digest, list[bytes]]
                                   ) -> None:
    msb, manifest, tars = msb_image
    cache = GlobalCache.new(tmp_path / "ours")
    diff_ids = materialize_all(cache, tars, write_blobs(tars, tmp_path / "blobs"))
    for d in diff_ids:
        name = f"layers/{d.path_safe()}.erofs"
        assert (cache.root / name).read_bytes() == (msb.cache / name).read_bytes()
        lock = cache.layer_erofs_lock_path(d)
        assert lock.stat().st_size == 0 and stat.S_IMODE(lock.stat().st_mode) == 0o600

    fsmeta, vmdk = stitch_image(cache, manifest, diff_ids, msb_quirks=True)
    assert fsmeta == cache.fsmeta_erofs_path(manifest) and vmdk == cache.vmdk_path(manifest)
    assert fsmeta.read_bytes() == (msb.cache / "fsmeta" / fsmeta.name).read_bytes()
    want_vmdk = (msb.cache / "vmdk" / vmdk.name).read_text()
    assert vmdk.read_text() == want_vmdk.replace(
        os.path.realpath(msb.cache), os.path.realpath(cache.root))
    assert cache.fsmeta_erofs_lock_path(manifest).exists()
    assert list(cache.tmp_dir().iterdir()) == []


def test_msb_takes_our_cache_as_a_hit(tmp_path: Path, msb_image: tuple[Msb, Digest, list[bytes]]
                                      ) -> None:
    """Artifacts we publish under msb's names are cache hits for msb: it rewrites nothing."""
    _, manifest, tars = msb_image
    other = Msb(msb_binary(), tmp_path / "home2")
    cache = GlobalCache.new(other.cache)
    diff_ids = materialize_all(cache, tars, write_blobs(tars, tmp_path / "blobs"))
    fsmeta, vmdk = stitch_image(cache, manifest, diff_ids)
    before = {p: p.stat().st_ino for p in [fsmeta, vmdk, *cache.layers_dir().glob("*.erofs")]}
    other.load(docker_archive(TestImage(tars), ["example.com/t/mat:1"], tmp_path / "b.tar"))
    assert {p: p.stat().st_ino for p in before} == before


def test_repeat_is_a_hit_and_stitch_repairs(tmp_path: Path) -> None:
    tars = overlay_tars()
    cache = GlobalCache.new(tmp_path / "c")
    blobs = write_blobs(tars, tmp_path / "blobs")
    diff_ids = materialize_all(cache, tars, blobs)
    again = materialize_layer(cache, blobs[0], compression=Compression.GZIP,
                              diff_id=diff_ids[0], layer_label="again")
    assert again == MaterializedLayer(diff_ids[0], cache.layer_erofs_path(diff_ids[0]), None)

    manifest = Digest.sha256_of(b"manifest")
    fsmeta, vmdk = stitch_image(cache, manifest, diff_ids)
    original = fsmeta.read_bytes()
    ino = fsmeta.stat().st_ino

    vmdk.unlink()  # only the VMDK is regenerated
    stitch_image(cache, manifest, diff_ids)
    assert vmdk.exists() and fsmeta.stat().st_ino == ino

    with fsmeta.open("r+b") as f:  # bad magic: rebuilt from the layer images
        f.seek(1024)
        f.write(b"\0\0\0\0")
    stitch_image(cache, manifest, diff_ids)
    assert fsmeta.read_bytes() == original and fsmeta.stat().st_ino != ino
    assert list(cache.tmp_dir().iterdir()) == []


def test_failures_publish_nothing_and_clean_tmp(tmp_path: Path) -> None:
    tars = overlay_tars()
    cache = GlobalCache.new(tmp_path / "c")
    blobs = write_blobs(tars, tmp_path / "blobs")
    wrong = Digest.parse(sha256(tars[1]))
    with pytest.raises(DigestMismatch):
        materialize_layer(cache, blobs[0], compression=None, diff_id=wrong, layer_label="x")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 100)
    with pytest.raises(LayerFormatError):
        materialize_layer(cache, garbage, compression=None, diff_id=wrong, layer_label="g")
    assert not cache.layer_erofs_path(wrong).exists()
    assert list(cache.tmp_dir().iterdir()) == []
    with pytest.raises(NotCachedError, match=str(wrong)):
        stitch_image(cache, Digest.sha256_of(b"m"), [wrong])


def _flock_waiters(lock: Path) -> int:
    """Blocked flock requests on ``lock``'s inode, from /proc/locks (lines with '->')."""
    st = lock.stat()
    tag = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and "FLOCK" in line and tag in line + " ")


def test_waits_for_msbs_lock_and_rechecks(tmp_path: Path) -> None:
    """While another holder has layers/<d>.erofs.lock we block; when it publishes the layer
    and releases, we must take its result instead of writing our own."""
    tars = overlay_tars()
    producer = GlobalCache.new(tmp_path / "producer")
    diff_ids = materialize_all(producer, tars[:1], write_blobs(tars[:1], tmp_path / "b1"))
    cache = GlobalCache.new(tmp_path / "c")
    blob = write_blobs(tars[:1], tmp_path / "b2")[0]
    lock = cache.layer_erofs_lock_path(diff_ids[0])
    result: list[MaterializedLayer | BaseException] = []

    def worker() -> None:
        try:
            result.append(materialize_layer(cache, blob, compression=None,
                                            diff_id=diff_ids[0], layer_label="w"))
        except BaseException as e:
            result.append(e)

    with flock_exclusive(lock):
        thread = threading.Thread(target=worker)
        thread.start()
        while _flock_waiters(lock) == 0:  # observe the worker blocked in flock(2)
            assert thread.is_alive(), result
            thread.join(0.01)
        os.link(producer.layer_erofs_path(diff_ids[0]), cache.layer_erofs_path(diff_ids[0]))
    thread.join()
    assert result == [MaterializedLayer(diff_ids[0], cache.layer_erofs_path(diff_ids[0]), None)]
    assert list(cache.tmp_dir().iterdir()) == []


def test_fsmeta_built_while_the_images_are_written_equals_msbs(
        tmp_path: Path, msb_image: tuple[Msb, Digest, list[bytes]]) -> None:
    """The pull's path: each layer's tree is handed on once planned, the fsmeta is merged
    and written while the images still are, and published after them; the bytes are msb's."""
    msb, manifest, tars = msb_image
    cache = GlobalCache.new(tmp_path / "ours")
    blobs = write_blobs(tars, tmp_path / "blobs")
    diff_ids = [Digest.parse(sha256(t)) for t in tars]
    trees: dict[Digest, LayerTree] = {}
    for i, (blob, d) in enumerate(zip(blobs, diff_ids, strict=True)):
        built = start_layer(cache, blob, compression=None, diff_id=d, layer_label=f"#{i}")
        assert built.tree is not None
        trees[d] = built.tree
    fsmeta, vmdk = stitch_image(cache, manifest, diff_ids, msb_quirks=True, trees=trees)
    for d in diff_ids:
        name = f"layers/{d.path_safe()}.erofs"
        assert (cache.root / name).read_bytes() == (msb.cache / name).read_bytes()
    assert fsmeta.read_bytes() == (msb.cache / "fsmeta" / fsmeta.name).read_bytes()
    assert vmdk.exists()
    assert list(cache.tmp_dir().iterdir()) == []


def test_an_image_that_fails_after_its_tree_was_handed_on_publishes_no_fsmeta(
        tmp_path: Path) -> None:
    """The top layer's image cannot be renamed into place (a directory holds its name):
    stitch reports that error, publishes neither fsmeta nor VMDK, leaves nothing in tmp/;
    the sound bottom layer stays published (reusable, as when a later layer fails)."""
    tars = overlay_tars()
    cache = GlobalCache.new(tmp_path / "c")
    blobs = write_blobs(tars, tmp_path / "blobs")
    diff_ids = [Digest.parse(sha256(t)) for t in tars]
    blocker = cache.layer_erofs_path(diff_ids[-1])
    blocker.mkdir(parents=True)
    (blocker / "occupied").touch()
    trees: dict[Digest, LayerTree] = {}
    for i, (blob, d) in enumerate(zip(blobs, diff_ids, strict=True)):
        built = start_layer(cache, blob, compression=None, diff_id=d, layer_label=f"#{i}")
        assert built.tree is not None
        trees[d] = built.tree
    manifest = Digest.sha256_of(b"manifest")
    with pytest.raises(OSError) as failed:
        stitch_image(cache, manifest, diff_ids, trees=trees)
    assert failed.value.filename2 == str(blocker)
    assert all(cache.is_layer_materialized(d) for d in diff_ids[:-1])
    assert not cache.is_layer_materialized(diff_ids[-1])
    assert not cache.fsmeta_erofs_path(manifest).exists()
    assert not cache.vmdk_path(manifest).exists()
    assert [p.name for p in cache.tmp_dir().iterdir() if not p.name.endswith(".lock")] == []
    fd = os.open(cache.layer_erofs_lock_path(diff_ids[-1]), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the failed write released it
    finally:
        os.close(fd)
