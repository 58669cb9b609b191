"""Pydantic models of the JSON documents cachefs reads and writes.

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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .digest import Digest
from .errors import DigestError

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


def _checked_digest(v: str) -> str:
    """Validator body: pydantic only turns ValueError into a validation failure."""
    try:
        Digest.parse(v)
    except DigestError as err:
        raise ValueError(str(err)) from None
    return v


# OCI documents -----------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=False)


class Platform(_Lenient):
    architecture: str
    os: str
    variant: str | None = None
    os_version: str | None = Field(default=None, alias="os.version")


class Descriptor(_Lenient):
    media_type: str = Field(default="", alias="mediaType")
    digest: str
    size: int = 0
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None

    @field_validator("digest")
    @classmethod
    def _valid_digest(cls, v: str) -> str:
        return _checked_digest(v)

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


class ImageManifest(_Lenient):
    schema_version: int = Field(default=2, alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    artifact_type: str | None = Field(default=None, alias="artifactType")
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


class ImageIndex(_Lenient):
    schema_version: int = Field(default=2, alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    manifests: list[Descriptor]


class ContainerConfig(_Lenient):
    env: list[str] | None = Field(default=None, alias="Env")
    cmd: list[str] | None = Field(default=None, alias="Cmd")
    entrypoint: list[str] | None = Field(default=None, alias="Entrypoint")
    working_dir: str | None = Field(default=None, alias="WorkingDir")
    user: str | None = Field(default=None, alias="User")
    exposed_ports: dict[str, Any] | None = Field(default=None, alias="ExposedPorts")
    volumes: dict[str, Any] | None = Field(default=None, alias="Volumes")
    labels: dict[str, str] | None = Field(default=None, alias="Labels")
    stop_signal: str | None = Field(default=None, alias="StopSignal")


class RootFs(_Lenient):
    type: str = "layers"
    diff_ids: list[str] = Field(default_factory=list)


class ImageConfigFile(_Lenient):
    """The image config blob (``application/vnd.oci.image.config.v1+json``)."""

    architecture: str = ""
    os: str = ""
    variant: str | None = None
    config: ContainerConfig | None = None
    rootfs: RootFs = Field(default_factory=RootFs)

    @property
    def diff_ids(self) -> list[Digest]:
        return [Digest.parse(d) for d in self.rootfs.diff_ids]


# msb's manifests/<key>.json ---------------------------------------------------------


class ImageConfig(BaseModel):
    """msb's ``ImageConfig``: the runtime-relevant part of the image config."""

    model_config = ConfigDict(extra="ignore")

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


class LayerMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class CachedImageMetadata(BaseModel):
    """msb's ``CachedImageMetadata`` (FORMATS.md §2.2), serialised byte-exactly."""

    model_config = ConfigDict(extra="ignore")

    manifest_digest: str
    config_digest: str
    raw_manifest_json: str
    raw_config_json: str
    config: ImageConfig
    layers: list[LayerMetadata]

    @field_validator("manifest_digest", "config_digest")
    @classmethod
    def _valid_digest(cls, v: str) -> str:
        return _checked_digest(v)

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

        Raises ``pydantic.ValidationError`` or ``ValueError`` for what msb would call corrupt.
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
