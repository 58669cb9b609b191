"""A streaming tar reader with exactly the semantics msb's ingest applies.

Why not ``tarfile``: it applies PAX ``mtime`` (msb ignores it and keeps the ustar integer
field), it decodes names to ``str`` (we keep raw bytes), and it would hand us file data in
ways that either buffer or seek. This reader is deliberately small:

* headers: ustar (with ``prefix``), old GNU, PAX; the header checksum is validated
  (unsigned sum, signed sum also accepted as GNU tar does);
* numbers: octal (NUL/space terminated, empty = 0) or GNU base-256 (high bit set);
* PAX ``x`` records apply to the next entry, ``g`` records to every later entry (an ``x``
  record wins). Honoured keys: ``path``, ``linkpath``, ``uid``, ``gid``, ``size``,
  ``SCHILY.xattr.*`` (collected only; layer ingest drops them, as msb does). ``mtime`` and
  everything else is ignored. An empty xattr value is accepted (Go's archive/tar writes it);
* GNU ``L``/``K`` long name / long link records;
* the end of the archive is the first all-zero header block, or a clean EOF on a header
  boundary (the Rust ``tar`` crate msb uses accepts both). EOF inside a header or inside
  data is a truncated archive.

Entries are yielded in order with their data as a bounded reader (``TarEntry.data``): data
never sits in memory as a whole, and whatever a consumer leaves unread is skipped when the
iteration moves on. Any malformed input raises ``LayerFormatError`` naming the entry.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import LayerFormatError

BLOCK = 512
DEFAULT_CHUNK = 1 << 20

# Entry kinds a consumer cares about; everything else comes out as ``OTHER`` (to skip).
REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
SOCKET = b"`"  # msb's non-standard socket type byte 0x60
OTHER = b"?"

_TYPE_KIND: dict[int, bytes] = {
    0: REGULAR,
    ord("0"): REGULAR,
    ord("7"): REGULAR,
    ord("1"): HARDLINK,
    ord("2"): SYMLINK,
    ord("3"): CHAR,
    ord("4"): BLOCKDEV,
    ord("5"): DIRECTORY,
    ord("6"): FIFO,
    0x60: SOCKET,
}

_XATTR_PREFIX = b"SCHILY.xattr."
_MAX_META = 16 << 20  # a PAX or GNU long-name record larger than this is not a real header


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(slots=True)
class TarEntry:
    """One archive member after PAX/GNU records were applied. Names are raw bytes."""

    name: bytes
    kind: bytes  # one of REGULAR, HARDLINK, …, OTHER
    typeflag: int  # the raw header type byte
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int  # the ustar integer field; PAX mtime is ignored on purpose
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: EntryData | None = None


def display_name(name: bytes) -> str:
    """A tar member name as errors show it: bytes that are not UTF-8 stay visible."""
    return name.decode("utf-8", "backslashreplace")


def parse_number(field_: bytes, what: str, entry: bytes) -> int:
    """A numeric header field: GNU base-256 if the top bit is set, otherwise octal."""
    if field_ and field_[0] & 0x80:
        # GNU base-256: big-endian two's complement with the marker bit; 0xff.. is negative
        if field_[0] & 0x40:
            raise LayerFormatError(f"negative base-256 {what}", entry=display_name(entry))
        return int.from_bytes(bytes((field_[0] & 0x7F,)) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    # int() alone would also take a sign or underscores ("-7" as a size): digits only
    if text.strip(b"01234567"):
        raise LayerFormatError(f"invalid octal {what} field {field_!r}", entry=display_name(entry))
    return int(text, 8)


# The numeric fields mode..chksum (offsets 100..156) as every common writer (GNU tar, Go's
# archive/tar, Python's tarfile) emits them: zero-padded octal, NUL-terminated, checksum
# "dddddd" plus two of NUL/space. A header that matches parses with six C-level ``int``
# calls and gives exactly what ``parse_number`` gives (digits only: nothing to split,
# strip or reject); anything else (base-256, space padding, odd terminators, garbage) goes
# through ``parse_number`` field by field, with its error messages and their order.
_PLAIN_NUMBERS = re.compile(
    rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})[ \0][ \0]"
)
_adler32 = zlib.adler32


def _byte_sum(hdr: bytes) -> int:
    """``sum(hdr)`` for a 512-byte block, five times faster than ``sum``.

    Why this is exact: Adler-32's low half is ``(1 + sum of the bytes) mod 65521``, and a
    256-byte half of a block sums to at most 256 * 255 = 65280, so no reduction happens.
    """
    return (_adler32(hdr[:256]) & 0xFFFF) + (_adler32(hdr[256:]) & 0xFFFF) - 2


def _header_checksum_ok(hdr: bytes) -> bool:
    """Does the checksum field parse and match (unsigned or signed sum)? Never raises."""
    text = hdr[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        stored = int(text, 8)
    except ValueError:
        return False
    unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 0x20
    high = sum(1 for b in hdr[:148] + hdr[156:] if b >= 0x80)
    return stored in (unsigned, unsigned - 256 * high)


def _parse_pax(data: bytes, entry: bytes) -> dict[bytes, bytes]:
    """``"<len> <key>=<value>\\n"`` records; later keys win."""
    out: dict[bytes, bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:  # some writers pad the record block with NULs
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise LayerFormatError("malformed PAX record (no length)", entry=display_name(entry))
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise LayerFormatError("malformed PAX record length",
                                   entry=display_name(entry)) from None
        rec_end = pos + length
        if length <= 0 or rec_end > end or data[rec_end - 1] != 0x0A:
            raise LayerFormatError("malformed PAX record", entry=display_name(entry))
        eq = data.find(b"=", sp + 1, rec_end)
        if eq < 0:
            raise LayerFormatError("malformed PAX record (no '=')", entry=display_name(entry))
        out[data[sp + 1 : eq]] = data[eq + 1 : rec_end - 1]
        pos = rec_end
    return out


def _pax_int(value: bytes, key: str, entry: bytes) -> int:
    try:
        n = int(value)
    except ValueError:
        raise LayerFormatError(f"invalid PAX {key} {value!r}", entry=display_name(entry)) from None
    if n < 0:
        raise LayerFormatError(f"negative PAX {key}", entry=display_name(entry))
    return n


_META_TYPES = frozenset((0x78, 0x67, 0x4C, 0x4B))  # 'x'/'g' PAX, 'L'/'K' GNU long name/link


class _PendingMeta:
    """PAX and GNU records read so far that apply to the next real entry (global PAX: to
    every later entry)."""

    __slots__ = ("global_pax", "gnu_link", "gnu_name", "pax")

    def __init__(self) -> None:
        self.global_pax: dict[bytes, bytes] = {}
        self.pax: dict[bytes, bytes] | None = None
        self.gnu_name: bytes | None = None
        self.gnu_link: bytes | None = None


def _check_signed_checksum(hdr: bytes, stored: int, unsigned: int, raw_name: bytes) -> None:
    """The stored checksum is not the unsigned sum: old writers summed signed bytes."""
    high = sum(1 for b in hdr[:148] + hdr[156:] if b >= 0x80)
    signed = unsigned - 256 * high
    if stored != signed:
        raise LayerFormatError(
            f"bad tar header checksum (stored {stored:#o}, computed {unsigned:#o})",
            entry=display_name(raw_name),
        )


def _pax_overrides(
    records: dict[bytes, bytes], name: bytes, linkname: bytes, uid: int, gid: int, size: int,
    xattrs: list[tuple[bytes, bytes]],
) -> tuple[bytes, bytes, int, int, int]:
    """PAX path/linkpath/uid/gid/size over the header's; SCHILY xattrs appended to
    ``xattrs``. (PAX mtime is ignored on purpose: see ``TarEntry.mtime``.)"""
    if b"path" in records:
        name = records[b"path"]
    if b"linkpath" in records:
        linkname = records[b"linkpath"]
    if b"uid" in records:
        uid = _pax_int(records[b"uid"], "uid", name)
    if b"gid" in records:
        gid = _pax_int(records[b"gid"], "gid", name)
    if b"size" in records:
        size = _pax_int(records[b"size"], "size", name)
    for key, value in records.items():
        if key.startswith(_XATTR_PREFIX):
            xattrs.append((key[len(_XATTR_PREFIX) :], value))
    return name, linkname, uid, gid, size


class EntryData:
    """The bounded data of one entry; valid until the reader moves to the next entry."""

    __slots__ = ("_reader", "remaining", "size")

    def __init__(self, reader: TarReader, size: int) -> None:
        self._reader = reader
        self.size = size
        self.remaining = size

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all remaining if ``n < 0``); ``b""`` at the end."""
        if n < 0 or n > self.remaining:
            n = self.remaining
        if n == 0:
            return b""
        parts = []
        got = 0
        for chunk in self._reader._data_chunks(self, n):
            parts.append(bytes(chunk))
            got += len(chunk)
        return b"".join(parts)

    def copy_to(self, write: Callable[[Any], Any]) -> int:
        """Stream every remaining byte to ``write`` (memoryview chunks); returns the count."""
        reader = self._reader
        n = self.remaining
        pos = reader._pos
        if self is reader._current and 0 < n <= len(reader._buf) - pos:
            # the common small file: all of it is in the buffer, one write, no generator
            reader._pos = pos + n
            reader.offset += n
            self.remaining = 0
            write(memoryview(reader._buf)[pos : pos + n])
            return n
        total = 0
        for chunk in self._reader._data_chunks(self, self.remaining):
            write(chunk)
            total += len(chunk)
        return total


class TarReader:
    """Iterate a tar stream (anything with ``read(n)``) entry by entry, without seeking."""

    def __init__(self, stream: Readable, *, chunk_size: int = DEFAULT_CHUNK) -> None:
        self._stream = stream
        self._chunk = chunk_size
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._current: EntryData | None = None
        self._current_name = b""
        self.offset = 0  # bytes of the tar stream consumed so far

    # -- buffer -------------------------------------------------------------------------
    def _fill(self) -> bool:
        """Replace the (exhausted) buffer with the next chunk; False at EOF."""
        while not self._eof:
            data = self._stream.read(self._chunk)
            if not data:
                self._eof = True
                break
            self._buf = data
            self._pos = 0
            return True
        return False

    def _take(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, ``None`` on EOF before the first byte; a partial read raises."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos >= n:
            self._pos = pos + n
            self.offset += n
            return buf[pos : pos + n]
        parts = [buf[pos:]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n:
            if not self._fill():
                if have == 0:
                    return None
                raise LayerFormatError(
                    f"truncated tar archive (needed {n} bytes at offset {self.offset})",
                    entry=display_name(self._current_name) if self._current_name else None,
                )
            k = min(n - have, len(self._buf))
            parts.append(self._buf[:k])
            self._pos = k
            have += k
        self.offset += n
        return b"".join(parts)

    def _buffered(self, what: str) -> int:
        """Bytes buffered past the position, filling the buffer when there are none; an
        archive that ends first is truncated inside the current entry's ``what``."""
        avail = len(self._buf) - self._pos
        while avail == 0:
            if not self._fill():
                raise LayerFormatError(
                    f"truncated tar archive ({what} ends early)",
                    entry=display_name(self._current_name),
                )
            avail = len(self._buf) - self._pos
        return avail

    def _skip(self, n: int) -> None:
        while n > 0:
            k = min(n, self._buffered("data"))
            self._pos += k
            self.offset += k
            n -= k

    def _data_chunks(self, data: EntryData, n: int) -> Iterator[memoryview]:
        if data is not self._current:
            raise RuntimeError("entry data read after the reader moved on")
        while n > 0:
            k = min(n, self._buffered("file data"))
            pos = self._pos
            self._pos = pos + k
            self.offset += k
            data.remaining -= k
            n -= k
            yield memoryview(self._buf)[pos : pos + k]

    def _finish_current(self) -> None:
        cur = self._current
        if cur is not None:
            self._skip(cur.remaining + (-cur.size % BLOCK))
            cur.remaining = 0
            self._current = None

    # -- headers ------------------------------------------------------------------------
    def _meta_data(self, size: int, name: bytes) -> bytes:
        if size > _MAX_META:
            raise LayerFormatError(f"metadata record of {size} bytes", entry=display_name(name))
        data = self._take(size + (-size % BLOCK)) if size else b""
        if data is None:
            raise LayerFormatError("truncated tar archive (metadata record)",
                                   entry=display_name(name))
        return data[:size]

    def __iter__(self) -> Iterator[TarEntry]:
        # This loop runs once per member and bounds pull/load CPU time (it holds the GIL
        # beside the inflate and hash threads): a plain header (octal numbers as every
        # common writer emits them, no pending PAX/GNU record) is parsed inline with no
        # call but the C ones; the rare cases (bad checksum, base-256 or odd numbers,
        # PAX/GNU records) are out of line, with their error messages and their order.
        meta = _PendingMeta()
        plain_numbers = _PLAIN_NUMBERS.match
        byte_sum = _byte_sum
        type_kind = _TYPE_KIND.get
        meta_types = _META_TYPES
        while True:
            # the rest of the previous entry, then the next header block (both usually
            # inside the buffer)
            cur = self._current
            if cur is not None:
                rest = cur.remaining + (-cur.size % BLOCK)
                pos = self._pos
                if 0 <= rest <= len(self._buf) - pos:  # (a "-1" size field gives rest < 0)
                    self._pos = pos + rest
                    self.offset += rest
                else:
                    self._skip(rest)
                cur.remaining = 0
                self._current = None
            self._current_name = b""
            buf, pos = self._buf, self._pos
            if len(buf) - pos >= BLOCK:
                self._pos = end = pos + BLOCK
                self.offset += BLOCK
                hdr = buf[pos:end]
            else:
                hdr_ = self._take(BLOCK)
                if hdr_ is None:
                    return  # clean EOF on a header boundary
                hdr = hdr_
            total = byte_sum(hdr)
            if not total:
                return  # end-of-archive marker (all zero); the caller drains the rest
            nul = hdr.find(0, 0, 100)
            raw_name = hdr[:nul] if nul >= 0 else hdr[:100]
            self._current_name = raw_name
            if self.offset == BLOCK and not _header_checksum_ok(hdr):
                # the very first block is no tar header: say that, not "entry <garbage>"
                raise LayerFormatError("not a tar archive (no valid tar header at offset 0)")
            numbers = plain_numbers(hdr, 100)
            if numbers is None:
                entry = self._odd_header(hdr, raw_name, total, meta)
                if entry is None:
                    continue
            else:
                mode_, uid_, gid_, size_, mtime_, stored_ = numbers.groups()
                stored = int(stored_, 8)
                # the checksum field is 6 digits and 2 of NUL/space: the sum of the block
                # with it read as 8 spaces
                unsigned = total - sum(hdr[148:156]) + 8 * 0x20
                if stored != unsigned:
                    _check_signed_checksum(hdr, stored, unsigned, raw_name)
                typeflag = hdr[156]
                size = int(size_, 8)
                if typeflag in meta_types:
                    self._take_meta(meta, typeflag, size, raw_name)
                    continue
                if (meta.pax is not None or meta.global_pax or meta.gnu_name is not None
                        or meta.gnu_link is not None):
                    entry = self._entry(hdr, raw_name, numbers.groups(), typeflag, size, meta)
                else:
                    name = raw_name
                    if hdr[257:263] == b"ustar\0" and hdr[345]:
                        nul = hdr.find(0, 345, 500)
                        name = (hdr[345:nul] if nul >= 0 else hdr[345:500]) + b"/" + name
                        self._current_name = name
                    if hdr[157]:
                        nul = hdr.find(0, 157, 257)
                        linkname = hdr[157:nul] if nul >= 0 else hdr[157:257]
                    else:
                        linkname = b""
                    kind = type_kind(typeflag, OTHER)
                    if kind is CHAR or kind is BLOCKDEV:
                        devmajor = parse_number(hdr[329:337], "devmajor", name)
                        devminor = parse_number(hdr[337:345], "devminor", name)
                    else:
                        devmajor = devminor = 0
                    entry = TarEntry(
                        name, kind, typeflag, int(mode_, 8), int(uid_, 8), int(gid_, 8), size,
                        int(mtime_, 8), linkname, devmajor, devminor, [],
                    )
            self._current = entry.data = EntryData(self, entry.size)
            yield entry

    def _odd_header(self, hdr: bytes, raw_name: bytes, total: int, meta: _PendingMeta
                    ) -> TarEntry | None:
        """A header whose numbers are not plain octal: each parsed by ``parse_number`` in
        header order, so the first bad one is reported. None: it was a PAX/GNU record."""
        stored = parse_number(hdr[148:156], "checksum", raw_name)
        unsigned = total - sum(hdr[148:156]) + 8 * 0x20
        if stored != unsigned:
            _check_signed_checksum(hdr, stored, unsigned, raw_name)
        typeflag = hdr[156]
        size = parse_number(hdr[124:136], "size", raw_name)
        if typeflag in _META_TYPES:
            self._take_meta(meta, typeflag, size, raw_name)
            return None
        return self._entry(hdr, raw_name, None, typeflag, size, meta)

    def _take_meta(self, meta: _PendingMeta, typeflag: int, size: int, raw_name: bytes) -> None:
        """A PAX or GNU long-name/link record: kept for the next real entry."""
        if typeflag == 0x4C:  # 'L' GNU long name
            meta.gnu_name = self._meta_data(size, raw_name).rstrip(b"\0")
        elif typeflag == 0x4B:  # 'K' GNU long link
            meta.gnu_link = self._meta_data(size, raw_name).rstrip(b"\0")
        else:  # 'x' per-entry PAX, 'g' global PAX
            records = _parse_pax(self._meta_data(size, raw_name), raw_name)
            if typeflag == 0x67:
                meta.global_pax.update(records)
            else:
                meta.pax = records if meta.pax is None else {**meta.pax, **records}

    def _entry(self, hdr: bytes, raw_name: bytes, fields: tuple[bytes, ...] | None,
               typeflag: int, size: int, meta: _PendingMeta) -> TarEntry:
        """The entry a header describes, with the pending PAX/GNU records applied (and
        consumed). Fields are parsed in header order, so the first bad one is reported."""
        name = raw_name
        if hdr[257:263] == b"ustar\0":
            nul = hdr.find(0, 345, 500)
            prefix = hdr[345:nul] if nul >= 0 else hdr[345:500]
            if prefix:
                name = prefix + b"/" + name
        if meta.gnu_name is not None:
            name = meta.gnu_name
        if meta.gnu_link is not None:
            linkname = meta.gnu_link
        else:
            nul = hdr.find(0, 157, 257)
            linkname = hdr[157:nul] if nul >= 0 else hdr[157:257]
        if fields is not None:
            uid = int(fields[1], 8)
            gid = int(fields[2], 8)
        else:
            uid = parse_number(hdr[108:116], "uid", name)
            gid = parse_number(hdr[116:124], "gid", name)
        xattrs: list[tuple[bytes, bytes]] = []
        pax = meta.pax
        records = {**meta.global_pax, **pax} if pax is not None else meta.global_pax
        if records:
            name, linkname, uid, gid, size = _pax_overrides(
                records, name, linkname, uid, gid, size, xattrs
            )
        meta.pax = meta.gnu_name = meta.gnu_link = None
        self._current_name = name
        if fields is not None:
            mode = int(fields[0], 8)
            mtime = int(fields[4], 8)
        else:
            mode = parse_number(hdr[100:108], "mode", name)
            mtime = parse_number(hdr[136:148], "mtime", name)
        kind = _TYPE_KIND.get(typeflag, OTHER)
        if kind is CHAR or kind is BLOCKDEV:
            devmajor = parse_number(hdr[329:337], "devmajor", name)
            devminor = parse_number(hdr[337:345], "devminor", name)
        else:
            devmajor = devminor = 0
        return TarEntry(
            name, kind, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor,
            xattrs,
        )

    def drain(self) -> int:
        """Read the stream to EOF (after the end marker); returns the bytes discarded."""
        self._finish_current()
        n = len(self._buf) - self._pos
        self.offset += n
        self._buf, self._pos = b"", 0
        while self._fill():
            n += len(self._buf)
            self.offset += len(self._buf)
            self._buf, self._pos = b"", 0
        return n
