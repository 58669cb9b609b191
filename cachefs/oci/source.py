"""The one shape of an image that every source hands the pipeline.

A registry (:class:`cachefs.oci.registry.ResolvedImage`) and an archive
(:class:`cachefs.oci.archive.ArchiveImage`) describe an image with different extras (an
index digest, repo tags, archive members); what the cache stores for it is the same, so
each says it once, as a :class:`SourceImage`, and the pipeline maps that one shape into
its plan (``ImagePlan.from_source``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..digest import Digest
from ..models import ImageConfigFile


@dataclass(frozen=True)
class SourceLayer:
    """One layer as its source names it; an empty media type or a zero size means
    unknown (msb then stores null)."""

    digest: str  # of the blob, as the source spells it
    media_type: str | None
    size: int | None
    diff_id: str


@dataclass(frozen=True)
class SourceImage:
    """An image's manifest and config as msb stores them, and its layers in order."""

    manifest_digest: Digest
    raw_manifest_json: str  # what msb stores as raw_manifest_json for this source
    config_bytes: bytes
    config: ImageConfigFile
    layers: tuple[SourceLayer, ...]


__all__ = ["SourceImage", "SourceLayer"]
