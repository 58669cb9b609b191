"""EROFS on-disk structures as ``struct`` layouts (FORMATS.md §3–§4, Linux ``erofs_fs.h``).

Only the subset msb and cachefs use is modelled, but the reader side accepts compact
inodes too. Everything is little-endian; a block is always 4096 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BLOCK_SIZE = 4096
BLOCK_BITS = 12
SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 128
EROFS_MAGIC = 0xE0F5E1E2
SLOT_SIZE = 32  # NID unit
NULL_ADDR = 0xFFFFFFFF

FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

# i_format: bit 0 = version (1 = extended), bits 1..3 = data layout
LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4

CHUNK_FORMAT_INDEXES = 0x0020
CHUNK_FORMAT_BLKBITS_MASK = 0x001F

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_PREFIXES: dict[int, bytes] = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_LUSTRE: b"lustre.",
    XATTR_INDEX_SECURITY: b"security.",
}
# Prefixes a writer may use (msb stores only these three, FORMATS.md §3.10).
WRITABLE_XATTR_PREFIXES: dict[bytes, int] = {
    b"user.": XATTR_INDEX_USER,
    b"trusted.": XATTR_INDEX_TRUSTED,
    b"security.": XATTR_INDEX_SECURITY,
}

# Superblock, 128 bytes at offset 1024.
SUPERBLOCK = struct.Struct(
    "<I"  # 0x00 magic
    "I"  # 0x04 checksum
    "I"  # 0x08 feature_compat
    "B"  # 0x0C blkszbits
    "B"  # 0x0D sb_extslots
    "H"  # 0x0E root_nid
    "Q"  # 0x10 inos
    "Q"  # 0x18 build_time
    "I"  # 0x20 build_time_nsec
    "I"  # 0x24 blocks
    "I"  # 0x28 meta_blkaddr
    "I"  # 0x2C xattr_blkaddr
    "16s"  # 0x30 uuid
    "16s"  # 0x40 volume_name
    "I"  # 0x50 feature_incompat
    "H"  # 0x54 u1 (available_compr_algs / lz4_max_distance)
    "H"  # 0x56 extra_devices
    "H"  # 0x58 devt_slotoff
    "B"  # 0x5A dirblkbits
    "B"  # 0x5B xattr_prefix_count
    "I"  # 0x5C xattr_prefix_start
    "Q"  # 0x60 packed_nid
    "B"  # 0x68 xattr_filter_reserved
    "23s"  # 0x69 reserved
)
assert SUPERBLOCK.size == SUPERBLOCK_SIZE


@dataclass(slots=True)
class Superblock:
    magic: int = EROFS_MAGIC
    checksum: int = 0
    feature_compat: int = FEATURE_COMPAT_SB_CHKSUM
    blkszbits: int = BLOCK_BITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 1
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = 0
    u1: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0
    reserved: bytes = bytes(23)

    def pack(self) -> bytes:
        return SUPERBLOCK.pack(
            self.magic, self.checksum, self.feature_compat, self.blkszbits, self.sb_extslots,
            self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
            self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name,
            self.feature_incompat, self.u1, self.extra_devices, self.devt_slotoff,
            self.dirblkbits, self.xattr_prefix_count, self.xattr_prefix_start, self.packed_nid,
            self.xattr_filter_reserved, self.reserved,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock:
        return cls(*SUPERBLOCK.unpack(raw[:SUPERBLOCK_SIZE]))


# Extended inode, 64 bytes.
INODE_EXTENDED = struct.Struct(
    "<H"  # 0x00 i_format
    "H"  # 0x02 i_xattr_icount
    "H"  # 0x04 i_mode
    "H"  # 0x06 i_nb (reserved / nlink hi)
    "Q"  # 0x08 i_size
    "I"  # 0x10 i_u (raw_blkaddr / rdev / chunk format)
    "I"  # 0x14 i_ino
    "I"  # 0x18 i_uid
    "I"  # 0x1C i_gid
    "Q"  # 0x20 i_mtime
    "I"  # 0x28 i_mtime_nsec
    "I"  # 0x2C i_nlink
    "16s"  # 0x30 reserved
)
assert INODE_EXTENDED.size == 64

# Compact inode, 32 bytes (read side only; msb never writes it).
INODE_COMPACT = struct.Struct(
    "<H"  # 0x00 i_format
    "H"  # 0x02 i_xattr_icount
    "H"  # 0x04 i_mode
    "H"  # 0x06 i_nlink
    "I"  # 0x08 i_size
    "I"  # 0x0C i_mtime (reserved in older versions)
    "I"  # 0x10 i_u
    "I"  # 0x14 i_ino
    "H"  # 0x18 i_uid
    "H"  # 0x1A i_gid
    "I"  # 0x1C reserved
)
assert INODE_COMPACT.size == 32


def i_format(extended: bool, layout: int) -> int:
    return (1 if extended else 0) | (layout << 1)


def layout_of(fmt: int) -> int:
    return (fmt >> 1) & 0x7


# Directory entry, 12 bytes.
DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved
DIRENT_SIZE = DIRENT.size

# Inline xattr body header, 12 bytes; entries follow, each padded to 4.
XATTR_IBODY_HEADER = struct.Struct("<IB7s")  # h_name_filter, h_shared_count, reserved
XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size

# Device slot, 128 bytes.
DEVICE_SLOT = struct.Struct("<64sII56s")  # tag, blocks, mapped_blkaddr, reserved
DEVICE_SLOT_SIZE = DEVICE_SLOT.size
assert DEVICE_SLOT_SIZE == 128

# Chunk index entry, 8 bytes.
CHUNK_INDEX = struct.Struct("<HHI")  # advise (startblk_hi), device_id, blkaddr
CHUNK_INDEX_SIZE = CHUNK_INDEX.size


def xattr_ibody_size(icount: int) -> int:
    """``i_xattr_icount`` → bytes of inline xattr body (0 when there are none)."""
    return 0 if icount == 0 else 12 + (icount - 1) * 4


def encode_rdev(major: int, minor: int) -> int:
    """Linux ``new_encode_dev``."""
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(dev: int) -> tuple[int, int]:
    """Linux ``new_decode_dev``."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return major, minor


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Castagnoli CRC as the kernel's ``crc32c(~0, …)``: reflected, no final XOR."""
    table = _CRC32C_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def superblock_checksum(block0: bytes) -> int:
    """Checksum over bytes [1024, 4096) of block 0 with the checksum field zeroed."""
    region = bytearray(block0[SUPERBLOCK_OFFSET:BLOCK_SIZE])
    region[4:8] = b"\0\0\0\0"
    return crc32c_raw(bytes(region))


def blocks_for(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE
