"""``cachefs push-erofs``: publish an image's converted EROFS next to it in its registry.

Order: the image must be complete in the cache; its platform manifest must be in the
repository (it becomes the artifact's ``subject``, so the registry's own bytes are
fetched for its size and media type). If the repository already holds one of our
artifacts for that subject whose EROFS digests equal the cache's files, nothing is sent
(idempotent: pushing twice changes nothing, whatever zstd build compressed the first).
Otherwise every EROFS is compressed under cachefs's own ``cachefs/tmp/``, the blobs are
made present (HEAD, mount, upload), the manifest is PUT by digest and, on a registry
without the referrers API (no ``OCI-Subject`` in the PUT answer), the tag-schema index is
rewritten with every referrer it had plus ours.

Concurrent pushers of one subject on a tag-schema registry race on that index (the
distribution API has no conditional PUT): the last writer wins, and the loser's entry is
restored by pushing again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..cache.store import CACHEFS_DIR, GlobalCache
from ..digest import Digest
from ..errors import NotCachedError, RegistryError
from ..oci.push import PushStats, RepoWriter
from ..oci.referrers import (
    EMPTY_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ErofsArtifact,
    ErofsBlob,
    artifact_manifest,
    index_with,
    referrer_entry,
    referrers_tag,
)
from ..oci.registry import RegistryClient
from ..reference import Reference
from .lookup import find_artifacts

COMPRESS_PARALLELISM = 2


@dataclass
class PushReport:
    reference: str
    subject: str
    artifact: str
    unchanged: bool
    mechanism: str  # "referrers-api" or "tag-schema"
    stats: PushStats = field(default_factory=PushStats)

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference, "subject": self.subject, "artifact": self.artifact,
            "unchanged": self.unchanged, "mechanism": self.mechanism,
            "blobs_skipped": len(self.stats.skipped), "blobs_mounted": len(self.stats.mounted),
            "blobs_uploaded": len(self.stats.uploaded), "documents_put": self.stats.manifests,
        }


def push_tmp_dir(cache: GlobalCache) -> Path:
    return cache.root / CACHEFS_DIR / "tmp"


def _local_files(cache: GlobalCache, ref: Reference) -> tuple[Digest, list[Digest],
                                                              list[Path], Path]:
    meta = cache.read_image_metadata(ref)
    if meta is None:
        raise NotCachedError(f"{ref} is not in the cache", hint=f"run: cachefs pull {ref}")
    diff_ids = meta.diff_ids
    missing = [str(d) for d in diff_ids if not cache.is_layer_materialized(d)]
    if missing or not cache.is_fsmeta_materialized(meta.manifest):
        raise NotCachedError(f"{ref}: the cache does not hold every EROFS of the image",
                             hint=f"run: cachefs pull {ref}")
    layers = [cache.layer_erofs_path(d) for d in diff_ids]
    return meta.manifest, diff_ids, layers, cache.fsmeta_erofs_path(meta.manifest)


def _file_digest(path: Path) -> tuple[Digest, int]:
    from ..digest import sha256_file

    return sha256_file(str(path)), path.stat().st_size


def _matches(artifact: ErofsArtifact, diff_ids: list[Digest],
             local: list[tuple[Digest, int]]) -> bool:
    """Whether ``artifact`` carries exactly the cache's EROFS files (layers, then fsmeta)."""
    blobs = [*artifact.layers, artifact.fsmeta]
    if len(blobs) != len(local):
        return False
    wanted = [*diff_ids, None]
    return all(b.diff_id == d and (b.erofs_digest, b.erofs_size) == got
               for b, d, got in zip(blobs, wanted, local, strict=True))


async def push_erofs(
    cache: GlobalCache,
    reference: str | Reference,
    client: RegistryClient,
    *,
    chunk_size: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> PushReport:
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    manifest_digest, diff_ids, layers, fsmeta = await trio.to_thread.run_sync(
        _local_files, cache, ref)
    writer = RepoWriter(client, ref) if chunk_size is None else \
        RepoWriter(client, ref, chunk_size=chunk_size)
    body = await writer.get_document(f"manifests/{manifest_digest}")
    if body is None:
        raise RegistryError(f"{ref}: manifest {manifest_digest} is not in "
                            f"{ref.registry}/{ref.repository}",
                            hint="push the image itself first")
    subject_digest = Digest.sha256_of(body)
    if subject_digest != manifest_digest:
        raise RegistryError(f"{ref}: registry sent a manifest that does not hash to "
                            f"{manifest_digest}")
    subject = {"mediaType": _media_type(body), "digest": str(manifest_digest),
               "size": len(body)}

    say("hashing the cached EROFS files")
    local = [await trio.to_thread.run_sync(_file_digest, p) for p in [*layers, fsmeta]]
    found = await find_artifacts(writer, manifest_digest)
    for digest, artifact in found.artifacts:
        if _matches(artifact, diff_ids, local):  # already there, and findable
            return PushReport(str(ref), str(manifest_digest), str(digest), True,
                              found.mechanism, writer.stats)

    tmp = push_tmp_dir(cache) / f"push-{os.getpid()}-{secrets.token_hex(4)}"
    await trio.to_thread.run_sync(functools.partial(tmp.mkdir, parents=True, exist_ok=True))
    try:
        say(f"compressing {len(layers) + 1} EROFS files")
        blobs = await _compress_all(layers, fsmeta, diff_ids, tmp)
        mount_from = _sibling_repositories(cache, ref, manifest_digest)
        await writer.ensure_blob(EMPTY_CONFIG, Digest.sha256_of(EMPTY_CONFIG), len(EMPTY_CONFIG))
        async with trio.open_nursery() as nursery:
            for blob, path in blobs:
                nursery.start_soon(functools.partial(
                    writer.ensure_blob, path, blob.digest, blob.size, mount_from))
        layer_blobs = [b for b, _ in blobs[:-1]]
        manifest = artifact_manifest(subject, layer_blobs, blobs[-1][0])
        artifact_digest = Digest.sha256_of(manifest)
        resp = await writer.put_manifest(str(artifact_digest), manifest, OCI_MANIFEST)
        mechanism = "referrers-api" if resp.headers.get("OCI-Subject") else "tag-schema"
        if mechanism == "tag-schema":
            await _add_to_tag_index(writer, manifest_digest, manifest)
        say(f"pushed {artifact_digest}")
        return PushReport(str(ref), str(manifest_digest), str(artifact_digest), False,
                          mechanism, writer.stats)
    finally:
        await trio.to_thread.run_sync(functools.partial(shutil.rmtree, tmp, ignore_errors=True))


async def _compress_all(layers: list[Path], fsmeta: Path, diff_ids: list[Digest],
                        tmp: Path) -> list[tuple[ErofsBlob, Path]]:
    from .transfer import compress

    jobs: list[tuple[Path, Digest | None]] = [*zip(layers, diff_ids, strict=True),
                                              (fsmeta, None)]
    results: list[tuple[ErofsBlob, Path] | None] = [None] * len(jobs)
    limiter = trio.CapacityLimiter(COMPRESS_PARALLELISM)

    async def one(i: int, src: Path, diff_id: Digest | None) -> None:
        dst = tmp / f"{i}.zst"
        c = await trio.to_thread.run_sync(compress, src, dst, limiter=limiter)
        results[i] = (ErofsBlob(c.blob_digest, c.blob_size, c.erofs_digest, c.erofs_size,
                                diff_id), dst)

    async with trio.open_nursery() as nursery:
        for i, (src, diff_id) in enumerate(jobs):
            nursery.start_soon(one, i, src, diff_id)
    return [r for r in results if r is not None]


async def _add_to_tag_index(writer: RepoWriter, subject: Digest, manifest: bytes) -> None:
    tag = referrers_tag(subject)
    existing = await writer.get_document(f"manifests/{tag}", OCI_INDEX)
    index = index_with(existing, referrer_entry(manifest))
    if existing != index:
        await writer.put_manifest(tag, index, OCI_INDEX)


def _media_type(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        media_type = json.loads(body).get("mediaType")
        if isinstance(media_type, str) and media_type:
            return media_type
    return OCI_MANIFEST


def _sibling_repositories(cache: GlobalCache, ref: Reference, manifest: Digest) -> list[str]:
    """Other repositories of the same registry that the cache pulled this image from: the
    registry holds its blobs there, and ours may have been pushed there too (mountable)."""
    out = []
    for record in cache.ref_records():
        with contextlib.suppress(Exception):
            other = Reference.parse(record.reference)
            if other.registry == ref.registry and other.repository != ref.repository and \
                    record.manifest_digest == str(manifest) and other.repository not in out:
                out.append(other.repository)
    return out
