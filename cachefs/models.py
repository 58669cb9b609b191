"""Models of the JSON documents cachefs reads and writes (dataclasses checked by
:mod:`cachefs.jsonmodel`).

Two families live here:

* OCI documents (manifest, index, config) as registries and archives send them; parsing is
  lenient (unknown fields kept out of the way) because registries vary.
* ``CachedImageMetadata``: msb's ``manifests/<key>.json``. Its serialisation must be
  byte-exact (FORMATS.md §2.2): serde field order, compact separators, UTF-8 unescaped,
  ``null`` for absent options. Reading is as tolerant as msb: absent optional fields are
  fine, absent required ones make the file a cache miss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest
from .errors import DigestError
from .jsonmodel import JsonModel, ValidationError, json_name

# Media types -----------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_LAYER_NONDIST_PREFIX = "application/vnd.oci.image.layer.nondistributable."

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
LAYER_TYPES = (
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
)


def compact_json(obj: Any) -> bytes:
    """serde_json's compact form: no spaces, UTF-8 kept as is."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _check_digest(model: JsonModel, name: str) -> None:
    """A digest field must parse (checked whenever a model is made, as it was parsed)."""
    try:
        Digest.parse(getattr(model, name))
    except DigestError as err:
        raise ValidationError(type(model).__name__, (name,), str(err)) from None


# OCI documents -----------------------------------------------------------------


@dataclass(kw_only=True)
class Platform(JsonModel):
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = field(default=None, metadata=json_name("os.version"))


@dataclass(kw_only=True)
class Descriptor(JsonModel):
    media_type: str = field(default="", metadata=json_name("mediaType"))
    digest: str
    size: int = 0
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None

    def __post_init__(self) -> None:
        _check_digest(self, "digest")

    @property
    def parsed_digest(self) -> Digest:
        return Digest.parse(self.digest)

    def to_oci_client_dict(self) -> dict[str, Any]:
        """Key order and omissions of oci-client's ``OciDescriptor`` serialisation."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls is not None:
            out["urls"] = self.urls
        if self.annotations is not None:
            out["annotations"] = dict(sorted(self.annotations.items()))  # a BTreeMap in Rust
        return out


@dataclass(kw_only=True)
class ImageManifest(JsonModel):
    schema_version: int = field(default=2, metadata=json_name("schemaVersion"))
    media_type: str | None = field(default=None, metadata=json_name("mediaType"))
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    artifact_type: str | None = field(default=None, metadata=json_name("artifactType"))
    annotations: dict[str, str] | None = None

    def to_oci_client_json(self) -> str:
        """The re-serialised form msb stores as ``raw_manifest_json`` after a registry pull.

        oci-client's field order (schemaVersion, mediaType, config, layers, subject,
        artifactType, annotations), absent options omitted, annotation maps sorted by key
        (they are BTreeMaps) — checked against ``msb pull`` in tests/oci/test_registry.py.
        """
        out: dict[str, Any] = {"schemaVersion": self.schema_version}
        if self.media_type is not None:
            out["mediaType"] = self.media_type
        out["config"] = self.config.to_oci_client_dict()
        out["layers"] = [layer.to_oci_client_dict() for layer in self.layers]
        if self.subject is not None:
            out["subject"] = self.subject.to_oci_client_dict()
        if self.artifact_type is not None:
            out["artifactType"] = self.artifact_type
        if self.annotations is not None:
            out["annotations"] = dict(sorted(self.annotations.items()))  # a BTreeMap in Rust
        return compact_json(out).decode()


@dataclass(kw_only=True)
class ImageIndex(JsonModel):
    schema_version: int = field(default=2, metadata=json_name("schemaVersion"))
    media_type: str | None = field(default=None, metadata=json_name("mediaType"))
    manifests: list[Descriptor]


@dataclass(kw_only=True)
class ContainerConfig(JsonModel):
    env: list[str] | None = field(default=None, metadata=json_name("Env"))
    cmd: list[str] | None = field(default=None, metadata=json_name("Cmd"))
    entrypoint: list[str] | None = field(default=None, metadata=json_name("Entrypoint"))
    working_dir: str | None = field(default=None, metadata=json_name("WorkingDir"))
    user: str | None = field(default=None, metadata=json_name("User"))
    exposed_ports: dict[str, Any] | None = field(default=None, metadata=json_name("ExposedPorts"))
    volumes: dict[str, Any] | None = field(default=None, metadata=json_name("Volumes"))
    labels: dict[str, str] | None = field(default=None, metadata=json_name("Labels"))
    stop_signal: str | None = field(default=None, metadata=json_name("StopSignal"))


@dataclass(kw_only=True)
class RootFs(JsonModel):
    type: str = "layers"
    diff_ids: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ImageConfigFile(JsonModel):
    """The image config blob (``application/vnd.oci.image.config.v1+json``)."""

    architecture: str = ""
    os: str = ""
    variant: str | None = None
    config: ContainerConfig | None = None
    rootfs: RootFs = field(default_factory=RootFs)

    @property
    def diff_ids(self) -> list[Digest]:
        return [Digest.parse(d) for d in self.rootfs.diff_ids]


# msb's manifests/<key>.json ---------------------------------------------------------


@dataclass(kw_only=True)
class ImageConfig(JsonModel):
    """msb's ``ImageConfig``: the runtime-relevant part of the image config."""

    env: list[str]
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str | None = None
    user: str | None = None
    exposed_ports: list[str]
    volumes: list[str]
    labels: dict[str, str]
    stop_signal: str | None = None

    @classmethod
    def from_container_config(cls, cfg: ContainerConfig | None) -> ImageConfig:
        cfg = cfg or ContainerConfig()
        return cls(
            env=list(cfg.env or []),
            cmd=cfg.cmd,
            entrypoint=cfg.entrypoint,
            working_dir=cfg.working_dir,
            user=cfg.user,
            exposed_ports=list((cfg.exposed_ports or {}).keys()),
            volumes=list((cfg.volumes or {}).keys()),
            labels=dict(cfg.labels or {}),
            stop_signal=cfg.stop_signal,
        )


@dataclass(kw_only=True)
class LayerMetadata(JsonModel):
    digest: str
    media_type: str | None = None
    size_bytes: int | None = None
    diff_id: str

    @property
    def diff_digest(self) -> Digest:
        return Digest.parse(self.diff_id)

    @property
    def blob_digest(self) -> Digest:
        return Digest.parse(self.digest)


@dataclass(kw_only=True)
class CachedImageMetadata(JsonModel):
    """msb's ``CachedImageMetadata`` (FORMATS.md §2.2), serialised byte-exactly."""

    manifest_digest: str
    config_digest: str
    raw_manifest_json: str
    raw_config_json: str
    config: ImageConfig
    layers: list[LayerMetadata]

    def __post_init__(self) -> None:
        _check_digest(self, "manifest_digest")
        _check_digest(self, "config_digest")

    @property
    def manifest(self) -> Digest:
        return Digest.parse(self.manifest_digest)

    @property
    def diff_ids(self) -> list[Digest]:
        return [layer.diff_digest for layer in self.layers]

    def to_json_bytes(self) -> bytes:
        c = self.config
        doc = {
            "manifest_digest": self.manifest_digest,
            "config_digest": self.config_digest,
            "raw_manifest_json": self.raw_manifest_json,
            "raw_config_json": self.raw_config_json,
            "config": {
                "env": c.env,
                "cmd": c.cmd,
                "entrypoint": c.entrypoint,
                "working_dir": c.working_dir,
                "user": c.user,
                "exposed_ports": c.exposed_ports,
                "volumes": c.volumes,
                "labels": c.labels,
                "stop_signal": c.stop_signal,
            },
            "layers": [
                {
                    "digest": layer.digest,
                    "media_type": layer.media_type,
                    "size_bytes": layer.size_bytes,
                    "diff_id": layer.diff_id,
                }
                for layer in self.layers
            ],
        }
        return compact_json(doc)

    @classmethod
    def from_json_bytes(cls, data: bytes) -> CachedImageMetadata:
        """Parse like msb: required fields must be present and non-null.

        Raises :class:`ValidationError` (a ``ValueError``) for what msb would call corrupt.
        """
        return cls.model_validate_json(data)


__all__ = [
    "CachedImageMetadata",
    "ContainerConfig",
    "Descriptor",
    "ImageConfig",
    "ImageConfigFile",
    "ImageIndex",
    "ImageManifest",
    "LayerMetadata",
    "Platform",
    "ValidationError",
    "compact_json",
]
