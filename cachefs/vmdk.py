"""VMDK "twoGbMaxExtentFlat" text descriptors (FORMATS.md §5).

msb's descriptor lists the fsmeta and then every layer image, bottom first, as flat
extents, so one virtual disk is the concatenation the fsmeta's device table expects.
``render_descriptor`` reproduces msb's text exactly (absolute, ``realpath``-ed paths);
with ``relative_to`` it writes paths relative to the descriptor's directory instead,
which QEMU resolves against the descriptor's location, so the view's ``disk.vmdk``
survives a moved cache. ``parse_descriptor`` reads both back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import VmdkError

SECTOR = 512
MAX_EXTENT_SECTORS = 4_194_304  # 2 GiB per extent line
_HEADS = 16
_SECTORS_PER_TRACK = 63

_HEADER = (
    "# Disk DescriptorFile\n"
    "version=1\n"
    "CID=fffffffe\n"
    "parentCID=ffffffff\n"
    'createType="twoGbMaxExtentFlat"\n'
    "\n"
    "# Extent description\n"
)
_DDB = (
    "\n"
    "# The Disk Data Base\n"
    "#DDB\n"
    'ddb.virtualHWVersion = "4"\n'
    'ddb.geometry.cylinders = "{cylinders}"\n'
    'ddb.geometry.heads = "16"\n'
    'ddb.geometry.sectors = "63"\n'
    'ddb.adapterType = "ide"\n'
)
_EXTENT_RE = re.compile(r'(RW|RDONLY|NOACCESS) (\d+) FLAT "([^"]*)" (\d+)')


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent line: ``sectors`` of file ``path`` starting at sector ``offset`` in it."""

    path: str
    sectors: int
    offset: int


def extents_for(files: Sequence[tuple[str, int]]) -> list[Extent]:
    """(path, byte size) → extent lines, splitting files above 2 GiB (§5)."""
    out: list[Extent] = []
    for path, size in files:
        if size <= 0 or size % SECTOR:
            raise VmdkError(f"VMDK extent {path!r}: size {size} is not a positive multiple of 512")
        if '"' in path or "\n" in path:
            raise VmdkError(f"VMDK extent path {path!r} contains a quote or newline")
        sectors = size // SECTOR
        for start in range(0, sectors, MAX_EXTENT_SECTORS):
            out.append(Extent(path, min(MAX_EXTENT_SECTORS, sectors - start), start))
    return out


def render_descriptor(
    files: Sequence[tuple[str, int]], *, relative_to: Path | None = None
) -> str:
    """The descriptor text for ``files`` (path, byte size), in disk order.

    Paths are written as given (msb passes realpaths of cache files). With
    ``relative_to``, each path is rewritten relative to that directory (the directory the
    descriptor will live in), e.g. ``fsmeta.erofs`` or ``layers/00-sha256_….erofs``.
    """
    if not files:
        raise VmdkError("a VMDK descriptor needs at least one extent")
    if relative_to is not None:
        files = [(os.path.relpath(p, relative_to), s) for p, s in files]
    extents = extents_for(files)
    total = sum(e.sectors for e in extents)
    cylinders = -(-total // (_HEADS * _SECTORS_PER_TRACK))
    lines = "".join(f'RW {e.sectors} FLAT "{e.path}" {e.offset}\n' for e in extents)
    return _HEADER + lines + _DDB.format(cylinders=cylinders)


def descriptor_for_paths(paths: Sequence[Path], *, relative_to: Path | None = None) -> str:
    """Render for existing files: sizes from ``stat``; absolute paths are ``realpath``-ed
    exactly as msb does unless ``relative_to`` is given."""
    files = []
    for p in paths:
        size = os.stat(p).st_size
        name = os.path.realpath(p) if relative_to is None else str(p)
        files.append((name, size))
    return render_descriptor(files, relative_to=relative_to)


def parse_descriptor(text: str) -> list[Extent]:
    """Extents of a flat descriptor, in order. Rejects anything that is not one.

    Accepts ``RW``/``RDONLY`` FLAT lines (``NOACCESS`` lines are skipped as QEMU does);
    comments, blank lines and ``key=value`` lines are allowed; other lines are an error.
    """
    if not text.startswith("# Disk DescriptorFile"):
        raise VmdkError("not a VMDK descriptor: missing '# Disk DescriptorFile' header")
    extents: list[Extent] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.fullmatch(line)
        if m:
            if m.group(1) != "NOACCESS":
                extents.append(Extent(m.group(3), int(m.group(2)), int(m.group(4))))
            continue
        if line.startswith(("RW ", "RDONLY ", "NOACCESS ")):
            raise VmdkError(f"VMDK descriptor line {lineno}: unsupported extent {line!r}")
        if "=" not in line:
            raise VmdkError(f"VMDK descriptor line {lineno}: unexpected {line!r}")
    if not extents:
        raise VmdkError("VMDK descriptor lists no extents")
    return extents
