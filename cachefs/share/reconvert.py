"""``cachefs verify --deep``: prove a cached image's EROFS are what its layer tars convert to.

A fetched artifact is trusted as far as whoever could push it (the same people who can
push the image). This removes the need: every layer blob is taken from the cache's
``<blob>.tar.gz`` if a pull left one, else downloaded (verified against its digest),
converted again here into a scratch file, and compared byte for byte with the cached
layer image; the fsmeta merged from the fresh trees is compared with the cached fsmeta.
Nothing in the cache is changed; scratch files live under cachefs's ``cachefs/tmp/``.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..cache.store import CACHEFS_DIR, GlobalCache
from ..digest import Digest, sha256_file
from ..erofs.fsmeta import fsmeta_of_layers
from ..erofs.tree import Node
from ..erofs.writer import write_layer_erofs
from ..errors import NotCachedError
from ..ingest.layer import compression_from_media_type, detect_compression, ingest_layer
from ..models import Descriptor, LayerMetadata
from ..oci.registry import RegistryClient
from ..reference import Reference
from .provenance import layer_origin


@dataclass
class LayerProof:
    diff_id: str
    origin: str
    identical: bool
    cached_digest: str | None
    converted_digest: str


@dataclass
class DeepReport:
    reference: str
    manifest_digest: str
    layers: list[LayerProof] = field(default_factory=list)
    fsmeta_identical: bool = False

    @property
    def ok(self) -> bool:
        return self.fsmeta_identical and all(p.identical for p in self.layers)

    def to_json(self) -> dict[str, object]:
        return {"reference": self.reference, "manifest_digest": self.manifest_digest,
                "ok": self.ok, "fsmeta_identical": self.fsmeta_identical,
                "layers": [p.__dict__ for p in self.layers]}


def _convert(blob: Path, media_type: str | None, diff_id: Digest, out: Path,
             label: str) -> tuple[Node, int]:
    """The layer conversion a pull runs, into ``out`` (not the cache)."""
    spool_path = out.with_suffix(".spool")
    try:
        with blob.open("rb") as f, spool_path.open("wb+", buffering=4 << 20) as spool:
            compression = (compression_from_media_type(media_type) if media_type
                           else detect_compression(f.read(4)))
            f.seek(0)
            ingested = ingest_layer(f, compression=compression, expected_diff_id=diff_id,
                                    spool=spool, layer_label=label)
            with out.open("wb") as w:
                block_map = write_layer_erofs(ingested.root, spool, w)
    finally:
        spool_path.unlink(missing_ok=True)
    return ingested.root, block_map.total_blocks


def _digest_or_none(path: Path) -> Digest | None:
    try:
        return sha256_file(str(path))
    except FileNotFoundError:
        return None


async def verify_deep(cache: GlobalCache, reference: str,
                      client: RegistryClient) -> DeepReport:
    ref = Reference.parse(reference)
    meta = await trio.to_thread.run_sync(cache.read_image_metadata, ref)
    if meta is None:
        raise NotCachedError(f"{ref} is not in the cache", hint=f"run: cachefs pull {reference}")
    report = DeepReport(str(ref), meta.manifest_digest)
    work = cache.root / CACHEFS_DIR / "tmp" / f"deep-{os.getpid()}-{secrets.token_hex(4)}"
    await trio.to_thread.run_sync(functools.partial(work.mkdir, parents=True, exist_ok=True))
    trees: dict[Digest, tuple[Node, int]] = {}
    try:
        for i, layer in enumerate(meta.layers):
            diff = layer.diff_digest
            if diff in trees:
                continue
            blob = await _blob(cache, ref, layer, work / f"{i}.blob", client)
            out = work / f"{i}.erofs"
            trees[diff] = await trio.to_thread.run_sync(
                _convert, blob, layer.media_type, diff, out, layer.digest)
            converted = await trio.to_thread.run_sync(sha256_file, str(out))
            cached = await trio.to_thread.run_sync(_digest_or_none,
                                                   cache.layer_erofs_path(diff))
            report.layers.append(LayerProof(
                layer.diff_id, layer_origin(cache, diff)["origin"], cached == converted,
                None if cached is None else str(cached), str(converted)))
            out.unlink()
        fsmeta = work / "fsmeta.erofs"

        def build() -> None:
            with fsmeta.open("wb") as f:
                fsmeta_of_layers([trees[d][0] for d in meta.diff_ids],
                                 [trees[d][1] for d in meta.diff_ids], f)

        await trio.to_thread.run_sync(build)
        report.fsmeta_identical = (await trio.to_thread.run_sync(sha256_file, str(fsmeta))
                                   == await trio.to_thread.run_sync(
                                       _digest_or_none, cache.fsmeta_erofs_path(meta.manifest)))
    finally:
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, work,
                                                        ignore_errors=True))
    return report


async def _blob(cache: GlobalCache, ref: Reference, layer: LayerMetadata, dest: Path,
                client: RegistryClient) -> Path:
    """The layer's original blob: a complete one in the cache, else downloaded to ``dest``."""
    kept = cache.tar_path(layer.blob_digest)
    if kept.exists() and (layer.size_bytes is None or kept.stat().st_size == layer.size_bytes):
        return kept
    descriptor = Descriptor(media_type=layer.media_type or "", digest=layer.digest,
                            size=layer.size_bytes or 0)
    await client.fetch_blob(ref, descriptor, dest, resume=False)
    return dest
