"""``verify`` and ``verify --repair``: structural checks of every artifact of an image.

msb's own cache-hit rule (FORMATS.md §1.7) is deliberately shallow: it ignores the
superblock crc, never compares an fsmeta's device table with the layers it points into,
and accepts any VMDK that exists. Each of those passes msb and still fails in a guest
(the kernel refuses a bad crc; a stale device table or VMDK extent reads the wrong
blocks). So verify checks, without a kernel:

* metadata: the json parses as msb would read it;
* each layer: §1.7 validity, the reader opens it, crc matches, no device table, and
  every inode and directory block parses (a full metadata walk);
* the fsmeta: the same, plus one device slot per layer whose ``blocks`` equals the
  layer file's current size / 4096 and whose ``mapped_blkaddr`` is cumulative from the
  fsmeta's own block count (§4.3);
* the VMDK: extents are fsmeta then the layers in order, each names the file the cache
  holds now (a moved cache leaves stale absolute paths, §5), covers the whole file, and
  exists with that size.

fsmeta and VMDK are derived from the layers alone (§4.7), so their problems are
repairable when every layer is sound; layer and metadata problems need the source again.
The checks themselves are ``cache.health``'s (``deep``): the view, ``images`` and
``status`` run the cheap half of the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.catalog import ImageInfo, find_image, list_images
from ..cache.health import info_problems
from ..cache.msb_index import default_msb_db
from ..cache.store import GlobalCache


@dataclass(frozen=True, slots=True)
class Problem:
    artifact: str  # "metadata", "layer sha256:…", "fsmeta", "vmdk"
    path: Path | None
    message: str
    repairable: bool

    def to_json(self) -> dict[str, object]:
        return {
            "artifact": self.artifact,
            "path": None if self.path is None else str(self.path),
            "message": self.message,
            "repairable": self.repairable,
        }


@dataclass(slots=True)
class ImageCheck:
    name: str
    manifest_digest: str | None
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.name,
            "manifest_digest": self.manifest_digest,
            "ok": self.ok,
            "repaired": self.repaired,
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass(slots=True)
class VerifyReport:
    images: list[ImageCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.images)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "images": [i.to_json() for i in self.images]}


def check_image(cache: GlobalCache, info: ImageInfo) -> ImageCheck:
    """``cache.health``'s checks of one image, with every EROFS walked in full."""
    check = ImageCheck(info.name, info.digest)
    check.problems = [Problem(p.label, p.path, p.message, p.repairable)
                      for p in info_problems(cache, info, deep=True)]
    return check


def verify(
    cache: GlobalCache,
    name: str | None = None,
    *,
    repair: bool = False,
    msb_db: Path | None = None,
    on_image: Callable[[ImageCheck], None] | None = None,
) -> VerifyReport:
    """Check one image (``name``) or every image; with ``repair``, rebuild what can be.

    A repaired image is checked again; its report then shows what is still wrong, so an
    exit status derived from ``report.ok`` means "sound now".
    """
    images = list_images(cache, msb_db if msb_db is not None else default_msb_db(cache))
    if name is not None:
        images = [find_image(images, name)]
    report = VerifyReport()
    for info in images:
        check = check_image(cache, info)
        if repair and check.problems and all(p.repairable for p in check.problems):
            rebuild_derived(cache, info)
            check = check_image(cache, info)
            check.repaired = True
        report.images.append(check)
        if on_image is not None:
            on_image(check)
    return report


def rebuild_derived(cache: GlobalCache, info: ImageInfo) -> None:
    """Stitch an image's fsmeta and VMDK again from its layers (§4.7), by replacement.

    Each new file is renamed over the bad one, so there is never a moment without an
    fsmeta, and a reader (a VMM holding ``rootfs.img`` open, with its shared lease) keeps
    the inode it opened: no exclusive lease is needed, and a repair works while the image
    is in use. The bad files' bytes are never read (``force``).
    """
    from ..pipeline.materialize import stitch_image

    assert info.metadata is not None and info.digest is not None
    stitch_image(cache, info.metadata.manifest, info.metadata.diff_ids, force=True)


__all__ = [
    "ImageCheck",
    "Problem",
    "VerifyReport",
    "check_image",
    "rebuild_derived",
    "verify",
]
