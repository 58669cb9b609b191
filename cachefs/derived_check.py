"""Are an image's derived files the ones its layers need? Cheap checks, one place.

msb's cache-hit rule (FORMATS.md §1.7) only asks whether an fsmeta has the EROFS magic
and a root directory, and whether a VMDK exists. A pull that trusts that reports success
for an fsmeta whose superblock the kernel refuses (bad crc), whose device table no longer
matches the layer files, or a VMDK whose extents name another cache. These checks read
the superblock block and the VMDK descriptor only (no metadata walk: that is
``cachefs verify``), so every pull can afford them; ``stitch_image`` rebuilds what fails
them, and ``verify`` reports the same problems in the same words.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import CachefsError, VmdkError
from .vmdk import parse_descriptor

SECTOR = 512
BLOCK = 4096


def one_line(err: BaseException) -> str:
    return err.one_line() if isinstance(err, CachefsError) else " ".join(str(err).split())


def superblock_problems(path: Path, *, devices: int | None = 0) -> list[str]:
    """What is wrong with an EROFS file short of walking its metadata."""
    from .erofs.reader import ErofsImage, is_valid_erofs

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
    except (CachefsError, OSError) as err:
        problems.append(f"unreadable: {one_line(err)}")
    return problems


def fsmeta_problems(fsmeta: Path, layers: Sequence[Path]) -> list[str]:
    """The fsmeta's superblock, and its device table against ``layers`` as they are now."""
    return superblock_problems(fsmeta, devices=len(layers)) or device_table_problems(
        fsmeta, layers)


def device_table_problems(fsmeta: Path, layers: Sequence[Path]) -> list[str]:
    """The fsmeta's device slots against the layer files as they are now (§4.3)."""
    from .erofs.reader import ErofsImage

    try:
        with ErofsImage.open(fsmeta) as image:
            slots = list(image.devices)
            own = image.file_size // BLOCK
    except (CachefsError, OSError) as err:
        return [f"unreadable: {one_line(err)}"]
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


def vmdk_problems(vmdk: Path, files: Sequence[Path], base: Path | None = None) -> list[str]:
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
        return [one_line(err)]
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
