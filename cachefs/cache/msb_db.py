"""Writing cachefs's images into msb's database, so ``msb image ls/inspect/rm`` see them.

msb lists only database rows (FORMATS.md §6): an image cachefs pulled is invisible to
``msb image ls`` until a ``msb pull`` re-resolves it. Here cachefs writes the rows msb
itself writes for the same pull or load — same tables, same values, same order, same
timestamp format — and deletes them on ``cachefs rm`` as ``msb image rm`` does.

The database is msb's, so this module is careful with it:

* it never creates one: no ``<MSB_HOME>/db/msb.db``, nothing to do;
* it writes only to the schema msb 0.7.11 creates, recognised by the exact set of
  migrations in msb's own ``seaql_migrations`` table. Any other schema is left untouched
  and a warning says so once per database and process;
* every change is one ``BEGIN IMMEDIATE`` transaction (the write lock up front, so no
  read-to-write upgrade can deadlock against msb), waiting out a writer for msb's busy
  timeout and never changing the journal mode (msb's WAL stays). msb 0.7.11's timeout is
  5 s per statement (strace of a blocked ``msb load``: sqlite's busy handler sleeps 5.0 s,
  then msb retries the operation, 8 times in all); one such wait is enough here, because
  a record that misses its turn costs only the listing;
* foreign keys are on, as in msb's connections: deleting a manifest cascades to its
  config and layer list, and a sandbox that uses it (ON DELETE RESTRICT) keeps it.

A database that is busy beyond the timeout or broken is reported, never fatal: the
cache itself is complete, and ``msb pull REF`` would add the rows from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CachefsError, MsbDatabaseError, MsbSchemaUnknown
from ..models import CachedImageMetadata, ImageConfigFile
from ..reference import Reference

log = logging.getLogger(__name__)

MSB_BUSY_TIMEOUT_S = 5.0

# ``seaql_migrations.version`` of every migration msb 0.7.11 applies; the schema is
# exactly theirs when this set is exactly what the table holds.
MSB_0711_MIGRATIONS: frozenset[str] = frozenset({
    "m20260305_000001_create_image_tables",
    "m20260305_000002_create_sandbox_tables",
    "m20260305_000003_create_storage_tables",
    "m20260305_000004_create_sandbox_images_table",
    "m20260410_000001_erofs_image_schema",
    "m20260501_000001_create_snapshot_index",
    "m20260517_000001_drop_sandbox_metric",
    "m20260527_000001_migrate_oci_rootfs_source",
    "m20260531_000001_create_sandbox_labels",
    "m20260531_000002_index_sandbox_labels_key_value",
    "m20260606_000001_named_volume_kinds",
    "m20260621_000001_add_sandbox_ephemeral",
    "m20260621_000002_create_maintenance_lease",
    "m20260703_000001_add_sandbox_active_config",
    "m20260708_000001_migrate_bind_rootfs_source",
    "m20260710_000001_migrate_root_disk",
    "m20260714_000001_add_snapshot_scope",
    "m20260723_000001_snapshot_artifact_transition",
    "m20260719_000001_create_cpu_allocations",
    "m20260803_000001_create_writeback_allocations",
    "m20260808_000001_create_memory_allocation_nodes",
    "m20260810_000001_rebuild_sandbox_labels",
    "m20260813_000001_share_cpu_allocations",
    "m20260824_000001_mount_owner_config",
    "m20260818_000001_sandbox_network_slot",
    "m20260829_000001_split_snapshot_identity",
    "m20260910_000001_snapshot_groups",
    "m20260922_000001_migrate_secret_config",
    "m20261001_000001_guest_clock_config",
    "m20261022_000001_sandbox_caller_config_overrides",
})

_warned: set[tuple[Path, str]] = set()


@dataclass(frozen=True, slots=True)
class ImageRows:
    """The values msb stores for one image (FORMATS.md §6), derived from its metadata."""

    manifest_digest: str
    config_digest: str
    architecture: str | None
    os: str | None
    layer_count: int
    total_size_bytes: int
    env: str | None
    cmd: str | None
    entrypoint: str | None
    working_dir: str | None
    user: str | None
    labels: str | None
    layers: tuple[tuple[str, str, str | None, int | None], ...]  # diff, blob, type, size

    @classmethod
    def of(cls, meta: CachedImageMetadata) -> ImageRows:
        """msb's mapping: empty env/labels are NULL, ``media_type``/``variant`` stay NULL,
        ``stop_signal`` is NULL even when the image sets one, sizes are compressed sizes.
        Labels keep the image's order; msb's own order is its HashMap's, random per run."""
        try:
            config = ImageConfigFile.model_validate_json(meta.raw_config_json)
        except ValueError:  # msb accepted the file; its platform columns stay NULL
            config = ImageConfigFile()
        c = meta.config
        return cls(
            manifest_digest=meta.manifest_digest,
            config_digest=meta.config_digest,
            architecture=config.architecture or None,
            os=config.os or None,
            layer_count=len(meta.layers),
            total_size_bytes=sum(layer.size_bytes or 0 for layer in meta.layers),
            env=_json(c.env) if c.env else None,
            cmd=_json(c.cmd) if c.cmd is not None else None,
            entrypoint=_json(c.entrypoint) if c.entrypoint is not None else None,
            working_dir=c.working_dir,
            user=c.user,
            labels=_json(c.labels) if c.labels else None,
            layers=tuple((layer.diff_id, layer.digest, layer.media_type, layer.size_bytes)
                         for layer in meta.layers),
        )


def _json(value: Any) -> str:
    """serde_json's compact form, as msb stores JSON columns."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def msb_timestamp(ns: int | None = None) -> str:
    """chrono's ``NaiveDateTime`` display in UTC: fraction of 0, 3, 6 or 9 digits."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs))
    if frac == 0:
        return text
    if frac % 1_000_000 == 0:
        return f"{text}.{frac // 1_000_000:03d}"
    if frac % 1_000 == 0:
        return f"{text}.{frac // 1_000:06d}"
    return f"{text}.{frac:09d}"


def _warn_once(path: Path, kind: str, text: str) -> None:
    if (path, kind) not in _warned:
        _warned.add((path, kind))
        log.warning("%s", text)


def schema_problem(conn: sqlite3.Connection, path: Path) -> str | None:
    """Why this database is not msb 0.7.11's (None when it is)."""
    try:
        versions = {row[0] for row in conn.execute("SELECT version FROM seaql_migrations")}
    except sqlite3.Error as err:
        return f"msb database {path} has no readable migration records ({err})"
    if versions == MSB_0711_MIGRATIONS:
        return None
    newer = sorted(versions - MSB_0711_MIGRATIONS)
    return (f"msb database {path} is not msb 0.7.11's ({len(versions)} migrations"
            f"{', unknown: ' + newer[-1] if newer else ''}); not touching it")


@contextlib.contextmanager
def _transaction(path: Path, timeout: float) -> Iterator[sqlite3.Connection]:
    """One immediate transaction on a database of msb 0.7.11's schema, or raise."""
    if not path.is_file():
        raise MsbDatabaseError(f"no msb database at {path}")
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as err:
        raise MsbDatabaseError(f"msb database {path} cannot be opened: {err}") from None
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            problem = schema_problem(conn, path)
            if problem is not None:
                raise MsbSchemaUnknown(problem)
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as err:
        raise MsbDatabaseError(f"msb database {path}: {err}") from None
    finally:
        conn.close()


def _upsert_image(conn: sqlite3.Connection, reference: str, rows: ImageRows) -> None:
    """msb's statements for one recorded image, in msb's order: manifest (kept if
    present), config and layer list (replaced), layers (``last_used_at`` touched), and
    the reference (re-pointed, ``updated_at`` touched)."""
    conn.execute(
        "INSERT INTO manifest (digest, media_type, config_digest, architecture, os, variant,"
        " layer_count, total_size_bytes, created_at) VALUES (?, NULL, ?, ?, ?, NULL, ?, ?, ?)"
        " ON CONFLICT (digest) DO NOTHING",
        (rows.manifest_digest, rows.config_digest, rows.architecture, rows.os,
         rows.layer_count, rows.total_size_bytes, msb_timestamp()))
    (manifest_id,) = conn.execute("SELECT id FROM manifest WHERE digest = ?",
                                  (rows.manifest_digest,)).fetchone()
    conn.execute("DELETE FROM config WHERE manifest_id = ?", (manifest_id,))
    conn.execute(
        "INSERT INTO config (manifest_id, digest, env, cmd, entrypoint, working_dir, user,"
        " labels, stop_signal, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        (manifest_id, rows.config_digest, rows.env, rows.cmd, rows.entrypoint,
         rows.working_dir, rows.user, rows.labels, msb_timestamp()))
    layer_ids = []
    for diff_id, blob, media_type, size in rows.layers:
        now = msb_timestamp()
        conn.execute(
            "INSERT INTO layer (diff_id, blob_digest, media_type, compressed_size_bytes,"
            " erofs_size_bytes, created_at, last_used_at) VALUES (?, ?, ?, ?, NULL, ?, ?)"
            " ON CONFLICT (diff_id) DO UPDATE SET last_used_at = excluded.last_used_at",
            (diff_id, blob, media_type, size, now, now))
        layer_ids.append(conn.execute("SELECT id FROM layer WHERE diff_id = ?",
                                      (diff_id,)).fetchone()[0])
    conn.execute("DELETE FROM manifest_layer WHERE manifest_id = ?", (manifest_id,))
    conn.executemany(
        "INSERT INTO manifest_layer (manifest_id, layer_id, position) VALUES (?, ?, ?)",
        [(manifest_id, layer_id, i) for i, layer_id in enumerate(layer_ids)])
    now = msb_timestamp()
    conn.execute(
        "INSERT INTO image_ref (reference, manifest_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (reference) DO UPDATE SET"
        " manifest_id = excluded.manifest_id, updated_at = excluded.updated_at",
        (reference, manifest_id, now, now))


def record_image(db: Path, reference: str, meta: CachedImageMetadata, *,
                 timeout: float = MSB_BUSY_TIMEOUT_S) -> bool:
    """Record ``reference`` (spelled as the user typed it, as msb keeps it) → ``meta``.

    True when written; False (with one warning) when the database is absent, of another
    schema, busy or broken. Never raises for the database's sake: the cache is complete.
    """
    if not db.is_file():
        return False
    rows = ImageRows.of(meta)
    try:
        with _transaction(db, timeout) as conn:
            _upsert_image(conn, reference, rows)
    except MsbSchemaUnknown as err:
        _warn_once(db, "schema", str(err))
        return False
    except MsbDatabaseError as err:
        _warn_once(db, "record", f"{err}; `msb image ls` lists {reference} once "
                                 f"`msb pull {reference}` finds it in the cache")
        return False
    return True


def forget_images(db: Path, keys: Iterable[str], *,
                  timeout: float = MSB_BUSY_TIMEOUT_S) -> list[str]:
    """Delete what ``msb image rm`` deletes for every reference whose cache key is in
    ``keys``: its ``image_ref`` rows; a manifest no reference points to any more (its
    config and layer list cascade); layers no manifest lists. Returns the references.

    Raises ``MsbDatabaseError`` when it cannot (schema, busy, a sandbox still uses the
    image), having changed nothing, so the caller removes no file msb would then miss.
    """
    wanted = set(keys)
    with _transaction(db, timeout) as conn:
        rows = conn.execute("SELECT id, reference, manifest_id FROM image_ref").fetchall()
        doomed = [(rid, ref, mid) for rid, ref, mid in rows if _key(ref) in wanted]
        for rid, _, _ in doomed:
            conn.execute("DELETE FROM image_ref WHERE id = ?", (rid,))
        layers: set[int] = set()
        for mid in {mid for _, _, mid in doomed}:
            if conn.execute("SELECT 1 FROM image_ref WHERE manifest_id = ?", (mid,)).fetchone():
                continue
            layers.update(row[0] for row in conn.execute(
                "SELECT layer_id FROM manifest_layer WHERE manifest_id = ?", (mid,)))
            try:
                conn.execute("DELETE FROM manifest WHERE id = ?", (mid,))
            except sqlite3.IntegrityError:
                raise MsbDatabaseError(
                    f"msb database {db}: a sandbox still uses {_ref_of(doomed, mid)}",
                    hint="remove the sandbox with msb first") from None
        conn.executemany(
            "DELETE FROM layer WHERE id = ? AND id NOT IN (SELECT layer_id FROM manifest_layer)",
            [(layer_id,) for layer_id in sorted(layers)])
        return [ref for _, ref, _ in doomed]


def writable_schema(db: Path, timeout: float = MSB_BUSY_TIMEOUT_S) -> bool:
    """Is there a database of msb 0.7.11's schema that cachefs may write? (read-only check)"""
    if not db.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True,
                               timeout=timeout)
    except sqlite3.Error:
        return False
    try:
        problem = schema_problem(conn, db)
    finally:
        conn.close()
    if problem is not None:
        _warn_once(db, "schema", problem)
    return problem is None


def _ref_of(doomed: list[tuple[int, str, int]], manifest_id: int) -> str:
    return next(ref for _, ref, mid in doomed if mid == manifest_id)


def _key(typed: str) -> str | None:
    try:
        return Reference.parse(typed).cache_key
    except CachefsError:
        return None


__all__ = ["MSB_0711_MIGRATIONS", "MSB_BUSY_TIMEOUT_S", "ImageRows",
           "forget_images", "msb_timestamp", "record_image", "writable_schema"]
