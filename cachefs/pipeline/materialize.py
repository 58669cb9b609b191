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
import functools
import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.locks import flock_exclusive
from ..cache.publish import naming, publish_file, remove_quietly
from ..cache.store import GlobalCache
from ..derived_check import fsmeta_problems, vmdk_problems
from ..digest import Digest
from ..erofs.fsmeta import fsmeta_from_layer_images, fsmeta_of_layers
from ..erofs.tree import BlockMap, Node
from ..erofs.writer import block_map_of
from ..errors import NotCachedError
from ..ingest.image import BlobOpener as BlobOpener  # its old home: re-exported
from ..ingest.image import (
    LayerImageBuilder,
    PlannedImage,
    close_quietly,
    plan_layer_image,
    write_planned_image,
)
from ..ingest.layer import Compression
from ..vmdk import descriptor_for_paths
from .image_write import BackgroundWrite, LayerTree, Written, raise_first, settle
from .parallelism import BUILDS_AT_ONCE as BUILDS_AT_ONCE  # its old home: re-exported

log = logging.getLogger(__name__)


class BuildSlots:
    """``BUILDS_AT_ONCE`` slots, and one spare that the pull lends to a layer whose blob is
    complete while a layer being built waits for its download.

    A layer that follows its download over a real link waits for bytes most of the time,
    so the core it was counted for sits idle: with three layers over a 40 MB/s link, the
    smallest one's download was complete at 1.17 s but its ingest could only start at
    1.71 s, when one of the two larger layers' images was written, and it ended the pull
    (docs/pull-profile.md, "Sixth round (tail)"). On loopback the downloads outrun the
    ingest, nobody waits for the network, and the spare stays unused: a third ingest
    beside two CPU-bound ones only made the largest layer end later.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._changed = threading.Condition()

    def acquire(self, spare: bool = False) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._free + spare > 0)
            self._free -= 1

    def release(self) -> None:
        with self._changed:
            self._free += 1
            self._changed.notify_all()


BUILD_SLOTS = BuildSlots(BUILDS_AT_ONCE)


@dataclass(frozen=True, slots=True)
class MaterializedLayer:
    """A layer image in the cache. ``tree`` is None when it was already there.

    ``tree`` holds what the layer was built from (regular files carry their ``block``), kept
    so :func:`stitch_image` can merge it without reading the image back; from
    :func:`start_layer` its ``image`` may still be being written.
    """

    diff_id: Digest
    path: Path
    tree: LayerTree | None = field(default=None, compare=False, repr=False)

    @property
    def created(self) -> bool:
        return self.tree is not None

    @property
    def root(self) -> Node | None:
        return None if self.tree is None else self.tree.root

    @property
    def block_map(self) -> BlockMap | None:
        """Every regular file's (block, size), walked from the tree (for tools and tests;
        the pipeline needs only ``tree.total_blocks``)."""
        return None if self.tree is None else block_map_of(self.tree.root,
                                                           self.tree.total_blocks)


def materialize_layer(
    cache: GlobalCache,
    blob_path: Path | BlobOpener,
    *,
    compression: Compression | None,
    diff_id: Digest,
    layer_label: str,
    force: bool = False,
    build: LayerImageBuilder | None = None,
) -> MaterializedLayer:
    """Make ``layers/<diff_id>.erofs`` from a (compressed) layer blob, unless it is valid.

    ``compression=None`` sniffs the magic bytes (msb's ``load`` behaviour). The blob is
    verified against ``diff_id`` while it is read; a mismatch raises ``DigestMismatch``
    and publishes nothing. Held: ``layers/<d>.erofs.lock`` (exclusive). ``force`` rebuilds
    a valid layer too (renamed over it, so readers holding the old file keep it).
    Returns once the layer is published (:func:`start_layer` returns before).

    ``build`` makes the whole image from the blob (a worker process's stand-in for
    :func:`~cachefs.ingest.image.build_layer_image`, see :mod:`cachefs.pipeline.workers`);
    without it the image is built here, in two halves (:func:`start_layer`).
    """
    built = start_layer(cache, blob_path, compression=compression, diff_id=diff_id,
                        layer_label=layer_label, force=force, build=build)
    if built.tree is not None:
        built.tree.image.wait()
    return built


def start_layer(
    cache: GlobalCache,
    blob_path: Path | BlobOpener,
    *,
    compression: Compression | None,
    diff_id: Digest,
    layer_label: str,
    force: bool = False,
    build: LayerImageBuilder | None = None,
    published: Callable[[], None] | None = None,
    spare_slot: bool = False,
) -> MaterializedLayer:
    """:func:`materialize_layer` up to the planned layout: returns the layer's tree while
    its image is still written and published by a thread of its own (``tree.image``),
    which holds the layer lock and removes the temporary files whatever happens.

    With ``build`` (a worker process) the image is complete and published on return.

    ``published`` runs once this call's image is published, after ``tree.image.wait()``
    has returned, in the image's thread (so never on the critical path of whoever
    waits): the pull removes the layer's downloaded blob there. It does not run when
    the layer was already valid or the build failed, and must not raise.
    ``spare_slot``: the pull lent this layer the spare slot (:class:`BuildSlots`).
    """
    final = cache.layer_erofs_path(diff_id)
    if not force and cache.is_layer_materialized(diff_id):
        return MaterializedLayer(diff_id, final, None)
    cache.layers_dir().mkdir(parents=True, exist_ok=True)
    cache.tmp_dir().mkdir(parents=True, exist_ok=True)
    if build is not None:
        built = _build_elsewhere(cache, blob_path, build, compression=compression,
                                 diff_id=diff_id, layer_label=layer_label, force=force,
                                 spare_slot=spare_slot)
        if built.created and published is not None:  # the lock and slot are released
            published()
        return built
    with contextlib.ExitStack() as held:  # handed to the image's thread once planned
        paths = _hold_layer(held, cache, diff_id, force, spare_slot)
        if paths is None:
            return MaterializedLayer(diff_id, final, None)  # finished while we waited
        spool_path, part = paths
        planned = plan_layer_image(blob_path, compression=compression, diff_id=diff_id,
                                   layer_label=layer_label, spool_path=spool_path)
        handed = held.pop_all()
    try:
        image = BackgroundWrite(
            functools.partial(_write_and_publish, planned, handed, part, final),
            f"image {layer_label}", then=functools.partial(close_quietly, planned.spool),
            then_if_done=published,
        )
    except BaseException:  # no thread: nobody else will clean up
        handed.close()
        close_quietly(planned.spool)
        raise
    return MaterializedLayer(diff_id, final, LayerTree(planned.root,
                                                       planned.layout.total_blocks, image))


def _hold_layer(held: contextlib.ExitStack, cache: GlobalCache, diff_id: Digest,
                force: bool, spare: bool) -> tuple[Path, Path] | None:
    """Take a build slot (``spare``: see :class:`BuildSlots`) and the layer lock into
    ``held``, which then also removes the spool and part files: their paths, or None when
    the layer turned valid meanwhile."""
    # taken before the lock: never wait for this process's slots holding a lock
    slots = BUILD_SLOTS
    slots.acquire(spare)
    held.callback(slots.release)
    held.enter_context(flock_exclusive(cache.layer_erofs_lock_path(diff_id)))
    if not force and cache.is_layer_materialized(diff_id):
        return None
    spool_path, part = cache.spool_path(diff_id), cache.layer_part_path(diff_id)
    held.callback(remove_quietly, part)
    held.callback(remove_quietly, spool_path)  # a builder elsewhere may leave it named
    return spool_path, part


def _build_elsewhere(
    cache: GlobalCache,
    blob_path: Path | BlobOpener,
    build: LayerImageBuilder,
    *,
    compression: Compression | None,
    diff_id: Digest,
    layer_label: str,
    force: bool,
    spare_slot: bool,
) -> MaterializedLayer:
    """:func:`start_layer` with ``build`` making the whole image (a worker process): the
    image is published on return."""
    final = cache.layer_erofs_path(diff_id)
    with contextlib.ExitStack() as held:
        paths = _hold_layer(held, cache, diff_id, force, spare_slot)
        if paths is None:
            return MaterializedLayer(diff_id, final, None)  # finished while we waited
        spool_path, part = paths
        root, block_map = build(blob_path, compression=compression, diff_id=diff_id,
                                layer_label=layer_label, spool_path=spool_path, part=part)
        publish_file(part, final)
        return MaterializedLayer(diff_id, final,
                                 LayerTree(root, block_map.total_blocks, Written()))


def _write_and_publish(planned: PlannedImage, held: contextlib.ExitStack, part: Path,
                       final: Path) -> None:
    """The second half of :func:`start_layer`; ``held`` releases the lock and the build
    slot and removes the part file on the way out, on success and failure alike."""
    with held:
        write_planned_image(planned, part)
        publish_file(part, final)
    log.debug("materialized layer %s (%d blocks)", final.name, planned.layout.total_blocks)


def stitch_image(
    cache: GlobalCache,
    manifest_digest: Digest,
    diff_ids: Sequence[Digest],
    *,
    msb_quirks: bool = False,
    trees: Mapping[Digest, LayerTree] | None = None,
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

    ``trees`` maps diff_ids to the layers just built (:attr:`MaterializedLayer.tree`): when
    it covers every layer, the fsmeta is merged from those trees, which are exactly what
    the images hold, instead of reading every image back, and it is written while the
    images still are; it is checked and published only once every image is. Otherwise it
    is rebuilt from the images.

    ``force`` rebuilds both even when valid (renamed over them, never absent meanwhile).
    """
    fsmeta, vmdk = cache.fsmeta_erofs_path(manifest_digest), cache.vmdk_path(manifest_digest)
    layers = [cache.layer_erofs_path(d) for d in diff_ids]
    fresh = trees is not None and all(d in trees for d in diff_ids)

    def fsmeta_sound() -> bool:
        return not force and not fsmeta_problems(fsmeta, layers)

    def vmdk_sound() -> bool:
        return not force and not vmdk_problems(vmdk, [fsmeta, *layers])

    if not fresh:
        # layers built here, but not all of them: wait for their images, then read back
        raise_first(settle(t.image for t in (trees or {}).values()))
        if fsmeta_sound() and vmdk_sound():
            return fsmeta, vmdk
    for sub in (cache.fsmeta_dir(), cache.vmdk_dir(), cache.tmp_dir()):
        sub.mkdir(parents=True, exist_ok=True)
    with flock_exclusive(cache.fsmeta_erofs_lock_path(manifest_digest)):
        work = cache.work_dir(manifest_digest)
        shutil.rmtree(work, ignore_errors=True)  # leftovers of a crashed run of ours
        work.mkdir()
        try:
            built = work / "fsmeta.erofs"
            if fresh:
                assert trees is not None
                _fsmeta_beside_images(built, [trees[d] for d in diff_ids], msb_quirks)
            _require_layers(cache, manifest_digest, diff_ids)
            rebuilt = False
            if not fsmeta_sound():
                if not fresh:
                    with naming(built), built.open("wb") as out:
                        fsmeta_from_layer_images(layers, out, msb_quirks=msb_quirks)
                publish_file(built, fsmeta)
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


def _require_layers(cache: GlobalCache, manifest_digest: Digest, diff_ids: Sequence[Digest]
                    ) -> None:
    missing = [str(d) for d in diff_ids if not cache.is_layer_materialized(d)]
    if missing:
        raise NotCachedError(
            f"image {manifest_digest}: cannot stitch, layer images missing or invalid: "
            + ", ".join(missing),
            hint="pull the image again",
        )


def _fsmeta_beside_images(tmp: Path, trees: Sequence[LayerTree], msb_quirks: bool) -> None:
    """Write the fsmeta of ``trees`` to ``tmp`` while their images are still written, then
    wait for every image: on return all are published, else the first real error of
    either half is raised (and the caller removes ``tmp``)."""
    errors: list[BaseException] = []
    try:
        with naming(tmp), tmp.open("wb") as out:
            fsmeta_of_layers([t.root for t in trees], [t.total_blocks for t in trees], out,
                             msb_quirks=msb_quirks)
    except BaseException as err:
        errors.append(err)
    raise_first([*settle(t.image for t in trees), *errors])
