"""zstd for transfer: the on-disk EROFS stays msb's bytes; only the wire copy is compressed.

Both directions hash what they read and write in the same pass, so a blob is compressed or
decompressed, and its two digests known, in one read of each file. Decompression is
bounded by the size the artifact promised: a blob that inflates beyond it is refused
before it can fill the disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..digest import Digest
from ..errors import DigestMismatch

LEVEL = 10  # compressed once (in CI), downloaded by every host: smaller beats faster here
READ = 4 << 20
INFLATE_READ = 1 << 20  # per concurrent download: small buffers keep peak RSS at msb's


@dataclass(frozen=True, slots=True)
class Compressed:
    erofs_digest: Digest
    erofs_size: int
    blob_digest: Digest
    blob_size: int


class _HashingWriter:
    def __init__(self, f: object) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.f.write(data)  # type: ignore[attr-defined, no-any-return]


def compress(src: Path, dst: Path, *, level: int = LEVEL, threads: int = -1) -> Compressed:
    """``src`` (an EROFS) → ``dst`` (zstd), with the digests and sizes of both."""
    raw = hashlib.sha256()
    size = 0
    cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        out = _HashingWriter(fout)
        with cctx.stream_writer(out, closefd=False) as z:  # type: ignore[arg-type]
            while data := fin.read(READ):
                raw.update(data)
                size += len(data)
                z.write(data)
    return Compressed(Digest.from_hash(raw), size, Digest.from_hash(out.h), out.n)


def decompress(src: Path | Callable[[], BinaryIO], dst: Path, *, digest: Digest, size: int,
               what: str) -> None:
    """``src`` (zstd; a file, or an opener of a stream still downloading) → ``dst``, which
    must be exactly ``size`` bytes hashing to ``digest``."""
    h = digest.hasher()
    n = 0
    dctx = zstandard.ZstdDecompressor()
    try:
        with (src.open("rb") if isinstance(src, Path) else src()) as fin, \
                dst.open("wb") as fout:
            reader = dctx.stream_reader(fin, read_size=INFLATE_READ)
            while data := reader.read(INFLATE_READ):
                n += len(data)
                if n > size:
                    raise DigestMismatch(what, f"{size} bytes", f"more than {size} bytes")
                h.update(data)
                fout.write(data)
    except zstandard.ZstdError as err:
        raise DigestMismatch(what, "a zstd stream", f"undecodable data ({err})") from None
    if n != size:
        raise DigestMismatch(what, f"{size} bytes", f"{n} bytes")
    if h.hexdigest() != digest.encoded:
        raise DigestMismatch(what, str(digest), f"{digest.algorithm}:{h.hexdigest()}")
