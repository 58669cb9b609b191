"""Reading msb's list of images from its database (FORMATS.md §6), read-only.

msb's metadata files (``manifests/<key>.json``) are keyed by a hash of the reference, so
msb keeps the reference itself only in its sqlite database. The database belongs to msb:
it is opened read-only (``mode=ro``) with a busy timeout, and a failure (locked,
half-migrated schema) is either noted and read as "no rows" (the view's first scan,
which has nothing else to show) or, for callers that must not guess (deleters, listings,
the view's later rescans), raised.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MsbDbUnreadable
from .location import default_msb_db as default_msb_db  # its old home: re-exported

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


@dataclass(slots=True)
class DbImage:
    """An ``image_ref`` row joined to its manifest and ordered layers."""

    typed: str
    manifest_digest: str
    layers: list[str] = field(default_factory=list)


def read_msb_db(
    path: Path,
    problems: list[str] | None = None,
    *,
    strict: bool = False,
    timeout: float = _BUSY_TIMEOUT_S,
) -> list[DbImage]:
    """Rows of msb's database, read-only; [] if there is none.

    One that cannot be read (locked, a migration half-way) is noted in ``problems`` and
    read as empty; ``strict`` raises ``MsbDbUnreadable`` (a ``CacheCorrupt``) instead, for
    callers that must not guess: ``gc`` (what is in use), listings, and the view once it
    shows a state (it keeps that state rather than hide msb's images).
    """
    if not path.exists():
        return []
    import sqlite3  # here: without msb's database, listing never loads it

    def fail(text: str) -> list[DbImage]:
        if strict:
            raise MsbDbUnreadable(text)
        log.warning("%s", text)
        if problems is not None:
            problems.append(text)
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


__all__ = ["SOURCE_MSB_DB", "DbImage", "default_msb_db", "read_msb_db"]
