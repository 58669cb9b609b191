"""What shows in the watched directories while the cache stays the same: the traces of
the view's own work, which must never make it rescan.

* Reading msb's database: SQLite opens the WAL and its shared-memory index read-write,
  ``fchown``s them to the database's owner when it runs as root (a new ctime, and
  ``IN_ATTRIB``), rebuilds the index when it is the only connection (``IN_MODIFY`` on
  ``-shm``) and closes both (``IN_CLOSE_WRITE``), for a read-only query. A write by msb
  always modifies the database or its WAL (``IN_MODIFY``; SQLite never writes through a
  mapping), or creates or deletes the WAL.
* Leases and locks (``.msb-leases/``, ``*.lock``): zero-length flock targets that a pull,
  a deleter or the view itself (serving a disk file) creates and never deletes; never data
  (FORMATS.md §1.3, §1.5).

Counted as changes, every rescan caused the next (a rescan reads the database): each walk
through an image directory became a full rescan and a new tree, and the poll rescanned
every half second on an idle cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..cache.locks import is_lock_entry
from .changes import IN_ATTRIB, IN_CLOSE_WRITE, Ignore

IN_ISDIR = 0x40000000
_READER_EVENTS = IN_ATTRIB | IN_CLOSE_WRITE | IN_ISDIR

# (inode, size, mtime, mode) of a database file: its ctime is left out, which any root
# reader renews (the chown above) without changing a byte.
DbIdentity = tuple[int, int, int, int] | None


def is_db_reader_trace(db: Path, name: str, mask: int) -> bool:
    """Is this event in the database's directory one that a reader of ``db`` causes?"""
    if name == f"{db.name}-shm":
        return True
    return name in (db.name, f"{db.name}-wal") and not mask & ~_READER_EVENTS


def not_a_change(db: Path) -> Ignore:
    """``DirWatch``'s ``ignore`` for the cache's directories and msb's database."""
    db_dir = db.parent

    def ignore(directory: Path, name: str, mask: int) -> bool:
        return is_lock_entry(name) or (directory == db_dir
                                       and is_db_reader_trace(db, name, mask))

    return ignore


def db_identity(path: Path) -> DbIdentity:
    """What changes when ``path`` (msb's database or its WAL) is written; None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
