"""Publish layer images, the fsmeta and the VMDK into the cache the way msb does.

Both steps follow FORMATS.md §1.3/§1.4 so msb and cachefs can work on one cache at the
same time: take msb's flock (never deleting the lock file), re-check validity after
acquiring it (someone may have finished the work while we waited), write under ``tmp/``
on the same filesystem, ``rename()`` into place, and leave nothing behind in ``tmp/`` on
any failure. Layer images are keyed by diff_id; fsmeta and VMDK by manifest digest, and
the fsmeta is always published before the VMDK that points at it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.locks import flock_exclusive
from ..cache.publish import naming, publish_file, remove_quietly
from ..cache.store import GlobalCache
from ..derived_check import fsmeta_problems, vmdk_problems
from ..digest import Digest
from ..erofs.fsmeta import fsmeta_from_layer_images, write_fsmeta
from ..erofs.merge import merge_layers
from ..erofs.tree import BlockMap, Node
from ..errors import NotCachedError
from ..ingest.image import BlobOpener as BlobOpener  # its old home: re-exported
from ..ingest.image import LayerImageBuilder, build_layer_image
from ..ingest.layer import Compression
from ..vmdk import descriptor_for_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MaterializedLayer:
    """A layer image in the cache. ``block_map`` is None when it was already there.

    ``root`` is the tree the image was written from (regular files carry their ``block``),
    kept so :func:`stitch_image` can merge it without reading the image back.
    """

    diff_id: Digest
    path: Path
    block_map: BlockMap | None
    root: Node | None = field(default=None, compare=False, repr=False)

    @property
    def created(self) -> bool:
        return self.block_map is not None


def materialize_layer(
    cache: GlobalCache,
    blob_path: Path | BlobOpener,
    *,
    compression: Compression | None,
    diff_id: Digest,
    layer_label: str,
    force: bool = False,
    build: LayerImageBuilder = build_layer_image,
) -> MaterializedLayer:
    """Make ``layers/<diff_id>.erofs`` from a (compressed) layer blob, unless it is valid.

    ``compression=None`` sniffs the magic bytes (msb's ``load`` behaviour). The blob is
    verified against ``diff_id`` while it is read; a mismatch raises ``DigestMismatch``
    and publishes nothing. Held: ``layers/<d>.erofs.lock`` (exclusive). ``force`` rebuilds
    a valid layer too (renamed over it, so readers holding the old file keep it).

    ``build`` makes the image from the blob (a worker process's stand-in for
    :func:`~cachefs.ingest.image.build_layer_image`, see :mod:`cachefs.pipeline.workers`).
    """
    final = cache.layer_erofs_path(diff_id)
    if not force and cache.is_layer_materialized(diff_id):
        return MaterializedLayer(diff_id, final, None)
    cache.layers_dir().mkdir(parents=True, exist_ok=True)
    cache.tmp_dir().mkdir(parents=True, exist_ok=True)
    with flock_exclusive(cache.layer_erofs_lock_path(diff_id)):
        if not force and cache.is_layer_materialized(diff_id):
            return MaterializedLayer(diff_id, final, None)  # finished while we waited
        spool_path, part = cache.spool_path(diff_id), cache.layer_part_path(diff_id)
        try:
            root, block_map = build(blob_path, compression=compression, diff_id=diff_id,
                                    layer_label=layer_label, spool_path=spool_path, part=part)
            publish_file(part, final)
        finally:
            remove_quietly(spool_path)
            remove_quietly(part)
    log.debug("materialized layer %s (%d blocks)", diff_id, block_map.total_blocks)
    return MaterializedLayer(diff_id, final, block_map, root)


def stitch_image(
    cache: GlobalCache,
    manifest_digest: Digest,
    diff_ids: Sequence[Digest],
    *,
    msb_quirks: bool = False,
    trees: Mapping[Digest, tuple[Node, int]] | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Make ``fsmeta/<m>.erofs`` and ``vmdk/<m>.vmdk`` for an image whose layers are cached.

    A sound fsmeta is kept (only a missing or stale VMDK is regenerated); a missing or
    unsound one is rebuilt from the layer images alone (§4.7), and then the VMDK is
    rewritten too, since its extent sizes may have changed. Sound is more than msb's
    §1.7 rule: :mod:`cachefs.derived_check`'s cheap checks (superblock crc, device table against
    the layer files, VMDK extents), so a pull never reports success over a file the
    kernel or QEMU would refuse. VMDK extents are the
    ``realpath`` of the cache files, exactly like msb's. ``msb_quirks`` selects msb's
    merge quirks (byte-identical fsmeta); the default merge is OCI-correct. Held:
    ``fsmeta/<m>.erofs.lock`` (exclusive) around both files.

    ``trees`` maps diff_ids to the (tree, total blocks) their layer images were just
    written from (:attr:`MaterializedLayer.root`): when it covers every layer, the fsmeta
    is merged from those trees, which are exactly what the images hold, instead of
    reading every image back; otherwise it is rebuilt from the images.

    ``force`` rebuilds both even when valid (renamed over them, never absent meanwhile).
    """
    fsmeta, vmdk = cache.fsmeta_erofs_path(manifest_digest), cache.vmdk_path(manifest_digest)
    layers = [cache.layer_erofs_path(d) for d in diff_ids]

    def fsmeta_sound() -> bool:
        return not force and not fsmeta_problems(fsmeta, layers)

    def vmdk_sound() -> bool:
        return not force and not vmdk_problems(vmdk, [fsmeta, *layers])

    if fsmeta_sound() and vmdk_sound():
        return fsmeta, vmdk
    missing = [str(d) for d in diff_ids if not cache.is_layer_materialized(d)]
    if missing:
        raise NotCachedError(
            f"image {manifest_digest}: cannot stitch, layer images missing or invalid: "
            + ", ".join(missing),
            hint="pull the image again",
        )
    for sub in (cache.fsmeta_dir(), cache.vmdk_dir(), cache.tmp_dir()):
        sub.mkdir(parents=True, exist_ok=True)
    with flock_exclusive(cache.fsmeta_erofs_lock_path(manifest_digest)):
        work = cache.work_dir(manifest_digest)
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a crashed run of ours
        work.mkdir()
        try:
            rebuilt = False
            if not fsmeta_sound():
                tmp = work / "fsmeta.erofs"
                with naming(tmp), tmp.open("wb") as out:
                    if trees is not None and all(d in trees for d in diff_ids):
                        roots = [trees[d][0] for d in diff_ids]
                        merged = merge_layers(roots, leak_nested_whiteouts=msb_quirks)
                        write_fsmeta(merged, [trees[d][1] for d in diff_ids], out)
                    else:
                        fsmeta_from_layer_images(layers, out, msb_quirks=msb_quirks)
                publish_file(tmp, fsmeta)
                rebuilt = True
            if rebuilt or not vmdk_sound():
                tmp = work / "rootfs.vmdk"
                with naming(tmp):
                    tmp.write_text(descriptor_for_paths([fsmeta, *layers]))
                publish_file(tmp, vmdk)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    return fsmeta, vmdk
