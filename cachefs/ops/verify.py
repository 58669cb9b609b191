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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.locks import FileLock, hold_leases
from ..cache.store import GlobalCache
from ..errors import CachefsError
from ..vmdk import VmdkError, parse_descriptor
from . import ImageInfo, default_msb_db, find_image, list_images

SECTOR = 512
BLOCK = 4096


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
            "image": self.name,
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


# ---------------------------------------------------------------------------------------
# artifact checks
# ---------------------------------------------------------------------------------------


def check_erofs(path: Path, *, devices: int | None = 0) -> list[str]:
    """Problems of one EROFS file; ``devices``: how many device slots it must have."""
    from ..erofs.reader import ErofsImage, is_valid_erofs

    if not path.exists():
        return ["missing"]
    if not is_valid_erofs(path):
        return ["not a valid EROFS image (msb would rebuild it)"]
    problems: list[str] = []
    try:
        with ErofsImage.open(path) as image:
            if not image.crc_ok:
                problems.append("superblock checksum mismatch (the kernel refuses to mount it)")
            if devices is not None and len(image.devices) != devices:
                problems.append(f"device table has {len(image.devices)} slots, expected {devices}")
            if image.superblock.blocks * BLOCK > image.file_size:
                problems.append(
                    f"superblock claims {image.superblock.blocks} blocks, file has "
                    f"{image.file_size // BLOCK}"
                )
            for _ in image.walk():
                pass
    except (CachefsError, OSError) as err:
        problems.append(f"unreadable: {_one_line(err)}")
    return problems


def _one_line(err: BaseException) -> str:
    return err.one_line() if isinstance(err, CachefsError) else " ".join(str(err).split())


def check_device_table(fsmeta: Path, layers: list[Path]) -> list[str]:
    """The fsmeta's device slots against the layer files as they are now (§4.3)."""
    from ..erofs.reader import ErofsImage

    try:
        with ErofsImage.open(fsmeta) as image:
            slots = list(image.devices)
            own = image.file_size // BLOCK
    except (CachefsError, OSError) as err:
        return [f"unreadable: {_one_line(err)}"]
    problems = []
    mapped = own
    for i, (slot, layer) in enumerate(zip(slots, layers, strict=False), start=1):
        try:
            blocks = layer.stat().st_size // BLOCK
        except FileNotFoundError:
            continue  # reported with the layer
        if slot.blocks != blocks:
            problems.append(f"device {i} has {slot.blocks} blocks but layer {layer.name} "
                            f"has {blocks}")
        if slot.mapped_blkaddr != mapped:
            problems.append(f"device {i} mapped_blkaddr {slot.mapped_blkaddr}, expected {mapped}")
        mapped += blocks
    return problems


def check_vmdk(vmdk: Path, files: list[Path], base: Path | None = None) -> list[str]:
    """The VMDK's extents must be exactly ``files`` in order, each whole, as they are now.

    Relative extent paths resolve against ``base`` (default: the VMDK's directory), as
    QEMU resolves them.
    """
    try:
        text = vmdk.read_text(errors="replace")
    except FileNotFoundError:
        return ["missing"]
    except OSError as err:
        return [f"unreadable: {err}"]
    try:
        extents = parse_descriptor(text)
    except VmdkError as err:
        return [_one_line(err)]
    base = vmdk.parent if base is None else base
    problems: list[str] = []
    # Group consecutive extents of one file (the 2 GiB split, §5).
    groups: list[tuple[str, int, list[tuple[int, int]]]] = []
    for extent in extents:
        path, sectors, offset = extent.path, extent.sectors, extent.offset
        if groups and groups[-1][0] == path:
            groups[-1][2].append((sectors, offset))
        else:
            groups.append((path, len(groups), [(sectors, offset)]))
    if len(groups) != len(files):
        problems.append(f"{len(groups)} extent files, expected {len(files)} "
                        "(fsmeta, then each layer)")
    for (path, i, parts), want in zip(groups, files, strict=False):
        target = Path(path) if os.path.isabs(path) else base / path
        if os.path.realpath(target) != os.path.realpath(want):
            problems.append(f"extent {i} names {path}, expected {want}")
            continue
        try:
            size = want.stat().st_size
        except FileNotFoundError:
            problems.append(f"extent {i} file {want} is missing")
            continue
        expect_offset = 0
        for sectors, offset in parts:
            if offset != expect_offset:
                problems.append(f"extent {i} offset {offset}, expected {expect_offset}")
            expect_offset += sectors
        if expect_offset * SECTOR != size:
            problems.append(
                f"extent {i} covers {expect_offset * SECTOR} bytes but {want.name} has {size}"
            )
    return problems


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------


def check_image(cache: GlobalCache, info: ImageInfo) -> ImageCheck:
    check = ImageCheck(info.name, info.digest)
    if info.metadata is None:
        check.problems.append(Problem(
            "metadata", cache.manifests_dir() / f"{info.key}.json",
            "image metadata is missing or does not parse as msb reads it", False))
    layer_paths = [cache.layer_erofs_path(d) for d in info.diff_ids]
    for diff_id, path in zip(info.diff_ids, layer_paths, strict=True):
        problems = check_erofs(path, devices=0)
        for text in problems:
            check.problems.append(Problem(f"layer {diff_id}", path, text, False))
    layers_ok = check.ok
    if info.digest is None:
        return check
    fsmeta, vmdk = cache.fsmeta_erofs_path(info.digest), cache.vmdk_path(info.digest)
    problems = check_erofs(fsmeta, devices=len(layer_paths))
    if not problems:
        problems = check_device_table(fsmeta, layer_paths)
    for text in problems:
        check.problems.append(Problem("fsmeta", fsmeta, text, layers_ok))
    for text in check_vmdk(vmdk, [fsmeta, *layer_paths]):
        check.problems.append(Problem("vmdk", vmdk, text, layers_ok))
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
    """Delete an image's fsmeta and VMDK and stitch them again from its layers (§4.7).

    The bad files are removed under the fsmeta lock and exclusive leases (nobody may be
    reading them: ``LockBusy`` otherwise), then ``materialize.stitch_image`` rebuilds and
    publishes both exactly as a pull would.
    """
    from ..materialize import stitch_image

    assert info.metadata is not None and info.digest is not None
    fsmeta, vmdk = cache.fsmeta_erofs_path(info.digest), cache.vmdk_path(info.digest)
    with hold_leases([fsmeta, vmdk], exclusive=True), \
            FileLock(cache.fsmeta_erofs_lock_path(info.digest)):
        for path in (vmdk, fsmeta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    stitch_image(cache, info.metadata.manifest, info.metadata.diff_ids)


__all__ = [
    "ImageCheck",
    "Problem",
    "VerifyReport",
    "check_device_table",
    "check_erofs",
    "check_image",
    "check_vmdk",
    "rebuild_derived",
    "verify",
]
