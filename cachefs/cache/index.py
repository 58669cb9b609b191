"""The view's list of images: the catalogue (``cache.catalog``) by normalised reference.

The view names images by reference, so an anonymous ``manifests/<key>.json`` (no record
or database row names it) has no directory there; everything else — which sources are
read, how they merge, what an unreadable or unparsable input becomes — is the
catalogue's, the same answer ``cachefs images`` and ``gc`` get. Read tolerantly: a view
that polls every half second must not fail because msb is mid-migration; what cannot be
read is a problem line in ``status.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models import CachedImageMetadata
from ..reference import Reference
from .catalog import SOURCE_JSON, list_images, metadata_path
from .msb_index import SOURCE_MSB_DB, DbImage, default_msb_db, read_msb_db
from .store import GlobalCache


@dataclass(frozen=True, slots=True)
class IndexedImage:
    """One image reference known to the cache.

    ``layers`` are diff_ids bottom first: from the metadata file when it parses (it is
    what msb itself trusts), else from the database. ``metadata`` is None when the file
    is missing or corrupt; the view then reports the image as not ready.
    """

    reference: Reference
    typed: str
    manifest_digest: str | None
    metadata: CachedImageMetadata | None
    layers: list[str]
    sources: frozenset[str]
    metadata_path: Path


def index_images(
    cache: GlobalCache, msb_db: Path | None = None, problems: list[str] | None = None,
    *, db_required: bool = False,
) -> list[IndexedImage]:
    """Every named image of the catalogue, sorted by normalised reference (stable
    listings). ``sources``: :attr:`ImageInfo.source_names`, as ``images --json`` says.
    ``db_required``: an unreadable msb database raises ``MsbDbUnreadable`` instead of
    reading as empty (``list_images``)."""
    found = list_images(cache, msb_db, problems=[] if problems is None else problems,
                        db_required=db_required)
    out = []
    for info in found:
        if info.parsed is None or info.reference is None:
            continue
        sources = set(info.source_names)
        if not sources - {SOURCE_JSON}:  # only the json: not named by anyone
            continue
        out.append(IndexedImage(
            reference=info.parsed,
            typed=info.typed or info.reference,
            manifest_digest=info.digest,
            metadata=info.metadata,
            layers=info.diff_ids,
            sources=frozenset(sources),
            metadata_path=metadata_path(cache, info),
        ))
    return sorted(out, key=lambda i: str(i.reference))


__all__ = [
    "SOURCE_JSON",
    "SOURCE_MSB_DB",
    "DbImage",
    "IndexedImage",
    "default_msb_db",
    "index_images",
    "read_msb_db",
]
