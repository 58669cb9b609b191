"""Tree → EROFS: the one layout engine behind layer images and the fsmeta image.

msb's layout rules (FORMATS.md §3) are reproduced exactly so that our images are byte
identical to msb's: NIDs in pre-order by raw name bytes, 32-byte slots that may straddle
blocks, data blocks allocated in the same walk, directory blocks with "." and ".." sorted
among the other names, inline tails only for directories and symlinks.

Writing is two-phase so it can stream: ``plan_layout`` decides every NID, layout and block
from metadata alone (memory grows with the number of inodes, never with file sizes); the
writer then emits block 0, the metadata area and the data area strictly in order.

The same engine serves fsmeta (§4) with ``chunked=True``: regular files become
CHUNK_BASED inodes whose chunk indexes point into the layer images, and the metadata
area starts after the device table (``meta_blkaddr`` > 1 for many layers).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add
from typing import BinaryIO

from ..errors import LayerFormatError
from . import format as F
from .tree import NULL_BLOCK, BlockMap, FileType, LayerBlocks, Node, SpoolExtent, walk

_MAX_NAME = 255
_COPY_CHUNK = 1 << 20
# Runs shorter than this are gathered from a map of the spool into vectored writes
# (_Sink.copy_ahead), one map of at most _GATHER_WINDOW bytes of the spool at a time:
# one system call per run of files adjacent in the image instead of one per file.
_GATHER_RUN_BELOW = 256 << 10
_GATHER_WINDOW = 8 << 20
_GATHER_IOVECS = 1024  # Linux's IOV_MAX
_ZERO_BLOCK = bytes(F.BLOCK_SIZE)


@dataclass(slots=True)
class PlannedInode:
    """Everything the writer needs about one inode, decided before any byte is written."""

    node: Node
    path: bytes  # first name in the walk (for error messages and block maps)
    nid: int
    offset: int  # absolute byte offset of the inode in the image
    layout: int  # F.LAYOUT_*
    size: int  # i_size
    ibody: bytes  # inline xattr body (b"" when none)
    nlink: int
    data_blocks: int = 0  # blocks this inode owns in the data area
    rel_block: int | None = None  # first data block relative to the data area start
    tail_len: int = 0  # bytes inlined after the ibody (dirs/symlinks only)
    chunk_pad: int = 0  # bytes between ibody and chunk array (fsmeta, ibody % 8 == 4)
    chunks: int = 0  # chunk index entries (fsmeta regular files)
    parent_nid: int = 0  # directories only: NID of ".."
    dir_blocks: list[list[bytes]] | None = None  # directories: names per dirent block


@dataclass(slots=True)
class Plan:
    """The complete layout of an image except the bytes of file data."""

    inodes: list[PlannedInode]  # in NID (= allocation) order, one per distinct inode
    by_node: dict[Node, PlannedInode]  # node (hashed by identity) → planned inode
    meta_blkaddr: int
    meta_end: int  # absolute byte offset just after the last inode slot
    data_start: int  # D: first block of the data area
    data_blocks: int  # blocks in the data area
    chunked: bool

    @property
    def total_blocks(self) -> int:
        return self.data_start + self.data_blocks

    def abs_block(self, inode: PlannedInode) -> int:
        """Absolute start block of an inode's data, or NULL_BLOCK when it owns none."""
        if inode.rel_block is None:
            return NULL_BLOCK
        return self.data_start + inode.rel_block


def _ibody(node: Node, path: bytes) -> bytes:
    """Inline xattr body (§3.10): header + entries in stored order, each padded to 4."""
    if not node.xattrs:
        return b""
    out = bytearray(F.XATTR_IBODY_HEADER.pack(0, 0, bytes(7)))
    for name, value in node.xattrs:
        prefix = next(
            (p for p in F.WRITABLE_XATTR_PREFIXES if name.startswith(p) and name != p), None
        )
        if prefix is None:
            raise LayerFormatError(
                f"xattr {name!r} has no storable prefix (user., trusted., security.)",
                entry=path.decode(errors="replace"),
            )
        index, suffix = F.WRITABLE_XATTR_PREFIXES[prefix], name[len(prefix):]
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise LayerFormatError(
                f"xattr {name!r} is too large for EROFS", entry=path.decode(errors="replace")
            )
        entry = F.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += entry + bytes(-len(entry) % 4)
    return bytes(out)


def pack_dirent_names(names: list[bytes]) -> list[list[bytes]]:
    """Split sorted names into dirent blocks greedily: ``12*(k+1) + Σlen <= 4096`` (§3.8)."""
    if F.DIRENT_SIZE * len(names) + sum(map(len, names)) <= F.BLOCK_SIZE:
        return [names]  # most directories: one block, no loop over the names
    # ends[i]: bytes names[:i] take in one block (12 + len each); a block starting at name
    # a takes names up to the last b with ends[b] - ends[a] <= 4096 (at least one name).
    # Found by bisection: one step per block, not per name (a flat directory of 1,000
    # files is 3 blocks).
    ends = list(accumulate(map(add, map(len, names), repeat(F.DIRENT_SIZE)), initial=0))
    blocks: list[list[bytes]] = []
    a, count = 0, len(names)
    while a < count:
        b = max(bisect_right(ends, ends[a] + F.BLOCK_SIZE, a) - 1, a + 1)
        blocks.append(names[a:b])
        a = b
    return blocks


def _dir_block_len(names: list[bytes]) -> int:
    return F.DIRENT_SIZE * len(names) + sum(map(len, names))


def _reject_names(sep: bytes, names: list[bytes]) -> None:
    for name in names:
        if len(name) > _MAX_NAME or not name or b"/" in name or name in (b".", b".."):
            raise LayerFormatError(
                "invalid file name (1..255 bytes, no '/', not '.'/'..')",
                entry=(sep + name).decode(errors="replace"),
            )
    raise AssertionError("called for a directory whose names are all valid")


def _queue_children(stack: list[tuple[bytes, Node, Node | None]], path: bytes, node: Node,
                    kids: dict[bytes, Node]) -> list[bytes]:
    """Check a directory's names and push its children for the pre-order walk (first name
    on top); returns the names, sorted."""
    kid_names = sorted(kids)
    sep = path + b"/" if path else b""
    # One check per directory, not per name (plan_layout runs once per inode, twice per
    # pull): sorted, an empty name comes first; no name holds the separator.
    if (not kid_names[0] or b"." in kids or b".." in kids
            or len(max(kid_names, key=len)) > _MAX_NAME
            or b"/" in b"\0".join(kid_names)):
        _reject_names(sep, kid_names)
    stack += [(sep + name, kids[name], node) for name in reversed(kid_names)]
    return kid_names


def _directory_shape(kid_names: list[bytes]) -> tuple[list[list[bytes]], int]:
    """A directory's (packed dirent blocks, size)."""
    # "." and ".." sort first unless a name starts with a byte below "." (rare): then sort
    if not kid_names or kid_names[0] > b"..":
        entries = [b".", b"..", *kid_names]
    else:
        entries = sorted([b".", b"..", *kid_names])
    dir_blocks = pack_dirent_names(entries)
    size = (len(dir_blocks) - 1) * F.BLOCK_SIZE + _dir_block_len(dir_blocks[-1])
    return dir_blocks, size


def plan_layout(root: Node, *, meta_blkaddr: int = 1, chunked: bool = False) -> Plan:
    """Assign NIDs, layouts and data blocks for ``root`` (FORMATS.md §3.5–§3.8, §4.4).

    ``chunked`` selects the fsmeta flavour: regular files are CHUNK_BASED and own no
    data blocks here (their chunk indexes point into the layer devices).
    """
    if not root.is_dir:
        raise LayerFormatError("the root of an EROFS image must be a directory")
    meta_start = meta_blkaddr * F.BLOCK_SIZE
    cursor = meta_start
    next_block = 0
    inodes: list[PlannedInode] = []
    by_node: dict[Node, PlannedInode] = {}
    # Pre-order walk that remembers each directory's parent for "..".
    stack: list[tuple[bytes, Node, Node | None]] = [(b"", root, None)]
    DIR, REG, SYMLINK = FileType.DIR, FileType.REG, FileType.SYMLINK  # locals: hot loop
    BLOCK, SLOT, CHUNK_INDEX_SIZE = F.BLOCK_SIZE, F.SLOT_SIZE, F.CHUNK_INDEX_SIZE
    FLAT_PLAIN, FLAT_INLINE = F.LAYOUT_FLAT_PLAIN, F.LAYOUT_FLAT_INLINE
    CHUNK_BASED = F.LAYOUT_CHUNK_BASED
    pop = stack.pop
    while stack:
        path, node, parent = pop()
        ntype = node.type
        is_dir = ntype is DIR
        seen = by_node.get(node)
        if seen is not None:
            if is_dir:
                raise LayerFormatError(
                    "a directory appears under two names (directories cannot be hardlinked)",
                    entry=path.decode(errors="replace"),
                )
            # a later name of a hardlink group: same NID, no slot; nlink counts the names
            # (§3.11), each met once in this walk
            seen.nlink += 1
            continue
        if ntype is REG and not node.xattrs:
            # most inodes: a regular file without xattrs, what the general case below
            # decides for it, in one branch
            size = node.size
            if chunked:
                chunks = -(-size // BLOCK)
                inode = PlannedInode(
                    node, path, (cursor - meta_start) // SLOT, cursor, CHUNK_BASED, size, b"",
                    1, 0, None, 0, 0, chunks, 0, None,
                )
                cursor += -(-(64 + CHUNK_INDEX_SIZE * chunks) // SLOT) * SLOT
            else:
                data_blocks = -(-size // BLOCK)
                inode = PlannedInode(
                    node, path, (cursor - meta_start) // SLOT, cursor, FLAT_PLAIN, size, b"",
                    1, data_blocks, next_block if data_blocks else None, 0, 0, 0, 0, None,
                )
                next_block += data_blocks
                cursor += 64
            inodes.append(inode)
            by_node[node] = inode
            continue
        kids = node.children
        kid_names = _queue_children(stack, path, node, kids) if kids else []
        ibody = _ibody(node, path) if node.xattrs else b""
        fixed = 64 + len(ibody)
        # Locals, then one positional constructor call: this body runs once per inode.
        layout, data_blocks, rel_block, tail_len, chunk_pad, chunks = FLAT_PLAIN, 0, None, 0, 0, 0
        dir_blocks = None
        parent_nid = 0
        if is_dir:
            # nlink: 2, plus 1 per subdirectory (counted as each is planned below), but
            # always 2 for the root (msb's value)
            nlink = 2
            dir_blocks, size = _directory_shape(kid_names)
            if parent is not None:
                above = by_node[parent]  # planned already: the walk is pre-order
                parent_nid = above.nid
                if parent is not root:
                    above.nlink += 1
        else:
            nlink = 1  # and 1 per later name of a hardlink group (above)
            size = node.size if ntype is REG else len(node.target) if ntype is SYMLINK else 0
        extra = 0  # bytes after the ibody inside the inode's slots
        if ntype is REG and chunked:
            layout = CHUNK_BASED
            chunks = -(-size // BLOCK)
            chunk_pad = 4 if len(ibody) % 8 == 4 and chunks else 0
            extra = chunk_pad + CHUNK_INDEX_SIZE * chunks
        elif size and (ntype is REG or is_dir or ntype is SYMLINK):
            tail = size % BLOCK
            if ntype is not REG and tail and fixed + tail <= BLOCK - cursor % BLOCK:
                layout = FLAT_INLINE
                tail_len = tail
                data_blocks = size // BLOCK
                extra = tail
            else:
                data_blocks = -(-size // BLOCK)
            if data_blocks:
                rel_block = next_block
                next_block += data_blocks
        inode = PlannedInode(
            node, path, (cursor - meta_start) // SLOT, cursor, layout, size, ibody, nlink,
            data_blocks, rel_block, tail_len, chunk_pad, chunks, parent_nid, dir_blocks,
        )
        cursor += -(-(fixed + extra) // SLOT) * SLOT
        inodes.append(inode)
        by_node[node] = inode
    return Plan(
        inodes=inodes, by_node=by_node, meta_blkaddr=meta_blkaddr, meta_end=cursor,
        data_start=F.blocks_for(cursor), data_blocks=next_block, chunked=chunked,
    )


_DIRENTS: dict[int, struct.Struct] = {}  # k → k dirents ("<QHBB" each); k ≤ 315 per block


def _dirent_block(plan: Plan, inode: PlannedInode, names: list[bytes]) -> bytes:
    """One directory block's bytes: k dirents then the names, unpadded (§3.8).

    The k dirents are packed by one call (a struct per k, cached): one per directory
    block of every layer and fsmeta, so its per-name work is what counts.
    """
    children = inode.node.children or {}
    by_node = plan.by_node
    fields: list[int] = []
    nameoff = F.DIRENT_SIZE * len(names)
    dir_type = int(FileType.DIR)
    for name in names:
        if name == b".":
            fields += (inode.nid, nameoff, dir_type, 0)
        elif name == b"..":
            fields += (inode.parent_nid, nameoff, dir_type, 0)
        else:
            child = children[name]
            fields += (by_node[child].nid, nameoff, child.type, 0)
        nameoff += len(name)
    layout = _DIRENTS.get(len(names))
    if layout is None:
        layout = _DIRENTS[len(names)] = struct.Struct("<" + "QHBB" * len(names))
    return layout.pack(*fields) + b"".join(names)


assert array("Q").itemsize == 8, "chunk indexes are built as arrays of 64-bit words"
_CHUNK_PIECE = 1 << 16  # chunk indexes per piece (512 KiB)
_META_PIECE = 1 << 20  # metadata is handed to the sink in pieces of about this size
_CHUNK_STEP = 1 << 32  # one block further: blkaddr is the high half of the 64-bit word
# By k: an extended inode, its k chunk indexes as little-endian 64-bit words and the zeros
# up to the next 32-byte slot (where the plan puts the next inode), in one call: most
# fsmeta files (up to 60 KiB) are one such record
_INODE_WITH_CHUNKS = [struct.Struct("").pack] + [
    struct.Struct(F.INODE_EXTENDED.format + "Q" * k + "x" * (-(64 + 8 * k) % F.SLOT_SIZE)).pack
    for k in range(1, 16)
]
assert struct.calcsize(F.INODE_EXTENDED.format + "Q") == 64 + F.CHUNK_INDEX_SIZE


def _chunk_pieces(inode: PlannedInode) -> Iterator[bytes]:
    """fsmeta chunk indexes (§4.4): one per block, contiguous in the provenance layer.

    In pieces of at most ``_CHUNK_PIECE`` entries, each built by one C call: an entry
    ("<HHI": advise 0, device_id, blkaddr) read as a little-endian 64-bit word is
    ``blkaddr << 32 | device_id << 16``, so a file's entries are an arithmetic progression.
    A 10 GiB file has 20 MiB of indexes, which must neither sit in memory at once nor cost
    one Python object each; a pull has thousands of small files, which must not cost one
    ``pack`` per block either.
    """
    content = inode.node.content
    n = inode.chunks
    if n == 0:
        return
    if isinstance(content, LayerBlocks) and content.start_block != NULL_BLOCK:
        step = _CHUNK_STEP
        base = content.start_block * step | content.device_id << 16
        for first in range(0, n, _CHUNK_PIECE):
            count = min(_CHUNK_PIECE, n - first)
            start = base + first * step
            words = array("Q", range(start, start + count * step, step))
            if sys.byteorder == "big":
                words.byteswap()
            yield words.tobytes()
        return
    if content is None or isinstance(content, LayerBlocks):
        # No provenance: null chunks read as zeros (msb's behaviour, §4.4).
        null = F.CHUNK_INDEX.pack(0, 0, F.NULL_ADDR)
        for first in range(0, n, _CHUNK_PIECE):
            yield null * min(_CHUNK_PIECE, n - first)
        return
    raise LayerFormatError(
        "fsmeta needs LayerBlocks content for regular files, got a spool extent",
        entry=inode.path.decode(errors="replace"),
    )


def metadata_pieces(plan: Plan) -> Iterator[bytearray]:
    """The metadata area (from ``meta_blkaddr`` up to ``meta_end``): inodes, ibodies,
    tails, in order and in pieces of about ``_META_PIECE`` bytes, so memory does not grow
    with the area (an fsmeta's chunk indexes are 8 bytes per block of file data)."""
    buf = bytearray()
    pos = plan.meta_blkaddr * F.BLOCK_SIZE  # where ``buf`` ends, as an image offset
    # Locals for the loop below, which runs once per inode (twice per pull).
    pack = F.INODE_EXTENDED.pack
    chunk_based, chunk_format = F.LAYOUT_CHUNK_BASED, F.CHUNK_FORMAT_INDEXES
    i_formats = {layout: F.i_format(True, layout)
                 for layout in (F.LAYOUT_FLAT_PLAIN, F.LAYOUT_FLAT_INLINE, chunk_based)}
    s_ifmt = {ftype: ftype.s_ifmt for ftype in FileType}
    devices, no_block = (FileType.CHR, FileType.BLK), (FileType.FIFO, FileType.SOCK)
    data_start, no_reserved = plan.data_start, bytes(16)
    big_endian = sys.byteorder == "big"
    i_format_chunked = i_formats[chunk_based]
    pack_with_chunks, few = _INODE_WITH_CHUNKS, len(_INODE_WITH_CHUNKS)
    pack_one_chunk, slot = pack_with_chunks[1], F.SLOT_SIZE
    null_block, chunk_step, meta_piece = NULL_BLOCK, _CHUNK_STEP, _META_PIECE
    s_ifreg = s_ifmt[FileType.REG]  # a chunk-based inode is a regular file
    for inode in plan.inodes:
        offset = inode.offset
        if offset < pos:
            raise AssertionError(f"inode {inode.nid} planned before the one preceding it")
        node = inode.node
        ftype, layout, ibody = node.type, inode.layout, inode.ibody
        if offset > pos:
            buf += bytes(offset - pos)
        if layout == chunk_based and not ibody:
            # the usual file of an fsmeta: a few blocks, no xattrs: inode and its chunk
            # indexes in one call (each index read as a little-endian u64, as below)
            chunks, content = inode.chunks, node.content
            if (0 < chunks < few and type(content) is LayerBlocks
                    and content.start_block != null_block):
                start = content.start_block << 32 | content.device_id << 16
                if chunks == 1:
                    buf += pack_one_chunk(
                        i_format_chunked, 0, s_ifreg | (node.mode & 0o7777), 0,
                        inode.size, chunk_format, inode.nid, node.uid, node.gid, node.mtime, 0,
                        inode.nlink, no_reserved, start,
                    )
                else:
                    buf += pack_with_chunks[chunks](
                        i_format_chunked, 0, s_ifreg | (node.mode & 0o7777), 0,
                        inode.size, chunk_format, inode.nid, node.uid, node.gid, node.mtime, 0,
                        inode.nlink, no_reserved,
                        *range(start, start + chunks * chunk_step, chunk_step),
                    )
                pos = offset + -(-(64 + 8 * chunks) // slot) * slot
                if len(buf) >= meta_piece:
                    yield buf
                    buf = bytearray()
                continue
        if layout == chunk_based:
            i_u = chunk_format
        elif ftype in devices:
            i_u = F.encode_rdev(node.rdev_major, node.rdev_minor)
        elif ftype in no_block:
            i_u = 0
        else:
            i_u = NULL_BLOCK if inode.rel_block is None else data_start + inode.rel_block
        buf += pack(
            i_formats[layout], (len(ibody) - 12) // 4 + 1 if ibody else 0,
            s_ifmt[ftype] | (node.mode & 0o7777), 0, inode.size, i_u, inode.nid, node.uid,
            node.gid, node.mtime, 0, inode.nlink, no_reserved,
        )
        written = 64
        if ibody:
            buf += ibody
            written += len(ibody)
        if layout == chunk_based:
            buf += bytes(inode.chunk_pad)
            written += inode.chunk_pad
            content, chunks = node.content, inode.chunks
            if (0 < chunks <= _CHUNK_PIECE and type(content) is LayerBlocks
                    and content.start_block != NULL_BLOCK):
                # _chunk_pieces' first case inlined: one piece, the usual file of an fsmeta
                start = content.start_block * _CHUNK_STEP | content.device_id << 16
                words = array("Q", range(start, start + chunks * _CHUNK_STEP, _CHUNK_STEP))
                if big_endian:
                    words.byteswap()
                buf += words
                written += chunks * F.CHUNK_INDEX_SIZE
            else:
                for piece in _chunk_pieces(inode):
                    buf += piece
                    written += len(piece)
                    if len(buf) >= _META_PIECE:
                        yield buf
                        buf = bytearray()
        elif inode.tail_len:
            if inode.dir_blocks is not None:
                after = _dirent_block(plan, inode, inode.dir_blocks[-1])
            else:
                after = node.target[inode.data_blocks * F.BLOCK_SIZE:]
            buf += after
            written += len(after)
        pos = offset + written
        if len(buf) >= _META_PIECE:
            yield buf
            buf = bytearray()
    buf += bytes(plan.meta_end - pos)
    yield buf


def _data_pieces(plan: Plan, inode: PlannedInode) -> Iterator[bytes]:
    """The in-memory data blocks of a directory or symlink (unpadded pieces)."""
    if inode.dir_blocks is not None:
        for names in inode.dir_blocks[: inode.data_blocks]:
            yield _dirent_block(plan, inode, names)
    else:
        yield inode.node.target[: inode.data_blocks * F.BLOCK_SIZE]


class _Sink:
    """Sequential writer that knows its position and can splice from a spool file.

    ``skip_to`` steps over a range already in place (copied ahead by ``copy_ahead``); the
    seek happens on the next write, so skipping many adjacent files costs one seek.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pos = 0
        self._spool_flushed = False
        self._seek_pending = False
        try:  # a pipe or socket cannot be spliced into at an offset: stay buffered
            self.base = out.tell()
            self._fast = out.seekable()
        except (OSError, ValueError):
            self.base = 0
            self._fast = False

    def write(self, data: bytes | bytearray) -> None:
        if self._seek_pending:
            self.finish()
        self.out.write(data)
        self.pos += len(data)

    def skip_to(self, offset: int) -> None:
        self.pos = offset
        self._seek_pending = True

    def finish(self) -> None:
        """Leave ``out`` positioned at ``pos`` (after skips, as after writes)."""
        if self._seek_pending:
            self.out.seek(self.base + self.pos)
            self._seek_pending = False

    def pad_to(self, offset: int) -> None:
        while self.pos < offset:
            self.write(_ZERO_BLOCK[: min(F.BLOCK_SIZE, offset - self.pos)])

    def copy_from(self, spool: BinaryIO, offset: int, length: int, what: bytes) -> None:
        if length and self._fast and self._try_copy_file_range(spool, offset, length, self.pos):
            self.pos += length
            self.out.seek(self.base + self.pos)
            return
        spool.seek(offset)
        left = length
        while left:
            chunk = spool.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise LayerFormatError(
                    f"spool ends {left} bytes early", entry=what.decode(errors="replace")
                )
            self.write(chunk)
            left -= len(chunk)

    def copy_ahead(self, spool: BinaryIO, runs: list[_Run]) -> bool:
        """Copy every run to its place before anything else is written; False (nothing to
        rely on, the runs are written in order later) if the kernel cannot copy here.

        Why first: ``copy_file_range`` releases the GIL, so the kernel moves the file data
        while Python (an fsmeta built meanwhile, or this image's metadata) runs.
        """
        if not self._fast:
            return False
        small = [run for run in runs if run[1] < _GATHER_RUN_BELOW]
        large = [run for run in runs if run[1] >= _GATHER_RUN_BELOW] if small else runs
        # Largest first: between two copies this thread waits for the GIL (up to the
        # switch interval while another thread runs Python), so the bytes that overlap
        # with that Python are the few first runs; a Debian layer has 72, 10 hold 2/3.
        for src, length, dst, _ in sorted(large, key=lambda run: -run[1]):
            if not self._try_copy_file_range(spool, src, length, dst):
                return False
        return not small or self._gather(spool, small)

    def _gather(self, spool: BinaryIO, runs: list[_Run]) -> bool:
        """Many small runs (a tar not in walk order: one per file) in a few vectored writes
        from read-only maps of the spool, one window of it at a time.

        Why: every ``copy_file_range`` gives the GIL up and has to get it back; with tens
        of thousands of them beside other threads' Python (the other layers' images, the
        fsmeta) the waits, not the copying, set the pace. Here the kernel still copies the
        bytes (from the mapped pages), and the GIL is released once per ``pwritev``.

        Why windows: a mapped page counts in the process's memory until it is unmapped,
        and the kernel maps whole folios around each fault; the whole spool of a 60,000
        small files layer mapped at once added ~290 MiB to a pull's peak. A window is at
        most ``_GATHER_WINDOW`` bytes and is unmapped before the next.
        """
        fds = self._descriptors(spool)
        if fds is None:
            return False
        src_fd, dst_fd = fds
        size = os.fstat(src_fd).st_size
        by_src = sorted(runs)
        last_src, last_len, _, last_path = by_src[-1]
        if last_src + last_len > size:
            raise LayerFormatError(f"spool ends {last_src + last_len - size} bytes early",
                                   entry=last_path.decode(errors="replace"))
        first = 0
        while first < len(by_src):
            base = by_src[first][0] // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
            stop = first + 1
            while stop < len(by_src) and _src_end(by_src[stop]) - base <= _GATHER_WINDOW:
                stop += 1
            window = by_src[first:stop]
            with mmap.mmap(src_fd, _src_end(window[-1]) - base, offset=base,
                           prot=mmap.PROT_READ) as mapped:
                view = memoryview(mapped)
                try:
                    self._write_window(view, base, dst_fd, sorted(window, key=_dst_of))
                finally:
                    view.release()
            first = stop
        return True

    def _write_window(self, view: memoryview, base: int, dst_fd: int, runs: list[_Run]) -> None:
        """``runs`` (in ``view``, which maps the spool from ``base``; sorted by image
        offset) as ``pwritev`` calls, each over runs adjacent in the image."""
        batch: list[memoryview] = []
        at = end = -1
        held = 0
        try:
            for src, length, dst, _ in runs:
                if dst != end or len(batch) >= _GATHER_IOVECS:
                    self._pwritev(dst_fd, batch, at, held)
                    for piece in batch:
                        piece.release()
                    batch, at, held = [], dst, 0
                batch.append(view[src - base:src - base + length])
                held += length
                end = dst + length
            self._pwritev(dst_fd, batch, at, held)
        finally:
            for piece in batch:  # the map can be closed only once no slice of it is left
                piece.release()

    def _pwritev(self, dst_fd: int, batch: list[memoryview], at: int, length: int) -> None:
        """All of ``batch`` at image offset ``at`` (``length`` bytes), short writes resumed."""
        pending = list(batch)
        offset = self.base + at
        while pending:
            n = os.pwritev(dst_fd, pending, offset)
            if n == length:
                return
            if n <= 0:
                raise OSError(errno.EIO, f"short write to the layer image at {offset}")
            offset += n
            length -= n
            while n >= len(pending[0]):  # drop what was written, keep the rest
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def _descriptors(self, spool: BinaryIO) -> tuple[int, int] | None:
        """The spool's and ``out``'s descriptors, every byte either buffers written first
        (the kernel copies between the files); None if either has none."""
        try:
            src, dst = spool.fileno(), self.out.fileno()
        except (OSError, ValueError, AttributeError):
            return None
        if not self._spool_flushed:  # the ingest may still hold spool bytes in its buffer
            spool.flush()
            self._spool_flushed = True
        self.out.flush()
        return src, dst

    def _try_copy_file_range(self, spool: BinaryIO, offset: int, length: int, to: int) -> bool:
        """Kernel-side copy to image offset ``to``; False (and buffered from then on) if
        either side can't do it. Leaves ``out``'s position alone."""
        fds = self._descriptors(spool)
        if fds is None:
            self._fast = False
            return False
        src, dst = fds
        dst_off = self.base + to
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src, dst, length - done, offset + done, dst_off + done)
                if n == 0:
                    raise LayerFormatError(f"spool ends {length - done} bytes early")
                done += n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            if done:
                raise
            self._fast = False
            return False
        return True


# A padded-spool run: (spool offset, length, image offset, first file's path).
_Run = tuple[int, int, int, bytes]


def _src_end(run: _Run) -> int:
    """Where ``run`` ends in the spool."""
    return run[0] + run[1]


def _dst_of(run: _Run) -> int:
    return run[2]


def _spool_content(inode: PlannedInode, spool: BinaryIO | None) -> SpoolExtent:
    node = inode.node
    if node.size and spool is None:
        raise LayerFormatError("regular file data but no spool",
                               entry=inode.path.decode(errors="replace"))
    if not isinstance(node.content, SpoolExtent):
        raise LayerFormatError(
            "regular file without spool content", entry=inode.path.decode(errors="replace")
        )
    return node.content


def _padded_runs(plan: Plan, spool: BinaryIO | None) -> list[_Run]:
    """The data area's regular files as copies from a padded spool: files adjacent both in
    the spool and in the data area make one run, their padding included."""
    runs: list[_Run] = []
    REG, BLOCK, data_start = FileType.REG, F.BLOCK_SIZE, plan.data_start
    src_end = dst_end = -1
    for inode in plan.inodes:
        if not inode.data_blocks or inode.rel_block is None or inode.node.type is not REG:
            continue
        src = _spool_content(inode, spool).offset
        length = inode.data_blocks * BLOCK
        dst = (data_start + inode.rel_block) * BLOCK
        if src == src_end and dst == dst_end:
            first_src, first_len, first_dst, path = runs[-1]
            runs[-1] = (first_src, first_len + length, first_dst, path)
        else:
            runs.append((src, length, dst, inode.path))
        src_end, dst_end = src + length, dst + length
    return runs


def _header_blocks(plan: Plan, superblock: F.Superblock, header_extra: bytes) -> bytes:
    """Block 0 up to ``meta_blkaddr``: superblock (its crc filled in) and ``header_extra``
    at 1152."""
    header = bytearray(plan.meta_blkaddr * F.BLOCK_SIZE)
    extra_at = F.SUPERBLOCK_OFFSET + F.SUPERBLOCK_SIZE
    if extra_at + len(header_extra) > len(header):
        raise ValueError("device table does not fit before meta_blkaddr")
    header[extra_at:extra_at + len(header_extra)] = header_extra
    superblock.checksum = 0
    header[F.SUPERBLOCK_OFFSET:extra_at] = superblock.pack()
    superblock.checksum = F.superblock_checksum(bytes(header[: F.BLOCK_SIZE]))
    header[F.SUPERBLOCK_OFFSET:extra_at] = superblock.pack()
    return bytes(header)


def write_image(
    plan: Plan, superblock: F.Superblock, header_extra: bytes, spool: BinaryIO | None,
    out: BinaryIO, *, padded_spool: bool = False,
) -> None:
    """Emit an image for ``plan``: header blocks (superblock + ``header_extra`` at 1152),
    metadata area, data area. The superblock crc is filled in here.

    ``padded_spool``: every file's bytes in ``spool`` are followed by zeros up to the next
    block boundary (as :func:`cachefs.ingest.layer.ingest_layer` writes them). Files that are
    adjacent both in the spool and in the data area are then copied as one run, padding
    included: for a tar in walk order that is a handful of copies instead of one per file,
    and when ``out`` is a file they are copied first (``_Sink.copy_ahead``).
    """
    sink = _Sink(out)
    runs = _padded_runs(plan, spool) if padded_spool else None
    ahead = runs is not None and spool is not None and sink.copy_ahead(spool, runs)
    sink.write(_header_blocks(plan, superblock, header_extra))
    for piece in metadata_pieces(plan):
        sink.write(piece)
    sink.pad_to(plan.data_start * F.BLOCK_SIZE)
    next_run = 0
    for inode in plan.inodes:
        if not inode.data_blocks or inode.rel_block is None:
            continue
        start = (plan.data_start + inode.rel_block) * F.BLOCK_SIZE
        if inode.node.type is FileType.REG:
            if runs is None:
                content = _spool_content(inode, spool)
                assert spool is not None
                sink.copy_from(spool, content.offset, inode.node.size, inode.path)
            elif next_run < len(runs) and runs[next_run][2] == start:  # else inside a run
                src, length, dst, path = runs[next_run]
                next_run += 1
                if ahead:
                    sink.skip_to(dst + length)
                else:
                    assert spool is not None
                    sink.pad_to(dst)
                    sink.copy_from(spool, src, length, path)
        else:
            for data in _data_pieces(plan, inode):
                sink.write(data)
                sink.pad_to(-(-sink.pos // F.BLOCK_SIZE) * F.BLOCK_SIZE)
        sink.pad_to(start + inode.data_blocks * F.BLOCK_SIZE)
    sink.pad_to(plan.total_blocks * F.BLOCK_SIZE)
    sink.finish()


@dataclass(slots=True)
class LayerLayout:
    """A layer image decided, not yet written: every regular file's ``block`` is set on
    its node and ``total_blocks`` is final, which is all an fsmeta needs of the layer.
    So the fsmeta can be built while the image is written (``write_layer``)."""

    root: Node
    plan: Plan

    @property
    def total_blocks(self) -> int:
        return self.plan.total_blocks

    def block_map(self) -> BlockMap:
        return block_map_of(self.root, self.plan.total_blocks)


def block_map_of(root: Node, total_blocks: int) -> BlockMap:
    """Every regular file's (start block, size) by path, from a tree whose layer image was
    planned (:func:`plan_layer` set the blocks)."""
    files: dict[bytes, tuple[int, int]] = {}
    for path, node in walk(root):
        if node.type is FileType.REG:
            files[path] = (node.block if node.block is not None else NULL_BLOCK, node.size)
    return BlockMap(total_blocks, files)


def plan_layer(root: Node) -> LayerLayout:
    """The layout of the layer EROFS for ``root`` (FORMATS.md §3). Sets ``node.block`` on
    every regular file (NULL_BLOCK when empty)."""
    plan = plan_layout(root)
    REG, data_start = FileType.REG, plan.data_start
    for inode in plan.inodes:
        node = inode.node
        if node.type is REG:
            node.block = NULL_BLOCK if inode.rel_block is None else data_start + inode.rel_block
    return LayerLayout(root, plan)


def write_layer(layout: LayerLayout, spool: BinaryIO | None, out: BinaryIO, *,
                padded_spool: bool = False) -> None:
    """Write the planned layer image, byte-identical to msb's.

    Regular-file bytes come from ``spool`` at each node's ``SpoolExtent`` offset and are
    copied in the kernel when both sides are real files.
    """
    plan = layout.plan
    sb = F.Superblock(inos=len(plan.inodes), blocks=plan.total_blocks, meta_blkaddr=1)
    write_image(plan, sb, b"", spool, out, padded_spool=padded_spool)


def write_layer_erofs(
    root: Node, spool: BinaryIO | None, out: BinaryIO, *, padded_spool: bool = False
) -> BlockMap:
    """Plan and write the layer EROFS for ``root``; returns the block map fsmeta needs.

    Sets ``node.block`` on every regular file (NULL_BLOCK when empty).
    """
    layout = plan_layer(root)
    write_layer(layout, spool, out, padded_spool=padded_spool)
    return layout.block_map()
