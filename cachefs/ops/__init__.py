"""Whole-cache operations behind the CLI: the image catalogue, rm/gc, df, verify.

The catalogue answers "which images does this cache hold, and what do they use?" from
every source a cache can have, because a deleter that misses one source deletes files
another tool still needs:

* cachefs's own reference records (``cachefs/refs/*.json``);
* msb's database (``<root>/db/msb.db``, read-only, FORMATS.md §6), which is the only
  place msb remembers which reference a ``manifests/<key>.json`` belongs to;
* every ``manifests/*.json`` on disk, even ones no record names (their layers are in use
  by *someone*; we just cannot say who).

Reading is tolerant (a missing or corrupt file is a fact to report), except that an msb
database that exists but cannot be read raises: deciding "unreferenced" without it
would be guessing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.index import SOURCE_MSB_DB, DbImage, default_msb_db, read_msb_db
from ..cache.store import GlobalCache, read_metadata_file
from ..digest import Digest
from ..errors import CacheUnreadable, NotCachedError, ReferenceError
from ..models import CachedImageMetadata
from ..reference import Reference

SOURCE_CACHEFS = "cachefs"
SOURCE_JSON = "manifest-json"
_DB_TIMEOUT_S = 10.0  # a command may wait out a busy msb; the polling view does not


@dataclass(slots=True)
class ImageInfo:
    """One cached image as every source sees it; ``key`` names ``manifests/<key>.json``."""

    key: str
    reference: str | None = None  # normalised; None when only an anonymous json exists
    typed: str | None = None
    manifest_digest: str | None = None
    metadata: CachedImageMetadata | None = None
    sources: list[str] = field(default_factory=list)
    db_diff_ids: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.reference or f"<unnamed {self.key[:12]}>"

    @property
    def diff_ids(self) -> list[str]:
        if self.metadata is not None:
            return [layer.diff_id for layer in self.metadata.layers]
        return list(self.db_diff_ids)

    @property
    def digest(self) -> str | None:
        if self.metadata is not None:
            return self.metadata.manifest_digest
        return self.manifest_digest


def list_images(
    cache: GlobalCache, msb_db: Path | None = None, *, strict: bool = False
) -> list[ImageInfo]:
    """Every image of the cache from all three sources, merged by cache key.

    ``strict`` (deleters): a source that cannot be read — ``manifests/`` itself, a
    metadata file or record that exists but does not read or parse — raises
    ``CacheUnreadable`` instead of reading as "no image", which would free its layers.
    """
    by_key: dict[str, ImageInfo] = {}

    def entry(key: str) -> ImageInfo:
        return by_key.setdefault(key, ImageInfo(key=key))

    for rec in cache.ref_records(strict=strict):
        try:
            ref = Reference.parse(rec.reference)
        except ReferenceError:
            continue
        info = entry(ref.cache_key)
        info.reference, info.typed = str(ref), rec.typed
        info.manifest_digest = rec.manifest_digest
        info.sources.append(SOURCE_CACHEFS)
    db = msb_db if msb_db is not None else default_msb_db(cache)
    for row in read_msb_db(db, strict=True, timeout=_DB_TIMEOUT_S):
        try:
            ref = Reference.parse(row.typed)
        except ReferenceError:
            continue
        info = entry(ref.cache_key)
        info.reference = str(ref)
        info.typed = info.typed or row.typed
        info.manifest_digest = info.manifest_digest or row.manifest_digest
        info.db_diff_ids = tuple(row.layers)
        info.sources.append(SOURCE_MSB_DB)
    for path in _manifest_jsons(cache, strict=strict):
        info = entry(path.stem)
        info.sources.append(SOURCE_JSON)
    for info in by_key.values():
        info.metadata = read_metadata_file(cache.manifests_dir() / f"{info.key}.json",
                                           strict=strict)
    return sorted(by_key.values(), key=lambda i: (i.reference is None, i.name))


def _manifest_jsons(cache: GlobalCache, *, strict: bool = False) -> list[Path]:
    directory = cache.manifests_dir()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as err:
        if strict:
            raise CacheUnreadable(directory, err) from None
        return []
    return sorted(directory / n for n in names if n.endswith(".json") and len(n) == 64 + 5)


def find_image(images: Iterable[ImageInfo], text: str) -> ImageInfo:
    """The image a user named: a reference (normalised like msb), ``REPO@sha256:…`` of
    an image cached under a tag of that repository, a manifest digest (``sha256:…``,
    unique prefix allowed) or a cache key."""
    images = list(images)
    try:
        ref: Reference | None = Reference.parse(text)
    except ReferenceError:
        if not (text.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{64}", text)):
            raise
        ref = None
    key = ref.cache_key if ref is not None else None
    for info in images:
        if info.key in (key, text):
            return info
    if ref is not None and ref.digest is not None:  # as docker/skopeo print it: REPO@digest
        for info in images:
            if info.digest == str(ref.digest) and _repository(info.reference) == ref.name:
                return info
    if text.startswith("sha256:"):
        hits = [i for i in images if i.digest and i.digest.startswith(text)]
        if len({i.digest for i in hits}) == 1:
            return hits[0]
    raise NotCachedError(f"image {text!r} is not in the cache",
                         hint="see `cachefs images`")


def _repository(reference: str | None) -> str | None:
    try:
        return Reference.parse(reference).name if reference else None
    except ReferenceError:
        return None


@dataclass(slots=True)
class References:
    """What the remaining images use: layer diff_ids and manifest digests (as strings)."""

    layers: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)

    def add(self, info: ImageInfo) -> None:
        self.layers.update(info.diff_ids)
        if info.digest:
            self.manifests.add(info.digest)
        if info.manifest_digest:
            self.manifests.add(info.manifest_digest)
        self.layers.update(info.db_diff_ids)


def referenced(
    cache: GlobalCache, msb_db: Path | None = None, *, excluding: Iterable[str] = ()
) -> References:
    """Layers and manifests used by every image except those whose key is in ``excluding``.

    Read strictly: this answers deleters, so a source that cannot be read stops them.

    Includes the msb database's layer lists as well as the json's, because the two can
    disagree while msb is mid-publication.
    """
    skip = set(excluding)
    refs = References()
    for info in list_images(cache, msb_db, strict=True):
        if info.key not in skip:
            refs.add(info)
    return refs


def layer_path(cache: GlobalCache, diff_id: str) -> Path:
    return cache.layer_erofs_path(Digest.parse(diff_id))


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def missing_parts(cache: GlobalCache, info: ImageInfo) -> list[str]:
    """What keeps an image from being usable, by msb's cache-hit rule (§1.7); [] = ready."""
    out = []
    if info.metadata is None:
        out.append("metadata")
    for diff_id in info.diff_ids:
        if not cache.is_layer_materialized(diff_id):
            out.append(f"layer {diff_id}")
    if info.digest is None or not cache.is_fsmeta_materialized(info.digest):
        out.append("fsmeta")
    if info.digest is None or not cache.is_vmdk_materialized(info.digest):
        out.append("vmdk")
    return out


def image_summary(cache: GlobalCache, info: ImageInfo) -> dict[str, object]:
    """One row of ``cachefs images``: reference, digest, layer count, bytes, state."""
    size = sum(_file_size(cache.layer_erofs_path(d)) or 0 for d in dict.fromkeys(info.diff_ids))
    if info.digest:
        size += _file_size(cache.fsmeta_erofs_path(info.digest)) or 0
    missing = missing_parts(cache, info)
    return {
        "reference": info.reference,
        "typed": info.typed,
        "key": info.key,
        "manifest_digest": info.digest,
        "layers": len(info.diff_ids),
        "size_bytes": size,
        "state": "ready" if not missing else "incomplete",
        "missing": missing,
        "sources": sorted(set(info.sources)),
    }


def _platform_and_created(raw_config_json: str) -> dict[str, object]:
    """What skopeo and msb show from the image config beside the runtime settings."""
    try:
        doc = json.loads(raw_config_json)
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    return {k: doc.get(k) if isinstance(doc.get(k), str) else None
            for k in ("architecture", "os", "variant", "created")}


def inspect_image(cache: GlobalCache, info: ImageInfo) -> dict[str, object]:
    """Everything cachefs knows about one image, with the paths of its artifacts."""
    md = info.metadata
    doc = image_summary(cache, info)
    doc["metadata_path"] = str(cache.manifests_dir() / f"{info.key}.json")
    doc["config_digest"] = md.config_digest if md else None
    doc.update(_platform_and_created(md.raw_config_json) if md else
               dict.fromkeys(("architecture", "os", "variant", "created")))
    doc["config"] = md.config.model_dump() if md else None
    layers = []
    by_diff = {layer.diff_id: layer for layer in md.layers} if md else {}
    for diff_id in info.diff_ids:
        path = cache.layer_erofs_path(diff_id)
        meta = by_diff.get(diff_id)
        layers.append({
            "diff_id": diff_id,
            "digest": meta.digest if meta else None,
            "media_type": meta.media_type if meta else None,
            "size_bytes": meta.size_bytes if meta else None,
            "erofs_path": str(path),
            "erofs_size": _file_size(path),
            "valid": cache.is_layer_materialized(diff_id),
            **_layer_origin(cache, diff_id),
        })
    doc["layer_details"] = layers
    if info.digest:
        fsmeta, vmdk = cache.fsmeta_erofs_path(info.digest), cache.vmdk_path(info.digest)
        doc["fsmeta"] = {"path": str(fsmeta), "size": _file_size(fsmeta),
                         "valid": cache.is_fsmeta_materialized(info.digest)}
        doc["vmdk"] = {"path": str(vmdk), "exists": vmdk.exists()}
    return doc


def _layer_origin(cache: GlobalCache, diff_id: str) -> dict[str, str]:
    """``origin`` (converted / fetched-erofs) and, when fetched, from where."""
    from ..share.provenance import layer_origin

    found = layer_origin(cache, diff_id)
    return {"origin": found["origin"], **({"origin_source": found["source"],
                                            "origin_artifact": found["artifact"]}
                                           if "source" in found else {})}


__all__ = [
    "DbImage",
    "ImageInfo",
    "References",
    "default_msb_db",
    "find_image",
    "image_summary",
    "inspect_image",
    "layer_path",
    "list_images",
    "missing_parts",
    "read_msb_db",
    "referenced",
]
