"""The shapes of ``cachefs images --json`` and ``cachefs inspect --json``.

TypedDicts rather than dataclasses: the documents are printed with ``json.dumps`` in key
order, and scripts parse them, so the keys and their order are the interface. Typing them
lets the CLI's text rendering read them back without guessing what each value is.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class ImageSummary(TypedDict):
    """One row of ``cachefs images``."""

    reference: str | None  # normalised; None when only an anonymous manifests/*.json exists
    typed: str | None
    key: str  # names manifests/<key>.json
    manifest_digest: str | None
    layers: int
    size_bytes: int  # layer EROFS files and the fsmeta on disk
    state: Literal["ready", "incomplete"]
    missing: list[str]  # what keeps the image from being usable; [] when ready
    sources: list[str]


class LayerOrigin(TypedDict):
    origin: str  # "converted" (from its tar) or "fetched-erofs" (an EROFS artifact)
    origin_source: NotRequired[str]  # both present when fetched
    origin_artifact: NotRequired[str]


class LayerDetail(LayerOrigin):
    """Key order: these, then the origin's (``inspect_image``)."""

    diff_id: str
    digest: str | None  # None when only msb's database names the layer
    media_type: str | None
    size_bytes: int | None
    erofs_path: str
    erofs_size: int | None  # None when the file is absent
    valid: bool


class FsmetaDetail(TypedDict):
    path: str
    size: int | None
    valid: bool


class VmdkDetail(TypedDict):
    path: str
    exists: bool


class ImageArtifacts(TypedDict, total=False):
    """Both present when the manifest digest is known, both absent otherwise."""

    fsmeta: FsmetaDetail
    vmdk: VmdkDetail


class ImagePlatform(TypedDict):
    """From the image config, as skopeo and msb show them; None when absent or not text."""

    architecture: str | None
    os: str | None
    variant: str | None
    created: str | None


class ImageDetails(ImageSummary, ImagePlatform, ImageArtifacts):
    """``cachefs inspect``: the summary and everything else cachefs knows about the image.

    Key order (the literal in ``inspect_image``): the summary's, metadata_path,
    config_digest, the platform's, config, layer_details, then fsmeta and vmdk.
    """

    metadata_path: str
    config_digest: str | None
    config: dict[str, Any] | None  # the image config's runtime settings, as msb stores them
    layer_details: list[LayerDetail]
