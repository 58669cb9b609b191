"""The in-memory file tree shared by tar ingest, the EROFS writers, the reader and the merge.

A tree is made of ``Node`` objects. A hardlink group is *one* ``Node`` object reachable
under several names: the writers detect groups by object identity, so nlink and NID
sharing come for free and never need a side table. Names are raw ``bytes`` (tar and
EROFS names need not be UTF-8).

Regular-file contents never live in a ``Node``: ``content`` says where the bytes are
(``SpoolExtent`` while a layer is being built from a tar, ``LayerBlocks`` once they sit
in a layer EROFS that an fsmeta image points into).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum


class FileType(IntEnum):
    """EROFS dirent file types (FORMATS.md §3.8)."""

    REG = 1
    DIR = 2
    CHR = 3
    BLK = 4
    FIFO = 5
    SOCK = 6
    SYMLINK = 7

    @property
    def s_ifmt(self) -> int:
        return _S_IFMT[self]

    @classmethod
    def from_mode(cls, mode: int) -> FileType:
        fmt = stat.S_IFMT(mode)
        for ft, bits in _S_IFMT.items():
            if bits == fmt:
                return ft
        raise ValueError(f"unknown file type in mode {mode:#o}")


_S_IFMT: dict[FileType, int] = {
    FileType.REG: stat.S_IFREG,
    FileType.DIR: stat.S_IFDIR,
    FileType.CHR: stat.S_IFCHR,
    FileType.BLK: stat.S_IFBLK,
    FileType.FIFO: stat.S_IFIFO,
    FileType.SOCK: stat.S_IFSOCK,
    FileType.SYMLINK: stat.S_IFLNK,
}

OPAQUE_XATTR = (b"trusted.overlay.opaque", b"y")
NULL_BLOCK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SpoolExtent:
    """File bytes at ``offset`` in the layer's spool file (length = ``Node.size``)."""

    offset: int


@dataclass(frozen=True, slots=True)
class LayerBlocks:
    """File bytes in a layer EROFS: device ``device_id`` (1 = bottom layer), contiguous
    blocks from ``start_block`` (layer-local). ``start_block == NULL_BLOCK`` for empty files."""

    device_id: int
    start_block: int


Content = SpoolExtent | LayerBlocks


@dataclass(eq=False, slots=True)
class Node:
    """One inode. Identity matters: the same object under two names is a hardlink."""

    type: FileType
    mode: int = 0o755  # permission bits only (& 0o7777); the type lives in ``type``
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)  # (full name, value), in order
    children: dict[bytes, Node] | None = None  # directories only
    target: bytes = b""  # symlinks only
    rdev_major: int = 0
    rdev_minor: int = 0
    size: int = 0  # regular files only
    content: Content | None = None  # regular files only
    block: int | None = None  # start block in the layer EROFS this node was written to / read from

    @classmethod
    def directory(cls, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
        return cls(FileType.DIR, mode, uid, gid, mtime, children={})

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIR

    @property
    def is_whiteout(self) -> bool:
        """overlayfs whiteout: a character device 0:0 (FORMATS.md §3.12)."""
        return self.type is FileType.CHR and self.rdev_major == 0 and self.rdev_minor == 0

    @property
    def is_opaque(self) -> bool:
        return self.is_dir and OPAQUE_XATTR in self.xattrs

    @property
    def full_mode(self) -> int:
        return self.type.s_ifmt | (self.mode & 0o7777)

    def child(self, name: bytes) -> Node | None:
        return self.children.get(name) if self.children is not None else None


def walk(root: Node, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Pre-order walk in EROFS order (children by raw byte order); paths relative, '/'-joined.

    The root itself is yielded with path ``b""``.
    """
    stack: list[tuple[bytes, Node]] = [(prefix, root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if node.children:
            for name in sorted(node.children, reverse=True):
                stack.append((path + b"/" + name if path else name, node.children[name]))


@dataclass(frozen=True, slots=True)
class BlockMap:
    """Where each regular file of a layer EROFS lives: path → (start block, size).

    ``total_blocks`` is the layer file size / 4096, which fsmeta's device table needs.
    """

    total_blocks: int
    files: dict[bytes, tuple[int, int]]
