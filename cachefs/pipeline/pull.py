"""The materialisation pipeline: an image from a registry or an archive into the cache.

Order (FORMATS.md §1.4, msb's contract for the layered target): resolve → for each layer,
in parallel (largest first): reuse a valid layer EROFS, else download the blob to
``tmp/<blob>.part`` under its download lock (resuming), verify it, ingest + verify the
diff_id, publish the layer (and remove its downloaded blob) → stitch fsmeta, then VMDK
→ publish the metadata json.
Everything is published by rename after it is complete, so a failure at any point leaves
the cache valid: at worst with extra, reusable layers.

Concurrency with other pullers (cachefs or msb): the per-reference image lock serialises
pulls of one reference; download locks make a blob download once; layer and fsmeta locks
(inside :mod:`cachefs.pipeline.materialize`) make an artifact be written once; shared leases keep
``rm``/``gc`` away from what we are writing.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..cache import GlobalCache
from ..cache.blobs import drop_leftovers, reusable_blob
from ..cache.locks import Leases, flock_exclusive, flock_exclusive_async, publication_gate_path
from ..cache.publish import remove_quietly
from ..digest import Digest
from ..errors import CachefsError, NotCachedError, UsageError
from ..heap import frozen_heap, imports_uncollected
from ..models import (
    CachedImageMetadata,
    Descriptor,
    ImageConfig,
    ImageConfigFile,
    LayerMetadata,
)
from ..openfiles import ensure_open_files, files_needed
from ..reference import Reference
from .parallelism import BUILDS_AT_ONCE
from .preload import Preload
from .progress import (
    Event,
    Finished,
    LayerPhase,
    LayerProgress,
    ProgressCallback,
    Resolved,
    Stitching,
    ignore,
    reporting,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..ingest.layer import Compression
    from ..oci.auth import Credentials
    from ..oci.registries_conf import RegistriesConf
    from ..oci.registry import RegistryClient
    from ..oci.source import SourceImage
    from .admission import RankedAdmission
    from .early import EarlyDownloads, Report
    from .growing import GrowingBlob
    from .handover import Pace
    from .image_write import LayerTree
    from .materialize import BlobOpener
    from .workers import LayerWorkers

# What a pull needs only once its image is resolved (~15 ms of imports: the EROFS writer,
# ingest, the build pipeline): imported in a thread while the resolve waits for the
# registry (issue 15). Every function below that uses one imports it itself.
AFTER_RESOLVE = Preload((
    "cachefs.pipeline.materialize",  # the EROFS writer and fsmeta, ingest, vmdk, checks
    "cachefs.pipeline.workers",  # pickle, the worker processes' protocol
    "cachefs.pipeline.admission",
    "cachefs.pipeline.growing",
    "cachefs.ingest.layer",
    "cachefs.erofs.reader",
    "cachefs.share.check",
    "cachefs.share.transfer",
    "cachefs.share.provenance",
))

# Layers being downloaded or ingested at once, whatever the image's layer count: each holds
# a few files and a connection (README "Limits"; CACHEFS_LAYERS_IN_FLIGHT). As many as are
# built at once (at least 2): a layer in flight beyond those only downloads ahead, and on a
# link that is the bottleneck it takes bandwidth from the layers being built, so the
# largest layers (admitted first) finish last and their plan and image write end the pull.
# With 2 in flight the smallest is fetched last: over a 40 MB/s, 20 ms link a 3-layer pull
# took 1.79 s instead of 1.85 (issue 15). A registry that limits each connection is faster
# with more: CACHEFS_LAYERS_IN_FLIGHT.
DOWNLOAD_PARALLELISM = max(2, BUILDS_AT_ONCE)
# Ingest is CPU-bound Python; more threads than cores only adds GIL contention.
MATERIALIZE_PARALLELISM = BUILDS_AT_ONCE


class PullPolicy(enum.StrEnum):
    IF_MISSING = "if-missing"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, eq=False)  # compared nowhere: no generated __eq__/__hash__
class ImagePlan:
    """Everything the pipeline needs to know about one image, whatever its source."""

    reference: Reference
    typed: str
    manifest_digest: Digest
    raw_manifest_json: str
    raw_config_json: str
    config: ImageConfigFile
    layers: tuple[LayerMetadata, ...]

    @classmethod
    def from_source(cls, reference: Reference, typed: str, image: SourceImage) -> ImagePlan:
        """The plan of an image from any source; unknown (0/"") sizes and media types
        become null, as msb stores them."""
        return cls(
            reference, typed, image.manifest_digest, image.raw_manifest_json,
            image.config_bytes.decode(), image.config,
            tuple(
                LayerMetadata(digest=layer.digest, media_type=layer.media_type or None,
                              size_bytes=layer.size or None, diff_id=layer.diff_id)
                for layer in image.layers
            ),
        )

    def metadata(self) -> CachedImageMetadata:
        return CachedImageMetadata(
            manifest_digest=str(self.manifest_digest),
            config_digest=str(Digest.sha256_of(self.raw_config_json.encode())),
            raw_manifest_json=self.raw_manifest_json,
            raw_config_json=self.raw_config_json,
            config=ImageConfig.from_container_config(self.config.config),
            layers=list(self.layers),
        )


@dataclass(frozen=True, eq=False)
class PullResult:
    reference: Reference
    manifest_digest: Digest
    cached: bool
    metadata: CachedImageMetadata
    fsmeta: Path
    vmdk: Path


@dataclass(eq=False, repr=False)
class LayerBlob:
    """A layer's blob, ready to ingest: a file, or an opener streaming it from an archive.

    With ``feed``, the blob is still arriving: ``feed()`` downloads it (holding its
    download lock) and must run while ``source`` is read, which follows the download.
    """

    source: Path | BlobOpener
    compression: Compression | None  # None: sniff the magic bytes (msb's ``load``)
    transient: bool  # a downloaded file to remove once the image is published
    feed: Callable[[], Awaitable[None]] | None = None
    file: Path | None = None  # the downloaded file, when ``source`` is not it
    # called when ingest failed: the cancelled download then drops its partial file
    discard: Callable[[], None] | None = None
    pace: Pace | None = None  # the download's measurements (:mod:`.handover`)


class _Emitter:
    """Progress callbacks must never break a pull; the first failure is logged (with its
    traceback under ``-v``), the rest would only repeat it."""

    def __init__(self, callback: ProgressCallback) -> None:
        self._callback = callback
        self._failed = False

    def __call__(self, event: Event) -> None:
        try:
            self._callback(event)
        except Exception:
            if not self._failed:
                self._failed = True
                log.info("progress display failed (the pull goes on without it)",
                         exc_info=True)


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a user should see when parallel layer work fails: the first real one.

    Cancellations of sibling tasks are consequences, not causes, so they rank last.
    """
    leaves = _leaves(group)
    chosen = next((exc for kind in (CachefsError, Exception) for exc in leaves
                   if isinstance(exc, kind)), leaves[0])
    for exc in leaves:  # the others are not lost: -v shows them
        if exc is not chosen and not isinstance(exc, trio.Cancelled):
            log.info("also failed in parallel: %s", _one_line(exc),
                     exc_info=(type(exc), exc, exc.__traceback__))
    return chosen


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The errors of a group and of the groups inside it, in order."""
    return [leaf for exc in group.exceptions
            for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


def _one_line(err: BaseException) -> str:
    return err.one_line() if isinstance(err, CachefsError) else f"{type(err).__name__}: {err}"


def _entries(cache: GlobalCache, plan: ImagePlan) -> list[Path]:
    """Every cache entry the image consists of (for leases)."""
    return [
        *(cache.layer_erofs_path(layer.diff_digest) for layer in plan.layers),
        cache.fsmeta_erofs_path(plan.manifest_digest),
        cache.vmdk_path(plan.manifest_digest),
        cache.image_metadata_path(plan.reference),
    ]


def cached_metadata(cache: GlobalCache, reference: Reference) -> CachedImageMetadata | None:
    """The metadata of a reference whose layers are all valid (fsmeta/VMDK may be rebuilt)."""
    meta = cache.read_image_metadata(reference)
    if meta is None or not cache.all_layers_materialized(meta.diff_ids):
        return None
    return meta


def _publish(cache: GlobalCache, plan: ImagePlan, source: str,
             msb_db: bool = True, *, recorded: bool | None = None) -> CachedImageMetadata:
    """cachefs's record, then the metadata json last: msb's file is the commit point.

    A failure before the json (ENOSPC, say) then fails an image that is not published,
    never a published image; a record this call created is taken back. msb's database
    hears of the image only once it is published. ``recorded``: :func:`_record` already
    ran (its answer), so this call only writes the json (and takes a created record back
    if that fails).
    """
    meta = plan.metadata()
    created = _record(cache, plan, source) if recorded is None else recorded
    gate = publication_gate_path(cache.manifests_dir(), plan.reference.cache_key)
    try:
        with flock_exclusive(gate):
            cache.write_image_metadata(plan.reference, meta)
    except BaseException:
        if created:
            cache.forget_reference(plan.reference)
        raise
    _record_in_msb_db(cache, plan.typed, meta, msb_db)
    return meta


def _record(cache: GlobalCache, plan: ImagePlan, source: str) -> bool:
    """cachefs's record of the reference (durable: two fsyncs); True if this call created
    it, so a failure before the json takes it back."""
    had_record = cache.ref_record_path(plan.reference).exists()
    cache.record_reference(plan.reference, plan.typed, plan.manifest_digest, source)
    return not had_record


def _record_in_msb_db(cache: GlobalCache, typed: str, meta: CachedImageMetadata,
                      enabled: bool) -> None:
    """So ``msb image ls`` lists it (blocking: it may wait out msb's write lock)."""
    if not enabled:
        return
    from ..cache.location import default_msb_db

    db = default_msb_db(cache)
    if db.is_file():  # without msb's database, sqlite3 and the writer are never loaded
        from ..cache.msb_db import record_image

        record_image(db, typed, meta)


async def _stitch(cache: GlobalCache, manifest: Digest, diff_ids: Sequence[Digest],
                  trees: dict[Digest, LayerTree] | None = None, *,
                  force: bool = False) -> tuple[Path, Path]:
    from .materialize import stitch_image

    fsmeta, vmdk = await trio.to_thread.run_sync(
        functools.partial(stitch_image, cache, manifest, list(diff_ids), trees=trees,
                          force=force)
    )
    return Path(fsmeta), Path(vmdk)


async def complete_from_cache(
    cache: GlobalCache, reference: Reference, typed: str, emit: ProgressCallback, source: str,
    msb_db: bool = True,
) -> PullResult | None:
    """A cache hit: every layer valid; fsmeta/VMDK rebuilt from layers if they are not."""
    meta = await trio.to_thread.run_sync(cached_metadata, cache, reference)
    if meta is None:
        return None
    emit(Resolved(str(reference), meta.manifest_digest,
                  tuple((layer.diff_id, layer.size_bytes) for layer in meta.layers), cached=True,
                  blobs=tuple(layer.digest for layer in meta.layers)))
    fsmeta, vmdk = await _stitch(cache, meta.manifest, meta.diff_ids)
    cache.record_reference(reference, typed, meta.manifest, source)
    await trio.to_thread.run_sync(drop_leftovers, cache, _blobs(meta.layers))
    await trio.to_thread.run_sync(_record_in_msb_db, cache, typed, meta, msb_db)
    emit(Finished(str(reference), meta.manifest_digest, cached=True))
    return PullResult(reference, meta.manifest, True, meta, fsmeta, vmdk)


def _blobs(layers: Sequence[LayerMetadata]) -> list[tuple[Digest, Digest]]:
    """(blob digest, diff_id) of each layer whose digests parse (msb's json may differ)."""
    out = []
    for layer in layers:
        with contextlib.suppress(CachefsError):
            out.append((Digest.parse(layer.digest), layer.diff_digest))
    return out


LayerProvider = Callable[[int, LayerMetadata, ProgressCallback], Awaitable["LayerBlob | None"]]


async def materialize_plan(
    cache: GlobalCache,
    plan: ImagePlan,
    provide: LayerProvider,
    *,
    emit: ProgressCallback,
    force: bool,
    source: str,
    msb_db: bool = True,
) -> PullResult:
    """Run the per-layer stages in parallel, then stitch and publish.

    ``provide(i, layer, emit)`` is an async function returning a :class:`LayerBlob` for a
    layer that has to be (re)built, or None if it turned valid while waiting for a lock.
    """
    emit(Resolved(str(plan.reference), str(plan.manifest_digest),
                  tuple((layer.diff_id, layer.size_bytes) for layer in plan.layers),
                  blobs=tuple(layer.digest for layer in plan.layers)))
    await _after_resolve_imported()
    entries = _entries(cache, plan)
    limit = layers_in_flight()
    ensure_open_files(files_needed(len(entries), limit),
                      f"{plan.reference} ({len(plan.layers)} layers)")
    # blocking: a deleter holding a lease exclusively is waited out, in a worker thread
    leases = await trio.to_thread.run_sync(Leases.acquire_all, entries)
    builds = _LayerBuilds(cache, provide, emit, force, limit)
    try:
        await builds.run(plan.layers)
        emit(Stitching(str(plan.manifest_digest)))
        fsmeta, vmdk, recorded = await _stitch_recording(
            cache, plan, source, builds.trees, force=force)
        builds.trees.clear()
        meta = await _publish_dropping_blobs(cache, plan, source, msb_db, builds.transient,
                                             recorded)
    except BaseException:
        await _settle_images(builds.trees.values())
        raise
    finally:
        leases.release()
    emit(Finished(str(plan.reference), str(plan.manifest_digest), cached=False))
    return PullResult(plan.reference, plan.manifest_digest, False, meta, fsmeta, vmdk)


async def _after_resolve_imported() -> None:
    """The :data:`AFTER_RESOLVE` modules' thread, if still importing, waited out off the
    trio thread: the build path then finds them loaded instead of racing the thread."""
    if AFTER_RESOLVE.running:
        await trio.to_thread.run_sync(AFTER_RESOLVE.wait)


async def _stitch_recording(cache: GlobalCache, plan: ImagePlan, source: str,
                            trees: dict[Digest, LayerTree], *, force: bool
                            ) -> tuple[Path, Path, bool]:
    """The stitch, with cachefs's record of the reference written beside it: the record's
    fsyncs (the first of a pull, which wait for a journal commit: 2-19 ms measured) then
    overlap the fsmeta instead of following it. The record is taken back if the stitch
    fails and it was this pull's; the json, the commit point, still comes after both.
    When both fail, the stitch's error is the one reported: a layer image that filled the
    disk also makes the record's write fail, and the image is the cause.
    Returns the fsmeta, the VMDK and whether the record was created here."""
    recorded: list[bool] = []
    stitch_failed: list[BaseException] = []

    async def record() -> None:
        recorded.append(await trio.to_thread.run_sync(_record, cache, plan, source))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            try:
                fsmeta, vmdk = await _stitch(cache, plan.manifest_digest,
                                             [layer.diff_digest for layer in plan.layers],
                                             trees, force=force)
            except Exception as err:
                stitch_failed.append(err)
                raise
    except BaseExceptionGroup as group:
        if recorded and recorded[0]:
            cache.forget_reference(plan.reference)
        if not stitch_failed:
            raise first_error(group) from None
        for other in _leaves(group):
            if other is not stitch_failed[0] and not isinstance(other, trio.Cancelled):
                log.info("also failed in parallel: %s", _one_line(other),
                         exc_info=(type(other), other, other.__traceback__))
        raise stitch_failed[0] from None
    return fsmeta, vmdk, recorded[0]


async def _settle_images(trees: Iterable[LayerTree]) -> None:
    """After a failure: wait for the layer images still being written (they clean up after
    themselves, and a published layer's blob is removed), so nothing of this pull runs
    on; their errors only go to the log."""
    from .image_write import settle

    images = [t.image for t in trees]

    def settle_all() -> list[BaseException]:
        errors = settle(images)
        for image in images:
            image.join()
        return errors

    with trio.CancelScope(shield=True):
        errors = await trio.to_thread.run_sync(settle_all)
    for err in errors:
        log.info("also failed in parallel: %s", _one_line(err),
                 exc_info=(type(err), err, err.__traceback__))


async def _publish_dropping_blobs(cache: GlobalCache, plan: ImagePlan, source: str,
                                  msb_db: bool, transient: list[Path],
                                  recorded: bool | None = None) -> CachedImageMetadata:
    """:func:`_publish`, while the downloaded blobs go: every layer image is published (the
    stitch waited for them), so they are no longer needed (msb removes them then too)."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _drop_blobs, cache, plan, transient)
            return await trio.to_thread.run_sync(
                functools.partial(_publish, cache, plan, source, msb_db, recorded=recorded))
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def _drop_blobs(cache: GlobalCache, plan: ImagePlan, transient: list[Path]) -> None:
    """The downloaded blobs of a pull whose layers are all published, and leftovers.
    (Unlinking a 60 MB file takes ~15 ms: never on the trio thread.)"""
    for path in transient:
        remove_quietly(path)
    drop_leftovers(cache, _blobs(plan.layers))


def _drop_published_blob(cache: GlobalCache, layer: LayerMetadata) -> None:
    """A published layer's downloaded blob, removed as :func:`drop_leftovers` does (never
    from under another pull holding its download lock). It runs in the layer image's
    thread, which must not raise: a blob that cannot go now is left to the end of the
    pull (:func:`_drop_blobs`)."""
    try:
        drop_leftovers(cache, _blobs([layer]))
    except OSError as err:
        log.debug("blob of %s left for the end of the pull: %s", layer.digest, err)


class _LayerBuilds:
    """The per-layer stages of one image, in parallel: each layer is reused when valid, else
    its blob is provided and ingested into its layer EROFS."""

    def __init__(self, cache: GlobalCache, provide: LayerProvider, emit: ProgressCallback,
                 force: bool, in_flight: int) -> None:
        self._cache = cache
        self._provide = provide
        self._emit = emit
        self._force = force
        self._in_flight_cap = in_flight
        self._parallel = min(MATERIALIZE_PARALLELISM, in_flight)  # layers built at once
        self.transient: list[Path] = []  # downloaded files to remove once published
        self.trees: dict[Digest, LayerTree] = {}  # built here: the fsmeta needs no re-read
        self._workers: LayerWorkers | None = None  # worker processes (issue 15), or threads
        # downloads that layers being ingested follow: when their readers wait for the
        # network, a layer whose blob is complete may take the spare build slot
        self._following: set[GrowingBlob] = set()
        # the downloads of the layers in flight, by rank: when one is about to end, the
        # next layer may take the spare slot in flight (:mod:`cachefs.pipeline.handover`)
        self._paced: dict[int, tuple[Pace, GrowingBlob | None]] = {}
        self._nudge: Callable[[], None] | None = None

    async def run(self, layers: Sequence[LayerMetadata]) -> None:
        """Every distinct layer at once (bounded by ``in_flight``), started and built
        largest first (:mod:`cachefs.pipeline.admission`); the first real error."""
        distinct: list[tuple[int, LayerMetadata]] = []
        seen: set[str] = set()
        for i, layer in enumerate(layers):
            if layer.diff_id not in seen:  # a repeated layer is built once
                seen.add(layer.diff_id)
                distinct.append((i, layer))
        from .admission import RankedAdmission, largest_first
        from .workers import LayerWorkers, workers_for

        if workers := workers_for(len(distinct), self._parallel):
            self._workers = LayerWorkers(workers)
        ranks = largest_first([layer.size_bytes for _, layer in distinct])
        # both in the same order, so a layer waiting for its build turn never waits for
        # one that is not in flight
        in_flight = RankedAdmission(self._in_flight_cap, len(distinct))
        self._nudge = in_flight.nudge
        builds = RankedAdmission(MATERIALIZE_PARALLELISM, len(distinct))
        try:
            async with trio.open_nursery() as nursery:
                for (i, layer), rank in zip(distinct, ranks, strict=True):
                    nursery.start_soon(self._one, i, layer, rank, in_flight, builds)
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        finally:
            if self._workers is not None:
                await self._workers.aclose()

    async def _one(self, i: int, layer: LayerMetadata, rank: int,
                   in_flight: RankedAdmission, builds: RankedAdmission) -> None:
        try:
            # looked at when a download near its end reports (Pace.near_end), never polled
            await in_flight.acquire(rank, spare=self._handover, polled=False)
        except BaseException:
            builds.withdraw(rank)
            raise
        try:
            await self._build_one(i, layer, rank, builds, time.monotonic())
        finally:
            paced = self._paced.pop(rank, None)
            if paced is not None:
                paced[0].near_end = None
            in_flight.release()
            builds.withdraw(rank)  # cached or failed before its turn: the next one goes

    def _handover(self) -> bool:
        """A layer in flight is about to end its download, its ingest keeping up: the
        next one may take the spare slot (:mod:`cachefs.pipeline.handover`)."""
        from .handover import ingest_keeps_up

        return any(ingest_keeps_up(pace, growing) for pace, growing in self._paced.values())

    async def _build_one(self, i: int, layer: LayerMetadata, rank: int,
                         builds: RankedAdmission, admitted: float) -> None:
        from .growing import GrowingBlob
        from .materialize import start_layer

        emit = self._emit
        diff = layer.diff_digest
        if not self._force and await trio.to_thread.run_sync(
            self._cache.is_layer_materialized, diff
        ):
            emit(LayerProgress(i, layer.diff_id, "cached"))
            return
        blob = await self._provide(i, layer, emit)
        if blob is None:  # another process materialised it while we waited
            emit(LayerProgress(i, layer.diff_id, "cached"))
            return
        downloaded = False
        if blob.transient:
            path = blob.file or blob.source
            if isinstance(path, Path):
                self.transient.append(path)
                downloaded = True
        start = functools.partial(
            start_layer, self._cache, blob.source, compression=blob.compression,
            diff_id=diff, layer_label=layer.digest, force=self._force,
            # nothing needs the blob once its layer is published: gone at once, off the
            # trio thread, so only the last layer's is left for the end of the pull. Under
            # its download lock, as leftovers are: another pull holding it may have found
            # the layer not yet built and be about to reuse the blob.
            published=functools.partial(_drop_published_blob, self._cache, layer)
            if downloaded else None,
            build=None if self._workers is None else self._workers.builder,
        )
        growing = blob.source if isinstance(blob.source, GrowingBlob) else None
        if blob.pace is not None:
            blob.pace.wanted(admitted)
            blob.pace.near_end = self._nudge
            self._paced[rank] = (blob.pace, growing)

        def may_take_spare() -> bool:
            """This blob is all there, and a layer being built waits for the network."""
            return ((growing is None or growing.ended)
                    and any(g.starved and not g.ended for g in self._following))

        async def build() -> Any:
            spare = await builds.acquire(rank, spare=may_take_spare)
            if growing is not None:
                self._following.add(growing)
            try:
                emit(LayerProgress(i, layer.diff_id, "materialize"))
                return await trio.to_thread.run_sync(functools.partial(start, spare_slot=spare))
            finally:
                if growing is not None:
                    self._following.discard(growing)
                builds.release()

        if blob.feed is None:
            built = await build()
        else:  # ingest follows the download
            built = await _ingest_while_downloading(build, blob.feed, blob.discard)
        if built.tree is not None:  # its image may still be being written
            self.trees[diff] = built.tree
        emit(LayerProgress(i, layer.diff_id, "done"))


# registry --------------------------------------------------------------------------------


async def pull(
    cache: GlobalCache,
    reference: str | Reference,
    *,
    policy: PullPolicy = PullPolicy.IF_MISSING,
    force: bool = False,
    insecure: bool = False,
    platform: str | None = None,
    ca_certs: Path | None = None,
    credentials: Credentials | None = None,
    progress: ProgressCallback = ignore,
    client: RegistryClient | None = None,
    registries: RegistriesConf | None = None,
    msb_db: bool = True,
    erofs_artifacts: str | None = None,
) -> PullResult:
    """Pull ``reference`` into ``cache``; see the module docstring for the stages.

    ``registries`` (default: the machine's registries.conf files) says where the
    reference is really fetched from; the cache key stays ``reference``.

    ``erofs_artifacts`` (auto|never|only; default from the environment or config file,
    see :mod:`cachefs.share.settings`): whether converted layers may come from the
    registry's EROFS artifact instead of being converted here.
    """
    with imports_uncollected():
        from ..oci.registry import RegistryClient

    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    typed = str(reference)
    emit = _Emitter(progress)
    async with flock_exclusive_async(cache.image_lock_path(ref)):
        if policy is not PullPolicy.ALWAYS and not force:
            hit = await complete_from_cache(cache, ref, typed, emit, "pull", msb_db)
            if hit is not None:
                return hit
        if policy is PullPolicy.NEVER:
            raise NotCachedError(
                f"{ref} is not in the cache and the pull policy is 'never'",
                hint=f"run: cachefs pull {typed}",
            )
        own_client = client is None
        registry = client or RegistryClient(
            insecure=insecure, ca_certs=ca_certs, credentials=credentials,
            registries=registries if registries is not None else _registries_conf(),
        )
        from .early import EarlyDownloads  # the largest blobs' downloads, beside the config

        in_flight = layers_in_flight()
        early = EarlyDownloads(
            cache, functools.partial(_Download.of, cache, registry, ref), in_flight,
            # materialize_plan's open-file check, for the manifest's layers (and the
            # fsmeta, VMDK and metadata leases, see _entries): refused, nothing starts
            fits=lambda layers: ensure_open_files(files_needed(layers + 3, in_flight),
                                                  f"{ref} ({layers} layers)"))
        owned = contextlib.aclosing(registry) if own_client else contextlib.nullcontext()
        async with owned, early.running():  # the early downloads end before the client
            try:
                async with trio.open_nursery() as nursery:
                    artifacts = None
                    if not force:  # EROFS artifacts: layers fetched there count as cached
                        from ..share.fetch import ArtifactStage
                        from ..share.settings import artifact_policy

                        artifacts = ArtifactStage(nursery, registry, ref,
                                                  artifact_policy(erofs_artifacts))
                    # the connections of the requests beside the config (the lookup's, the
                    # early download's), opened beside the manifest request
                    warm = (artifacts.extra_connections if artifacts is not None else 0
                            ) + early.connections
                    plan, descriptors = await _resolve_plan(
                        registry, ref, typed, platform,
                        artifacts.manifest_known if artifacts is not None else None,
                        location_known=_preloading(nursery, _warming(nursery, registry, warm,
                                                                     early)),
                        layers_known=early.layers_known)
                    if artifacts is not None:
                        await artifacts.fetch(cache, plan.manifest_digest,
                                              [layer.diff_digest for layer in plan.layers], emit)
                    nursery.cancel_scope.cancel()  # a lookup nobody needed (layers cached)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
            await early.keep_needed(plan.layers, force)
            provide = _RegistryLayers(cache, registry, ref, descriptors, force, early)
            with frozen_heap():
                return await materialize_plan(cache, plan, provide, emit=emit, force=force,
                                              source="pull", msb_db=msb_db)


def _preloading(nursery: trio.Nursery, location_known: Callable[[Reference], None]
                ) -> Callable[[Reference], None]:
    """``location_known``, which also starts :data:`AFTER_RESOLVE`'s imports as the first
    request goes out: from a task, which trio runs once the resolve waits, so the thread's
    imports overlap the handshake and the manifest's round trip. (Started once the
    manifest was answered instead, they delayed the config's answer: over a 20 ms link the
    first blob request came ~12 ms later than from here.)"""
    async def start() -> None:
        AFTER_RESOLVE.start()

    def known(at: Reference) -> None:
        location_known(at)
        nursery.start_soon(start)
    return known


def _warming(nursery: trio.Nursery, registry: RegistryClient, connections: int,
             early: EarlyDownloads) -> Callable[[Reference], None]:
    """The resolve's ``location_known`` hook: the warm-up connections go out, and the early
    downloads learn when the manifest request did."""
    def known(at: Reference) -> None:
        early.request_sent()
        nursery.start_soon(registry.warm_up, at, connections)
    return known


async def _resolve_plan(
    registry: RegistryClient, ref: Reference, typed: str, platform: str | None,
    manifest_known: Callable[[Digest], None] | None = None,
    location_known: Callable[[Reference], None] | None = None,
    layers_known: Callable[[list[Descriptor]], None] | None = None,
) -> tuple[ImagePlan, dict[str, Descriptor]]:
    """The registry's manifest and config as a plan, and each layer's descriptor by digest."""
    from ..oci.platform import parse_platform

    wanted = parse_platform(platform) if platform else None
    resolved = await registry.resolve(ref, wanted, manifest_known=manifest_known,
                                      location_known=location_known,
                                      layers_known=layers_known)
    descriptors = {d.digest: d for d in resolved.layers}
    return ImagePlan.from_source(ref, typed, resolved.source_image()), descriptors


class _RegistryLayers:
    """The :data:`LayerProvider` of a registry pull: a layer's blob reused from ``layers/``,
    or downloaded under its download lock while ingest follows the file; a download started
    beside the config (:mod:`cachefs.pipeline.early`) is adopted, its lock with it."""

    def __init__(self, cache: GlobalCache, registry: RegistryClient, ref: Reference,
                 descriptors: Mapping[str, Descriptor], force: bool,
                 early: EarlyDownloads | None = None) -> None:
        self._cache = cache
        self._registry = registry
        self._ref = ref
        self._descriptors = descriptors
        self._force = force
        self._early = early

    async def __call__(
        self, i: int, layer: LayerMetadata, emit: ProgressCallback
    ) -> LayerBlob | None:
        cache = self._cache
        descriptor = self._descriptors[layer.digest]
        blob = descriptor.parsed_digest
        tar = cache.tar_path(blob)
        total = descriptor.size or None
        from ..ingest.layer import compression_from_media_type

        compression = compression_from_media_type(descriptor.media_type)
        report = functools.partial(_download_progress, emit, i, layer.diff_id, total)
        early = self._early.take(blob) if self._early is not None else None
        if early is not None:  # started beside the config, under the lock it holds
            if not self._force and cache.is_layer_materialized(layer.diff_digest):
                early.drop()
                return None
            assert early.download is not None
            early.adopt(report)
            return LayerBlob(early.download.growing, compression, True, feed=early.follow,
                             file=tar, discard=early.download.discard.set,
                             pace=early.download.pace)
        held = contextlib.AsyncExitStack()
        await held.enter_async_context(flock_exclusive_async(cache.download_lock_path(blob)))
        try:
            # a concurrent pull may have finished this layer (and removed its blob)
            if not self._force and cache.is_layer_materialized(layer.diff_digest):
                return None
            if await trio.to_thread.run_sync(reusable_blob, tar, total, blob):
                return LayerBlob(tar, compression, True)
            download = _Download.of(
                cache, self._registry, self._ref, descriptor,
                held.pop_all(),  # the download releases it when it ends
                report,
            )
            return LayerBlob(download.growing, compression, True, feed=download,
                             file=tar, discard=download.discard.set, pace=download.pace)
        finally:
            await held.aclose()


def _download_progress(emit: ProgressCallback, i: int, diff_id: str, total: int | None,
                       phase: LayerPhase, n: int, seconds: float | None = None) -> None:
    emit(LayerProgress(i, diff_id, phase, n, total, seconds))


class _Download:
    """One blob's download into its ``.part`` file, under its download lock (handed over),
    while ingest reads the file as it grows; renamed to ``tar`` once verified."""

    def __init__(self, registry: RegistryClient, ref: Reference, descriptor: Descriptor,
                 part: Path, tar: Path, lock: contextlib.AsyncExitStack,
                 report: Report) -> None:
        self._registry = registry
        self._ref = ref
        self._descriptor = descriptor
        self._part = part
        self._tar = tar
        self._lock = lock
        self._report = report
        self._since: float | None = None  # when it began (monotonic)
        self._done = 0
        from .growing import GrowingBlob
        from .handover import Pace

        self.growing = GrowingBlob(part, tar)
        self.pace = Pace(descriptor.size)
        # set when ingest failed: the cancelled download then drops its partial file
        self.discard = trio.Event()

    @classmethod
    def of(cls, cache: GlobalCache, registry: RegistryClient, ref: Reference,
           descriptor: Descriptor, lock: contextlib.AsyncExitStack,
           report: Report) -> _Download:
        """The download of ``descriptor``'s blob into the cache's usual files."""
        blob = descriptor.parsed_digest
        return cls(registry, ref, descriptor, cache.part_path(blob), cache.tar_path(blob),
                   lock, report)

    def _on_disk(self, n: int) -> None:
        """Bytes on disk: a resumed download starts at its kept prefix; a restarted one
        goes back to 0."""
        self._done = n
        self.growing.written(n)
        self._report("download", n, self._seconds())
        self.pace.written(n)

    def _seconds(self) -> float | None:
        return None if self._since is None else time.monotonic() - self._since

    async def __call__(self) -> None:
        self._since = time.monotonic()
        self.pace.wanted(self._since)
        async with self._lock:
            ok = False
            try:
                await self._registry.fetch_blob(
                    self._ref, self._descriptor, self._part, resume=True, written=self._on_disk,
                )
                self._report("verify", self._done, self._seconds())
                os.rename(self._part, self._tar)
                ok = True
            finally:
                self.growing.finish(ok)
                if not ok and self.discard.is_set():  # still under the lock
                    remove_quietly(self._part)


async def _ingest_while_downloading(
    build: Callable[[], Awaitable[Any]],
    feed: Callable[[], Awaitable[None]],
    discard: Callable[[], None] | None,
) -> Any:
    """Ingest a blob as it downloads. A failed ingest cancels the download (whose partial
    file is then discarded: its bytes are what failed); a failed download makes the
    ingest's reader fail, and the download's error is the one reported (``first_error``)."""
    built: Any = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            built = await build()
        except Exception:
            if discard is not None:
                discard()
            nursery.cancel_scope.cancel()
            raise
    return built


def layers_in_flight(environ: Mapping[str, str] | None = None) -> int:
    """DOWNLOAD_PARALLELISM, or ``CACHEFS_LAYERS_IN_FLIGHT``."""
    raw = (os.environ if environ is None else environ).get("CACHEFS_LAYERS_IN_FLIGHT", "")
    if not raw.strip():
        return DOWNLOAD_PARALLELISM
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"CACHEFS_LAYERS_IN_FLIGHT={raw!r}: expected a positive integer")
    return value


def _registries_conf() -> RegistriesConf:
    from ..oci.registries_conf import load_registries_conf

    return load_registries_conf()


# archives --------------------------------------------------------------------------------


async def load(
    cache: GlobalCache,
    archive: Path,
    *,
    tag: str | None = None,
    platform: str | None = None,
    force: bool = False,
    progress: ProgressCallback = ignore,
    msb_db: bool = True,
) -> list[PullResult]:
    """Load a docker archive or OCI layout (tar or directory) like ``msb load``.

    Every image is published under each of its tags (docker ``RepoTags`` or the OCI
    ``ref.name`` annotation); ``tag`` adds one more reference to the first image, as msb's
    ``--tag`` does. Layers stream straight from the archive into ingest: no staging copy.
    """
    from ..errors import ArchiveError
    from ..oci.archive import open_archive
    from ..oci.platform import parse_platform

    emit = _Emitter(progress)
    wanted = parse_platform(platform) if platform else None
    source = await trio.to_thread.run_sync(open_archive, Path(archive), wanted)
    if not source.images:
        raise ArchiveError(f"{archive}: contains no image")
    results: list[PullResult] = []
    for n, image in enumerate(source.images):
        names = list(image.repo_tags)
        if n == 0 and tag is not None:
            names.append(tag)
        if not names:
            bare = (f" (its OCI ref.name {image.layout_tag!r} is only a tag)"
                    if image.layout_tag else "")
            raise ArchiveError(f"{archive}: image {image.manifest_digest} has no tag{bare}",
                               hint="pass --tag REPOSITORY[:TAG]")
        refs = [(Reference.parse(name), name) for name in names]
        # An uncompressed layer's blob digest is its diff_id: ingest verifies those same
        # bytes against the diff_id, so the archive stream need not hash them a second time.
        openers: dict[str, BlobOpener] = {
            str(layer.diff_id): functools.partial(layer.open, verify=layer.digest != layer.diff_id)
            for layer in image.layers
        }

        async def provide(
            i: int, layer: LayerMetadata, emit_: ProgressCallback,
            openers: dict[str, BlobOpener] = openers,
        ) -> LayerBlob:
            def converted(read: int) -> None:  # bytes read from the archive so far
                emit_(LayerProgress(i, layer.diff_id, "materialize", read, layer.size_bytes))

            return LayerBlob(reporting(openers[layer.diff_id], converted), None,
                             transient=False)

        first_ref, first_typed = refs[0]
        async with flock_exclusive_async(cache.image_lock_path(first_ref)):
            plan = ImagePlan.from_source(first_ref, first_typed, image.source_image())
            with frozen_heap():
                result = await materialize_plan(cache, plan, provide, emit=emit, force=force,
                                                source="load", msb_db=msb_db)
        results.append(result)
        for ref, typed in refs[1:]:  # further tags: same artifacts, one more json each
            alias = ImagePlan(ref, typed, plan.manifest_digest, plan.raw_manifest_json,
                              plan.raw_config_json, plan.config, plan.layers)
            meta = await trio.to_thread.run_sync(_publish, cache, alias, "load", msb_db)
            results.append(PullResult(ref, plan.manifest_digest, False, meta,
                                      result.fsmeta, result.vmdk))
    return results
