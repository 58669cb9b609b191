"""Images from files: ``docker save`` archives and OCI image layouts (directory or tar).

What msb 0.7.11 ``load`` does, observed (tests/oci/test_archive.py checks each point):

* A tar with ``manifest.json`` is a **docker archive**, even when it is also an OCI layout
  (docker ≥ 25 writes both). msb then *synthesizes* the manifest (FORMATS.md §2.4): an OCI
  manifest with sorted keys, compact, layer media types from the blobs' magic bytes
  (``1f 8b`` gzip, ``28 b5 2f fd`` zstd, else plain tar); ``manifest_digest`` is the sha256
  of those bytes. Every ``RepoTags`` entry names the image; an image without tags needs
  ``--tag``.
* A tar with only ``index.json`` is an **OCI layout**. msb keeps the manifest blob's exact
  bytes as ``raw_manifest_json`` and its digest as ``manifest_digest``. Each top-level entry
  of ``index.json`` is one image, named by its ``org.opencontainers.image.ref.name``
  annotation; a nested index is narrowed to linux/<host arch>; top-level manifests of
  another platform are skipped.
* msb only reads tar files; cachefs also accepts the same layouts as directories, and a
  pipe (``docker save … | cachefs load -``), spooled to the cache's ``tmp/`` first.

Where cachefs deliberately differs: msb takes ``ref.name`` as a whole reference, so a
layout written by ``skopeo copy … oci:dir:bookworm`` (``ref.name`` = ``bookworm``, a tag,
as the OCI image-layout spec and skopeo mean it) became ``docker.io/library/bookworm:latest``.
cachefs takes a ``ref.name`` without ``/`` and ``:`` as a tag only: it names no image, and
the image needs ``--tag`` (which then is its only name).

Everything is validated when the archive is opened — missing members, unparsable JSON,
digests that do not match their names — and layer streams verify their digest at EOF, so a
bad archive fails with ArchiveError / DigestMismatch naming the member.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ..digest import Digest
from ..errors import ArchiveError, DigestError, DigestMismatch
from ..models import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    ImageConfigFile,
    ImageIndex,
    ImageManifest,
    Platform,
    ValidationError,
)
from .platform import host_platform, platform_matches, select_manifest
from .registry import check_layer_descriptor
from .source import SourceImage, SourceLayer

REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON_BYTES = 32 << 20
_CHUNK = 1 << 20

ArchiveKind = Literal["docker-archive", "oci-layout"]


# Member access: one interface over a directory and a tar ----------------------------------


class _Members:
    """Named regular files of an archive (tar members or files under a directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def open(self, name: str) -> io.BufferedReader:
        raise NotImplementedError

    def read(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        if not self.exists(name):
            raise ArchiveError(f"{self.path}: member {name!r} is missing")
        if self.size(name) > limit:
            raise ArchiveError(f"{self.path}: member {name!r} is larger than {limit} bytes")
        with self.open(name) as f:
            return f.read()


def _norm(name: str) -> str:
    name = posixpath.normpath(name.lstrip("/"))
    return "" if name == "." else name


class _DirMembers(_Members):
    def _file(self, name: str) -> Path:
        rel = _norm(name)
        if rel.startswith("../") or rel == "..":
            raise ArchiveError(f"{self.path}: member {name!r} points outside the layout")
        return self.path / rel

    def exists(self, name: str) -> bool:
        return self._file(name).is_file()

    def size(self, name: str) -> int:
        return self._file(name).stat().st_size

    def open(self, name: str) -> io.BufferedReader:
        try:
            return self._file(name).open("rb")
        except FileNotFoundError:
            raise ArchiveError(f"{self.path}: member {name!r} is missing") from None


class _TarMember(io.RawIOBase):
    """A member's bytes, read straight from the archive file (its own file handle)."""

    def __init__(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        self._tf = tf
        stream = tf.extractfile(info)
        assert isinstance(stream, io.BufferedReader)  # tarfile's ExFileObject; None: not a file
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._stream.readinto(b)  # straight into the caller's buffer: no extra copy

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._tf.close()
        super().close()


class _TarMembers(_Members):
    """Members of a (possibly gzip-compressed) tar, indexed once; links resolved."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._index: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(path, "r:*") as tf:
                for info in tf:
                    self._index[_norm(info.name)] = info
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ArchiveError(f"{path}: not a readable tar archive ({err})") from None

    def _resolve(self, name: str) -> tarfile.TarInfo | None:
        key = _norm(name)
        for _ in range(16):  # bounded: link cycles are an error, not a hang
            info = self._index.get(key)
            if info is None:
                return None
            if info.isreg():
                return info
            if info.issym():
                key = _norm(posixpath.join(posixpath.dirname(key), info.linkname))
            elif info.islnk():
                key = _norm(info.linkname)
            else:
                return None
        raise ArchiveError(f"{self.path}: member {name!r} is a link cycle")

    def exists(self, name: str) -> bool:
        return self._resolve(name) is not None

    def size(self, name: str) -> int:
        info = self._resolve(name)
        if info is None:
            raise ArchiveError(f"{self.path}: member {name!r} is missing")
        return info.size

    def open(self, name: str) -> io.BufferedReader:
        info = self._resolve(name)
        if info is None:
            raise ArchiveError(f"{self.path}: member {name!r} is missing")
        tf = tarfile.open(self.path, "r:*")  # noqa: SIM115  (closed with the stream)
        return io.BufferedReader(_TarMember(tf, info), buffer_size=_CHUNK)


# Public model --------------------------------------------------------------------------------


class _VerifyingStream(io.RawIOBase):
    """Hashes as it is read; at EOF raises DigestMismatch (naming the member) on a mismatch."""

    def __init__(self, raw: io.BufferedReader, digest: Digest, size: int, what: str) -> None:
        self._raw = raw
        self._hash = digest.hasher()
        self._digest = digest
        self._size = size
        self._seen = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        if not n and len(b):
            self._check()
        with memoryview(b) as view:
            self._hash.update(view[:n])
        self._seen += n
        return n

    def _check(self) -> None:
        actual = f"{self._digest.algorithm}:{self._hash.hexdigest()}"
        if actual != str(self._digest) or self._seen != self._size:
            raise DigestMismatch(self._what, str(self._digest), f"{actual} ({self._seen} bytes)")

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@dataclass(frozen=True)
class ArchiveLayer:
    """One layer blob inside an archive."""

    digest: Digest  # of the blob as stored (compressed, if it is)
    media_type: str
    size: int
    diff_id: Digest
    member: str  # the archive member holding the blob
    _members: _Members = field(repr=False, compare=False)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=str(self.digest), size=self.size)

    def open(self, *, verify: bool = True) -> BinaryIO:
        """Stream the blob's bytes; DigestMismatch is raised on reading past a bad end.

        ``verify=False`` leaves the digest check to the caller: :func:`cachefs.pipeline.pull.load`
        does so for an uncompressed layer, whose blob digest is its diff_id, because ingest
        verifies the diff_id over the very same bytes (one sha256 pass instead of two).
        """
        raw = self._members.open(self.member)
        if not verify:
            return raw
        what = f"{self._members.path}: layer member {self.member!r}"
        return io.BufferedReader(
            _VerifyingStream(raw, self.digest, self.size, what), buffer_size=_CHUNK
        )


@dataclass(frozen=True)
class ArchiveImage:
    """One image of an archive, with what msb stores for it."""

    kind: ArchiveKind
    repo_tags: list[str]  # docker RepoTags, or the OCI ref.name annotation (if any)
    manifest_digest: Digest
    manifest_bytes: bytes  # exactly what msb stores as raw_manifest_json
    manifest: ImageManifest
    config_bytes: bytes
    config: ImageConfigFile
    config_digest: Digest
    layers: list[ArchiveLayer]
    platform: Platform | None = None
    layout_tag: str | None = None  # an OCI ref.name that is only a tag (names no image)

    @property
    def raw_manifest_json(self) -> str:
        return self.manifest_bytes.decode()

    def source_image(self) -> SourceImage:
        """The image as the pipeline takes it from any source."""
        return SourceImage(
            self.manifest_digest, self.raw_manifest_json, self.config_bytes, self.config,
            tuple(SourceLayer(str(layer.digest), layer.media_type, layer.size,
                              str(layer.diff_id)) for layer in self.layers),
        )


@dataclass(frozen=True)
class ArchiveSource:
    path: Path
    kind: ArchiveKind
    images: list[ArchiveImage]


def is_bare_tag(ref_name: str) -> bool:
    """``bookworm``, ``v1``: a ref.name with no repository part (see the module docstring)."""
    return "/" not in ref_name and ":" not in ref_name and "@" not in ref_name


@contextlib.contextmanager
def spooled_archive(source: Path, tmp_dir: Path) -> Iterator[Path]:
    """``source`` as a path :func:`open_archive` can read: itself when it is a file or a
    directory; ``-`` (stdin) or a pipe (``/dev/stdin``) copied to ``tmp_dir`` first,
    because tar members are read out of order and a pipe cannot seek.

    The copy is named like an abandoned load (``load-<ns>-<pid>-0.blob``), which
    ``cachefs gc`` removes once this process is gone, and is removed on the way out.
    """
    if str(source) != "-" and (source.is_file() or source.is_dir()):
        yield source
        return
    tmp_dir.mkdir(parents=True, exist_ok=True)
    spool = tmp_dir / f"load-{time.time_ns()}-{os.getpid()}-0.blob"
    try:
        with contextlib.ExitStack() as stack:
            stream: BinaryIO = (sys.stdin.buffer if str(source) == "-"
                                else stack.enter_context(source.open("rb")))
            with spool.open("xb") as out:
                shutil.copyfileobj(stream, out, _CHUNK)
        yield spool
    finally:
        spool.unlink(missing_ok=True)


def open_archive(path: Path, platform: Platform | None = None) -> ArchiveSource:
    """Open a docker archive or an OCI layout (tar or directory) and validate it.

    ``platform`` selects from multi-platform OCI indexes (default linux/<host arch>); docker
    archives carry one image per entry and are taken as they are, like msb does.
    """
    path = Path(path)
    if path.is_dir():
        members: _Members = _DirMembers(path)
    elif path.is_file():
        members = _TarMembers(path)
    else:
        raise ArchiveError(f"{path}: no such archive or directory")
    if members.exists("manifest.json"):
        return ArchiveSource(path, "docker-archive", _docker_images(members))
    if members.exists("index.json"):
        return ArchiveSource(path, "oci-layout", _oci_images(members, platform))
    raise ArchiveError(
        f"{path}: neither a docker archive (manifest.json) nor an OCI layout (index.json)"
    )


# helpers ---------------------------------------------------------------------------------------


def _json(members: _Members, name: str) -> Any:
    try:
        return json.loads(members.read(name))
    except ValueError as err:
        raise ArchiveError(f"{members.path}: member {name!r} is not valid JSON ({err})") from None


def _hash_member(members: _Members, name: str) -> tuple[Digest, int, bytes]:
    """(sha256, size, first 4 bytes) of a member, streamed."""
    h = hashlib.sha256()
    head = b""
    n = 0
    with members.open(name) as f:
        while chunk := f.read(_CHUNK):
            if n < 4:
                head = (head + chunk)[:4]
            h.update(chunk)
            n += len(chunk)
    return Digest("sha256", h.hexdigest()), n, head


def _digest_in_name(name: str) -> Digest | None:
    """``blobs/sha256/<hex>`` or ``<hex>.json`` / ``<hex>/layer.tar`` → the digest they claim."""
    parts = _norm(name).split("/")
    candidates = []
    if len(parts) >= 3 and parts[-3] == "blobs":
        candidates.append(f"{parts[-2]}:{parts[-1]}")
    stem = parts[-1].removesuffix(".json")
    if stem != parts[-1]:
        candidates.append(f"sha256:{stem}")
    for text in candidates:
        try:
            return Digest.parse(text)
        except DigestError:
            continue
    return None


def media_type_from_magic(head: bytes) -> str:
    """msb ``load``'s rule: gzip and zstd by magic bytes, anything else is a plain tar."""
    if head[:2] == b"\x1f\x8b":
        return OCI_LAYER_GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return OCI_LAYER_ZSTD
    return OCI_LAYER_TAR


def synthesize_manifest(config: tuple[Digest, int], layers: list[tuple[Digest, str, int]]) -> bytes:
    """The OCI manifest msb writes for a docker-archive image: sorted keys, compact."""
    doc = {
        "config": {"digest": str(config[0]), "mediaType": OCI_CONFIG, "size": config[1]},
        "layers": [{"digest": str(d), "mediaType": mt, "size": size} for d, mt, size in layers],
        "mediaType": OCI_MANIFEST,
        "schemaVersion": 2,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _parse_config(members: _Members, name: str, data: bytes) -> ImageConfigFile:
    try:
        return ImageConfigFile.model_validate_json(data)
    except ValidationError as err:
        raise ArchiveError(f"{members.path}: config {name!r} is malformed: "
                           f"{err.errors()[0].get('msg', '')}") from None


def _check_layer_count(members: _Members, where: str, layers: int, config: ImageConfigFile) -> None:
    if len(config.rootfs.diff_ids) != layers:
        raise ArchiveError(
            f"{members.path}: {where} lists {layers} layers but its config has "
            f"{len(config.rootfs.diff_ids)} diff_ids"
        )


# docker archives ------------------------------------------------------------------------------


def _docker_images(members: _Members) -> list[ArchiveImage]:
    doc = _json(members, "manifest.json")
    if not isinstance(doc, list) or not doc:
        raise ArchiveError(f"{members.path}: manifest.json is not a non-empty list of images")
    images = []
    for i, entry in enumerate(doc):
        where = f"manifest.json entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or not (
            isinstance(entry.get("Layers"), list)
            and all(isinstance(x, str) for x in entry["Layers"])
        ):
            raise ArchiveError(f"{members.path}: {where} needs a Config string and a Layers list")
        cfg_name = entry["Config"]
        config_bytes = members.read(cfg_name)
        config_digest = Digest.sha256_of(config_bytes)
        claimed = _digest_in_name(cfg_name)
        if claimed is not None and claimed.algorithm == "sha256" and claimed != config_digest:
            raise DigestMismatch(f"{members.path}: config member {cfg_name!r}", str(claimed),
                                 str(config_digest))
        config = _parse_config(members, cfg_name, config_bytes)
        _check_layer_count(members, where, len(entry["Layers"]), config)
        layers: list[ArchiveLayer] = []
        for name, diff_id in zip(entry["Layers"], config.diff_ids, strict=True):
            if not members.exists(name):
                raise ArchiveError(f"{members.path}: layer member {name!r} ({where}) is missing")
            digest, size, head = _hash_member(members, name)
            claimed = _digest_in_name(name)
            if claimed is not None and claimed.algorithm == "sha256" and claimed != digest:
                raise DigestMismatch(f"{members.path}: layer member {name!r}", str(claimed),
                                     str(digest))
            layers.append(ArchiveLayer(digest, media_type_from_magic(head), size, diff_id,
                                       name, members))
        manifest_bytes = synthesize_manifest(
            (config_digest, len(config_bytes)), [(x.digest, x.media_type, x.size) for x in layers]
        )
        tags = entry.get("RepoTags") or []
        images.append(ArchiveImage(
            kind="docker-archive",
            repo_tags=[str(t) for t in tags],
            manifest_digest=Digest.sha256_of(manifest_bytes),
            manifest_bytes=manifest_bytes,
            manifest=ImageManifest.model_validate_json(manifest_bytes),
            config_bytes=config_bytes,
            config=config,
            config_digest=config_digest,
            layers=layers,
            platform=Platform(os=config.os, architecture=config.architecture,
                              variant=config.variant) if config.architecture else None,
        ))
    return images


# OCI layouts ----------------------------------------------------------------------------------


def _blob_name(d: Descriptor) -> str:
    digest = d.parsed_digest
    return f"blobs/{digest.algorithm}/{digest.encoded}"


def _read_blob(members: _Members, d: Descriptor, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    name = _blob_name(d)
    if not members.exists(name):
        raise ArchiveError(f"{members.path}: {what} blob {name!r} is missing")
    data = members.read(name, limit)
    d.parsed_digest.verify_bytes(data, f"{members.path}: {what} member {name!r}")
    if d.size and len(data) != d.size:
        raise ArchiveError(f"{members.path}: {what} member {name!r} is {len(data)} bytes, "
                           f"its descriptor says {d.size}")
    return data


def _kind(data: bytes, d: Descriptor, members: _Members, what: str) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        raise ArchiveError(f"{members.path}: {what} {_blob_name(d)!r} is not valid JSON") from None
    media_type = (doc.get("mediaType") if isinstance(doc, dict) else None) or d.media_type
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        return "index"
    if media_type in MANIFEST_TYPES or (not media_type and "layers" in doc):
        return "manifest"
    raise ArchiveError(f"{members.path}: {what} {_blob_name(d)!r} has unsupported media type "
                       f"{media_type!r}")


def _oci_images(members: _Members, platform: Platform | None) -> list[ArchiveImage]:
    try:
        index = ImageIndex.model_validate(_json(members, "index.json"))
    except ValidationError as err:
        raise ArchiveError(f"{members.path}: index.json is malformed: "
                           f"{err.errors()[0].get('msg', '')}") from None
    target = platform or host_platform()
    images: list[ArchiveImage] = []
    skipped: list[Descriptor] = []
    for entry in index.manifests:
        ref_name = (entry.annotations or {}).get(REF_NAME)
        data = _read_blob(members, entry, "index.json entry")
        kind = _kind(data, entry, members, "index.json entry")
        chosen, desc = entry.platform, entry
        if kind == "index":
            try:
                nested = ImageIndex.model_validate_json(data)
            except ValidationError as err:
                raise ArchiveError(f"{members.path}: image index {_blob_name(entry)!r} is "
                                   f"malformed: {err.errors()[0].get('msg', '')}") from None
            desc = select_manifest(nested.manifests, platform,
                                   source=f"{members.path} ({ref_name or entry.digest})",
                                   error=ArchiveError)
            chosen = desc.platform
            data = _read_blob(members, desc, "platform manifest")
            if _kind(data, desc, members, "platform manifest") != "manifest":
                raise ArchiveError(f"{members.path}: nested image indexes are not supported")
        elif entry.platform is not None and not platform_matches(entry.platform, target):
            skipped.append(entry)
            continue
        images.append(_oci_image(members, desc, data, ref_name, chosen))
    if not images:
        # Reuse the selector's message, which lists what the layout offers.
        select_manifest(skipped, platform, source=f"{members.path}", error=ArchiveError)
        raise ArchiveError(f"{members.path}: index.json lists no images")
    return images


def _oci_image(members: _Members, desc: Descriptor, data: bytes, ref_name: str | None,
               chosen: Platform | None) -> ArchiveImage:
    try:
        manifest = ImageManifest.model_validate_json(data)
    except ValidationError as err:
        raise ArchiveError(f"{members.path}: manifest {_blob_name(desc)!r} is malformed: "
                           f"{err.errors()[0].get('msg', '')}") from None
    where = f"{members.path}: manifest {_blob_name(desc)!r}"
    config_bytes = _read_blob(members, manifest.config, "config")
    config = _parse_config(members, _blob_name(manifest.config), config_bytes)
    _check_layer_count(members, f"manifest {_blob_name(desc)!r}", len(manifest.layers), config)
    layers = []
    for d, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        check_layer_descriptor(d, where)
        name = _blob_name(d)
        if not members.exists(name):
            raise ArchiveError(f"{members.path}: layer blob {name!r} is missing")
        size = members.size(name)
        if d.size and size != d.size:
            raise ArchiveError(f"{members.path}: layer member {name!r} is {size} bytes, its "
                               f"descriptor says {d.size}")
        layers.append(ArchiveLayer(d.parsed_digest, d.media_type, size, diff_id, name, members))
    return ArchiveImage(
        kind="oci-layout",
        repo_tags=[ref_name] if ref_name and not is_bare_tag(ref_name) else [],
        manifest_digest=desc.parsed_digest,
        manifest_bytes=data,
        manifest=manifest,
        config_bytes=config_bytes,
        config=config,
        config_digest=manifest.config.parsed_digest,
        layers=layers,
        platform=chosen,
        layout_tag=ref_name if ref_name and is_bare_tag(ref_name) else None,
    )


__all__ = [
    "ArchiveImage",
    "ArchiveLayer",
    "ArchiveSource",
    "media_type_from_magic",
    "open_archive",
    "synthesize_manifest",
]
