"""zstd decompression whose memory and time do not depend on the compression ratio.

Why not hand whole input chunks to ``zstandard``'s ``decompressobj``: it returns *all*
the output of what it was given, and 32 KiB of zstd input can be 8,000 RLE blocks, one
GiB of zeros, built up in one growing buffer (a 328 KB layer took 15 minutes at 3.8 GB
RSS). Its ``stream_reader`` does bound output, but it hides a frame cut short and
garbage after the last frame, which must fail the layer as they do for gzip.

So this walks the frame structure itself (RFC 8878 §3.1: frame header, 3-byte block
headers, optional checksum; skippable frames) and feeds the decompressor a few blocks at
a time: no block regenerates more than 128 KiB (``Block_Maximum_Size``), so each call
yields at most ``out_chunk`` + 128 KiB. The walk costs one small parse per block (a
block is up to 128 KiB of output), and it knows where every frame ends, so a truncated
frame or trailing garbage is an error naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import BinaryIO

import zstandard

from ..errors import LayerFormatError

ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_BLOCK_MAX = 128 << 10  # RFC 8878 §3.1.1.2.4: no block regenerates more than this
_RLE = 1
_COMPRESSED = 2
_RESERVED = 3
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)
_MAX_SKIPPABLE = 1 << 32  # the size field is 32 bits; skipped in bounded reads anyway


class _Input:
    """Exact reads over the compressed blob, in ``read_size`` pieces."""

    def __init__(self, blob: BinaryIO, read_size: int, label: str) -> None:
        self._blob = blob
        self._read_size = read_size
        self._label = label
        self._buf = b""
        self._pos = 0

    def at_eof(self) -> bool:
        if self._pos < len(self._buf):
            return False
        self._buf, self._pos = self._blob.read(self._read_size), 0
        return not self._buf

    def take(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            return buf[pos : pos + n]
        parts = [buf[pos:]]
        have = len(parts[0])
        while have < n:
            chunk = self._blob.read(max(self._read_size, n - have))
            if not chunk:
                self._buf, self._pos = b"", 0
                raise LayerFormatError(
                    "truncated zstd stream (ends inside a frame)", layer=self._label
                )
            k = min(n - have, len(chunk))
            parts.append(chunk[:k])
            have += k
            self._buf, self._pos = chunk, k
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            k = min(n, self._read_size)
            self.take(k)
            n -= k


def _corrupt(label: str, why: str) -> LayerFormatError:
    return LayerFormatError(f"corrupt zstd stream: {why}", layer=label)


def _frame_header(src: _Input, magic: bytes, label: str) -> bytes:
    """The whole frame header (magic included), validated as far as sizes go."""
    fhd = src.take(1)
    flags = fhd[0]
    if flags & 0x08:
        raise _corrupt(label, "reserved bit set in the frame header")
    single_segment = bool(flags & 0x20)
    fcs_flag = flags >> 6
    fcs = _FCS_SIZES[fcs_flag] or (1 if single_segment else 0)
    rest = (0 if single_segment else 1) + _DICT_ID_SIZES[flags & 0x03] + fcs
    return magic + fhd + (src.take(rest) if rest else b"")


def zstd_chunks(
    blob: BinaryIO, label: str, *, read_size: int = 256 << 10, out_chunk: int = 1 << 20
) -> Generator[bytes, None, None]:
    """Every zstd frame in turn, each piece of output ≤ ``out_chunk`` + 128 KiB."""
    dctx = zstandard.ZstdDecompressor()
    src = _Input(blob, read_size, label)
    seen_frame = False
    while not src.at_eof():
        magic = src.take(4)
        value = int.from_bytes(magic, "little")
        seen_frame = True
        if value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            src.skip(int.from_bytes(src.take(4), "little"))
            continue
        if value != ZSTD_MAGIC:
            raise _corrupt(label, f"unknown frame magic {magic.hex()}")
        header = _frame_header(src, magic, label)
        checksum = bool(header[4] & 0x04)
        d = dctx.decompressobj()
        feed = [header]
        budget = 0
        while True:
            block_header = src.take(3)
            word = int.from_bytes(block_header, "little")
            last, kind, size = word & 1, (word >> 1) & 3, word >> 3
            if kind == _RESERVED:
                raise _corrupt(label, "reserved block type")
            feed.append(block_header)
            feed.append(src.take(1 if kind == _RLE else size))
            budget += _BLOCK_MAX if kind == _COMPRESSED else size
            if last and checksum:
                feed.append(src.take(4))
            if last or budget >= out_chunk:
                try:
                    out = d.decompress(b"".join(feed))
                except zstandard.ZstdError as e:
                    raise _corrupt(label, str(e)) from None
                if out:
                    yield out
                feed, budget = [], 0
            if last:
                break
        if not d.eof:
            raise _corrupt(label, "frame did not end where its last block ends")
    if not seen_frame:
        raise LayerFormatError("empty zstd stream", layer=label)
