"""A pull's EROFS-artifact stage: fetch converted layers instead of converting layer tars.

Runs after the manifest is resolved and before the per-layer stages. It publishes into
``layers/`` only layer images that passed every check, so the per-layer stages find them
cached and convert only the rest, exactly as today:

1. look the artifact up (one round trip, :mod:`.lookup`; it starts once the manifest
   digest is known, beside the config fetch: :class:`ArtifactStage`); none → nothing
   changes;
2. per missing layer, in parallel: download the zstd blob to ``tmp/<blob>.part`` under its
   download lock (resumable, digest-verified by the registry client, as layer blobs are),
   decompress it under ``cachefs/tmp/`` checking the EROFS digest and size the artifact
   promised, then the structural check of :mod:`.check` (which yields the layer's tree);
3. when every layer of the image is at hand, merge the fsmeta from the trees, as a pull
   that converted the layers would, and require its digest to be the artifact's fsmeta
   digest. This is what catches a blob that is a valid EROFS of some *other* layer: the
   merged tree no longer matches what the pusher merged. A mismatch drops every fetched
   layer (the artifact cannot say which one lied);
4. publish each layer under its layer lock (renamed into place), record its provenance in
   cachefs's own records, and publish the fsmeta under its lock.

Any failure of one blob: a warning, and the artifact is not used at all (every layer is
converted from its tar as today): once one blob is dropped the others can no longer be
cross-checked, and an artifact that could bypass the cross-check by breaking one blob on
purpose would make it worthless. ``--erofs-artifacts only`` turns "not everything came
from the artifact" into an error instead; ``never`` skips the stage (no request at all).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..cache.locks import flock_exclusive, flock_exclusive_async
from ..cache.publish import publish_file, remove_quietly
from ..cache.store import CACHEFS_DIR, GlobalCache
from ..digest import Digest, sha256_file
from ..errors import CachefsError, DownloadFailed, RegistryError, UsageError
from ..models import Descriptor
from ..oci.push import RepoWriter
from ..oci.referrers import LAYER_MEDIA_TYPE, ErofsArtifact, ErofsBlob
from ..oci.registry import RegistryClient
from ..pipeline.progress import LayerProgress, ProgressCallback
from ..reference import Reference
from .lookup import PendingLookup, find_artifacts

# The EROFS reader and fsmeta writer, the checks, zstd: used only once an artifact is
# found, so imported where used and not before a pull's first request (issue 15;
# cachefs.pipeline.pull.AFTER_RESOLVE loads them while the resolve waits).
if TYPE_CHECKING:
    from ..erofs.tree import Node

log = logging.getLogger(__name__)
# Downloads at once. Few, so that on a slow link the first blobs finish early and their
# decompression and checks overlap the later downloads instead of all piling up at the
# end; decompression itself is not limited (each follows its own download).
FETCH_PARALLELISM = 2
LOOKUP_REQUESTS = 2  # the referrers API and the tag schema, asked at once (.lookup)
ENV = "CACHEFS_EROFS_ARTIFACTS"


class ArtifactPolicy(enum.StrEnum):
    AUTO = "auto"  # use an artifact when the registry has one, else convert
    NEVER = "never"  # always convert layer tars (no lookup)
    ONLY = "only"  # every missing layer must come from an artifact, or the pull fails

    @classmethod
    def parse(cls, value: str | ArtifactPolicy, where: str) -> ArtifactPolicy:
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"{where}: erofs-artifacts must be auto, never or only, "
                             f"not {value!r}") from None


@dataclass(eq=False)  # compared nowhere: no generated __eq__
class FetchOutcome:
    mechanism: str = "none"
    artifact: str | None = None
    fetched: list[str] = field(default_factory=list)  # diff_ids now cached from the artifact
    warnings: list[str] = field(default_factory=list)


@dataclass(eq=False, repr=False)
class _Candidate:
    index: int
    diff_id: Digest
    blob: ErofsBlob
    path: Path | None = None  # the decompressed, checked EROFS under cachefs/tmp/
    tree: tuple[Node, int] | None = None


def fetch_tmp_dir(cache: GlobalCache) -> Path:
    return cache.root / CACHEFS_DIR / "tmp"


def _unique() -> str:
    """Scratch names: pulls of two references (one process or several) share layers."""
    return f"{os.getpid()}.{secrets.token_hex(4)}"


async def fetch_erofs(
    cache: GlobalCache,
    client: RegistryClient,
    ref: Reference,
    manifest_digest: Digest,
    diff_ids: Sequence[Digest],
    *,
    policy: ArtifactPolicy = ArtifactPolicy.AUTO,
    emit: ProgressCallback = lambda _: None,
    warn: Callable[[str], None] | None = None,
    lookup: PendingLookup | None = None,
) -> FetchOutcome:
    """Publish every layer of the image the registry's EROFS artifact provides soundly.

    ``lookup``: the artifact lookup for ``manifest_digest``, already under way
    (:class:`ArtifactStage`); else it is made here."""
    outcome = FetchOutcome()

    def warning(text: str) -> None:
        outcome.warnings.append(text)
        (warn or log.warning)(text)

    if policy is ArtifactPolicy.NEVER:
        return outcome
    pending = lookup if lookup is not None and lookup.subject == manifest_digest else None
    if pending is not None and policy is ArtifactPolicy.AUTO:
        # a pull: this runs between the config and the first blob request, and the lookup
        # (sent beside the config) has usually answered "nothing here" by now
        with contextlib.suppress(CachefsError):  # asked again below, and warned about
            early = await pending.result()
            if not early.artifacts and not early.problems:
                outcome.mechanism = early.mechanism
                return outcome  # nothing to fetch, whichever layers are missing
    # one worker-thread trip for every layer
    needed = await trio.to_thread.run_sync(_missing_layers, cache, diff_ids)
    if not needed:
        return outcome
    try:
        if pending is not None:
            found = await pending.result()
        else:
            found = await find_artifacts(RepoWriter(client, ref, push=False), manifest_digest)
    except CachefsError as err:
        if policy is ArtifactPolicy.ONLY:
            raise
        warning(f"{ref}: looking for an EROFS artifact failed ({err.one_line()}); "
                "converting layer tars")
        return outcome
    outcome.mechanism = found.mechanism
    for problem in found.problems:
        warning(f"{ref}: {problem}")
    artifact, artifact_digest = _matching(found.artifacts, diff_ids)
    if artifact is None:
        if found.artifacts:
            warning(f"{ref}: EROFS artifact lists other layers than the image; ignoring it")
        _require_all(policy, ref, needed, outcome)
        return outcome
    outcome.artifact = str(artifact_digest)
    assert artifact_digest is not None
    job = _ArtifactJob(cache, client, ref, manifest_digest, list(diff_ids), artifact,
                       artifact_digest, emit, warning)
    outcome.fetched = await job.run(needed)
    if outcome.fetched:
        log.info("%s: %d of %d missing layers fetched as EROFS (artifact %s, %s)", ref,
                 len(outcome.fetched), len(needed), artifact_digest, found.mechanism)
    _require_all(policy, ref, needed, outcome)
    return outcome


def _missing_layers(cache: GlobalCache, diff_ids: Sequence[Digest]) -> dict[Digest, int]:
    """The layers not converted yet, each with its first index."""
    needed: dict[Digest, int] = {}
    for i, diff in enumerate(diff_ids):
        if diff not in needed and not cache.is_layer_materialized(diff):
            needed[diff] = i
    return needed


class ArtifactStage:
    """A pull's EROFS-artifact stage, its lookup started as early as it can be.

    The lookup needs only the manifest digest, so :meth:`manifest_known` (the resolve's
    hook) starts it in ``nursery`` and its round trip runs beside the config fetch instead
    of after it: ~30 ms of a pull over a 20 ms link (issue 15). Only for a reference with
    one location: with registries.conf mirrors, the location that serves the image is
    known only once the resolve ends, and the lookup asks that one (in :meth:`fetch`).
    """

    def __init__(self, nursery: trio.Nursery, client: RegistryClient, ref: Reference,
                 policy: ArtifactPolicy) -> None:
        self._nursery = nursery
        self._client = client
        self._ref = ref
        self.policy = policy
        self._lookup: PendingLookup | None = None

    @property
    def extra_connections(self) -> int:
        """Connections the lookup will want beside the one the config fetch reuses
        (:meth:`RegistryClient.warm_up` opens them beside the manifest request): both
        requests at once beside the config; one more when it runs only after the resolve
        (mirrors: the config's connection is idle again then); none without a lookup."""
        if self.policy is ArtifactPolicy.NEVER:
            return 0
        return LOOKUP_REQUESTS if self._early() else LOOKUP_REQUESTS - 1

    def _early(self) -> bool:
        """Can the lookup start once the manifest digest is known (one location only)?"""
        return len(self._client.registries.pull_sources(self._ref)) == 1

    def manifest_known(self, digest: Digest) -> None:
        if self._lookup is not None or self.policy is ArtifactPolicy.NEVER or not self._early():
            return
        self._lookup = PendingLookup(digest)
        self._nursery.start_soon(self._look_up, self._lookup)

    async def _look_up(self, lookup: PendingLookup) -> None:
        # its two requests want connections beside the config's: the warmed ones
        await self._client.warmed(self._ref)
        await lookup.run(RepoWriter(self._client, self._ref, push=False))

    async def fetch(self, cache: GlobalCache, manifest_digest: Digest,
                    diff_ids: Sequence[Digest], emit: ProgressCallback) -> FetchOutcome:
        """:func:`fetch_erofs` with the lookup already under way."""
        return await fetch_erofs(cache, self._client, self._ref, manifest_digest, diff_ids,
                                 policy=self.policy, emit=emit, lookup=self._lookup)


@dataclass(eq=False, repr=False)
class _ArtifactJob:
    """Fetch, check, cross-check and publish the needed layers of one chosen artifact."""

    cache: GlobalCache
    client: RegistryClient
    ref: Reference
    manifest_digest: Digest
    diff_ids: list[Digest]
    artifact: ErofsArtifact
    artifact_digest: Digest
    emit: ProgressCallback
    warning: Callable[[str], None]

    async def run(self, needed: dict[Digest, int]) -> list[str]:
        """diff_ids now cached from the artifact; [] when it was set aside (and why warned)."""
        candidates = [_Candidate(i, d, blob) for d, i in needed.items()
                      if (blob := self.artifact.for_diff_id(d)) is not None]
        tmp = fetch_tmp_dir(self.cache)
        await trio.to_thread.run_sync(functools.partial(tmp.mkdir, parents=True, exist_ok=True))
        fsmeta_tmp = tmp / f"{self.manifest_digest.path_safe()}.{_unique()}.fsmeta"
        try:
            limiter = trio.CapacityLimiter(FETCH_PARALLELISM)
            async with trio.open_nursery() as nursery:
                for cand in candidates:
                    nursery.start_soon(_fetch_one, self.cache, self.client, self.ref, cand, tmp,
                                       limiter, self.emit, self.warning)
            good = [c for c in candidates if c.tree is not None]
            problem = await self._problem(good, len(needed), fsmeta_tmp)
            if problem is not None:
                self.warning(f"{self.ref}: EROFS artifact {self.artifact_digest} not used: "
                             f"{problem}; converting every layer from its tar")
                return []
            return await self._publish(good, fsmeta_tmp)
        finally:
            remove_quietly(fsmeta_tmp)
            for cand in candidates:
                if cand.path is not None:
                    remove_quietly(cand.path)

    async def _problem(self, good: list[_Candidate], needed: int,
                       fsmeta_tmp: Path) -> str | None:
        """Why the fetched layers cannot be used together, or None (fsmeta in ``fsmeta_tmp``)."""
        if len(good) < needed:
            return (f"{needed - len(good)} of its blobs were refused, and without them the "
                    "others cannot be cross-checked against its fsmeta")
        return await trio.to_thread.run_sync(
            _cross_check, self.cache, self.diff_ids, {c.diff_id: c.tree for c in good},
            self.artifact, fsmeta_tmp)

    async def _publish(self, good: list[_Candidate], fsmeta_tmp: Path) -> list[str]:
        from .provenance import record_fetched

        done = []
        for cand in good:
            if cand.path is not None and await _publish_layer(self.cache, cand.diff_id,
                                                              cand.path):
                await trio.to_thread.run_sync(functools.partial(
                    record_fetched, self.cache, cand.diff_id, source=str(self.ref),
                    artifact=str(self.artifact_digest), blob=str(cand.blob.digest)))
            done.append(str(cand.diff_id))
            self.emit(LayerProgress(cand.index, str(cand.diff_id), "done"))
        if good:
            await trio.to_thread.run_sync(_publish_fsmeta, self.cache, self.manifest_digest,
                                          fsmeta_tmp)
        return done


def _matching(artifacts: list[tuple[Digest, ErofsArtifact]],
              diff_ids: Sequence[Digest]) -> tuple[ErofsArtifact | None, Digest | None]:
    for digest, artifact in artifacts:
        if [b.diff_id for b in artifact.layers] == list(diff_ids):
            return artifact, digest
    return None, None


def _require_all(policy: ArtifactPolicy, ref: Reference, needed: dict[Digest, int],
                 outcome: FetchOutcome) -> None:
    if policy is ArtifactPolicy.ONLY and len(outcome.fetched) < len(needed):
        why = outcome.warnings[-1] if outcome.warnings else (
            f"the registry has no EROFS artifact for it ({outcome.mechanism} lookup)")
        raise RegistryError(f"{ref}: {len(needed) - len(outcome.fetched)} layer(s) not "
                            f"available as checked EROFS: {why}",
                            hint="--erofs-artifacts auto converts them instead")


async def _fetch_one(cache: GlobalCache, client: RegistryClient, ref: Reference,
                     cand: _Candidate, tmp: Path, limiter: trio.CapacityLimiter,
                     emit: ProgressCallback, warning: Callable[[str], None]) -> None:
    """Download, decompress, check one blob; on any failure warn and leave ``cand.tree``."""
    blob = cand.blob
    label = str(cand.diff_id)
    out = tmp / f"{cand.diff_id.path_safe()}.{_unique()}.erofs"
    try:
        async with flock_exclusive_async(cache.download_lock_path(blob.digest)):
            if await trio.to_thread.run_sync(cache.is_layer_materialized, cand.diff_id):
                # another pull made it while we waited: nothing to fetch or publish
                cand.tree = await trio.to_thread.run_sync(_cached_tree, cache, cand.diff_id)
                return
            await _download_and_inflate(client, ref, cand, cache.part_path(blob.digest), out,
                                        emit, limiter)
        from .check import check_layer_image

        cand.tree = await trio.to_thread.run_sync(check_layer_image, out, "the EROFS")
        cand.path = out
    except CachefsError as err:
        remove_quietly(out)
        warning(f"{ref}: EROFS artifact blob {blob.digest} for layer {label} refused "
                f"({err.one_line()})")


async def _download_and_inflate(client: RegistryClient, ref: Reference, cand: _Candidate,
                                part: Path, out: Path, emit: ProgressCallback,
                                downloads: trio.CapacityLimiter) -> None:
    """The blob downloads into ``tmp/<blob>.part`` (resumable, verified by the client;
    holding a ``downloads`` slot) while a worker thread decompresses what has arrived into
    ``out``. ``out`` counts only
    once both finished: the download verified the blob, the decompression the EROFS digest.
    The ``.part`` is removed afterwards, unless the download broke off (kept to resume)."""
    from ..pipeline.growing import GrowingBlob
    from .transfer import decompress

    blob = cand.blob
    label = str(cand.diff_id)
    growing = GrowingBlob(part, part)
    started = trio.Event()
    failed: dict[str, BaseException] = {}
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        emit(LayerProgress(cand.index, label, "download", done, blob.size))

    async def download() -> None:
        ok = False
        try:
            descriptor = Descriptor(media_type=LAYER_MEDIA_TYPE, digest=str(blob.digest),
                                    size=blob.size)
            async with downloads:
                started.set()
                emit(LayerProgress(cand.index, label, "download", 0, blob.size))
                await client.fetch_blob(ref, descriptor, part, resume=True,
                                        progress=on_bytes, written=growing.written)
            ok = True
        except CachefsError as err:
            failed["download"] = err
        finally:
            growing.finish(ok)
            started.set()

    async def inflate() -> None:
        # A worker thread only once the download runs: threads parked on downloads that
        # wait for a slot could take every thread the downloads themselves need.
        await started.wait()
        try:
            await trio.to_thread.run_sync(functools.partial(
                decompress, growing.open, out, digest=blob.erofs_digest, size=blob.erofs_size,
                what=f"EROFS of layer {label}"))
        except DownloadFailed:
            pass  # the download's own error is the one to report
        except CachefsError as err:
            failed["inflate"] = err
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download)
        nursery.start_soon(inflate)
    if "download" in failed or "inflate" in failed:
        if not isinstance(failed.get("download"), RegistryError) or "inflate" in failed:
            remove_quietly(part)
        raise failed.get("download") or failed["inflate"]
    if nursery.cancel_scope.cancelled_caught:
        raise RegistryError(f"download of {blob.digest} was cancelled")
    emit(LayerProgress(cand.index, label, "verify", done, blob.size))
    remove_quietly(part)


def _cached_tree(cache: GlobalCache, diff_id: Digest) -> tuple[Node, int]:
    from ..erofs.reader import ErofsImage

    with ErofsImage.open(cache.layer_erofs_path(diff_id)) as image:
        return image.to_tree(), image.total_blocks


def _cross_check(cache: GlobalCache, diff_ids: Sequence[Digest],
                 fetched: dict[Digest, tuple[Node, int] | None], artifact: ErofsArtifact,
                 out: Path) -> str | None:
    """Merge the fsmeta from every layer's tree; None if it is the artifact's, else why not."""
    from ..erofs.fsmeta import fsmeta_of_layers

    roots: list[Node] = []
    blocks: list[int] = []
    for diff in diff_ids:
        tree = fetched.get(diff)
        if tree is None:  # a layer that was cached already: read it back
            tree = _cached_tree(cache, diff)
        roots.append(tree[0])
        blocks.append(tree[1])
    try:
        with out.open("wb") as f:
            fsmeta_of_layers(roots, blocks, f)
    except CachefsError as err:
        return f"its layers do not merge into an fsmeta ({err.one_line()})"
    size = out.stat().st_size
    got = sha256_file(str(out))
    want = artifact.fsmeta
    if (got, size) != (want.erofs_digest, want.erofs_size):
        return (f"the fsmeta merged from its layers ({got}, {size} bytes) is not the one it "
                f"carries ({want.erofs_digest}, {want.erofs_size} bytes)")
    return None


async def _publish_layer(cache: GlobalCache, diff_id: Digest, path: Path) -> bool:
    """Rename into ``layers/`` under the layer lock; False if another process was first."""
    def publish() -> bool:
        cache.layers_dir().mkdir(parents=True, exist_ok=True)
        with flock_exclusive(cache.layer_erofs_lock_path(diff_id)):
            if cache.is_layer_materialized(diff_id):
                return False
            publish_file(path, cache.layer_erofs_path(diff_id))
            return True

    return await trio.to_thread.run_sync(publish)


def _publish_fsmeta(cache: GlobalCache, manifest_digest: Digest, path: Path) -> None:
    cache.fsmeta_dir().mkdir(parents=True, exist_ok=True)
    with flock_exclusive(cache.fsmeta_erofs_lock_path(manifest_digest)):
        if not cache.is_fsmeta_materialized(manifest_digest):
            publish_file(path, cache.fsmeta_erofs_path(manifest_digest))
        else:
            remove_quietly(path)
