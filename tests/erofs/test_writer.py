"""Layer EROFS writer: byte-identical to msb, mountable by the kernel, clean under fsck."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.erofs import format as F
from cachefs.erofs.reader import ErofsImage
from cachefs.erofs.tree import NULL_BLOCK, FileType, Node, SpoolExtent, walk
from cachefs.erofs.writer import pack_dirent_names, plan_layout, write_layer_erofs
from cachefs.errors import LayerFormatError
from tests.erofs.layer_cases import (
    everything_tar,
    flatten,
    pattern,
    scan_mount,
    small_tars,
    tar_to_tree,
    want_layer,
)
from tests.fixtures.images import (
    Entry,
    TestImage,
    device,
    dir_,
    docker_archive,
    hardlink,
    layer_tar,
    reg,
    sha256,
    symlink,
)
from tests.fixtures.system import Msb, loop_mount_erofs, require_tool, run


def build(tar: bytes) -> bytes:
    spool = io.BytesIO()
    root = tar_to_tree(tar, spool)
    out = io.BytesIO()
    write_layer_erofs(root, spool, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def case_tars() -> list[bytes]:
    return [everything_tar(), *small_tars()]


def test_layers_byte_identical_to_msb(msb: Msb, tmp_path: Path, case_tars: list[bytes]) -> None:
    archive = docker_archive(TestImage(case_tars), ["example.com/t/writer:1"], tmp_path / "a.tar")
    msb.load(archive)
    for tar in case_tars:
        want = (msb.cache / "layers" / f"{sha256(tar).replace(':', '_')}.erofs").read_bytes()
        got = build(tar)
        assert len(got) == len(want)
        first = next((i for i in range(len(got)) if got[i] != want[i]), None)
        assert got == want, f"first difference at byte {first}"


def test_block_map_and_node_blocks_agree_with_reader(tmp_path: Path) -> None:
    spool = io.BytesIO()
    root = tar_to_tree(everything_tar(), spool)
    image = tmp_path / "l.erofs"
    with image.open("wb") as out:
        bm = write_layer_erofs(root, spool, out)
    assert bm.total_blocks * F.BLOCK_SIZE == image.stat().st_size
    for path, node in walk(root):
        if node.type is FileType.REG:
            assert node.block is not None
            assert (node.block == NULL_BLOCK) == (node.size == 0)
            assert bm.files[path] == (node.block, node.size)
    with ErofsImage.open(image) as img:
        assert img.block_map() == bm
        assert img.read(img.lookup(b"big.bin")) == pattern(1536 * 1024 + 7, 4)


def test_real_files_use_the_same_bytes_as_buffered(tmp_path: Path) -> None:
    """The copy_file_range path (both sides real files) must equal the buffered path."""
    tar = everything_tar()
    with (tmp_path / "spool").open("wb+") as spool:
        root = tar_to_tree(tar, spool)
        with (tmp_path / "prefix.erofs").open("wb") as out:
            out.write(b"junk")  # writing starts at the stream's current position
            write_layer_erofs(root, spool, out)
    assert (tmp_path / "prefix.erofs").read_bytes()[4:] == build(tar)


@pytest.mark.system
def test_kernel_mount_and_fsck(tmp_path: Path, case_tars: list[bytes]) -> None:
    fsck = require_tool("fsck.erofs")
    for i, tar in enumerate(case_tars):
        image = tmp_path / f"l{i}.erofs"
        image.write_bytes(build(tar))
        proc = run([fsck, str(image)])
        assert proc.stdout + proc.stderr == ""
        # --extract reads every byte of every file back through erofs-utils' own decoder
        extracted = tmp_path / f"x{i}"
        proc = run([fsck, f"--extract={extracted}", "--preserve", str(image)])
        assert proc.stdout + proc.stderr == ""
        with loop_mount_erofs(image, tmp_path / f"m{i}") as mnt:
            assert scan_mount(mnt) == flatten(want_layer(tar))
            # extraction writes hardlinks as copies, root its own way, and drops setuid bits
            def content(rows: dict[bytes, tuple]) -> dict[bytes, tuple]:
                return {p: (r[0], r[1] & 0o777, *r[2:9]) for p, r in rows.items() if p}

            assert content(scan_mount(extracted)[0]) == content(scan_mount(mnt)[0])


def test_dirent_packing_boundary() -> None:
    """A block takes entries while 12*k + Σ name_len <= 4096 (§3.8): exact fit, one over."""
    fits = [b".", b"..", b"a" * 1344, b"b" * 1344, b"c" * 1345, b"d"]
    assert 12 * 5 + sum(map(len, fits[:5])) == 4096
    assert [len(b) for b in pack_dirent_names(fits)] == [5, 1]
    over = [b".", b"..", b"a" * 1344, b"b" * 1344, b"c" * 1346, b"d"]
    assert [len(b) for b in pack_dirent_names(over)] == [4, 2]


def test_dirent_packing_of_a_large_directory_is_greedy() -> None:
    """Many blocks (a flat directory of 1,000+ names of mixed lengths): every block is
    full in the §3.8 sense, i.e. it fits and the next name would not have fitted."""
    names = sorted(b"f%06d" % i + b"x" * (i * 37 % 200) for i in range(3000))
    blocks = pack_dirent_names(names)
    assert [n for block in blocks for n in block] == names
    for block, after in zip(blocks, [*blocks[1:], []], strict=True):
        assert 12 * len(block) + sum(map(len, block)) <= 4096
        if after:
            assert 12 * (len(block) + 1) + sum(map(len, block)) + len(after[0]) > 4096


def test_plan_rules() -> None:
    """Spot checks of §3.6/§3.11 decisions, made without writing anything."""
    root = Node.directory()
    assert root.children is not None
    sub = root.children[b"d"] = Node.directory()
    assert sub.children is not None
    sub.children[b"e"] = Node.directory()
    f = Node(FileType.REG, size=5, content=SpoolExtent(0))
    root.children[b"x"] = sub.children[b"y"] = f
    link = root.children[b"l"] = Node(FileType.SYMLINK, target=b"short")
    plan = plan_layout(root)
    by = {id(i.node): i for i in plan.inodes}
    assert [by[id(n)].nlink for n in (root, sub, f, link)] == [2, 3, 2, 1]
    assert by[id(f)].layout == F.LAYOUT_FLAT_PLAIN and by[id(f)].data_blocks == 1
    assert by[id(link)].layout == F.LAYOUT_FLAT_INLINE and by[id(link)].data_blocks == 0
    assert len(plan.inodes) == 5  # root, d, e, l, x=y: one NID for the hardlink group
    assert [i.nid for i in plan.inodes] == sorted(i.nid for i in plan.inodes)


def test_bad_xattr_prefix_is_refused() -> None:
    root = Node.directory()
    root.xattrs.append((b"system.posix_acl_access", b"\x02"))
    with pytest.raises(LayerFormatError, match=r"system\.posix_acl_access"):
        write_layer_erofs(root, None, io.BytesIO())


def test_name_over_255_bytes_is_refused() -> None:
    root = Node.directory()
    assert root.children is not None
    root.children[b"n" * 256] = Node(FileType.FIFO)
    with pytest.raises(LayerFormatError, match="invalid file name"):
        write_layer_erofs(root, None, io.BytesIO())


def test_truncated_spool_is_refused() -> None:
    root = Node.directory()
    assert root.children is not None
    root.children[b"f"] = Node(FileType.REG, size=10, content=SpoolExtent(0))
    with pytest.raises(LayerFormatError, match="spool ends 7 bytes early"):
        write_layer_erofs(root, io.BytesIO(b"abc"), io.BytesIO())


# --- property test: random trees through tar → EROFS → kernel ---------------------------

_NAMES = st.sampled_from(["a", "b", "ç", "Zz", "-x", "!", "x" * 200, ".hidden", "é" * 100])


@st.composite
def layer_entries(draw: st.DrawFn) -> list[Entry]:
    paths = draw(st.sets(st.lists(_NAMES, min_size=1, max_size=3).map("/".join),
                         min_size=1, max_size=25))
    dirs = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
    entries: list[Entry] = []
    regs: list[str] = []
    for p in sorted(paths | dirs):
        meta = dict(mtime=draw(st.integers(0, 8**11 - 1)), uid=draw(st.integers(0, 70000)),
                    gid=draw(st.integers(0, 70000)))
        if p in dirs:
            if draw(st.booleans()):  # else the dir is implicit
                entries.append(dir_(p + "/", mode=draw(st.sampled_from([0o755, 0o1777, 0o700])),
                                    **meta))
            continue
        kind = draw(st.sampled_from(["reg", "reg", "sym", "chr", "blk", "fifo", "wh"]))
        if kind == "reg":
            size = draw(st.sampled_from([0, 1, 4095, 4096, 4097, 12000]))
            entries.append(reg(p, pattern(size, len(p)), mode=draw(st.sampled_from(
                [0o644, 0o4755, 0o600])), **meta))
            regs.append(p)
        elif kind == "sym":
            # 4096 is legal for msb, but the kernel's page symlinks stop at 4095 bytes.
            entries.append(symlink(p, "t" * draw(st.integers(1, 4095)), **meta))
        elif kind == "wh":
            head, _, base = p.rpartition("/")
            entries.append(reg((head + "/" if head else "") + ".wh." + base, b"", **meta))
        else:
            ttype = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
            major, minor = (draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))) \
                if kind != "fifo" else (0, 0)
            entries.append(device(p, ttype[kind], major, minor, **meta))
    entries = draw(st.permutations(entries))
    if regs:
        target = draw(st.sampled_from(regs))
        entries.append(hardlink("hlink-" + str(len(regs)), target))
    return entries


@pytest.mark.system
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=layer_entries())
def test_random_trees_mount_as_described(tmp_path_factory: pytest.TempPathFactory,
                                         entries: list[Entry]) -> None:
    tar = layer_tar(entries)
    work = tmp_path_factory.mktemp("prop")
    image = work / "l.erofs"
    image.write_bytes(build(tar))
    with loop_mount_erofs(image, work / "mnt") as mnt:
        assert scan_mount(mnt) == flatten(want_layer(tar))


def test_streams_into_a_pipe(tmp_path: Path) -> None:
    """The writer only moves forward: a non-seekable output gets the same bytes."""
    tar = small_tars()[2]
    spool = (tmp_path / "spool").open("wb+")
    root = tar_to_tree(tar, spool)
    r, w = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    with os.fdopen(w, "wb") as out:
        write_layer_erofs(root, spool, out)
    reader.join()
    os.close(r)
    spool.close()
    assert b"".join(chunks) == build(tar)


def test_directory_under_two_names_is_refused() -> None:
    root = Node.directory()
    assert root.children is not None
    root.children[b"a"] = root.children[b"b"] = Node.directory()
    with pytest.raises(LayerFormatError, match="directories cannot be hardlinked"):
        write_layer_erofs(root, None, io.BytesIO())


def test_symlink_of_exactly_one_block(msb: Msb, tmp_path: Path) -> None:
    """A 4096-byte target (msb's maximum) is one plain block; the kernel shows only 4095
    bytes of it, so check it through the reader and against msb instead."""
    tar = layer_tar([symlink("s", "w" * 4096)])
    msb.load(docker_archive(TestImage([tar]), ["example.com/t/s4096:1"], tmp_path / "a.tar"))
    got = build(tar)
    assert got == (msb.cache / "layers" / f"{sha256(tar).replace(':', '_')}.erofs").read_bytes()
    (tmp_path / "l.erofs").write_bytes(got)
    with ErofsImage.open(tmp_path / "l.erofs") as img:
        assert img.readlink(img.lookup(b"s")) == b"w" * 4096
