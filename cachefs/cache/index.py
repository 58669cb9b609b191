"""Which images the cache holds, by reference.

msb's metadata files (``manifests/<key>.json``) are keyed by a hash of the reference, so
the reference itself lives elsewhere: in cachefs's own records (``GlobalCache.ref_records``)
and in msb's sqlite database (FORMATS.md §6). This module joins both, reads each
reference's metadata file and returns one ``IndexedImage`` per normalised reference.

The database belongs to msb: it is opened read-only (``mode=ro``), with a short busy
timeout, and every failure (missing, locked, half-migrated schema) degrades to "no rows
from the database" plus a problem string, never an exception. A view that polls the
cache every half second must not crash because msb is mid-migration.
"""

from __future__ import annotations

import logging
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..errors import CacheCorrupt, CachefsError
from ..models import CachedImageMetadata
from ..reference import Reference
from .store import GlobalCache

log = logging.getLogger(__name__)

SOURCE_MSB_DB = "msb-db"
_BUSY_TIMEOUT_S = 0.5

_DB_QUERY = """
SELECT r.reference, m.digest, l.diff_id
FROM image_ref AS r
JOIN manifest AS m ON m.id = r.manifest_id
LEFT JOIN manifest_layer AS ml ON ml.manifest_id = m.id
LEFT JOIN layer AS l ON l.id = ml.layer_id
ORDER BY r.id, ml.position
"""


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


@dataclass(slots=True)
class DbImage:
    """An ``image_ref`` row joined to its manifest and ordered layers."""

    typed: str
    manifest_digest: str
    layers: list[str] = field(default_factory=list)


def default_msb_db(cache: GlobalCache) -> Path:
    """``<cache>/../db/msb.db``: msb keeps cache/ and db/ side by side (FORMATS.md §1.1)."""
    return cache.root.parent / "db" / "msb.db"


def read_msb_db(
    path: Path,
    problems: list[str] | None = None,
    *,
    strict: bool = False,
    timeout: float = _BUSY_TIMEOUT_S,
) -> list[DbImage]:
    """Rows of msb's database, read-only; [] if there is none.

    One that cannot be read (locked, a migration half-way) is noted in ``problems`` and
    read as empty, so a polling view just tries again; ``strict`` raises ``CacheCorrupt``
    instead, for callers such as ``gc`` that must not guess what is in use.
    """
    if not path.exists():
        return []

    def fail(text: str) -> list[DbImage]:
        if strict:
            raise CacheCorrupt(text)
        _note(problems, text)
        return []

    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
    except sqlite3.Error as err:
        return fail(f"msb database {path} cannot be opened: {err}")
    try:
        conn.execute("PRAGMA query_only = ON")
        rows = conn.execute(_DB_QUERY).fetchall()
    except sqlite3.Error as err:
        return fail(f"msb database {path} cannot be read: {err}")
    finally:
        conn.close()
    images: dict[str, DbImage] = {}
    for typed, manifest_digest, diff_id in rows:
        if not isinstance(typed, str) or not isinstance(manifest_digest, str):
            continue
        img = images.setdefault(typed, DbImage(typed, manifest_digest))
        if isinstance(diff_id, str):
            img.layers.append(diff_id)
    return list(images.values())


def index_images(
    cache: GlobalCache, msb_db: Path | None = None, problems: list[str] | None = None
) -> list[IndexedImage]:
    """Every reference from cachefs's records and msb's database, deduplicated.

    Sorted by normalised reference so the view's listings are stable.
    """
    db_path = default_msb_db(cache) if msb_db is None else msb_db
    # normalised reference → (typed, manifest_digest, db layers, sources)
    found: dict[str, tuple[Reference, str, str | None, list[str], set[str]]] = {}

    def add(typed: str, manifest_digest: str | None, layers: list[str], source: str) -> None:
        try:
            ref = Reference.parse(typed)
        except CachefsError as err:
            _note(problems, f"ignoring unparsable reference {typed!r} ({source}): {err}")
            return
        key = str(ref)
        if key in found:
            _, first_typed, digest, old_layers, sources = found[key]
            found[key] = (ref, first_typed, digest or manifest_digest, old_layers or layers,
                          sources | {source})
        else:
            found[key] = (ref, typed, manifest_digest, list(layers), {source})

    for rec in cache.ref_records():
        add(rec.typed or rec.reference, rec.manifest_digest, [], f"cachefs-{rec.source}")
    for row in read_msb_db(db_path, problems):
        add(row.typed, row.manifest_digest, row.layers, SOURCE_MSB_DB)

    out = []
    for key in sorted(found):
        ref, typed, digest, layers, sources = found[key]
        metadata = cache.read_image_metadata(ref)
        if metadata is not None:
            digest = metadata.manifest_digest
            layers = [layer.diff_id for layer in metadata.layers]
        out.append(
            IndexedImage(
                reference=ref,
                typed=typed,
                manifest_digest=_valid_digest(digest),
                metadata=metadata,
                layers=[d for d in layers if _valid_digest(d)],
                sources=frozenset(sources),
                metadata_path=cache.image_metadata_path(ref),
            )
        )
    return out


def _valid_digest(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return str(Digest.parse(text))
    except CachefsError:
        log.warning("ignoring malformed digest %r", text)
        return None


def _note(problems: list[str] | None, text: str) -> None:
    log.warning("%s", text)
    if problems is not None:
        problems.append(text)
