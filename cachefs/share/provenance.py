"""Where a cached layer image came from: converted here, or fetched as EROFS from a registry.

Recorded in cachefs's own directory (``cachefs/provenance/<diff>.json``), never in msb's
files, which stay byte-identical to msb's. A record names the layer file it describes by
size, inode and mtime: a layer converted again later (``pull --force``, msb rebuilding an
invalid one) is a new file, so a stale record reads as "converted" without anyone having
to remember to delete it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from ..cache.publish import publish_file, remove_quietly
from ..cache.store import CACHEFS_DIR, GlobalCache
from ..digest import Digest
from ..errors import DigestError

FETCHED = "fetched-erofs"
CONVERTED = "converted"


def _record_path(cache: GlobalCache, diff_id: Digest) -> Path:
    return cache.root / CACHEFS_DIR / "provenance" / f"{diff_id.path_safe()}.json"


def _identity(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns]


def record_fetched(cache: GlobalCache, diff_id: Digest, *, source: str, artifact: str,
                   blob: str) -> None:
    """Note that ``layers/<diff_id>.erofs`` (as it is now) came from ``artifact``."""
    ident = _identity(cache.layer_erofs_path(diff_id))
    if ident is None:
        return
    path = _record_path(cache, diff_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    doc = {"diff_id": str(diff_id), "origin": FETCHED, "source": source,
           "artifact": artifact, "blob": blob, "file": ident, "recorded_at": time.time()}
    try:
        tmp.write_text(json.dumps(doc, sort_keys=True))
        publish_file(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def layer_origin(cache: GlobalCache, diff_id: Digest | str) -> dict[str, str]:
    """``{"origin": "fetched-erofs", "source": …, "artifact": …}`` or ``{"origin": "converted"}``.

    "converted" covers every layer without a current record: converted from its tar by
    cachefs or by msb.
    """
    diff = diff_id if isinstance(diff_id, Digest) else Digest.parse(diff_id)
    try:
        doc = json.loads(_record_path(cache, diff).read_text())
    except (OSError, ValueError):
        return {"origin": CONVERTED}
    if not isinstance(doc, dict) or doc.get("file") != _identity(cache.layer_erofs_path(diff)):
        return {"origin": CONVERTED}
    return {"origin": FETCHED, "source": str(doc.get("source", "")),
            "artifact": str(doc.get("artifact", ""))}


def fetched_layers(cache: GlobalCache) -> dict[str, dict[str, str]]:
    """Every layer whose current file was fetched as EROFS: diff_id → its record's facts.

    One directory listing for a whole cache (the view's snapshot); layers without a current
    record are "converted".
    """
    out: dict[str, dict[str, str]] = {}
    try:
        names = os.listdir(cache.root / CACHEFS_DIR / "provenance")
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            diff = Digest.parse(name[: -len(".json")].replace("_", ":", 1))
        except DigestError:
            continue
        found = layer_origin(cache, diff)
        if found["origin"] == FETCHED:
            out[str(diff)] = found
    return out
