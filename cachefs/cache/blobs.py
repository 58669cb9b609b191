"""Downloaded layer blobs (``layers/<blob>.tar.gz``, ``tmp/<blob>.part``): trust and cleanup.

These files are transient: a pull keeps a blob only until its layer image is published.
Two ways they outlive their use, both from interrupted runs:

* a complete-looking ``.tar.gz`` left by an earlier run is reused by msb's rule (right
  size, §1.6). A same-size file with other bytes would then fail every retry at ingest;
  so a reused blob must hash to its digest first, and is dropped when it does not;
* a pull killed after some layers were built leaves their blobs behind, and the run that
  later completes the image finds those layers valid and never looks at their blobs. The
  run that completes an image therefore removes what its own layers left.

Both act only under the blob's download lock (msb's too), so nobody is downloading or
reading a blob that is checked or removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from ..digest import Digest
from .locks import FileLock
from .publish import remove_quietly
from .store import GlobalCache

log = logging.getLogger(__name__)

_READ = 1 << 20


def blob_matches(path: Path, digest: Digest) -> bool:
    """Do the bytes of ``path`` hash to ``digest``? (Blocking: run it in a worker thread.)"""
    hasher = digest.hasher()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_READ):
                hasher.update(chunk)
    except FileNotFoundError:
        return False
    return Digest.from_hash(hasher) == digest


def reusable_blob(path: Path, expected_size: int | None, digest: Digest) -> bool:
    """A complete blob from an earlier run that may be used as is; a bad one is removed.

    The caller holds the blob's download lock. Blocking: run it in a worker thread.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if (size != expected_size) if expected_size is not None else size == 0:
        return False
    if blob_matches(path, digest):
        return True
    log.warning("dropping %s: its bytes do not hash to %s", path, digest)
    remove_quietly(path)
    return False


def drop_leftovers(cache: GlobalCache, layers: Iterable[tuple[Digest, Digest]]) -> list[Path]:
    """Remove the blob files of ``(blob digest, diff_id)`` layers whose image is valid.

    A blob whose download lock is held (a pull using it right now) is left alone; the
    run that holds it removes it. Returns what was removed.
    """
    removed: list[Path] = []
    for blob, diff_id in layers:
        leftovers = [p for p in (cache.tar_path(blob), cache.part_path(blob)) if p.exists()]
        if not leftovers or not cache.is_layer_materialized(diff_id):
            continue
        lock = FileLock(cache.download_lock_path(blob))
        if not lock.acquire(blocking=False):
            continue
        try:
            removed += [p for p in leftovers if remove_quietly(p)]
        finally:
            lock.release()
    return removed
