"""``cachefs images`` and ``cachefs inspect``: the catalogue's entries as reports.

The facts come from ``cache.catalog`` (which images) and ``cache.health`` (is each one
usable); this module only shapes them into rows and documents.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cache.catalog import ImageInfo
from ..cache.store import GlobalCache
from ..digest import Digest
from .image_report import (
    ImageArtifacts,
    ImageDetails,
    ImagePlatform,
    ImageSummary,
    LayerDetail,
    LayerOrigin,
)


def layer_path(cache: GlobalCache, diff_id: str) -> Path:
    return cache.layer_erofs_path(Digest.parse(diff_id))


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def missing_parts(cache: GlobalCache, info: ImageInfo) -> list[str]:
    """What keeps an image from being usable ([] = ready): ``cache.health``'s verdict,
    the same the view and ``cachefs status`` give."""
    from ..cache.health import info_problems, missing_labels

    return missing_labels(info_problems(cache, info))


def image_summary(cache: GlobalCache, info: ImageInfo) -> ImageSummary:
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
        "sources": info.source_names,
    }


def _platform_and_created(raw_config_json: str) -> ImagePlatform:
    """What skopeo and msb show from the image config beside the runtime settings."""
    try:
        doc = json.loads(raw_config_json)
    except ValueError:
        doc = {}
    doc = doc if isinstance(doc, dict) else {}

    def text(key: str) -> str | None:
        value = doc.get(key)
        return value if isinstance(value, str) else None

    return {"architecture": text("architecture"), "os": text("os"),
            "variant": text("variant"), "created": text("created")}


def inspect_image(cache: GlobalCache, info: ImageInfo) -> ImageDetails:
    """Everything cachefs knows about one image, with the paths of its artifacts."""
    md = info.metadata
    layers: list[LayerDetail] = []
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
    doc: ImageDetails = {
        **image_summary(cache, info),
        "metadata_path": str(cache.manifests_dir() / f"{info.key}.json"),
        "config_digest": md.config_digest if md else None,
        **_platform_and_created(md.raw_config_json if md else "{}"),
        "config": md.config.model_dump() if md else None,
        "layer_details": layers,
        **_artifacts(cache, info),
    }
    return doc


def _artifacts(cache: GlobalCache, info: ImageInfo) -> ImageArtifacts:
    if not info.digest:
        return {}
    fsmeta, vmdk = cache.fsmeta_erofs_path(info.digest), cache.vmdk_path(info.digest)
    return {
        "fsmeta": {"path": str(fsmeta), "size": _file_size(fsmeta),
                   "valid": cache.is_fsmeta_materialized(info.digest)},
        "vmdk": {"path": str(vmdk), "exists": vmdk.exists()},
    }


def _layer_origin(cache: GlobalCache, diff_id: str) -> LayerOrigin:
    """``origin`` (converted / fetched-erofs) and, when fetched, from where."""
    from ..share.provenance import layer_origin

    found = layer_origin(cache, diff_id)
    if "source" not in found:
        return {"origin": found["origin"]}
    return {"origin": found["origin"], "origin_source": found["source"],
            "origin_artifact": found["artifact"]}


__all__ = ["image_summary", "inspect_image", "layer_path", "missing_parts"]
