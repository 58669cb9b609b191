"""Cache-wide status: ``status.json`` and Prometheus ``metrics``, rendered from a snapshot.

Both are rendered on every open from a fresh scan, so a monitoring agent that reads them
never sees stale numbers; both are pure functions of ``CacheSnapshot`` so they are tested
without FUSE.
"""

from __future__ import annotations

import json
from typing import NotRequired, TypedDict

from ..cache.health import KINDS
from .model import CacheSnapshot, image_states


class ImageStatus(TypedDict):
    reference: str
    manifest_digest: str | None
    layers: int
    ready: bool
    sources: list[str]


class ImageCounts(TypedDict):
    total: int
    ready: int
    list: list[ImageStatus]  # last: the name shadows the builtin below it in this body


class LayerCounts(TypedDict):
    total: int
    corrupt: int


class Download(TypedDict):
    file: str
    bytes: int


class StatusDocument(TypedDict):
    """``status.json`` and ``cachefs status --json``; scripts parse it, keys in this order."""

    cache: str
    generated_at_ns: int
    leases: str
    images: ImageCounts
    layers: LayerCounts
    bytes: dict[str, int]  # by kind (KINDS)
    downloads_in_flight: list[Download]
    problems: list[dict[str, str]]  # scope, problem and, for an image's problem, fix
    log: NotRequired[str]


def status_document(snap: CacheSnapshot, log: str | None = None) -> StatusDocument:
    """``log``: where the serving daemon logs (a file, the journal), when there is one."""
    images: list[ImageStatus] = []
    problems: list[dict[str, str]] = [{"scope": "cache", "problem": p} for p in snap.problems]
    ready = 0
    for img, state in image_states(snap):
        ready += state.ready
        images.append({
            "reference": str(img.reference),
            "manifest_digest": img.manifest_digest,
            "layers": len(img.layers),
            "ready": state.ready,
            "sources": sorted(img.sources),
        })
        problems += [
            {"scope": str(img.reference), "problem": what, "fix": fix}
            for what, fix in state.problems
        ]
    layers_present = sum(1 for a in snap.layers.values() if a.exists)
    doc: StatusDocument = {
        "cache": str(snap.cache_root),
        "generated_at_ns": snap.taken_at_ns,
        "leases": snap.lease_problem or "ok",
        "images": {"total": len(images), "ready": ready, "list": images},
        "layers": {
            "total": layers_present,
            "corrupt": sum(1 for a in snap.layers.values() if a.exists and a.problem),
        },
        "bytes": {kind: snap.bytes_by_kind.get(kind, 0) for kind in KINDS},
        "downloads_in_flight": [
            {"file": name, "bytes": size} for name, size in sorted(snap.downloads.items())
        ],
        "problems": problems,
    }
    if log is not None:
        doc["log"] = log
    return doc


def render_status_json(snap: CacheSnapshot, log: str | None = None) -> bytes:
    doc = status_document(snap, log)
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(snap: CacheSnapshot) -> bytes:
    """Prometheus text exposition format 0.0.4."""
    doc = status_document(snap)
    images = doc["images"]
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("cachefs_images", "gauge", "Image references known to the cache.",
           [("", images["total"])])
    metric("cachefs_images_ready", "gauge", "Image references whose artifacts are all valid.",
           [("", images["ready"])])
    metric("cachefs_layers", "gauge", "Layer EROFS images in the cache.",
           [("", sum(1 for a in snap.layers.values() if a.exists))])
    metric("cachefs_bytes", "gauge", "Bytes used by the cache, by kind.",
           [(f'{{kind="{k}"}}', snap.bytes_by_kind.get(k, 0)) for k in KINDS])
    metric("cachefs_downloads_in_flight", "gauge", "Partial downloads in tmp/.",
           [("", len(snap.downloads))])
    metric("cachefs_download_bytes", "gauge", "Bytes received so far by partial downloads.",
           [("", sum(snap.downloads.values()))])
    metric("cachefs_problems", "gauge", "Problems found (missing or corrupt artifacts).",
           [("", len(doc["problems"]))])
    metric("cachefs_image_ready", "gauge", "1 if the image can be used, else 0.",
           [(f'{{reference="{_label(i["reference"])}"}}', int(i["ready"]))
            for i in images["list"]])
    return ("\n".join(out) + "\n").encode()
