"""OCI 1.1 referrers: the cachefs EROFS artifact, and how it is found next to its image.

The artifact is an image manifest with ``artifactType`` :data:`ARTIFACT_TYPE` whose
``subject`` is the image's platform manifest. Its config is the OCI empty descriptor; each
layer is one zstd-compressed EROFS (one per image layer, bottom first, then the fsmeta),
annotated with what the blob must decompress to (:data:`ANN_DIGEST`, :data:`ANN_SIZE`) and,
for a layer image, the diff_id it was converted from (:data:`ANN_DIFF_ID`).

Finding it: the referrers API (``GET /v2/<repo>/referrers/<subject>``) where the registry
has one; else the referrers *tag schema*: the tag ``sha256-<hex of the subject>`` holding an
image index of every referrer. Registries without the API (Debian's distribution 2.8)
answer 404 for the API; both lookups are sent at once, so a lookup costs one round trip
whatever the registry supports, and a registry with neither answers two 404s.

Everything here parses documents an outsider wrote: sizes are capped by the caller (the
client's manifest limit), and every field is validated before it is believed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..digest import Digest
from ..errors import DigestError, RegistryError

ARTIFACT_TYPE = "application/vnd.cachefs.erofs.v1"
LAYER_MEDIA_TYPE = "application/vnd.cachefs.erofs.layer.v1+zstd"
FSMETA_MEDIA_TYPE = "application/vnd.cachefs.erofs.fsmeta.v1+zstd"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

ANN_DIFF_ID = "io.cachefs.erofs.diff_id"
ANN_DIGEST = "io.cachefs.erofs.digest"
ANN_SIZE = "io.cachefs.erofs.size"
ANN_FORMAT = "io.cachefs.erofs.format"
FORMAT = "msb-0.7.11"  # the cache format whose bytes the artifact carries
MAX_EROFS_BYTES = 64 << 30  # an annotation claiming more is refused, not believed
MAX_REFERRERS = 4096  # entries of one referrers index we keep when we rewrite it


def referrers_tag(subject: Digest) -> str:
    """The tag schema's tag for ``subject``: ``<alg>-<hex>`` (OCI distribution 1.1)."""
    return f"{subject.algorithm}-{subject.encoded}"


@dataclass(frozen=True, slots=True)
class ErofsBlob:
    """One blob of the artifact: what to download and what it must decompress to."""

    digest: Digest  # of the zstd blob
    size: int  # of the zstd blob
    erofs_digest: Digest  # of the decompressed EROFS
    erofs_size: int
    diff_id: Digest | None  # None for the fsmeta

    def descriptor(self) -> dict[str, Any]:
        annotations = {ANN_DIGEST: str(self.erofs_digest), ANN_SIZE: str(self.erofs_size)}
        if self.diff_id is not None:
            annotations[ANN_DIFF_ID] = str(self.diff_id)
        return {
            "mediaType": LAYER_MEDIA_TYPE if self.diff_id is not None else FSMETA_MEDIA_TYPE,
            "digest": str(self.digest),
            "size": self.size,
            "annotations": dict(sorted(annotations.items())),
        }


@dataclass(frozen=True, slots=True)
class ErofsArtifact:
    """A parsed cachefs artifact: layer blobs bottom first, and the fsmeta's (if any)."""

    layers: tuple[ErofsBlob, ...]
    fsmeta: ErofsBlob

    def for_diff_id(self, diff_id: Digest) -> ErofsBlob | None:
        for blob in self.layers:
            if blob.diff_id == diff_id:
                return blob
        return None


def empty_descriptor() -> dict[str, Any]:
    return {"mediaType": EMPTY_MEDIA_TYPE, "digest": str(Digest.sha256_of(EMPTY_CONFIG)),
            "size": len(EMPTY_CONFIG)}


def artifact_manifest(subject: dict[str, Any], layers: list[ErofsBlob],
                      fsmeta: ErofsBlob) -> bytes:
    """The artifact manifest's exact bytes: deterministic, so equal inputs push nothing new."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_descriptor(),
        "layers": [b.descriptor() for b in [*layers, fsmeta]],
        "subject": subject,
        "annotations": {ANN_FORMAT: FORMAT},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _digest_field(value: object, what: str) -> Digest:
    if not isinstance(value, str):
        raise RegistryError(f"{what}: not a digest string")
    try:
        return Digest.parse(value)
    except DigestError as err:
        raise RegistryError(f"{what}: {err}") from None


def _size_field(value: object, what: str, limit: int) -> int:
    try:
        if not isinstance(value, int | float | str):  # what int() takes from JSON
            raise TypeError
        n = int(value)
    except (TypeError, ValueError):
        raise RegistryError(f"{what}: size {value!r} is not a number") from None
    if not 0 < n <= limit:
        raise RegistryError(f"{what}: size {n} out of range")
    return n


def parse_artifact(body: bytes, subject: Digest) -> ErofsArtifact:
    """The artifact manifest ``body``, checked to be ours and to point at ``subject``."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError("EROFS artifact manifest is not JSON") from None
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE:
        raise RegistryError("manifest is not a cachefs EROFS artifact")
    subj = doc.get("subject")
    if not isinstance(subj, dict) or _digest_field(subj.get("digest"), "subject") != subject:
        raise RegistryError(f"EROFS artifact does not refer to {subject}")
    if doc.get("annotations", {}).get(ANN_FORMAT) != FORMAT:
        raise RegistryError(f"EROFS artifact is not in format {FORMAT}")
    entries = doc.get("layers")
    if not isinstance(entries, list) or len(entries) > 0xFFFF + 1:
        raise RegistryError("EROFS artifact has no usable layer list")
    layers: list[ErofsBlob] = []
    fsmeta: ErofsBlob | None = None
    for i, entry in enumerate(entries):
        what = f"EROFS artifact blob {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("annotations"), dict):
            raise RegistryError(f"{what}: not a descriptor with annotations")
        ann = entry["annotations"]
        kind = entry.get("mediaType")
        diff_id = None
        if kind == LAYER_MEDIA_TYPE:
            diff_id = _digest_field(ann.get(ANN_DIFF_ID), f"{what} diff_id")
        elif kind != FSMETA_MEDIA_TYPE or fsmeta is not None:
            raise RegistryError(f"{what}: unexpected media type {kind!r}")
        blob = ErofsBlob(
            digest=_digest_field(entry.get("digest"), f"{what} digest"),
            size=_size_field(entry.get("size"), what, MAX_EROFS_BYTES),
            erofs_digest=_digest_field(ann.get(ANN_DIGEST), f"{what} EROFS digest"),
            erofs_size=_size_field(ann.get(ANN_SIZE), f"{what} EROFS", MAX_EROFS_BYTES),
            diff_id=diff_id,
        )
        if diff_id is None:
            fsmeta = blob
        else:
            layers.append(blob)
    if fsmeta is None:
        raise RegistryError("EROFS artifact carries no fsmeta (nothing to cross-check its "
                            "layers against)")
    return ErofsArtifact(tuple(layers), fsmeta)


def referrer_descriptors(body: bytes) -> list[dict[str, Any]]:
    """The ``manifests`` of a referrers index (API answer or tag-schema tag), validated."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError("referrers index is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
        raise RegistryError("referrers index has no manifest list")
    out = []
    for entry in doc.get("manifests", [])[:MAX_REFERRERS]:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            out.append(entry)
    return out


def pick_ours(descriptors: list[dict[str, Any]]) -> list[Digest]:
    """Digests of our artifacts among referrers, newest-listed first (a later push wins)."""
    found = []
    for entry in reversed(descriptors):
        if entry.get("artifactType") == ARTIFACT_TYPE:
            try:
                found.append(Digest.parse(entry["digest"]))
            except DigestError:
                continue
    return found


def index_with(existing: bytes | None, entry: dict[str, Any]) -> bytes:
    """A tag-schema index holding every referrer of ``existing`` plus ``entry``.

    Other tools' referrers are kept verbatim; an entry with the same digest is replaced,
    so re-adding a referrer changes nothing.
    """
    manifests = referrer_descriptors(existing) if existing is not None else []
    manifests = [m for m in manifests if m.get("digest") != entry["digest"]]
    manifests.append(entry)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                      separators=(",", ":")).encode()


def referrer_entry(manifest: bytes) -> dict[str, Any]:
    """The index entry describing an artifact manifest (what the referrers API returns)."""
    doc = json.loads(manifest)
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": str(Digest.sha256_of(manifest)),
                             "size": len(manifest), "artifactType": doc["artifactType"]}
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    return entry


__all__ = [
    "ANN_DIFF_ID",
    "ANN_DIGEST",
    "ANN_SIZE",
    "ARTIFACT_TYPE",
    "FSMETA_MEDIA_TYPE",
    "LAYER_MEDIA_TYPE",
    "ErofsArtifact",
    "ErofsBlob",
    "artifact_manifest",
    "index_with",
    "parse_artifact",
    "pick_ours",
    "referrer_descriptors",
    "referrer_entry",
    "referrers_tag",
]
