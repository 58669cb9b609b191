"""The streaming tar reader against tarfile-built archives and hand-crafted headers."""

from __future__ import annotations

import io
import tarfile

import pytest

from cachefs.errors import LayerFormatError
from cachefs.ingest import tarstream as ts
from tests.fixtures.images import device, dir_, hardlink, layer_tar, reg, symlink

FORMATS = [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]


def entries(data: bytes, chunk_size: int = 1 << 20) -> list[tuple[ts.TarEntry, bytes]]:
    out = []
    for e in ts.TarReader(io.BytesIO(data), chunk_size=chunk_size):
        assert e.data is not None
        out.append((e, e.data.read()))
    return out


def header(ti: tarfile.TarInfo, fmt: int = tarfile.USTAR_FORMAT) -> bytearray:
    return bytearray(ti.tobuf(format=fmt))


def fix_checksum(hdr: bytearray, at: int = 0) -> bytearray:
    block = hdr[at : at + 512]
    block[148:156] = b" " * 8
    hdr[at + 148 : at + 156] = b"%06o\0 " % sum(block)
    return hdr


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_header(records: bytes, typeflag: bytes = b"x") -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = typeflag
    ti.size = len(records)
    return bytes(header(ti)) + records + b"\0" * (-len(records) % 512)


END = b"\0" * 1024


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_type_roundtrips(fmt: int) -> None:
    data = layer_tar(
        [
            dir_("d/", uid=1000, gid=1001, mtime=1234567),
            reg("d/f", b"hello", mode=0o4755),
            hardlink("d/h", "d/f"),
            symlink("d/s", "../f"),
            device("c", tarfile.CHRTYPE, 4, 64),
            device("b", tarfile.BLKTYPE, 8, 1),
            device("p", tarfile.FIFOTYPE),
            reg("c7", b"contig", type=tarfile.CONTTYPE),
        ],
        fmt,
    )
    got = {e.name: (e, d) for e, d in entries(data)}
    assert list(got) == [b"d/", b"d/f", b"d/h", b"d/s", b"c", b"b", b"p", b"c7"]
    d = got[b"d/"][0]
    assert (d.kind, d.uid, d.gid, d.mtime, d.mode) == (ts.DIRECTORY, 1000, 1001, 1234567, 0o755)
    f, fdata = got[b"d/f"]
    assert (f.kind, f.size, f.mode, fdata) == (ts.REGULAR, 5, 0o4755, b"hello")
    assert (got[b"d/h"][0].kind, got[b"d/h"][0].linkname) == (ts.HARDLINK, b"d/f")
    assert (got[b"d/s"][0].kind, got[b"d/s"][0].linkname) == (ts.SYMLINK, b"../f")
    c = got[b"c"][0]
    assert (c.kind, c.devmajor, c.devminor) == (ts.CHAR, 4, 64)
    assert (got[b"b"][0].kind, got[b"b"][0].devmajor) == (ts.BLOCKDEV, 8)
    assert got[b"p"][0].kind == ts.FIFO
    assert (got[b"c7"][0].kind, got[b"c7"][1]) == (ts.REGULAR, b"contig")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_links(fmt: int) -> None:
    long_dir = "a" * 150 + "/" + "b" * 200
    long_target = "t" * 300
    data = layer_tar([reg(long_dir, b"x"), symlink("s", long_target)], fmt)
    (f, fd), (s, _) = entries(data)
    assert f.name == long_dir.encode() and fd == b"x"
    assert s.linkname == long_target.encode()


def test_ustar_prefix_field() -> None:
    name = "p" * 120 + "/" + "n" * 90
    data = layer_tar([reg(name, b"1")], tarfile.USTAR_FORMAT)
    assert entries(data)[0][0].name == name.encode()


def test_gnu_magic_has_no_prefix() -> None:
    """In old-GNU headers bytes 345.. hold atime/ctime, never a name prefix."""
    hdr = header(reg("f", b"")[0], tarfile.GNU_FORMAT)
    hdr[345:357] = b"%011o\0" % 0o777
    assert entries(bytes(fix_checksum(hdr)) + END)[0][0].name == b"f"


def test_nul_typeflag_is_regular() -> None:
    hdr = header(reg("old", b"ab")[0])
    hdr[156] = 0
    data = bytes(fix_checksum(hdr)) + b"ab".ljust(512, b"\0") + END
    (e, d), = entries(data)
    assert (e.kind, e.typeflag, d) == (ts.REGULAR, 0, b"ab")


def test_socket_and_unknown_types() -> None:
    sock = header(reg("sock")[0])
    sock[156] = 0x60
    sparse = header(reg("sparse", b"S" * 700)[0])
    sparse[156] = ord("S")
    data = (
        bytes(fix_checksum(sock))
        + bytes(fix_checksum(sparse)) + b"S" * 700 + b"\0" * (1024 - 700)
        + layer_tar([reg("after", b"ok")])
    )
    got = entries(data)
    assert [(e.name, e.kind) for e, _ in got] == [
        (b"sock", ts.SOCKET), (b"sparse", ts.OTHER), (b"after", ts.REGULAR)
    ]
    assert got[2][1] == b"ok"


def test_base256_numbers() -> None:
    hdr = header(reg("big", b"")[0])
    hdr[108:116] = b"\x80" + (5_000_000_000).to_bytes(7, "big")  # uid beyond octal range
    hdr[116:124] = b"\x80" + (70000).to_bytes(7, "big")
    hdr[136:148] = b"\x80" + (1 << 40).to_bytes(11, "big")
    (e, _), = entries(bytes(fix_checksum(hdr)) + END)
    assert (e.uid, e.gid, e.mtime) == (5_000_000_000, 70000, 1 << 40)


@pytest.mark.parametrize(
    ("at", "field", "value"),
    [
        (100, b"000644 \0", 0o644),  # libarchive/v7: space then NUL
        (100, b"  644\0\0\0", 0o644),  # leading spaces, NUL padding
        (100, b"644\0junk", 0o644),  # whatever follows the NUL is ignored
        (100, b"\0   0755", 0),  # a leading NUL makes the field empty, so 0
        (108, b"        ", 0),  # all spaces: empty, so 0
        (108, b"\0" * 8, 0),
        (116, b"0001750 ", 0o1750),  # space-terminated instead of NUL
        (124, b"3" + b"\0" * 11, 3),  # size, short
        (136, b"12345670123 ", 0o12345670123),  # mtime, space-terminated
        (136, b"\x80" + (1 << 40).to_bytes(11, "big"), 1 << 40),  # base-256
    ],
)
def test_numbers_off_the_plain_layout_parse_like_before(at: int, field: bytes, value: int) -> None:
    """Headers that are not zero-padded NUL-terminated octal leave the fast path; same values."""
    hdr = header(reg("f", b"abc", mode=0o600)[0])
    hdr[at : at + len(field)] = field
    (e, d), = entries(bytes(fix_checksum(hdr)) + b"abc".ljust(512, b"\0") + END)
    assert d == b"abc"
    got = {100: e.mode, 108: e.uid, 116: e.gid, 124: e.size, 136: e.mtime}[at]
    assert got == value


@pytest.mark.parametrize("chk_tail", [b"\0 ", b" \0", b"  ", b"\0\0"])
def test_checksum_terminators(chk_tail: bytes) -> None:
    hdr = fix_checksum(header(reg("f", b"")[0]))
    hdr[154:156] = chk_tail
    block = hdr[:512]
    block[148:156] = b" " * 8
    assert int(hdr[148:154], 8) == sum(block)
    assert entries(bytes(hdr) + END)[0][0].name == b"f"


@pytest.mark.parametrize("fill", [0, 1, 0x7F, 0x80, 0xFF])
def test_byte_sum_is_sum(fill: int) -> None:
    block = bytes([fill]) * 512
    assert ts._byte_sum(block) == sum(block)
    mixed = bytes(range(256)) * 2
    assert ts._byte_sum(mixed) == sum(mixed)
    assert ts._byte_sum(mixed[::-1]) == sum(mixed)


def test_base256_size_streams_data() -> None:
    hdr = header(reg("f", b"")[0])
    hdr[124:136] = b"\x80" + (3).to_bytes(11, "big")
    (e, d), = entries(bytes(fix_checksum(hdr)) + b"abc".ljust(512, b"\0") + END)
    assert (e.size, d) == (3, b"abc")


def test_negative_base256_rejected() -> None:
    hdr = header(reg("neg", b"")[0])
    hdr[108:116] = b"\xff" * 8
    with pytest.raises(LayerFormatError, match="negative base-256 uid") as ei:
        entries(bytes(fix_checksum(hdr)) + END)
    assert ei.value.entry == "neg"


def test_bad_octal_rejected() -> None:
    hdr = header(reg("bad", b"")[0])
    hdr[100:108] = b"0009999\0"
    with pytest.raises(LayerFormatError, match="invalid octal mode") as ei:
        entries(bytes(fix_checksum(hdr)) + END)
    assert ei.value.entry == "bad"


def test_pax_mtime_ignored_uid_gid_path_honoured() -> None:
    ti, _ = reg("short", b"data", mtime=1111, uid=1, gid=2)
    recs = (
        pax_record(b"mtime", b"1700000000.123456")
        + pax_record(b"uid", b"4000000000")
        + pax_record(b"gid", b"77")
        + pax_record(b"path", "ünï/cödé".encode())
        + pax_record(b"atime", b"1")
    )
    data = pax_header(recs) + bytes(header(ti)) + b"data".ljust(512, b"\0") + END
    (e, d), = entries(data)
    assert (e.mtime, e.uid, e.gid, d) == (1111, 4000000000, 77, b"data")
    assert e.name == "ünï/cödé".encode()


def test_tarfile_pax_float_mtime_ignored() -> None:
    """tarfile writes a PAX mtime for fractional times; the ustar integer field wins."""
    data = layer_tar([reg("f", b"", mtime=1700000000.75)], tarfile.PAX_FORMAT)
    assert b"mtime=1700000000.75" in data
    ustar_field = int(data[1024 + 136 : 1024 + 147], 8)  # tarfile rounds into the ustar field
    assert entries(data)[0][0].mtime == ustar_field == 1700000001


def test_pax_size_and_linkpath() -> None:
    ti, _ = reg("f", b"")
    recs = pax_record(b"size", b"5")
    lti, _ = symlink("l", "short")
    lrecs = pax_record(b"linkpath", b"x" * 200)
    data = (
        pax_header(recs) + bytes(header(ti)) + b"12345".ljust(512, b"\0")
        + pax_header(lrecs) + bytes(header(lti)) + END
    )
    (f, fd), (link, _) = entries(data)
    assert (f.size, fd) == (5, b"12345")
    assert link.linkname == b"x" * 200


def test_pax_xattrs_collected_and_empty_value_accepted() -> None:
    ti, _ = reg("f", b"")
    recs = pax_record(b"SCHILY.xattr.user.a", b"1") + pax_record(b"SCHILY.xattr.user.empty", b"")
    (e, _), = entries(pax_header(recs) + bytes(header(ti)) + END)
    assert e.xattrs == [(b"user.a", b"1"), (b"user.empty", b"")]


def test_pax_records_apply_to_one_entry_only() -> None:
    recs = pax_record(b"uid", b"99")
    data = pax_header(recs) + bytes(header(reg("a")[0])) + bytes(header(reg("b")[0])) + END
    assert [e.uid for e, _ in entries(data)] == [99, 0]


def test_global_pax_applies_to_later_entries_and_x_wins() -> None:
    data = (
        pax_header(pax_record(b"gid", b"5") + pax_record(b"uid", b"6"), b"g")
        + bytes(header(reg("a")[0]))
        + pax_header(pax_record(b"uid", b"9"))
        + bytes(header(reg("b")[0]))
        + END
    )
    assert [(e.name, e.uid, e.gid) for e, _ in entries(data)] == [(b"a", 6, 5), (b"b", 9, 5)]


def test_malformed_pax_record() -> None:
    data = pax_header(b"99 path=x\n") + bytes(header(reg("f")[0])) + END
    with pytest.raises(LayerFormatError, match="malformed PAX record"):
        entries(data)


def test_bad_checksum_names_entry() -> None:
    hdr = header(reg("broken", b"")[0])
    hdr[0:6] = b"BROKEN"
    first = bytes(header(reg("fine", b"")[0]))
    with pytest.raises(LayerFormatError, match="bad tar header checksum") as ei:
        entries(first + bytes(hdr) + END)
    assert ei.value.entry == "BROKEN"


@pytest.mark.parametrize("data", [b"root:x:0:0:root:/root:/bin/bash\n" * 40, b"\x89PNG" * 300])
def test_not_a_tar_says_so(data: bytes) -> None:
    hdr = header(reg("broken", b"")[0])
    hdr[0:6] = b"BROKEN"
    for blob in (data[:2048], bytes(hdr) + END):
        with pytest.raises(LayerFormatError, match="not a tar archive") as ei:
            entries(blob.ljust(1024, b"\0"))
        assert ei.value.entry is None


def test_signed_checksum_accepted() -> None:
    """Some old tars sum the header as signed chars; GNU tar accepts both, so do we."""
    hdr = header(reg("f", b"")[0])
    hdr[0:2] = b"\xe9\xe9"  # name bytes >= 0x80
    block = hdr[:512]
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in block)
    hdr[148:156] = b"%06o\0 " % signed
    assert entries(bytes(hdr) + END)[0][0].name == b"\xe9\xe9"


@pytest.mark.parametrize("cut", [100, 512 + 300, 1024 + 10])
def test_truncated_archive(cut: int) -> None:
    data = layer_tar([reg("f", b"x" * 700), reg("g", b"y")], tarfile.USTAR_FORMAT)
    with pytest.raises(LayerFormatError, match="truncated"):
        entries(data[:cut])


def test_truncated_names_entry() -> None:
    data = layer_tar([reg("victim", b"x" * 700)], tarfile.USTAR_FORMAT)
    with pytest.raises(LayerFormatError) as ei:
        entries(data[:600])
    assert ei.value.entry == "victim"


def test_end_marker_and_clean_eof() -> None:
    data = layer_tar([reg("a", b"1")], tarfile.USTAR_FORMAT)
    assert len(entries(data + b"garbage after the end marker")) == 1
    assert len(entries(data[:1024])) == 1  # no end marker at all: clean EOF is accepted
    assert entries(b"") == []


def test_unread_data_is_skipped_and_data_streams_in_chunks() -> None:
    big = bytes(range(256)) * 4000  # ~1 MiB
    data = layer_tar([reg("big", big), reg("small", b"s")])
    reader = ts.TarReader(io.BytesIO(data), chunk_size=4096)
    it = iter(reader)
    first = next(it)
    assert first.data is not None
    assert first.data.read(10) == big[:10]
    chunks: list[int] = []
    assert first.data.copy_to(lambda c: chunks.append(len(c))) == len(big) - 10
    assert max(chunks) <= 4096
    second = next(it)
    assert second.data is not None and second.data.read() == b"s"
    third = layer_tar([reg("one", b"a" * 5000), reg("two", b"b")])
    assert [d for _, d in entries(third, chunk_size=1000)] == [b"a" * 5000, b"b"]
    names = [e.name for e in ts.TarReader(io.BytesIO(third), chunk_size=700)]  # data unread
    assert names == [b"one", b"two"]


def test_copy_to_small_files_in_the_buffer() -> None:
    """Data that sits in the buffer goes out in one write; state is as after chunked copies."""
    data = layer_tar([reg("a", b"alpha"), reg("b", b"x" * 700), reg("c", b"")])
    reader = ts.TarReader(io.BytesIO(data))
    it = iter(reader)
    a = next(it)
    assert a.data is not None
    assert a.data.read(2) == b"al"
    writes: list[bytes] = []
    assert a.data.copy_to(lambda c: writes.append(bytes(c))) == 3
    assert writes == [b"pha"] and a.data.remaining == 0
    assert a.data.copy_to(writes.append) == 0
    b = next(it)
    assert b.data is not None
    assert b.data.copy_to(lambda c: writes.append(bytes(c))) == 700
    assert writes[1:] == [b"x" * 700]
    assert reader.offset == 3 * 512 + 700  # the padding goes when the reader moves on
    with pytest.raises(RuntimeError, match="after the reader moved on"):
        a.data.copy_to(writes.append)
    assert [e.name for e in it] == [b"c"]


def test_drain_counts_padding() -> None:
    data = layer_tar([reg("a", b"1")], tarfile.USTAR_FORMAT) + b"\0" * 5000
    reader = ts.TarReader(io.BytesIO(data), chunk_size=512)
    assert len(list(reader)) == 1
    reader.drain()
    assert reader.offset == len(data)


@pytest.mark.parametrize("field", [b"-7\0", b"+7\0", b"1_0\0", b"7 7\0"])
def test_numbers_are_plain_octal_digits(field: bytes) -> None:
    with pytest.raises(LayerFormatError, match="invalid octal size"):
        ts.parse_number(field, "size", b"f")
