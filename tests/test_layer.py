"""Layer ingest: decompression, diff_id, and every FORMATS.md §3.12 rule."""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
import tracemalloc
import zlib

import pytest
import zstandard

from cachefs.digest import Digest
from cachefs.erofs.tree import OPAQUE_XATTR, FileType, Node, SpoolExtent, walk
from cachefs.errors import DigestMismatch, LayerFormatError, UsageError
from cachefs.ingest import layer as layer_mod
from cachefs.ingest.layer import (
    Compression,
    IngestedLayer,
    compression_from_media_type,
    detect_compression,
    ingest_layer,
)
from tests.fixtures.images import Entry, device, dir_, hardlink, layer_tar, reg, symlink
from tests.test_tarstream import END, fix_checksum, header, pax_header, pax_record


def ingest(
    blob: bytes,
    compression: Compression = Compression.NONE,
    expected: Digest | None = None,
    label: str = "L0",
) -> tuple[IngestedLayer, bytes]:
    with tempfile.TemporaryFile() as spool:
        res = ingest_layer(
            io.BytesIO(blob), compression=compression, expected_diff_id=expected,
            spool=spool, layer_label=label,
        )
        spool.seek(0)
        return res, spool.read()


def tree_of(entries: list[Entry]) -> Node:
    return ingest(layer_tar(entries))[0].root


def at(root: Node, path: bytes) -> Node:
    node: Node | None = root
    for comp in path.split(b"/"):
        node = node.child(comp) if node is not None else None
    assert node is not None, path
    return node


def paths(root: Node) -> list[bytes]:
    return [p for p, _ in walk(root) if p]


def fails(entries: list[Entry] | bytes, match: str, entry: str | None = None) -> None:
    blob = entries if isinstance(entries, bytes) else layer_tar(entries)
    with pytest.raises(LayerFormatError, match=match) as ei:
        ingest(blob, label="sha256:abc")
    assert ei.value.layer == "sha256:abc"
    if entry is not None:
        assert ei.value.entry == entry
        assert f"entry {entry!r}" in str(ei.value)


# -- compression ------------------------------------------------------------------------


def test_compression_from_media_type() -> None:
    mt = "application/vnd.oci.image.layer.v1.tar"
    assert compression_from_media_type(mt + "+gzip") is Compression.GZIP
    assert compression_from_media_type(mt + "+zstd") is Compression.ZSTD
    assert compression_from_media_type(
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    ) is Compression.GZIP
    assert compression_from_media_type(mt) is Compression.NONE
    assert compression_from_media_type(None) is Compression.NONE


def test_detect_compression() -> None:
    assert detect_compression(gzip.compress(b"x")) is Compression.GZIP
    assert detect_compression(zstandard.ZstdCompressor().compress(b"x")) is Compression.ZSTD
    assert detect_compression(layer_tar([reg("a")])) is Compression.NONE
    assert detect_compression(b"") is Compression.NONE


SAMPLE = layer_tar([dir_("d/"), reg("d/a", b"A" * 5000), reg("b", b"bee"), symlink("s", "d/a")])


def _gzip_multi(data: bytes) -> bytes:
    return b"".join(gzip.compress(data[i : i + 1500], mtime=0) for i in range(0, len(data), 1500))


def _zstd_multi(data: bytes) -> bytes:
    c = zstandard.ZstdCompressor()
    return c.compress(data[:2000]) + c.compress(data[2000:])


@pytest.mark.parametrize(
    ("compression", "blob"),
    [
        (Compression.NONE, SAMPLE),
        (Compression.GZIP, gzip.compress(SAMPLE)),
        (Compression.GZIP, _gzip_multi(SAMPLE)),
        (Compression.ZSTD, zstandard.ZstdCompressor().compress(SAMPLE)),
        (Compression.ZSTD, _zstd_multi(SAMPLE)),
    ],
    ids=["plain", "gzip", "gzip-multimember", "zstd", "zstd-multiframe"],
)
def test_every_compression_gives_same_tree(compression: Compression, blob: bytes) -> None:
    res, spool = ingest(blob, compression, Digest.sha256_of(SAMPLE))
    assert res.diff_id == Digest.sha256_of(SAMPLE)
    assert res.uncompressed_size == len(SAMPLE)
    assert res.entries == 4
    assert paths(res.root) == [b"b", b"d", b"d/a", b"s"]
    a, b = at(res.root, b"d/a"), at(res.root, b"b")
    # each file's bytes padded with zeros to the next 4 KiB, as in the image's data area
    assert (a.size, a.content, b.size, b.content) == (5000, SpoolExtent(0), 3, SpoolExtent(8192))
    assert spool == b"A" * 5000 + bytes(3192) + b"bee" + bytes(4093)


def test_gzip_nul_padding_between_members_is_skipped() -> None:
    blob = gzip.compress(SAMPLE[:3000]) + b"\0" * 10 + gzip.compress(SAMPLE[3000:]) + b"\0" * 7
    assert ingest(blob, Compression.GZIP)[0].diff_id == Digest.sha256_of(SAMPLE)


@pytest.mark.parametrize(
    ("compression", "blob", "match"),
    [
        (Compression.GZIP, gzip.compress(SAMPLE)[:-20], "truncated gzip"),
        (Compression.GZIP, gzip.compress(SAMPLE)[:60], "truncated gzip"),
        (Compression.GZIP, b"\x1f\x8b" + b"\x00" * 50, "corrupt gzip"),
        (Compression.GZIP, gzip.compress(SAMPLE) + b"trailing junk", "corrupt gzip"),
        (Compression.GZIP, b"", "empty gzip"),
        (Compression.ZSTD, zstandard.ZstdCompressor().compress(SAMPLE)[:-10], "truncated zstd"),
        (Compression.ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 40, "corrupt zstd"),
        (Compression.ZSTD, b"", "empty zstd"),
    ],
)
def test_bad_compressed_input(compression: Compression, blob: bytes, match: str) -> None:
    with pytest.raises(LayerFormatError, match=match) as ei:
        ingest(blob, compression, label="sha256:feed")
    assert ei.value.layer == "sha256:feed"


def test_gzip_bomb_output_is_bounded() -> None:
    """64 MiB of zeros decompress in bounded pieces: memory stays far below the file size."""
    big = 64 << 20
    tar = layer_tar([reg("zeros", bytes(big))])
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    blob = c.compress(tar) + c.flush()
    del tar
    tracemalloc.start()
    try:
        with tempfile.TemporaryFile() as spool:
            res = ingest_layer(io.BytesIO(blob), compression=Compression.GZIP,
                               expected_diff_id=None, spool=spool, layer_label="bomb")
            assert spool.tell() == big
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert at(res.root, b"zeros").size == big
    assert peak < 12 << 20


# -- diff_id ----------------------------------------------------------------------------


def test_diff_id_covers_padding_after_end_marker() -> None:
    padded = SAMPLE + b"\0" * 20 * 512
    res, _ = ingest(gzip.compress(padded), Compression.GZIP, Digest.sha256_of(padded))
    assert res.diff_id == Digest.sha256_of(padded)
    assert res.uncompressed_size == len(padded)
    with pytest.raises(DigestMismatch) as ei:
        ingest(gzip.compress(padded), Compression.GZIP, Digest.sha256_of(SAMPLE), "sha256:x")
    assert ei.value.expected == str(Digest.sha256_of(SAMPLE))
    assert ei.value.actual == str(Digest.sha256_of(padded))
    assert "sha256:x" in ei.value.what


def test_diff_id_without_expectation_is_computed() -> None:
    res, _ = ingest(SAMPLE)
    assert res.diff_id == Digest.sha256_of(SAMPLE)


# -- §3.12 paths ------------------------------------------------------------------------


def test_leading_dot_slash_and_slashes_stripped() -> None:
    root = tree_of([reg("./a", b"1"), reg("/b", b"2"), dir_("./c/"), reg("c//d/./e", b"3")])
    assert paths(root) == [b"a", b"b", b"c", b"c/d", b"c/d/e"]


def test_paths_under_a_known_directory_normalise_as_any_other() -> None:
    # "a" is known (an entry made it) before each odd path below, so each is looked up
    # by its parent first: the lookup must not take "a/." or "a/.." for a name in "a"
    root = tree_of([
        dir_("a/"), reg("a/f", b"1"), reg("a/./g", b"2"), reg("a//h", b"3"),
        reg("./a/i/", b"4"), dir_("a/.", mode=0o700), reg("a/j/k", b"5"), reg("/a/j/l", b"6"),
    ])
    assert paths(root) == [b"a", b"a/f", b"a/g", b"a/h", b"a/i", b"a/j", b"a/j/k", b"a/j/l"]
    assert at(root, b"a").mode == 0o700
    fails([dir_("a/"), reg("a/f"), reg("a/..")], "'..' component", "a/..")
    fails([dir_("a/"), reg("a/f"), reg("a/../f")], "'..' component", "a/../f")
    fails([dir_("a/"), reg("a/f"), reg("a/f/g")], "not a directory", "a/f/g")


def test_root_entry_skipped_root_keeps_defaults() -> None:
    root = tree_of([dir_("./", mode=0o700, uid=5, gid=6, mtime=99), reg("f")])
    assert (root.mode, root.uid, root.gid, root.mtime, root.xattrs) == (0o755, 0, 0, 0, [])
    assert paths(root) == [b"f"]


def test_dotdot_component_fails() -> None:
    fails([reg("a/../../etc/passwd", b"x")], "'..' component", "a/../../etc/passwd")


def test_implicit_parents_have_defaults() -> None:
    root = tree_of([reg("x/y/z", b"1", uid=7, mtime=5)])
    for p in (b"x", b"x/y"):
        n = at(root, p)
        assert (n.type, n.mode, n.uid, n.gid, n.mtime) == (FileType.DIR, 0o755, 0, 0, 0)


def test_parent_that_is_a_file_fails() -> None:
    fails([reg("f", b"1"), reg("f/g", b"2")], "not a directory", "f/g")


def test_dir_on_dir_replaces_metadata_and_resets_xattrs() -> None:
    root = tree_of([
        dir_("d/", mode=0o700, uid=1, gid=2, mtime=3),
        reg("d/.wh..wh..opq"),
        dir_("d/", mode=0o750, uid=4, gid=5, mtime=6),
        reg("d/f"),
    ])
    d = at(root, b"d")
    assert (d.mode, d.uid, d.gid, d.mtime, d.xattrs) == (0o750, 4, 5, 6, [])
    assert paths(root) == [b"d", b"d/f"]


def test_dir_on_implicit_dir_keeps_children() -> None:
    root = tree_of([reg("d/f"), dir_("d", mode=0o711, uid=9)])
    assert (at(root, b"d").mode, at(root, b"d").uid) == (0o711, 9)
    assert paths(root) == [b"d", b"d/f"]


def test_non_dir_onto_dir_fails() -> None:
    fails([dir_("d/"), reg("d", b"x")], "non-directory entry replaces a directory", "d")
    fails([reg("d/f"), symlink("d", "x")], "replaces a directory", "d")


def test_non_dir_onto_non_dir_last_wins() -> None:
    root = tree_of([reg("f", b"first"), symlink("f", "target")])
    assert (at(root, b"f").type, at(root, b"f").target) == (FileType.SYMLINK, b"target")
    root = tree_of([symlink("g", "t"), reg("g", b"second")])
    assert (at(root, b"g").type, at(root, b"g").size) == (FileType.REG, 6)


def test_dir_onto_non_dir_replaces() -> None:
    root = tree_of([reg("x", b"1"), dir_("x/", mode=0o700)])
    assert (at(root, b"x").type, at(root, b"x").mode) == (FileType.DIR, 0o700)


# -- hardlinks --------------------------------------------------------------------------


def test_hardlink_shares_node() -> None:
    root = tree_of([reg("a", b"data", uid=3), hardlink("d/b", "a"), hardlink("c", "./d/b")])
    a, b, c = at(root, b"a"), at(root, b"d/b"), at(root, b"c")
    assert a is b is c
    assert a.uid == 3


def test_hardlink_replaced_by_later_entry_splits_group() -> None:
    root = tree_of([reg("a", b"data"), hardlink("b", "a"), reg("a", b"new")])
    assert at(root, b"a") is not at(root, b"b")
    assert at(root, b"b").size == 4


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([hardlink("h", "missing")], "does not exist"),
        ([reg("h", b"x"), hardlink("later", "nope/h")], "does not exist"),
        ([dir_("d/"), hardlink("h", "d")], "not a regular file"),
        ([symlink("s", "x"), hardlink("h", "s")], "not a regular file"),
        ([reg("f"), hardlink("h", "../f")], "'..' component"),
    ],
)
def test_bad_hardlinks_fail(entries: list[Entry], match: str) -> None:
    fails(entries, match, entries[-1][0].name)


def test_hardlink_onto_dir_fails() -> None:
    fails([reg("f"), dir_("d/"), hardlink("d", "f")], "replaces a directory", "d")


# -- whiteouts --------------------------------------------------------------------------


def test_whiteout_becomes_char_device_with_header_metadata() -> None:
    root = tree_of([reg("d/.wh.gone", mode=0o600, uid=8, gid=9, mtime=77), symlink(".wh.sym", "x")])
    gone = at(root, b"d/gone")
    assert gone.is_whiteout
    assert (gone.mode, gone.uid, gone.gid, gone.mtime) == (0o600, 8, 9, 77)
    assert at(root, b"sym").is_whiteout
    assert paths(root) == [b"d", b"d/gone", b"sym"]


def test_opaque_marker_sets_xattr_on_parent() -> None:
    root = tree_of([dir_("d/", mode=0o700), reg("d/.wh..wh..opq"), reg("d/.wh..wh..opq"),
                    reg("e/f/.wh..wh..opq"), reg(".wh..wh..opq")])
    assert at(root, b"d").xattrs == [OPAQUE_XATTR]  # set once
    assert at(root, b"d").mode == 0o700
    assert at(root, b"e/f").xattrs == [OPAQUE_XATTR]
    assert at(root, b"e").xattrs == []
    assert root.xattrs == [OPAQUE_XATTR]
    assert paths(root) == [b"d", b"e", b"e/f"]


def test_whiteout_names_that_stay_normal() -> None:
    root = tree_of([reg(".wh.", b"1"), dir_(".wh.dir/"), hardlink(".wh.link", ".wh."),
                    device(".wh.dev", tarfile.FIFOTYPE)])
    assert paths(root) == [b".wh.", b".wh.dev", b".wh.dir", b".wh.link"]
    assert at(root, b".wh.dir").type is FileType.DIR


def test_whiteout_onto_dir_fails() -> None:
    fails([dir_("x/"), reg(".wh.x")], "replaces a directory", ".wh.x")


# -- metadata ---------------------------------------------------------------------------


def test_mode_masked_to_permission_bits() -> None:
    hdr = header(reg("f")[0])
    hdr[100:108] = b"%07o\0" % 0o107755
    root = ingest(bytes(fix_checksum(hdr)) + END)[0].root
    assert at(root, b"f").mode == 0o7755


def test_pax_uid_gid_honoured_mtime_ignored() -> None:
    ti, _ = reg("f", b"", uid=1, gid=2, mtime=1000)
    recs = pax_record(b"uid", b"100000") + pax_record(b"gid", b"200000")
    recs += pax_record(b"mtime", b"1700000000.5")
    root = ingest(pax_header(recs) + bytes(header(ti)) + END)[0].root
    f = at(root, b"f")
    assert (f.uid, f.gid, f.mtime) == (100000, 200000, 1000)


def test_pax_xattrs_dropped_and_empty_value_accepted() -> None:
    ti, _ = dir_("d/")
    recs = pax_record(b"SCHILY.xattr.user.x", b"1") + pax_record(b"SCHILY.xattr.security.e", b"")
    root = ingest(pax_header(recs) + bytes(header(ti)) + END)[0].root
    assert at(root, b"d").xattrs == []


def test_devices_fifo_socket_and_skipped_types() -> None:
    sock = header(reg("sock")[0])
    sock[156] = 0x60
    sparse = header(reg("sparse", b"S" * 10)[0])
    sparse[156] = ord("S")
    tar = layer_tar([device("c", tarfile.CHRTYPE, 300, 70000), device("b", tarfile.BLKTYPE, 8, 3),
                     device("p", tarfile.FIFOTYPE)], tarfile.GNU_FORMAT)[: 3 * 512]
    tar += bytes(fix_checksum(sock)) + bytes(fix_checksum(sparse)) + b"S" * 10 + b"\0" * 502 + END
    res, spool = ingest(tar)
    root = res.root
    c, b = at(root, b"c"), at(root, b"b")
    assert (c.type, c.rdev_major, c.rdev_minor) == (FileType.CHR, 300, 70000)
    assert (b.type, b.rdev_major, b.rdev_minor) == (FileType.BLK, 8, 3)
    assert at(root, b"p").type is FileType.FIFO
    assert at(root, b"sock").type is FileType.SOCK
    assert paths(root) == [b"b", b"c", b"p", b"sock"]
    assert res.entries == 5
    assert spool == b""


def test_symlink_target_kept_raw() -> None:
    root = tree_of([symlink("s", "a" * 4096)])
    assert at(root, b"s").target == b"a" * 4096


def test_names_are_raw_bytes() -> None:
    ti = tarfile.TarInfo("x")
    tar = bytearray(layer_tar([(ti, b"")], tarfile.USTAR_FORMAT))
    tar[0:3] = b"\xff\xfe\x00"
    root = ingest(bytes(fix_checksum(tar)))[0].root
    assert paths(root) == [b"\xff\xfe"]


def test_spool_appends_from_current_position() -> None:
    with tempfile.TemporaryFile() as spool:
        spool.write(b"prefix")
        res = ingest_layer(io.BytesIO(SAMPLE), compression=Compression.NONE,
                           expected_diff_id=None, spool=spool, layer_label="L")
        assert at(res.root, b"d/a").content == SpoolExtent(6)
        assert at(res.root, b"b").content == SpoolExtent(8192)  # padded to 4 KiB


def test_empty_regular_file() -> None:
    root = tree_of([reg("e", b"")])
    assert (at(root, b"e").size, at(root, b"e").content) == (0, SpoolExtent(0))


# -- limits -----------------------------------------------------------------------------


def test_path_longer_than_4096_fails() -> None:
    name = "/".join(["n" * 200] * 20) + "/" + "x" * 200  # 4220 bytes
    fails([reg(name)], "path longer than 4096", name)
    ok = "/".join(["n" * 200] * 20) + "/" + "z" * 76
    assert len(ok) == 4096
    tree_of([reg(ok)])


def test_depth_over_128_fails() -> None:
    deep = "/".join(["d"] * 129)
    fails([reg(deep)], "deeper than 128", deep)
    ok = "/".join(["d"] * 128)  # 255 bytes; its sibling finds the parent known
    sibling = ok[:-1] + "e"
    assert paths(tree_of([reg(ok), reg(sibling)]))[-2:] == [ok.encode(), sibling.encode()]


def test_symlink_target_over_4096_fails() -> None:
    fails([symlink("s", "a" * 4097)], "symlink target longer than 4096", "s")


def test_file_over_5gib_fails_before_reading_data() -> None:
    hdr = header(reg("huge")[0])
    hdr[124:136] = b"\x80" + ((5 << 30) + 1).to_bytes(11, "big")
    fails(bytes(fix_checksum(hdr)), "file larger than", "huge")


def test_content_cap_names_the_entry_that_crosses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The declared sizes cross the cap before the stream does: the entry is named."""
    monkeypatch.setenv(layer_mod.CONTENT_CAP_ENV, str(1_100_000))
    big = bytes(600_000)
    fails([reg("a", big), reg("b", big)], "layer content exceeds 1100000 bytes", "b")


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP, Compression.ZSTD])
def test_content_cap_bounds_the_decompressed_stream(
    monkeypatch: pytest.MonkeyPatch, compression: Compression
) -> None:
    """Zeros after the end marker hold no file, yet cost as much to inflate: capped too."""
    monkeypatch.setenv(layer_mod.CONTENT_CAP_ENV, str(3 << 20))
    tar = SAMPLE + bytes(4 << 20)
    blob = {
        Compression.NONE: tar,
        Compression.GZIP: gzip.compress(tar),
        Compression.ZSTD: zstandard.ZstdCompressor().compress(tar),
    }[compression]
    with pytest.raises(LayerFormatError, match=f"layer content exceeds {3 << 20} bytes") as ei:
        ingest(blob, compression, label="sha256:bomb")
    assert ei.value.layer == "sha256:bomb"
    assert layer_mod.CONTENT_CAP_ENV in ei.value.one_line()


@pytest.mark.parametrize("value", ["ten", "0", "-5", str((1 << 40) + 1)])
def test_content_cap_setting_must_be_in_range(monkeypatch: pytest.MonkeyPatch, value: str
                                              ) -> None:
    monkeypatch.setenv(layer_mod.CONTENT_CAP_ENV, value)
    with pytest.raises(UsageError, match=layer_mod.CONTENT_CAP_ENV):
        ingest(SAMPLE)


def test_entry_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layer_mod, "MAX_ENTRIES", 3)
    fails([reg("a"), reg("b"), reg("c"), reg("d")], "more than 3 entries", "d")


def test_tar_errors_carry_layer_label() -> None:
    fails(SAMPLE[:700], "truncated")  # inside a header: no entry name yet
    fails(SAMPLE[:1500], "truncated", "d/a")


# -- zstd frame walk ----------------------------------------------------------------------

_ZSTD_DATA = bytes(range(256)) * 4000 + bytes(3 << 20) + b"abc" * 100_000


def _zstd_streamed(data: bytes) -> bytes:
    """Frames as a streaming writer makes them: no content size, blocks flushed mid-way."""
    out = io.BytesIO()
    w = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(out, closefd=False)
    for i in range(0, len(data), 70_000):
        w.write(data[i : i + 70_000])
        w.flush()
    w.close()
    return out.getvalue()


@pytest.mark.parametrize(
    "blob",
    [
        zstandard.ZstdCompressor(level=19).compress(_ZSTD_DATA),
        zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(
            _ZSTD_DATA),
        _zstd_streamed(_ZSTD_DATA),
        (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!"
        + zstandard.ZstdCompressor().compress(_ZSTD_DATA),
    ],
    ids=["level19", "checksum-no-size", "streamed", "skippable-frame"],
)
def test_zstd_frames_decode_exactly(blob: bytes) -> None:
    chunks = list(layer_mod.decompressed_chunks(io.BytesIO(blob), Compression.ZSTD, "z"))
    assert b"".join(chunks) == _ZSTD_DATA
    assert max(map(len, chunks)) <= (1 << 20) + (128 << 10)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (zstandard.ZstdCompressor().compress(_ZSTD_DATA)[:-3], "truncated zstd"),
        (zstandard.ZstdCompressor().compress(_ZSTD_DATA)[:5], "truncated zstd"),
        (zstandard.ZstdCompressor().compress(b"x") + b"junk", "corrupt zstd.*unknown frame"),
        (zstandard.ZstdCompressor().compress(b"x") + b"\0", "truncated zstd"),
        (b"\x28\xb5\x2f\xfd\x08" + b"\0" * 20, "corrupt zstd.*reserved bit"),
    ],
    ids=["cut-in-block", "cut-in-header", "trailing-junk", "trailing-nul", "reserved-bit"],
)
def test_zstd_damage_is_named(blob: bytes, match: str) -> None:
    with pytest.raises(LayerFormatError, match=match):
        list(layer_mod.decompressed_chunks(io.BytesIO(blob), Compression.ZSTD, "z"))


def test_zstd_rle_bomb_output_is_bounded_per_piece() -> None:
    """8 KiB of RLE blocks regenerate 256 MiB: never more than ~1 MiB at a time."""
    blob = zstandard.ZstdCompressor(level=1).compress(bytes(256 << 20))
    assert len(blob) < 64 << 10
    total = 0
    tracemalloc.start()
    try:
        for chunk in layer_mod.decompressed_chunks(io.BytesIO(blob), Compression.ZSTD, "z"):
            assert len(chunk) <= (1 << 20) + (128 << 10)
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 256 << 20
    assert peak < 8 << 20


# -- numbers an EROFS inode cannot hold, names it cannot hold -----------------------------


def _b256(value: int, width: int) -> bytes:
    return b"\x80" + value.to_bytes(width - 1, "big")


def _with_field(entry: Entry, at: tuple[int, int], value: bytes) -> bytes:
    hdr = header(entry[0])
    hdr[at[0]:at[1]] = value
    return bytes(fix_checksum(hdr)) + (entry[1] or b"") + bytes(-len(entry[1] or b"") % 512)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (pax_header(pax_record(b"uid", b"%d" % (1 << 40))) + header(reg("f")[0]),
         "uid 1099511627776 out"),
        (pax_header(pax_record(b"gid", b"%d" % (1 << 32))) + header(reg("f")[0]),
         "gid 4294967296 out"),
        (_with_field(reg("f"), (108, 116), _b256(1 << 32, 8)), "uid 4294967296 out of range"),
        (_with_field(reg("f"), (136, 148), _b256(1 << 70, 12)), f"mtime {1 << 70} out of range"),
        (_with_field(reg("f"), (136, 148), _b256(1 << 64, 12)), f"mtime {1 << 64} out of range"),
    ],
    ids=["pax-uid-2^40", "pax-gid-2^32", "base256-uid-2^32", "mtime-2^70", "mtime-2^64"],
)
def test_numbers_an_inode_cannot_hold_fail_naming_the_entry(blob: bytes, match: str) -> None:
    fails(bytes(blob) + END, match, "f")


def test_largest_numbers_an_inode_holds_are_kept() -> None:
    top = str((1 << 32) - 1).encode()
    blob = (pax_header(pax_record(b"uid", top) + pax_record(b"gid", top))
            + _with_field(reg("f"), (136, 148), _b256((1 << 64) - 1, 12)) + END)
    node = at(ingest(bytes(blob))[0].root, b"f")
    assert (node.uid, node.gid, node.mtime) == ((1 << 32) - 1, (1 << 32) - 1, (1 << 64) - 1)


@pytest.mark.parametrize(
    ("kind", "major", "minor"),
    [(tarfile.CHRTYPE, 1 << 40, 1), (tarfile.CHRTYPE, 1, 1 << 33), (tarfile.BLKTYPE, 4096, 0),
     (tarfile.CHRTYPE, 0, 1 << 20)],
    ids=["major-2^40", "minor-2^33", "major-4096", "minor-2^20-would-be-whiteout"],
)
def test_device_numbers_out_of_range_fail(kind: bytes, major: int, minor: int) -> None:
    entry = device("dev/x", kind)
    hdr = header(entry[0])
    hdr[329:337] = _b256(major, 8) if major >= 1 << 21 else b"%07o\0" % major
    hdr[337:345] = _b256(minor, 8) if minor >= 1 << 21 else b"%07o\0" % minor
    fails(bytes(fix_checksum(hdr)) + END, f"device number {major}:{minor} out of range",
          "dev/x")


def test_largest_device_numbers_are_kept() -> None:
    node = at(tree_of([device("x", tarfile.CHRTYPE, 0xFFF, 0xFFFFF)]), b"x")
    assert (node.type, node.rdev_major, node.rdev_minor) == (FileType.CHR, 0xFFF, 0xFFFFF)


def test_name_over_255_bytes_names_the_whole_path() -> None:
    long = "n" * 256
    fails([dir_("d/"), reg(f"d/{long}", b"1")], "file name longer than 255 bytes", f"d/{long}")


@pytest.mark.parametrize("name", ["d/.wh..", ".wh..."])
def test_whiteout_of_dot_names_layer_and_entry(name: str) -> None:
    fails([dir_("d/"), reg(name)], "names no file", name)
