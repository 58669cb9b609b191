"""The catalogue: which images this cache holds, from every source, in one place.

A cache names its images in three places, and a deleter that misses one deletes files
another tool still needs:

* cachefs's own reference records (``cachefs/refs/*.json``);
* msb's database (``<root>/db/msb.db``, read-only, FORMATS.md §6), which is the only
  place msb remembers which reference a ``manifests/<key>.json`` belongs to;
* every ``manifests/*.json`` on disk, even ones no record names (their layers are in use
  by *someone*; we just cannot say who).

The view (``cache.index``), ``cachefs images``/``inspect``/``df``/``verify`` and
``rm``/``gc`` all read this one merge. Two ways to read it:

* tolerant (``problems`` given): the view polls every half second and must not fail
  because msb is mid-migration; what cannot be read becomes a problem line (with
  ``db_required``, the view once it shows a state, an unreadable database still raises
  ``MsbDbUnreadable``: read as empty it would hide msb's images from a booting guest);
* strict (deleters): a source that exists but cannot be read — ``manifests/`` itself, a
  metadata file or record, the database, a database reference that does not parse — raises
  ``CacheUnreadable``/``CacheCorrupt``: reading it as "no image" would free its layers.

Otherwise (commands that only list) an unreadable database is still an error (it is
msb's list of images; silently leaving it out would list too little), while a corrupt
file is an image that is not ready.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import Digest
from ..errors import CacheCorrupt, CachefsError, CacheUnreadable, InvalidReference, NotCachedError
from ..models import CachedImageMetadata
from ..reference import Reference
from .msb_index import SOURCE_MSB_DB, default_msb_db, read_msb_db
from .store import GlobalCache, read_metadata_file

log = logging.getLogger(__name__)

SOURCE_CACHEFS = "cachefs"
SOURCE_JSON = "manifest-json"
_DB_TIMEOUT_S = 10.0  # a command may wait out a busy msb; the polling view does not
_VIEW_DB_TIMEOUT_S = 0.5


@dataclass(slots=True)
class ImageInfo:
    """One cached image as every source sees it; ``key`` names ``manifests/<key>.json``."""

    key: str
    reference: str | None = None  # normalised; None when only an anonymous json exists
    typed: str | None = None
    manifest_digest: str | None = None
    metadata: CachedImageMetadata | None = None
    sources: list[str] = field(default_factory=list)
    db_diff_ids: tuple[str, ...] = ()
    record_source: str | None = None  # "pull" | "load": how cachefs recorded it
    parsed: Reference | None = None

    @property
    def name(self) -> str:
        return self.reference or f"<unnamed {self.key[:12]}>"

    @property
    def source_names(self) -> list[str]:
        """The sources in the words every listing uses (``images --json``, the view's
        status.json and image.json): how cachefs recorded the image (``cachefs-pull`` or
        ``cachefs-load``), ``msb-db``, ``manifest-json``."""
        return sorted({
            f"{SOURCE_CACHEFS}-{self.record_source}"
            if source == SOURCE_CACHEFS and self.record_source else source
            for source in self.sources
        })

    @property
    def diff_ids(self) -> list[str]:
        if self.metadata is not None:
            return [layer.diff_id for layer in self.metadata.layers]
        return list(self.db_diff_ids)

    @property
    def digest(self) -> str | None:
        if self.metadata is not None:
            return self.metadata.manifest_digest
        return self.manifest_digest


def _note(problems: list[str] | None, text: str) -> None:
    log.warning("%s", text)
    if problems is not None:
        problems.append(text)


def _valid_digest(text: str | None, problems: list[str] | None, what: str) -> str | None:
    if text is None:
        return None
    try:
        return str(Digest.parse(text))
    except CachefsError:
        _note(problems, f"ignoring malformed digest {text!r} ({what})")
        return None


def list_images(
    cache: GlobalCache,
    msb_db: Path | None = None,
    *,
    strict: bool = False,
    problems: list[str] | None = None,
    db_required: bool = False,
) -> list[ImageInfo]:
    """Every image of the cache from all three sources, merged by cache key.

    ``strict`` (deleters): a source that cannot be read raises instead of reading as "no
    image". ``problems`` (the view): an unreadable database is noted there and read as
    empty, unless ``db_required`` (then it raises ``MsbDbUnreadable``, waiting no longer
    than the view's short timeout). Unparsable references are noted (and logged) in every
    mode; in strict mode one in msb's database raises, since the layers of its row would
    otherwise count as unused.
    """
    by_key: dict[str, ImageInfo] = {}

    def entry(key: str) -> ImageInfo:
        return by_key.setdefault(key, ImageInfo(key=key))

    for rec in cache.ref_records(strict=strict):
        try:
            ref = Reference.parse(rec.reference)
        except InvalidReference as err:
            _note(problems, f"ignoring unparsable reference {rec.reference!r} (cachefs record): "
                            f"{err.one_line()}")
            continue
        info = entry(ref.cache_key)
        if info.reference is None:
            info.reference, info.typed, info.parsed = str(ref), rec.typed, ref
            info.manifest_digest = _valid_digest(rec.manifest_digest, problems, str(ref))
            info.record_source = rec.source
        info.sources.append(SOURCE_CACHEFS)
    db = msb_db if msb_db is not None else default_msb_db(cache)
    tolerant = problems is not None and not strict
    for row in read_msb_db(db, problems, strict=not tolerant or db_required,
                           timeout=_VIEW_DB_TIMEOUT_S if tolerant else _DB_TIMEOUT_S):
        try:
            ref = Reference.parse(row.typed)
        except InvalidReference as err:
            text = (f"msb database {db} names an unparsable reference {row.typed!r}: "
                    f"{err.one_line()}")
            if strict and row.layers:
                raise CacheCorrupt(text + "; cannot tell which layers it uses") from None
            _note(problems, "ignoring " + text)
            continue
        info = entry(ref.cache_key)
        if info.reference is None:
            info.reference, info.parsed = str(ref), ref
        info.typed = info.typed or row.typed
        info.manifest_digest = info.manifest_digest or _valid_digest(
            row.manifest_digest, problems, str(ref))
        info.db_diff_ids = tuple(d for d in row.layers
                                 if _valid_digest(d, problems, str(ref)) is not None)
        info.sources.append(SOURCE_MSB_DB)
    for path in _manifest_jsons(cache, strict=strict):
        entry(path.stem).sources.append(SOURCE_JSON)
    for info in by_key.values():
        info.metadata = read_metadata_file(metadata_path(cache, info), strict=strict)
    return sorted(by_key.values(), key=lambda i: (i.reference is None, i.name))


def metadata_path(cache: GlobalCache, info: ImageInfo) -> Path:
    return cache.manifests_dir() / f"{info.key}.json"


def _manifest_jsons(cache: GlobalCache, *, strict: bool = False) -> list[Path]:
    directory = cache.manifests_dir()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as err:
        if strict:
            raise CacheUnreadable(directory, err) from None
        log.warning("cannot list %s: %s", directory, err)
        return []
    return sorted(directory / n for n in names if n.endswith(".json") and len(n) == 64 + 5)


def find_image(images: Iterable[ImageInfo], text: str) -> ImageInfo:
    """The image a user named: a reference (normalised like msb), ``REPO@sha256:…`` of
    an image cached under a tag of that repository, a manifest digest (``sha256:…``,
    unique prefix allowed) or a cache key."""
    images = list(images)
    try:
        ref: Reference | None = Reference.parse(text)
    except InvalidReference:
        if not (text.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{64}", text)):
            raise
        ref = None
    key = ref.cache_key if ref is not None else None
    for info in images:
        if info.key in (key, text):
            return info
    if ref is not None and ref.digest is not None:  # as docker/skopeo print it: REPO@digest
        for info in images:
            if info.digest == str(ref.digest) and _repository(info.reference) == ref.name:
                return info
    if text.startswith("sha256:"):
        hits = [i for i in images if i.digest and i.digest.startswith(text)]
        if len({i.digest for i in hits}) == 1:
            return hits[0]
    raise NotCachedError(f"image {text!r} is not in the cache",
                         hint="see `cachefs images`")


def _repository(reference: str | None) -> str | None:
    try:
        return Reference.parse(reference).name if reference else None
    except InvalidReference:
        return None


@dataclass(slots=True)
class References:
    """What the remaining images use: layer diff_ids and manifest digests (as strings)."""

    layers: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)

    def add(self, info: ImageInfo) -> None:
        self.layers.update(info.diff_ids)
        if info.digest:
            self.manifests.add(info.digest)
        if info.manifest_digest:
            self.manifests.add(info.manifest_digest)
        self.layers.update(info.db_diff_ids)


def referenced(
    cache: GlobalCache, msb_db: Path | None = None, *, excluding: Iterable[str] = ()
) -> References:
    """Layers and manifests used by every image except those whose key is in ``excluding``.

    Read strictly: this answers deleters, so a source that cannot be read stops them.

    Includes the msb database's layer lists as well as the json's, because the two can
    disagree while msb is mid-publication.
    """
    skip = set(excluding)
    refs = References()
    for info in list_images(cache, msb_db, strict=True):
        if info.key not in skip:
            refs.add(info)
    return refs


__all__ = [
    "SOURCE_CACHEFS",
    "SOURCE_JSON",
    "SOURCE_MSB_DB",
    "ImageInfo",
    "References",
    "default_msb_db",
    "find_image",
    "list_images",
    "metadata_path",
    "referenced",
]
