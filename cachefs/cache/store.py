"""``GlobalCache``: the on-disk image cache shared with msb (FORMATS.md §1, §2).

Every path and validity rule matches msb 0.7.11 so both tools can use one cache. The
methods mirror microsandbox's ``GlobalCache``; trio variants run blocking I/O in a worker
thread. cachefs adds one thing msb lacks: ``refs/``-records that remember which reference
a metadata file belongs to (msb keeps that only in its database), stored under
``<cache>/cachefs/`` so msb's own files stay byte-identical.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..digest import Digest
from ..errors import CacheUnreadable, UsageError
from ..jsonmodel import JsonModel, ValidationError
from ..models import CachedImageMetadata, compact_json
from ..reference import Reference
from .location import default_cache_dir as default_cache_dir  # its old home: re-exported
from .publish import fsync_dir, naming, publish_file, remove_quietly

log = logging.getLogger(__name__)
T = TypeVar("T")

SUBDIRS = ("layers", "fsmeta", "vmdk", "manifests", "tmp")
CACHEFS_DIR = "cachefs"


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Blocking cache I/O off the trio loop; trio is imported here, not at module level,
    because most CLI commands never run an event loop and should not pay for loading it."""
    import trio

    return await trio.to_thread.run_sync(fn, *args)


def _digest(d: Digest | str) -> Digest:
    return d if isinstance(d, Digest) else Digest.parse(d)


def _reference(r: Reference | str) -> Reference:
    return r if isinstance(r, Reference) else Reference.parse(r)


@dataclass(kw_only=True)
class RefRecord(JsonModel):
    """cachefs's note of which reference a ``manifests/<key>.json`` belongs to."""

    reference: str  # normalised (FORMATS.md §2.1)
    typed: str  # as the user or the archive spelled it
    manifest_digest: str
    source: str  # "pull" | "load"
    recorded_at: float


@dataclass(frozen=True, slots=True)
class GlobalCache:
    """The cache rooted at ``root`` (the ``cache/`` directory itself)."""

    root: Path

    # construction --------------------------------------------------------------
    @classmethod
    def new(cls, root: Path | str) -> GlobalCache:
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise UsageError(f"cache path {root} exists and is not a directory")
        for sub in SUBDIRS:
            (root / sub).mkdir(parents=True, exist_ok=True)
        return cls(root)

    @classmethod
    async def new_async(cls, root: Path | str) -> GlobalCache:
        return await _in_thread(cls.new, root)

    # layers --------------------------------------------------------------------
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def layer_erofs_path(self, diff_id: Digest | str) -> Path:
        return self.layers_dir() / f"{_digest(diff_id).path_safe()}.erofs"

    def layer_erofs_lock_path(self, diff_id: Digest | str) -> Path:
        return self.layers_dir() / f"{_digest(diff_id).path_safe()}.erofs.lock"

    def is_layer_materialized(self, diff_id: Digest | str) -> bool:
        return _valid_erofs(self.layer_erofs_path(diff_id))

    def all_layers_materialized(self, diff_ids: Iterable[Digest | str]) -> bool:
        return all(self.is_layer_materialized(d) for d in diff_ids)

    def tar_path(self, blob_digest: Digest | str) -> Path:
        """Transient compressed blob, named ``.tar.gz`` whatever its compression (as msb)."""
        return self.layers_dir() / f"{_digest(blob_digest).path_safe()}.tar.gz"

    # fsmeta / vmdk -----------------------------------------------------------------
    def fsmeta_dir(self) -> Path:
        return self.root / "fsmeta"

    def fsmeta_erofs_path(self, manifest_digest: Digest | str) -> Path:
        return self.fsmeta_dir() / f"{_digest(manifest_digest).path_safe()}.erofs"

    def fsmeta_erofs_lock_path(self, manifest_digest: Digest | str) -> Path:
        return self.fsmeta_dir() / f"{_digest(manifest_digest).path_safe()}.erofs.lock"

    def is_fsmeta_materialized(self, manifest_digest: Digest | str) -> bool:
        return _valid_erofs(self.fsmeta_erofs_path(manifest_digest))

    def vmdk_dir(self) -> Path:
        return self.root / "vmdk"

    def vmdk_path(self, manifest_digest: Digest | str) -> Path:
        return self.vmdk_dir() / f"{_digest(manifest_digest).path_safe()}.vmdk"

    def vmdk_lock_path(self, manifest_digest: Digest | str) -> Path:
        return self.vmdk_dir() / f"{_digest(manifest_digest).path_safe()}.vmdk.lock"

    def is_vmdk_materialized(self, manifest_digest: Digest | str) -> bool:
        """msb's rule: a VMDK is valid if it exists (FORMATS.md §1.7)."""
        return self.vmdk_path(manifest_digest).exists()

    # tmp ---------------------------------------------------------------------------
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def part_path(self, blob_digest: Digest | str) -> Path:
        return self.tmp_dir() / f"{_digest(blob_digest).path_safe()}.part"

    def download_lock_path(self, blob_digest: Digest | str) -> Path:
        return self.tmp_dir() / f"{_digest(blob_digest).path_safe()}.download.lock"

    def spool_path(self, diff_id: Digest | str) -> Path:
        return self.tmp_dir() / f"{_digest(diff_id).path_safe()}.spool"

    def layer_part_path(self, diff_id: Digest | str) -> Path:
        return self.tmp_dir() / f"{_digest(diff_id).path_safe()}.erofs.part"

    def work_dir(self, manifest_digest: Digest | str) -> Path:
        return self.tmp_dir() / f"{_digest(manifest_digest).path_safe()}.work"

    # manifests -------------------------------------------------------------------------
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    def image_lock_path(self, reference: Reference | str) -> Path:
        return self.manifests_dir() / f"{_reference(reference).cache_key}.lock"

    def image_metadata_path(self, reference: Reference | str) -> Path:
        return self.manifests_dir() / f"{_reference(reference).cache_key}.json"

    def read_image_metadata(self, reference: Reference | str) -> CachedImageMetadata | None:
        """The metadata, or None on a miss. A file msb would reject is a miss, logged."""
        return read_metadata_file(self.image_metadata_path(reference))

    def write_image_metadata(
        self, reference: Reference | str, metadata: CachedImageMetadata
    ) -> Path:
        """Durable publish: ``<key>.json.part``, fsync, rename, fsync dir (as msb)."""
        final = self.image_metadata_path(reference)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".part")
        try:
            with naming(tmp), open(tmp, "wb") as f:
                f.write(metadata.to_json_bytes())
            publish_file(tmp, final, durable=True)
        except BaseException:
            remove_quietly(tmp)
            raise
        return final

    def delete_image_metadata(self, reference: Reference | str) -> bool:
        path = self.image_metadata_path(reference)
        removed = remove_quietly(path)
        if removed:
            fsync_dir(path.parent)
        return removed

    async def read_image_metadata_async(
        self, reference: Reference | str
    ) -> CachedImageMetadata | None:
        return await _in_thread(self.read_image_metadata, reference)

    async def write_image_metadata_async(
        self, reference: Reference | str, metadata: CachedImageMetadata
    ) -> Path:
        return await _in_thread(self.write_image_metadata, reference, metadata)

    async def delete_image_metadata_async(self, reference: Reference | str) -> bool:
        return await _in_thread(self.delete_image_metadata, reference)

    # cachefs's own records ------------------------------------------------------------------
    def refs_dir(self) -> Path:
        return self.root / CACHEFS_DIR / "refs"

    def ref_record_path(self, reference: Reference | str) -> Path:
        return self.refs_dir() / f"{_reference(reference).cache_key}.json"

    def record_reference(
        self, reference: Reference | str, typed: str, manifest_digest: Digest | str, source: str
    ) -> None:
        ref = _reference(reference)
        record = RefRecord(
            reference=str(ref),
            typed=typed,
            manifest_digest=str(_digest(manifest_digest)),
            source=source,
            recorded_at=time.time(),
        )
        path = self.ref_record_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.part")
        try:
            with naming(tmp):
                tmp.write_bytes(compact_json(record.model_dump()))
            publish_file(tmp, path, durable=True)
        except BaseException:
            remove_quietly(tmp)
            raise

    def forget_reference(self, reference: Reference | str) -> bool:
        return remove_quietly(self.ref_record_path(reference))

    def ref_records(self, *, strict: bool = False) -> list[RefRecord]:
        """cachefs's records; an unreadable one is skipped (logged), or with ``strict``
        raises ``CacheUnreadable``: a deleter must not guess what it named."""
        out = []
        try:
            names = sorted(os.listdir(self.refs_dir()))
        except FileNotFoundError:
            return []
        except OSError as err:
            if strict:
                raise CacheUnreadable(self.refs_dir(), err) from None
            log.warning("cannot list reference records %s: %s", self.refs_dir(), err)
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            path = self.refs_dir() / name
            try:
                out.append(RefRecord.model_validate_json(path.read_bytes()))
            except FileNotFoundError:
                continue  # removed meanwhile (rm)
            except (OSError, ValidationError) as err:
                if strict:
                    raise CacheUnreadable(path, err) from None
                log.warning("ignoring unreadable reference record %s: %s", name, err)
        return out


def read_metadata_file(path: Path, *, strict: bool = False) -> CachedImageMetadata | None:
    """The metadata, or None if there is none. One that cannot be read or parsed is a miss
    (logged), as msb treats it; with ``strict`` it raises ``CacheUnreadable`` instead, for
    deleters, which would otherwise count its layers as unused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        if strict:
            raise CacheUnreadable(path, err) from None
        log.warning("cannot read image metadata %s: %s", path, err)
        return None
    try:
        return CachedImageMetadata.from_json_bytes(data)
    except (ValidationError, ValueError) as err:
        if strict:
            raise CacheUnreadable(path, err) from None
        log.warning("image metadata %s is corrupt, treating as a miss: %s", path,
                    str(err).splitlines()[0])
        return None


def _valid_erofs(path: Path) -> bool:
    from ..erofs.reader import is_valid_erofs

    return is_valid_erofs(path)
