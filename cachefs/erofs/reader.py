"""Read any EROFS image that msb or cachefs writes (FORMATS.md §1.7, §3, §4, §7b).

The reader is deliberately defensive: it is pointed at cache files that other
processes write, that may be truncated by a crash, or that a user corrupted. Every
offset and length taken from disk is checked against the size of the file it points
into before anything is read, so a bad image raises ``ErofsFormatError`` naming the
inode (nid) and block involved, never ``IndexError`` or ``struct.error``.

Reads go through ``os.pread`` on a file descriptor: images can be large, and pread keeps
the reader stateless (safe to share between threads) without mapping whole files.

Supported: 4096-byte blocks; compact (32 B) and extended (64 B) inodes; layouts
FLAT_PLAIN, FLAT_INLINE and CHUNK_BASED (block maps and chunk indexes, multi-device and
flat-device addressing); inline and shared xattrs with name indexes 1..6.
Compressed inodes and long xattr name prefixes are refused with a clear error.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cachefs.erofs import format as fmt
from cachefs.erofs.tree import NULL_BLOCK, BlockMap, FileType, LayerBlocks, Node
from cachefs.errors import ErofsFormatError

BS = fmt.BLOCK_SIZE
_MAX_SYMLINK = 4096
_BLOCK_MAP_ENTRY = 4


# ---------------------------------------------------------------------------------------
# Validity check (msb's cache-hit rule)
# ---------------------------------------------------------------------------------------


def is_valid_erofs(path: Path) -> bool:
    """msb's cache-hit rule for an EROFS artifact, exactly (FORMATS.md §1.7).

    A regular file whose size is > 0 and a multiple of 4096, with the EROFS magic at
    1024, whose root inode (read as a 64-byte extended inode at
    ``meta_blkaddr*4096 + root_nid*32``) has ``S_IFDIR``. The superblock crc is *not*
    checked, because msb does not check it either. Never raises.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= 0 or st.st_size % BS:
            return False
        with open(path, "rb") as f:
            f.seek(fmt.SUPERBLOCK_OFFSET)
            raw = f.read(fmt.SUPERBLOCK_SIZE)
            if len(raw) < fmt.SUPERBLOCK_SIZE:
                return False
            sb = fmt.Superblock.unpack(raw)
            if sb.magic != fmt.EROFS_MAGIC:
                return False
            f.seek(sb.meta_blkaddr * BS + sb.root_nid * fmt.SLOT_SIZE)
            inode = f.read(fmt.INODE_EXTENDED.size)
            if len(inode) < fmt.INODE_EXTENDED.size:
                return False
            (mode,) = struct.unpack_from("<H", inode, 4)
            return stat.S_ISDIR(mode)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One entry of the device table (FORMATS.md §4.3); slot i is device_id i+1."""

    blocks: int
    mapped_blkaddr: int
    tag: bytes = b""


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """Where a CHUNK_BASED inode's chunk table lives and how to read it."""

    chunkbits: int  # log2 of the chunk size in bytes
    indexes: bool  # True: 8-byte chunk indexes (device_id, blkaddr); False: 4-byte block map
    table_offset: int  # absolute byte offset of entry 0 in the image
    count: int  # number of entries

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunkbits


@dataclass(slots=True)
class Inode:
    """A decoded on-disk inode. ``raw_u`` is ``i_u`` verbatim (block, rdev or chunk format)."""

    nid: int
    mode: int  # full st_mode, type bits included
    type: FileType
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    nlink: int
    size: int
    layout: int
    raw_u: int
    extended: bool
    offset: int  # absolute byte offset of the inode in the image
    xattr_isize: int
    inline_offset: int  # absolute byte offset of inline data (right after the ibody)
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)  # inline, then shared
    shared_xattrs: int = 0  # how many of ``xattrs`` came from the shared xattr area
    chunk: ChunkInfo | None = None

    @property
    def perm(self) -> int:
        return self.mode & 0o7777

    @property
    def rdev(self) -> tuple[int, int]:
        """(major, minor) for device inodes, decoded from ``i_u``."""
        if self.type in (FileType.CHR, FileType.BLK):
            return fmt.decode_rdev(self.raw_u)
        return (0, 0)


@dataclass(frozen=True, slots=True)
class _Extent:
    """``length`` bytes of file data: from ``fd`` at ``phys`` (fd None = zeros)."""

    logical: int
    length: int
    fd: int | None
    phys: int
    fd_size: int
    what: str


# ---------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------


class ErofsImage:
    """An open EROFS image (optionally with its extra devices, for multi-device mode).

    Without ``devices``, chunks on device d>0 are read from the image itself at
    ``(mapped_blkaddr[d] + blkaddr) * 4096`` (flat-device mode, FORMATS.md §4.6), which
    works when the file is the fsmeta‖layers concatenation. With ``devices``, device d
    reads ``devices[d-1]`` at ``blkaddr * 4096``.
    """

    def __init__(self, path: Path, fd: int, device_fds: list[tuple[int, int, Path]]) -> None:
        self.path = path
        self._fd = fd
        self._device_fds = device_fds  # (fd, size, path) per extra device
        self._closed = False
        self.file_size = os.fstat(fd).st_size
        if self.file_size < fmt.SUPERBLOCK_OFFSET + fmt.SUPERBLOCK_SIZE:
            raise ErofsFormatError(
                f"{path}: {self.file_size} bytes is too short to hold an EROFS superblock"
            )
        self.block0 = self._pread(0, min(BS, self.file_size), "superblock")
        self.superblock = fmt.Superblock.unpack(
            self.block0[fmt.SUPERBLOCK_OFFSET : fmt.SUPERBLOCK_OFFSET + fmt.SUPERBLOCK_SIZE]
        )
        sb = self.superblock
        if sb.magic != fmt.EROFS_MAGIC:
            raise ErofsFormatError(f"{path}: bad EROFS magic {sb.magic:#010x} at offset 1024")
        if sb.blkszbits != fmt.BLOCK_BITS:
            raise ErofsFormatError(
                f"{path}: block size 2^{sb.blkszbits} unsupported (only 4096-byte blocks)"
            )
        self.total_blocks = (self.file_size + BS - 1) // BS
        self.devices = self._read_device_table()
        if device_fds and len(device_fds) != len(self.devices):
            raise ErofsFormatError(
                f"{path}: image has {len(self.devices)} extra devices, {len(device_fds)} given"
            )
        self.crc_ok = self._crc_matches()
        root = self.inode(sb.root_nid)
        if root.type is not FileType.DIR:
            raise ErofsFormatError(f"{path}: root inode nid {sb.root_nid} is not a directory")

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, devices: Sequence[Path] | None = None) -> ErofsImage:
        """Open ``path`` (and ``devices``, for multi-device mode) read-only."""
        path = Path(path)
        opened: list[int] = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(fd)
            dev_fds: list[tuple[int, int, Path]] = []
            for dev in devices or ():
                dfd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                opened.append(dfd)
                dev_fds.append((dfd, os.fstat(dfd).st_size, Path(dev)))
            return cls(path, fd, dev_fds)
        except BaseException:
            for o in opened:
                os.close(o)
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            for dfd, _, _ in self._device_fds:
                os.close(dfd)

    def __enter__(self) -> ErofsImage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- low-level I/O --------------------------------------------------------------

    def _pread(self, offset: int, length: int, what: str) -> bytes:
        return _pread_checked(self._fd, self.file_size, offset, length, what, self.path)

    # -- superblock -----------------------------------------------------------------

    def _read_device_table(self) -> list[DeviceSlot]:
        sb = self.superblock
        n = sb.extra_devices
        if n == 0:
            return []
        start = sb.devt_slotoff * fmt.DEVICE_SLOT_SIZE
        if start < fmt.SUPERBLOCK_OFFSET + fmt.SUPERBLOCK_SIZE:
            raise ErofsFormatError(
                f"{self.path}: device table slot offset {sb.devt_slotoff} overlaps the superblock"
            )
        raw = self._pread(start, n * fmt.DEVICE_SLOT_SIZE, "device table")
        slots = []
        for i in range(n):
            tag, blocks, mapped, _ = fmt.DEVICE_SLOT.unpack_from(raw, i * fmt.DEVICE_SLOT_SIZE)
            slots.append(DeviceSlot(blocks, mapped, tag.rstrip(b"\0")))
        return slots

    def _crc_matches(self) -> bool:
        if not self.superblock.feature_compat & fmt.FEATURE_COMPAT_SB_CHKSUM:
            return True
        if len(self.block0) < BS:
            return False
        return fmt.superblock_checksum(self.block0) == self.superblock.checksum

    def check_crc(self) -> None:
        """Raise unless the superblock crc is right (the kernel refuses to mount otherwise)."""
        if not self.crc_ok:
            expected = fmt.superblock_checksum(self.block0.ljust(BS, b"\0"))
            raise ErofsFormatError(
                f"{self.path}: superblock checksum {self.superblock.checksum:#010x} "
                f"does not match computed {expected:#010x}"
            )

    # -- inodes ---------------------------------------------------------------------

    def inode(self, nid: int) -> Inode:
        """Decode inode ``nid`` (compact or extended; may straddle a block boundary)."""
        sb = self.superblock
        if nid < 0:
            raise ErofsFormatError(f"{self.path}: negative nid {nid}")
        off = sb.meta_blkaddr * BS + nid * fmt.SLOT_SIZE
        where = f"inode nid {nid} (block {off // BS})"
        head = self._pread(off, fmt.INODE_COMPACT.size, where)
        (i_format,) = struct.unpack_from("<H", head, 0)
        extended = bool(i_format & 1)
        if extended:
            raw = self._pread(off, fmt.INODE_EXTENDED.size, where)
            (i_format, icount, mode, _nb, size, i_u, _ino, uid, gid, mtime, nsec, nlink,
             _r) = fmt.INODE_EXTENDED.unpack(raw)
            isize = fmt.INODE_EXTENDED.size
        else:
            (i_format, icount, mode, nlink, size, mt, i_u, _ino, uid, gid,
             _r) = fmt.INODE_COMPACT.unpack(head)
            # As the kernel: epoch (build_time) + a 32-bit offset that older writers
            # (erofs-utils 1.5, msb) leave 0.
            mtime, nsec = sb.build_time + mt, sb.build_time_nsec
            isize = fmt.INODE_COMPACT.size
        layout = fmt.layout_of(i_format)
        if layout in (fmt.LAYOUT_COMPRESSED_FULL, fmt.LAYOUT_COMPRESSED_COMPACT):
            raise ErofsFormatError(f"{self.path}: {where}: compressed inode not supported")
        if layout not in (fmt.LAYOUT_FLAT_PLAIN, fmt.LAYOUT_FLAT_INLINE, fmt.LAYOUT_CHUNK_BASED):
            raise ErofsFormatError(f"{self.path}: {where}: unknown data layout {layout}")
        try:
            ftype = FileType.from_mode(mode)
        except ValueError:
            raise ErofsFormatError(f"{self.path}: {where}: bad mode {mode:#o}") from None
        xattr_isize = fmt.xattr_ibody_size(icount)
        inline_off = off + isize + xattr_isize
        ino = Inode(
            nid=nid, mode=mode, type=ftype, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec,
            nlink=nlink, size=size, layout=layout, raw_u=i_u, extended=extended, offset=off,
            xattr_isize=xattr_isize, inline_offset=inline_off,
        )
        if xattr_isize:
            ino.xattrs = self._read_xattrs(ino, off + isize, xattr_isize)
        if layout == fmt.LAYOUT_CHUNK_BASED:
            ino.chunk = self._chunk_info(ino)
        return ino

    def _read_xattrs(self, ino: Inode, start: int, length: int) -> list[tuple[bytes, bytes]]:
        where = f"xattrs of nid {ino.nid} (block {start // BS})"
        body = self._pread(start, length, where)
        if length < fmt.XATTR_IBODY_HEADER.size:
            raise ErofsFormatError(f"{self.path}: {where}: ibody of {length} bytes is too short")
        _filter, shared_count, _ = fmt.XATTR_IBODY_HEADER.unpack_from(body, 0)
        pos = fmt.XATTR_IBODY_HEADER.size
        if pos + 4 * shared_count > length:
            raise ErofsFormatError(
                f"{self.path}: {where}: {shared_count} shared xattr ids overflow the ibody"
            )
        shared_ids = struct.unpack_from(f"<{shared_count}I", body, pos)
        pos += 4 * shared_count
        out: list[tuple[bytes, bytes]] = []
        while pos + fmt.XATTR_ENTRY.size <= length:
            entry, pos = self._xattr_entry(body, pos, where)
            out.append(entry)
        if pos != length:
            raise ErofsFormatError(f"{self.path}: {where}: trailing bytes after xattr entries")
        ino.shared_xattrs = len(shared_ids)
        if shared_ids:
            base = self.superblock.xattr_blkaddr * BS
            for sid in shared_ids:
                out.append(self._shared_xattr(base + sid * 4, ino.nid))
        return out

    def _shared_xattr(self, off: int, nid: int) -> tuple[bytes, bytes]:
        where = f"shared xattr at byte {off} of nid {nid} (block {off // BS})"
        head = self._pread(off, fmt.XATTR_ENTRY.size, where)
        name_len, _idx, value_size = fmt.XATTR_ENTRY.unpack(head)
        raw = self._pread(off, fmt.XATTR_ENTRY.size + name_len + value_size, where)
        entry, _ = self._xattr_entry(raw, 0, where)
        return entry

    def _xattr_entry(self, buf: bytes, pos: int, where: str) -> tuple[tuple[bytes, bytes], int]:
        name_len, idx, value_size = fmt.XATTR_ENTRY.unpack_from(buf, pos)
        end = pos + fmt.XATTR_ENTRY.size + name_len + value_size
        if end > len(buf):
            raise ErofsFormatError(f"{self.path}: {where}: xattr entry overruns its body")
        prefix = fmt.XATTR_PREFIXES.get(idx)
        if prefix is None:
            raise ErofsFormatError(f"{self.path}: {where}: unsupported xattr name index {idx}")
        name_start = pos + fmt.XATTR_ENTRY.size
        name = prefix + buf[name_start : name_start + name_len]
        value = buf[name_start + name_len : end]
        return (name, value), (end + 3) & ~3

    def _chunk_info(self, ino: Inode) -> ChunkInfo:
        cfmt = ino.raw_u
        indexes = bool(cfmt & fmt.CHUNK_FORMAT_INDEXES)
        if cfmt & ~(fmt.CHUNK_FORMAT_INDEXES | fmt.CHUNK_FORMAT_BLKBITS_MASK):
            raise ErofsFormatError(
                f"{self.path}: nid {ino.nid}: unknown chunk format bits {cfmt:#06x}"
            )
        chunkbits = fmt.BLOCK_BITS + (cfmt & fmt.CHUNK_FORMAT_BLKBITS_MASK)
        unit = fmt.CHUNK_INDEX_SIZE if indexes else _BLOCK_MAP_ENTRY
        # Kernel rule: the table starts at the ibody end aligned to the entry size.
        table = (ino.inline_offset + unit - 1) // unit * unit
        count = (ino.size + (1 << chunkbits) - 1) >> chunkbits
        if table + count * unit > self.file_size:
            raise ErofsFormatError(
                f"{self.path}: nid {ino.nid}: chunk table of {count} entries at byte {table} "
                f"(block {table // BS}) runs past the end of the image"
            )
        return ChunkInfo(chunkbits, indexes, table, count)

    # -- chunk mapping --------------------------------------------------------------

    def chunks(self, nid: int) -> list[tuple[int, int]]:
        """The chunk table of a CHUNK_BASED inode as (device_id, blkaddr) pairs.

        A block map (no INDEXES bit) always addresses device 0, the image itself.
        ``blkaddr == 0xFFFFFFFF`` is a hole.
        """
        ino = self.inode(nid)
        if ino.chunk is None:
            raise ErofsFormatError(f"{self.path}: nid {nid} is not chunk-based")
        return self._chunk_entries(ino, 0, ino.chunk.count)

    def _chunk_entries(self, ino: Inode, first: int, count: int) -> list[tuple[int, int]]:
        ci = ino.chunk
        assert ci is not None
        unit = fmt.CHUNK_INDEX_SIZE if ci.indexes else _BLOCK_MAP_ENTRY
        start = ci.table_offset + first * unit
        raw = self._pread(start, count * unit, f"chunk table of nid {ino.nid}")
        if ci.indexes:
            return [(dev, blk) for _adv, dev, blk in fmt.CHUNK_INDEX.iter_unpack(raw)]
        return [(0, blk) for (blk,) in struct.iter_unpack("<I", raw)]

    def _device_location(self, nid: int, device_id: int) -> tuple[int, int, str]:
        """(fd, fd size, description) of the file holding device ``device_id``'s blocks."""
        if device_id == 0:
            return self._fd, self.file_size, str(self.path)
        if device_id > len(self.devices):
            raise ErofsFormatError(
                f"{self.path}: nid {nid}: chunk on device {device_id}, "
                f"but the image has {len(self.devices)} extra devices"
            )
        if self._device_fds:
            dfd, dsize, dpath = self._device_fds[device_id - 1]
            return dfd, dsize, str(dpath)
        return self._fd, self.file_size, str(self.path)

    def _extents(self, ino: Inode, offset: int, end: int) -> Iterator[_Extent]:
        """Physical extents covering logical bytes [offset, end) of ``ino``."""
        where = f"data of nid {ino.nid}"
        if ino.layout == fmt.LAYOUT_CHUNK_BASED:
            ci = ino.chunk
            assert ci is not None
            cs = ci.chunk_size
            first, last = offset // cs, (end - 1) // cs
            entries = self._chunk_entries(ino, first, last - first + 1)
            for k, (dev, blk) in enumerate(entries, start=first):
                lo, hi = max(offset, k * cs), min(end, (k + 1) * cs, ino.size)
                if blk == fmt.NULL_ADDR:
                    yield _Extent(lo, hi - lo, None, 0, 0, where)
                    continue
                dfd, dsize, desc = self._device_location(ino.nid, dev)
                base = blk * BS
                if dev and not self._device_fds:
                    base = (self.devices[dev - 1].mapped_blkaddr + blk) * BS
                yield _Extent(lo, hi - lo, dfd, base + (lo - k * cs), dsize,
                              f"{where}, chunk {k} (device {dev} block {blk}) in {desc}")
            return
        # FLAT_PLAIN / FLAT_INLINE: blocks from i_u, for INLINE the last block is inline.
        if ino.layout == fmt.LAYOUT_FLAT_INLINE:
            plain_len = (ino.size - 1) // BS * BS if ino.size else 0
        else:
            plain_len = ino.size
        if offset < plain_len:
            if ino.raw_u == fmt.NULL_ADDR:
                raise ErofsFormatError(
                    f"{self.path}: nid {ino.nid}: {plain_len} bytes of data but no start block"
                )
            hi = min(end, plain_len)
            yield _Extent(offset, hi - offset, self._fd, ino.raw_u * BS + offset,
                          self.file_size, f"{where} (block {ino.raw_u + offset // BS})")
        if end > plain_len:
            lo = max(offset, plain_len)
            tail_len = ino.size - plain_len
            if ino.inline_offset % BS + tail_len > BS:
                raise ErofsFormatError(
                    f"{self.path}: nid {ino.nid}: inline data of {tail_len} bytes crosses "
                    f"block {ino.inline_offset // BS}"
                )
            yield _Extent(lo, end - lo, self._fd, ino.inline_offset + (lo - plain_len),
                          self.file_size,
                          f"inline {where} (block {ino.inline_offset // BS})")

    # -- data -----------------------------------------------------------------------

    def read(self, nid: int, offset: int = 0, size: int | None = None) -> bytes:
        """Up to ``size`` bytes of file data from ``offset`` (clamped at end of file)."""
        return self._read_inode(self.inode(nid), offset, size)

    def _read_inode(self, ino: Inode, offset: int = 0, size: int | None = None) -> bytes:
        if offset < 0 or (size is not None and size < 0):
            raise ValueError("offset and size must be non-negative")
        end = ino.size if size is None else min(ino.size, offset + size)
        if offset >= end:
            return b""
        parts = []
        for ext in self._extents(ino, offset, end):
            if ext.fd is None:
                parts.append(bytes(ext.length))
            else:
                parts.append(_pread_checked(ext.fd, ext.fd_size, ext.phys, ext.length,
                                            ext.what, self.path))
        return b"".join(parts)

    def readlink(self, nid: int) -> bytes:
        ino = self.inode(nid)
        if ino.type is not FileType.SYMLINK:
            raise ErofsFormatError(f"{self.path}: nid {nid} is not a symlink")
        return self._readlink_inode(ino)

    def _readlink_inode(self, ino: Inode) -> bytes:
        if ino.size > _MAX_SYMLINK:
            raise ErofsFormatError(
                f"{self.path}: symlink nid {ino.nid} has an implausible size {ino.size}"
            )
        return self._read_inode(ino)

    # -- directories ----------------------------------------------------------------

    def listdir(self, nid: int) -> list[tuple[bytes, int, int]]:
        """Every dirent of directory ``nid`` as (name, nid, file_type), "." and ".." included,
        in on-disk order (sorted by raw bytes)."""
        ino = self.inode(nid)
        if ino.type is not FileType.DIR:
            raise ErofsFormatError(f"{self.path}: nid {nid} is not a directory")
        return self._listdir_inode(ino)

    def _listdir_inode(self, ino: Inode) -> list[tuple[bytes, int, int]]:
        # Directory data is never a hole, so it cannot exceed what is stored; checking
        # first keeps a corrupt i_size (or a chunk of holes) from allocating gigabytes.
        stored = self.file_size + sum(size for _, size, _ in self._device_fds)
        if ino.size > stored:
            raise ErofsFormatError(
                f"{self.path}: directory nid {ino.nid} claims {ino.size} bytes, "
                f"more than the {stored} bytes stored"
            )
        data = self._read_inode(ino)
        out: list[tuple[bytes, int, int]] = []
        for b in range(0, len(data), BS):
            out.extend(self._parse_dirblock(ino.nid, b // BS, data[b : b + BS]))
        return out

    def _parse_dirblock(self, nid: int, blk: int, block: bytes) -> list[tuple[bytes, int, int]]:
        where = f"{self.path}: directory nid {nid}, dir block {blk}"
        used = len(block)
        if used < fmt.DIRENT_SIZE:
            raise ErofsFormatError(f"{where}: {used} bytes cannot hold a dirent")
        _, nameoff0, _, _ = fmt.DIRENT.unpack_from(block, 0)
        if nameoff0 < fmt.DIRENT_SIZE or nameoff0 % fmt.DIRENT_SIZE or nameoff0 >= used:
            raise ErofsFormatError(f"{where}: bad first nameoff {nameoff0}")
        k = nameoff0 // fmt.DIRENT_SIZE
        ents = [fmt.DIRENT.unpack_from(block, i * fmt.DIRENT_SIZE) for i in range(k)]
        out = []
        for i, (cnid, nameoff, ftype, _r) in enumerate(ents):
            if i + 1 < k:
                name_end = ents[i + 1][1]
                if not nameoff < name_end <= used:
                    raise ErofsFormatError(f"{where}: dirent {i} has bad nameoff {nameoff}")
                name = block[nameoff:name_end]
            else:
                if nameoff >= used:
                    raise ErofsFormatError(f"{where}: dirent {i} has bad nameoff {nameoff}")
                name = block[nameoff:used].split(b"\0", 1)[0]
            if not name or b"/" in name:
                raise ErofsFormatError(f"{where}: dirent {i} has an invalid name {name!r}")
            out.append((name, cnid, ftype))
        return out

    def lookup(self, path: bytes | str) -> int:
        """The nid of ``path`` (absolute or relative to the root); symlinks are not followed."""
        if isinstance(path, str):
            path = os.fsencode(path)
        nid = self.superblock.root_nid
        for comp in path.split(b"/"):
            if not comp:
                continue
            ino = self.inode(nid)
            if ino.type is not FileType.DIR:
                raise FileNotFoundError(f"{path!r}: not a directory at {comp!r}")
            for name, cnid, _ in self._listdir_inode(ino):
                if name == comp:
                    nid = cnid
                    break
            else:
                raise FileNotFoundError(f"{path!r}: no entry {comp!r}")
        return nid

    def walk(self) -> Iterator[tuple[bytes, int, Inode]]:
        """Pre-order walk: (path, nid, inode); the root is b"", paths are "a/b" like
        ``tree.walk``. Hardlinks are yielded under every name. Raises on directory cycles."""
        seen_dirs: set[int] = set()
        stack: list[tuple[bytes, int]] = [(b"", self.superblock.root_nid)]
        while stack:
            path, nid = stack.pop()
            ino = self.inode(nid)
            if ino.type is FileType.DIR:
                if nid in seen_dirs:
                    raise ErofsFormatError(
                        f"{self.path}: directory nid {nid} reached twice (at {path!r}): "
                        "cycle or hardlinked directory"
                    )
                seen_dirs.add(nid)
            yield path, nid, ino
            if ino.type is not FileType.DIR:
                continue
            children = []
            for name, cnid, _ftype in self._listdir_inode(ino):
                if name in (b".", b".."):
                    continue
                children.append((path + b"/" + name if path else name, cnid))
            children.sort(reverse=True)
            stack.extend(children)

    # -- trees ----------------------------------------------------------------------

    def to_tree(self) -> Node:
        """The whole image as a ``tree.Node`` tree (hardlinks share one Node).

        Regular files get ``size``; FLAT_PLAIN ones ``block`` = start block
        (``NULL_BLOCK`` when empty); CHUNK_BASED ones with contiguous chunks on one device
        ``content = LayerBlocks(device_id, start_block)`` (``LayerBlocks(0, NULL_BLOCK)``
        for an empty file, which has no chunks).
        """
        by_nid: dict[int, Node] = {}
        root: Node | None = None
        parents: dict[bytes, Node] = {}
        for path, nid, ino in self.walk():
            node = by_nid.get(nid)
            if node is None or ino.type is FileType.DIR:
                node = self._node_for(ino)
                by_nid[nid] = node
            if path == b"":
                root = node
            else:
                parent_path, _, name = path.rpartition(b"/")
                parent = parents[parent_path]
                assert parent.children is not None
                parent.children[name] = node
            if node.is_dir:
                parents[path] = node
        assert root is not None
        return root

    def _node_for(self, ino: Inode) -> Node:
        node = Node(ino.type, ino.perm, ino.uid, ino.gid, ino.mtime, xattrs=list(ino.xattrs))
        if ino.type is FileType.DIR:
            node.children = {}
        elif ino.type is FileType.SYMLINK:
            node.target = self._readlink_inode(ino)
        elif ino.type in (FileType.CHR, FileType.BLK):
            node.rdev_major, node.rdev_minor = ino.rdev
        elif ino.type is FileType.REG:
            node.size = ino.size
            if ino.layout == fmt.LAYOUT_FLAT_PLAIN:
                node.block = ino.raw_u if ino.size else NULL_BLOCK
            elif ino.layout == fmt.LAYOUT_CHUNK_BASED:
                node.content = self._contiguous(ino)
        return node

    def _contiguous(self, ino: Inode) -> LayerBlocks | None:
        ci = ino.chunk
        assert ci is not None
        if ci.count == 0:
            return LayerBlocks(0, NULL_BLOCK)
        entries = self._chunk_entries(ino, 0, ci.count)
        dev0, blk0 = entries[0]
        step = 1 << (ci.chunkbits - fmt.BLOCK_BITS)
        for k, (dev, blk) in enumerate(entries):
            if dev != dev0 or blk == fmt.NULL_ADDR or blk != blk0 + k * step:
                return None
        return LayerBlocks(dev0, blk0)

    def block_map(self) -> BlockMap:
        """Every regular file path → (start block, size), as msb reads a layer (§4.7).

        Paths use the ``tree.walk`` convention ("a/b"). Empty files give
        ``(NULL_BLOCK, 0)``. A regular file that is not FLAT_PLAIN is an error, because
        msb refuses such a layer.
        """
        files: dict[bytes, tuple[int, int]] = {}
        for path, nid, ino in self.walk():
            if ino.type is not FileType.REG:
                continue
            if ino.layout != fmt.LAYOUT_FLAT_PLAIN:
                raise ErofsFormatError(
                    f"{self.path}: regular file {path!r} (nid {nid}) has layout "
                    f"{ino.layout}, a layer block map needs FLAT_PLAIN"
                )
            files[path] = (ino.raw_u if ino.size else NULL_BLOCK, ino.size)
        return BlockMap(self.total_blocks, files)


def _pread_checked(fd: int, fd_size: int, offset: int, length: int, what: str,
                   image: Path) -> bytes:
    """pread exactly ``length`` bytes, after checking the range lies inside the file."""
    if offset < 0 or length < 0 or offset + length > fd_size:
        raise ErofsFormatError(
            f"{image}: {what}: bytes [{offset}, {offset + length}) (block {offset // BS}) "
            f"lie outside the {fd_size}-byte file"
        )
    chunks = []
    got = 0
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            raise ErofsFormatError(
                f"{image}: {what}: file shrank while reading at byte {offset + got}"
            )
        chunks.append(piece)
        got += len(piece)
    return b"".join(chunks)
