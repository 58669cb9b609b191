"""Transient layer blobs: a reused one must hash to its digest; leftovers go only when
their layer is built and nobody holds their download lock."""

from __future__ import annotations

import io
from pathlib import Path

from cachefs.cache import GlobalCache
from cachefs.cache.blobs import drop_leftovers, reusable_blob
from cachefs.digest import Digest
from cachefs.ingest.layer import Compression
from cachefs.pipeline.materialize import materialize_layer
from tests.cli.conftest import held_by_other_process
from tests.fixtures.images import layer_tar, reg

TAR = layer_tar([reg("a", b"a" * 3000)])
BLOB = Digest.sha256_of(TAR)  # an uncompressed layer: blob digest = diff_id


def _cache(tmp_path: Path, *, built: bool) -> GlobalCache:
    cache = GlobalCache.new(tmp_path / "c")
    if built:
        materialize_layer(cache, lambda: io.BytesIO(TAR), compression=Compression.NONE,
                          diff_id=BLOB, layer_label=str(BLOB))
    cache.tar_path(BLOB).write_bytes(TAR)
    cache.part_path(BLOB).write_bytes(TAR[:100])
    return cache


def test_reusable_blob_checks_size_then_digest(tmp_path: Path) -> None:
    cache = _cache(tmp_path, built=False)
    tar = cache.tar_path(BLOB)
    assert reusable_blob(tar, len(TAR), BLOB)
    assert not reusable_blob(tar, len(TAR) + 1, BLOB) and tar.exists()  # incomplete: kept
    tar.write_bytes(b"\0" * len(TAR))
    assert not reusable_blob(tar, len(TAR), BLOB)
    assert not tar.exists()  # wrong bytes: dropped, so the retry downloads it again


def test_leftovers_of_a_built_layer_are_dropped(tmp_path: Path) -> None:
    cache = _cache(tmp_path, built=True)
    assert drop_leftovers(cache, [(BLOB, BLOB)]) == [cache.tar_path(BLOB), cache.part_path(BLOB)]
    assert not cache.tar_path(BLOB).exists() and not cache.part_path(BLOB).exists()


def test_leftovers_stay_while_their_download_lock_is_held_or_the_layer_is_missing(
    tmp_path: Path,
) -> None:
    cache = _cache(tmp_path, built=True)
    with held_by_other_process(cache.download_lock_path(BLOB), shared=False):
        assert drop_leftovers(cache, [(BLOB, BLOB)]) == []
    assert cache.tar_path(BLOB).exists() and cache.part_path(BLOB).exists()
    unbuilt = _cache(tmp_path / "other", built=False)
    assert drop_leftovers(unbuilt, [(BLOB, BLOB)]) == []
    assert unbuilt.part_path(BLOB).exists()  # resumable: the next pull continues it
