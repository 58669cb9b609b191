"""``df``: where the cache's bytes are, by kind and by image.

Sizes are apparent sizes (``st_size``), which is what a VMM reads and what msb records;
EROFS files are block-aligned, so they equal allocated space on any ordinary filesystem.
Per image, a layer is *shared* when another image uses it too and *unique* otherwise,
so "what would ``rm`` free" is the unique column (plus fsmeta and VMDK unless another
reference points at the same manifest).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.catalog import ImageInfo, list_images
from ..cache.health import KINDS, account_bytes
from ..cache.store import GlobalCache


@dataclass(slots=True)
class ImageUsage:
    name: str
    manifest_digest: str | None
    layers: int
    unique_bytes: int
    shared_bytes: int
    missing_layers: int

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.name,
            "manifest_digest": self.manifest_digest,
            "layers": self.layers,
            "unique_bytes": self.unique_bytes,
            "shared_bytes": self.shared_bytes,
            "missing_layers": self.missing_layers,
        }


@dataclass(slots=True)
class Usage:
    root: Path
    by_kind: dict[str, int] = field(default_factory=dict)
    files_by_kind: dict[str, int] = field(default_factory=dict)
    images: list[ImageUsage] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def to_json(self) -> dict[str, object]:
        return {
            "cache": str(self.root),
            "total_bytes": self.total,
            "bytes_by_kind": dict(self.by_kind),
            "files_by_kind": dict(self.files_by_kind),
            "images": [i.to_json() for i in self.images],
        }


def _size(path: Path) -> int | None:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return None


def disk_usage(cache: GlobalCache, msb_db: Path | None = None,
               images: list[ImageInfo] | None = None) -> Usage:
    """Bytes by kind (``cache.health.account_bytes``) and per image."""
    account = account_bytes(cache)  # the same numbers status.json shows
    usage = Usage(cache.root, account.bytes_by_kind, account.files_by_kind)
    images = list_images(cache, msb_db) if images is None else images
    layer_users: Counter[str] = Counter()
    manifest_users: Counter[str] = Counter()
    for info in images:
        layer_users.update(set(info.diff_ids))
        if info.digest:
            manifest_users[info.digest] += 1
    for info in images:
        unique = shared = missing = 0
        for diff_id in dict.fromkeys(info.diff_ids):
            size = _size(cache.layer_erofs_path(diff_id))
            if size is None:
                missing += 1
            elif layer_users[diff_id] > 1:
                shared += size
            else:
                unique += size
        if info.digest:
            own = sum(_size(p) or 0 for p in (cache.fsmeta_erofs_path(info.digest),
                                              cache.vmdk_path(info.digest)))
            if manifest_users[info.digest] > 1:
                shared += own
            else:
                unique += own
        usage.images.append(ImageUsage(info.name, info.digest, len(info.diff_ids), unique,
                                       shared, missing))
    return usage


__all__ = ["KINDS", "ImageUsage", "Usage", "disk_usage"]
