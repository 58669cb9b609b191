"""The EROFS reader against real writers (mkfs.erofs 1.5, msb 0.7.11) and the kernel.

Oracles: the source directory mkfs.erofs was given, the tar msb was given, and the
kernel's own EROFS driver (loop mount). No expectation is derived from the reader itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefs.erofs import format as fmt
from cachefs.erofs.reader import ErofsImage, is_valid_erofs
from cachefs.erofs.tree import NULL_BLOCK, FileType, LayerBlocks
from cachefs.erofs.tree import walk as tree_walk
from cachefs.errors import ErofsFormatError
from tests.fixtures.images import (
    Entry,
    TestImage,
    device,
    dir_,
    docker_archive,
    hardlink,
    layer_tar,
    reg,
    symlink,
)
from tests.fixtures.system import (
    Msb,
    loop_mount_erofs,
    msb_binary,
    require_root,
    require_tool,
    run,
    system_fixture,
)

Records = dict[bytes, dict[str, Any]]


def data(n: int, seed: int) -> bytes:
    """Deterministic bytes that differ per block, so a misplaced block is caught."""
    rnd = random.Random(seed)
    return rnd.randbytes(n)


# ---------------------------------------------------------------------------------------
# Snapshots: one record per path, from a directory (source or kernel mount) or the reader
# ---------------------------------------------------------------------------------------

_KIND = {
    stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "lnk", stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock",
}


def dir_records(root: Path) -> tuple[Records, set[frozenset[bytes]]]:
    """lstat-level view of a directory tree; paths relative ("a/b"), root b""."""
    recs: Records = {}
    inodes: dict[int, set[bytes]] = {}
    base = os.fsencode(root)

    def visit(rel: bytes) -> None:
        full = base + b"/" + rel if rel else base
        st = os.lstat(full)
        rec: dict[str, Any] = {
            "kind": _KIND[stat.S_IFMT(st.st_mode)], "perm": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
            "mtime": (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9),
            "xattrs": tuple(sorted(
                (os.fsencode(n), os.getxattr(full, n, follow_symlinks=False))
                for n in os.listxattr(full, follow_symlinks=False)
            )),
        }
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                rec["sha"] = hashlib.sha256(f.read()).hexdigest()
            rec["size"] = st.st_size
            inodes.setdefault(st.st_ino, set()).add(rel)
        elif stat.S_ISLNK(st.st_mode):
            rec["target"] = os.readlink(full)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        recs[rel] = rec
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(full)):
                visit(rel + b"/" + name if rel else name)

    visit(b"")
    return recs, {frozenset(g) for g in inodes.values() if len(g) > 1}


def reader_records(im: ErofsImage) -> tuple[Records, set[frozenset[bytes]]]:
    recs: Records = {}
    by_nid: dict[int, set[bytes]] = {}
    for path, nid, ino in im.walk():
        rec: dict[str, Any] = {
            "kind": _KIND[stat.S_IFMT(ino.mode)], "perm": ino.perm, "uid": ino.uid,
            "gid": ino.gid, "nlink": ino.nlink, "mtime": (ino.mtime, ino.mtime_nsec),
            "xattrs": tuple(sorted(ino.xattrs)),
        }
        if ino.type is FileType.REG:
            rec["sha"] = hashlib.sha256(im.read(nid)).hexdigest()
            rec["size"] = ino.size
            by_nid.setdefault(nid, set()).add(path)
        elif ino.type is FileType.SYMLINK:
            rec["target"] = im.readlink(nid)
        elif ino.type in (FileType.CHR, FileType.BLK):
            rec["rdev"] = ino.rdev
        recs[path] = rec
    return recs, {frozenset(g) for g in by_nid.values() if len(g) > 1}


def project(recs: Records, drop: set[str]) -> Records:
    return {p: {k: v for k, v in r.items() if k not in drop} for p, r in recs.items()}


def assert_same(got: Records, want: Records) -> None:
    assert sorted(got) == sorted(want)
    diffs = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
    assert not diffs, "\n".join(f"{p!r}: got {g} want {w}" for p, (g, w) in diffs.items())


# ---------------------------------------------------------------------------------------
# mkfs.erofs images from a directory
# ---------------------------------------------------------------------------------------

SIZES = [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 12345, 70000, 300_001]


def build_source(root: Path) -> None:
    """A directory with every kind of entry mkfs.erofs can store."""
    root.mkdir()
    os.chmod(root, 0o755)
    for i, n in enumerate(SIZES):
        (root / f"f{n}").write_bytes(data(n, i))
    many = root / "many"
    many.mkdir()
    for i in range(400):  # several dirent blocks; names of varied length
        (many / (f"e{i:03d}-" + "n" * (i % 50))).write_bytes(str(i).encode())
    (many / "!bang").write_bytes(b"sorts before .")
    (many / "-dash").write_bytes(b"so does this")
    deep = root
    for c in "abcdefgh":
        deep = deep / c
        deep.mkdir()
    (deep / "leaf").write_bytes(b"deep")
    for n in (1, 9, 100, 3001, 4095):
        os.symlink("t" * n, root / f"s{n}")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "bigdev", 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
    os.mknod(root / "sda", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.link(root / "f100", root / "hl1")
    os.link(root / "f100", root / "a" / "hl2")
    (root / "own").write_bytes(b"owned")
    os.chown(root / "own", 1234, 5678)
    os.chmod(root / "own", 0o4751)
    os.chmod(root / "many", 0o1777)
    os.setxattr(root / "f1", "user.one", b"1")
    os.setxattr(root / "f1", "trusted.two", b"\xff\x00binary")
    os.setxattr(root / "a", "user.dirattr", b"on a dir")
    os.setxattr(root / "own", "user.long", b"v" * 300)
    for name in ("f0", "f4095", "f4096", "f8191", "f8192"):  # used 5 times → shared xattr
        os.setxattr(root / name, "user.shared", b"everyone")
    # distinct, deterministic mtimes (with nanoseconds) so they are really compared
    for i, (dirpath, dirs, files) in enumerate(os.walk(root, topdown=False)):
        for j, name in enumerate(files + dirs):
            os.utime(Path(dirpath) / name, ns=(1_600_000_000 * 10**9 + i * 1000 + j,
                                                1_600_000_000 * 10**9 + i * 10**6 + j * 7),
                     follow_symlinks=False)
    os.utime(root, ns=(1_650_000_000 * 10**9, 1_650_000_000 * 10**9 + 5))


@pytest.fixture(scope="module")
@system_fixture
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()  # mknod, chown, trusted.* xattrs
    root = tmp_path_factory.mktemp("src") / "root"
    build_source(root)
    return root


MKFS_VARIANTS = {
    "default": [],
    "extended": ["-E", "force-inode-extended"],
    "compact-fixed-time": ["-T", "1700000000", "-E", "force-inode-compact"],
    "noinline": ["-E", "noinline_data"],
    "chunk-blockmap": ["--chunksize=4096"],
    "chunk-indexes-8k": ["--chunksize=8192", "-E", "force-chunk-indexes"],
}


def mkfs(src: Path, out: Path, opts: list[str]) -> Path:
    run([require_tool("mkfs.erofs"), "--quiet", *opts, str(out), str(src)])
    return out


@pytest.mark.system
@pytest.mark.parametrize("variant", sorted(MKFS_VARIANTS))
def test_mkfs_image_matches_source_and_kernel(variant: str, source: Path, tmp_path: Path) -> None:
    img = mkfs(source, tmp_path / "img.erofs", MKFS_VARIANTS[variant])
    assert is_valid_erofs(img)  # msb reads the root as extended; i_mode is at +4 either way
    want, want_groups = dir_records(source)
    with ErofsImage.open(img) as im:
        assert im.crc_ok
        got, groups = reader_records(im)
        reg_layouts = {ino.layout for _, _, ino in im.walk() if ino.type is FileType.REG}
        extended = {ino.extended for _, _, ino in im.walk()}
        shared = sum(ino.shared_xattrs for _, _, ino in im.walk())
    drop: set[str] = set()
    if variant.startswith("compact"):
        assert extended == {False}
        drop = {"mtime"}
        assert {r["mtime"] for r in got.values()} == {(1700000000, 0)}
    if variant == "extended":
        assert extended == {True}
    if variant.startswith("chunk"):
        assert fmt.LAYOUT_CHUNK_BASED in reg_layouts
    if variant == "noinline":
        assert reg_layouts == {fmt.LAYOUT_FLAT_PLAIN}  # 1.5 still inlines dirs and symlinks
    if variant == "default":
        assert fmt.LAYOUT_FLAT_INLINE in reg_layouts and shared > 0
    assert_same(project(got, drop), project(want, drop))
    assert groups == want_groups
    # the kernel agrees on everything, mtime included
    with loop_mount_erofs(img, tmp_path / "mnt") as mnt:
        kernel, kernel_groups = dir_records(mnt)
    assert_same(got, kernel)
    assert groups == kernel_groups


@pytest.mark.system
def test_mkfs_tree_lookup_read_ranges(source: Path, tmp_path: Path) -> None:
    img = mkfs(source, tmp_path / "img.erofs", [])
    with ErofsImage.open(img) as im:
        tree = im.to_tree()
        nodes = dict(tree_walk(tree))
        assert nodes[b"f100"] is nodes[b"hl1"] is nodes[b"a/hl2"]
        assert nodes[b"null"].rdev_major == 1 and nodes[b"null"].rdev_minor == 3
        assert (nodes[b"bigdev"].rdev_major, nodes[b"bigdev"].rdev_minor) == (300, 70000)
        assert nodes[b"s3001"].target == b"t" * 3001
        assert nodes[b"own"].full_mode == 0o104751 and nodes[b"own"].uid == 1234
        assert sorted(nodes[b"f1"].xattrs) == [(b"trusted.two", b"\xff\x00binary"),
                                               (b"user.one", b"1")]
        assert nodes[b"f0"].block == NULL_BLOCK
        assert nodes[b"many"].children is not None and len(nodes[b"many"].children) == 402
        assert im.lookup("/a/b/c/d/e/f/g/h/leaf") == im.lookup(b"a/b/c/d/e/f/g/h/leaf")
        assert im.read(im.lookup("a/b/c/d/e/f/g/h/leaf")) == b"deep"
        with pytest.raises(FileNotFoundError):
            im.lookup("a/nope")
        with pytest.raises(FileNotFoundError):
            im.lookup("f1/below-a-file")
        content = data(300_001, SIZES.index(300_001))
        nid = im.lookup("f300001")
        for off, size in [(0, 1), (4095, 2), (4096, 4096), (299_999, 10), (300_001, 5),
                          (123_457, 70_000), (0, 10**9)]:
            assert im.read(nid, off, size) == content[off : off + size]
        names = [n for n, _, _ in im.listdir(im.lookup("many"))]
        assert names == sorted(names)  # "!bang" and "-dash" sort before "."
        assert names[:2] == [b"!bang", b"-dash"] and b"." in names and b".." in names


@pytest.mark.system
def test_chunk_based_mkfs_image(source: Path, tmp_path: Path) -> None:
    img = mkfs(source, tmp_path / "img.erofs", ["--chunksize=8192", "-E", "force-chunk-indexes"])
    with ErofsImage.open(img) as im:
        nid = im.lookup("f70000")
        ino = im.inode(nid)
        assert ino.chunk is not None and ino.chunk.indexes and ino.chunk.chunk_size == 8192
        chunks = im.chunks(nid)
        assert len(chunks) == 9 and {d for d, _ in chunks} == {0}
        assert im.read(nid) == data(70000, SIZES.index(70000))
        node = dict(tree_walk(im.to_tree()))[b"f70000"]
        assert node.content == LayerBlocks(0, chunks[0][1])
        with pytest.raises(ErofsFormatError, match="FLAT_PLAIN"):
            im.block_map()


@pytest.mark.system
def test_compressed_inode_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "z").write_bytes(b"compress me " * 10000)
    img = mkfs(src, tmp_path / "img.erofs", ["-zlz4"])
    with ErofsImage.open(img) as im:
        root = im.listdir(im.superblock.root_nid)
        nid = next(n for name, n, _ in root if name == b"z")
        with pytest.raises(ErofsFormatError, match="compressed inode not supported"):
            im.read(nid)


# ---------------------------------------------------------------------------------------
# msb-written layers and fsmeta
# ---------------------------------------------------------------------------------------

LAYER1: list[Entry] = [
    dir_("etc/", mtime=1600000000),
    reg("etc/hosts", b"127.0.0.1 localhost\n"),
    reg("empty"),
    reg("f4096", data(4096, 1)),
    reg("f4097", data(4097, 2)),
    reg("big", data(300_000, 3), uid=1000, gid=1000, mtime=1234567890),
    reg("huge", data(3 << 20, 4)),  # 768 chunk entries: the array must cross a block
    reg("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=50),
    symlink("s9", "123456789"),
    symlink("s100", "x" * 100),
    symlink("s3001", "y" * 3001),
    hardlink("hl", "etc/hosts"),
    device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
    device("dev/big", tarfile.CHRTYPE, 300, 70000),
    device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660),
    device("fifo", tarfile.FIFOTYPE),
    dir_("many/", mode=0o700, uid=7, gid=8),
    *[reg(f"many/f{i:03d}" + "n" * (i % 40), str(i).encode()) for i in range(300)],
    reg("many/!bang", b"!"),
    reg("-dash", b"-"),
    dir_("gone/"),
    reg("gone/x", b"x"),
    dir_("op/"),
    reg("op/old", b"old"),
]
LAYER2: list[Entry] = [
    reg(".wh.gone"),
    reg("op/.wh..wh..opq"),
    reg("op/new", b"new"),
    reg("etc/hosts", b"override\n"),
    reg("bin/.wh.tool"),
    dir_("newdir/"),
    reg("newdir/.wh.ghost"),
    reg("newdir/file", data(5000, 9)),
]


def tar_records(entries: list[Entry]) -> Records:
    """What a layer EROFS must contain for ``entries`` (FORMATS.md §3.12), in record form."""
    recs: Records = {b"": _dir_rec(0o755, 0, 0, 0)}

    def ensure_parents(path: bytes) -> None:
        parts = path.split(b"/")
        for i in range(1, len(parts)):
            p = b"/".join(parts[:i])
            recs.setdefault(p, _dir_rec(0o755, 0, 0, 0))

    for ti, payload in entries:
        path = ti.name.strip("/").encode()
        ensure_parents(path)
        base = path.rpartition(b"/")[2]
        parent = path.rpartition(b"/")[0]
        common = {"perm": ti.mode & 0o7777, "uid": ti.uid, "gid": ti.gid,
                  "mtime": (int(ti.mtime), 0)}
        if ti.isreg() and base == b".wh..wh..opq":
            recs[parent]["xattrs"] = ((b"trusted.overlay.opaque", b"y"),)
        elif ti.isreg() and base.startswith(b".wh.") and len(base) > 4:
            name = (parent + b"/" if parent else b"") + base[4:]
            recs[name] = {"kind": "chr", "rdev": (0, 0), "xattrs": (), **common}
        elif ti.isdir():
            old = recs.get(path)
            recs[path] = _dir_rec(ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime)
            if old:
                recs[path]["xattrs"] = ()
        elif ti.isreg():
            assert payload is not None
            recs[path] = {"kind": "reg", "size": len(payload), "xattrs": (),
                          "sha": hashlib.sha256(payload).hexdigest(), **common}
        elif ti.islnk():
            recs[path] = recs[ti.linkname.encode()]
        elif ti.issym():
            recs[path] = {"kind": "lnk", "target": ti.linkname.encode(), "xattrs": (), **common}
        elif ti.ischr() or ti.isblk():
            recs[path] = {"kind": "chr" if ti.ischr() else "blk", "xattrs": (),
                          "rdev": (ti.devmajor, ti.devminor), **common}
        elif ti.isfifo():
            recs[path] = {"kind": "fifo", "xattrs": (), **common}
    return recs


def _dir_rec(perm: int, uid: int, gid: int, mtime: int) -> dict[str, Any]:
    return {"kind": "dir", "perm": perm, "uid": uid, "gid": gid, "mtime": (int(mtime), 0),
            "xattrs": ()}


def merged_contents() -> dict[bytes, bytes]:
    """Regular files of LAYER1 ⊕ LAYER2, content by path (worked out by hand from §4.5)."""
    files = {ti.name.encode(): d for ti, d in LAYER1 if ti.isreg()}
    files[b"hl"] = files[b"etc/hosts"]
    for gone in (b"gone/x", b"op/old", b"bin/tool"):
        del files[gone]
    files[b"op/new"] = b"new"
    files[b"etc/hosts"] = b"override\n"
    files[b"newdir/file"] = data(5000, 9)
    return {k: v for k, v in files.items() if v is not None}


class MsbImage:
    def __init__(self, cache: Path, image: TestImage) -> None:
        self.layers = [cache / "layers" / (d.replace(":", "_") + ".erofs")
                       for d in image.diff_ids()]
        fsmetas = sorted((cache / "fsmeta").glob("*.erofs"))
        assert len(fsmetas) == 1
        self.fsmeta = fsmetas[0]


@pytest.fixture(scope="module")
@system_fixture
def msb_image(tmp_path_factory: pytest.TempPathFactory) -> MsbImage:
    work = tmp_path_factory.mktemp("msb")
    image = TestImage([layer_tar(LAYER1), layer_tar(LAYER2)])
    archive = docker_archive(image, ["example.com/reader/test:v1"], work / "a.tar")
    m = Msb(msb_binary(), work / "home")
    m.load(archive)
    return MsbImage(m.cache, image)


@pytest.fixture(scope="module")
def flat_disk(msb_image: MsbImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fsmeta ‖ layer1 ‖ layer2, what the guest sees through the VMDK."""
    out = tmp_path_factory.mktemp("flat") / "disk.img"
    with open(out, "wb") as f:
        for p in [msb_image.fsmeta, *msb_image.layers]:
            f.write(p.read_bytes())
    return out


def test_msb_layers_match_their_tars(msb_image: MsbImage) -> None:
    for path, entries in zip(msb_image.layers, (LAYER1, LAYER2), strict=True):
        assert is_valid_erofs(path)
        with ErofsImage.open(path) as im:
            im.check_crc()
            got, groups = reader_records(im)
            assert all(ino.extended for _, _, ino in im.walk())
            bm = im.block_map()
            tree = im.to_tree()
        assert_same(project(got, {"nlink"}), tar_records(entries))
        assert bm.total_blocks == path.stat().st_size // 4096
        nodes = dict(tree_walk(tree))
        for p, (blk, size) in bm.files.items():
            assert (nodes[p].block, nodes[p].size) == (blk, size)
        if entries is LAYER1:
            assert groups == {frozenset({b"etc/hosts", b"hl"})}
            assert nodes[b"etc/hosts"] is nodes[b"hl"]
            assert bm.files[b"empty"] == (NULL_BLOCK, 0)


def test_msb_images_straddle_block_boundaries(msb_image: MsbImage) -> None:
    """The msb images really contain what §7b.3 warns about, so the tests above cover it."""
    straddling_inodes = crossing_tables = 0
    for p in [*msb_image.layers, msb_image.fsmeta]:
        with ErofsImage.open(p) as im:
            for _, _, ino in im.walk():
                straddling_inodes += ino.offset // 4096 != (ino.offset + 63) // 4096
                ci = ino.chunk
                if ci is not None and ci.count:
                    end = ci.table_offset + 8 * ci.count - 1
                    crossing_tables += ci.table_offset // 4096 != end // 4096
    assert straddling_inodes > 0 and crossing_tables > 0


def test_msb_fsmeta_multi_device_and_flat(msb_image: MsbImage, flat_disk: Path) -> None:
    want = merged_contents()
    with ErofsImage.open(msb_image.fsmeta, devices=msb_image.layers) as im:
        im.check_crc()
        assert [d.blocks for d in im.devices] == [p.stat().st_size // 4096
                                                 for p in msb_image.layers]
        assert im.devices[0].mapped_blkaddr == im.total_blocks
        files = {p: im.read(nid) for p, nid, ino in im.walk() if ino.type is FileType.REG}
        assert files == want
        tree = im.to_tree()
        nodes = dict(tree_walk(tree))
        assert nodes[b"newdir/ghost"].is_whiteout  # the §4.5 quirk
        assert b"gone" not in nodes and b"op/old" not in nodes
        assert not nodes[b"op"].xattrs  # opaque stripped in the merge
        layer_maps = []
        for p in msb_image.layers:
            with ErofsImage.open(p) as layer:
                layer_maps.append(layer.block_map().files)
        for path, node in nodes.items():
            if node.type is FileType.REG:
                assert isinstance(node.content, LayerBlocks)
                if node.size:
                    blk, size = layer_maps[node.content.device_id - 1][path]
                    assert (node.content.start_block, node.size) == (blk, size)
        hl = im.lookup("hl")
        assert im.chunks(hl) == [(1, layer_maps[0][b"hl"][0])]
    with ErofsImage.open(flat_disk) as flat:
        assert {p: flat.read(nid) for p, nid, ino in flat.walk()
                if ino.type is FileType.REG} == want


@pytest.mark.system
def test_msb_images_match_kernel(msb_image: MsbImage, flat_disk: Path, tmp_path: Path) -> None:
    for i, img in enumerate([*msb_image.layers, flat_disk]):
        with ErofsImage.open(img) as im:
            got, groups = reader_records(im)
        with loop_mount_erofs(img, tmp_path / f"mnt{i}") as mnt:
            kernel, kernel_groups = dir_records(mnt)
        assert_same(got, kernel)
        assert groups == kernel_groups


# ---------------------------------------------------------------------------------------
# is_valid_erofs and crc
# ---------------------------------------------------------------------------------------


def test_is_valid_erofs_rules(msb_image: MsbImage, tmp_path: Path) -> None:
    good = msb_image.layers[0]
    raw = good.read_bytes()
    assert is_valid_erofs(good) and is_valid_erofs(msb_image.fsmeta)

    def variant(name: str, content: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(content)
        return p

    assert not is_valid_erofs(variant("empty", b""))
    assert not is_valid_erofs(variant("short", raw[:-512]))
    assert not is_valid_erofs(variant("tiny", raw[:100]))
    bad_magic = bytearray(raw)
    bad_magic[1024] ^= 0xFF
    assert not is_valid_erofs(variant("magic", bytes(bad_magic)))
    not_dir = bytearray(raw)
    root_off = 4096 + 4  # meta_blkaddr 1, root nid 0, i_mode at +4
    struct.pack_into("<H", not_dir, root_off, stat.S_IFREG | 0o644)
    assert not is_valid_erofs(variant("rootfile", bytes(not_dir)))
    assert not is_valid_erofs(tmp_path / "missing")
    assert not is_valid_erofs(tmp_path)
    bad_crc = bytearray(raw)
    bad_crc[1028] ^= 0x01
    p = variant("crc", bytes(bad_crc))
    assert is_valid_erofs(p)  # msb does not check the crc
    with ErofsImage.open(p) as im:
        assert not im.crc_ok
        with pytest.raises(ErofsFormatError, match="checksum"):
            im.check_crc()
    with ErofsImage.open(good) as im:
        assert im.crc_ok


# ---------------------------------------------------------------------------------------
# Corruption: only ErofsFormatError, never anything else
# ---------------------------------------------------------------------------------------


def exercise(path: Path, devices: list[Path] | None = None, block_map: bool = True) -> None:
    """Touch every part of an image the way the cache, fsmeta rebuild and view do."""
    with ErofsImage.open(path, devices) as im:
        _ = im.crc_ok
        for _path, nid, ino in im.walk():
            if ino.type is FileType.REG:
                im.read(nid, 0, 1 << 20)
                if ino.chunk is not None:
                    im.chunks(nid)
            elif ino.type is FileType.SYMLINK:
                im.readlink(nid)
        im.to_tree()
        if block_map:
            im.block_map()


def mutations(raw: bytes, seed: int, count: int) -> Iterator[bytes]:
    rnd = random.Random(seed)
    meta_end = min(len(raw), 4 * 4096)  # mostly hit superblock, inodes and dirents
    for i in range(count):
        buf = bytearray(raw)
        if i % 10 == 9:
            yield bytes(buf[: rnd.randrange(0, len(buf))])
            continue
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(1024, meta_end) if rnd.random() < 0.9 else rnd.randrange(len(buf))
            flip = buf[pos] ^ (1 << rnd.randrange(8))
            buf[pos] = rnd.randrange(256) if rnd.random() < 0.5 else flip
        yield bytes(buf)


@pytest.mark.parametrize("which", ["layer1", "layer2", "fsmeta"])
def test_corrupt_images_raise_only_format_errors(
    which: str, msb_image: MsbImage, tmp_path: Path
) -> None:
    src = {"layer1": msb_image.layers[0], "layer2": msb_image.layers[1],
           "fsmeta": msb_image.fsmeta}[which]
    devices = msb_image.layers if which == "fsmeta" else None
    target = tmp_path / "fuzz.erofs"
    outcomes = {"ok": 0, "error": 0}
    seed = ["layer1", "layer2", "fsmeta"].index(which)
    for buf in mutations(src.read_bytes(), seed=seed, count=300):
        target.write_bytes(buf)
        try:
            exercise(target, devices, block_map=which != "fsmeta")
            outcomes["ok"] += 1
        except ErofsFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0  # the mutations do reach the parser


def test_directory_cycle_detected(msb_image: MsbImage, tmp_path: Path) -> None:
    raw = bytearray(msb_image.layers[0].read_bytes())
    with ErofsImage.open(msb_image.layers[0]) as im:
        etc = im.inode(im.lookup("etc"))
        # etc's dir data: point its "." entry's sibling "hosts" at the root directory
        data_off = etc.inline_offset if etc.layout == fmt.LAYOUT_FLAT_INLINE else etc.raw_u * 4096
        ents = im.listdir(etc.nid)
    idx = [n for n, _, _ in ents].index(b"hosts")
    struct.pack_into("<QHBB", raw, data_off + 12 * idx,
                     0, struct.unpack_from("<H", raw, data_off + 12 * idx + 8)[0], 2, 0)
    bad = tmp_path / "cycle.erofs"
    bad.write_bytes(bytes(raw))
    with ErofsImage.open(bad) as im, pytest.raises(ErofsFormatError, match="reached twice"):
        list(im.walk())


def test_truncated_and_garbage_files(tmp_path: Path, msb_image: MsbImage) -> None:
    for name, content in [("zero", b""), ("junk", os.urandom(8192)),
                          ("sb-only", msb_image.layers[0].read_bytes()[:4096])]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ErofsFormatError):
            exercise(p)


@pytest.mark.system
def test_mkfs_blobdev_multi_device(source: Path, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    img = mkfs(source, tmp_path / "img.erofs", ["--chunksize=4096", f"--blobdev={blob}"])
    want, _ = dir_records(source)
    with ErofsImage.open(img, devices=[blob]) as im:
        assert len(im.devices) == 1
        got, _ = reader_records(im)
        nid = im.lookup("f70000")
        assert {d for d, _ in im.chunks(nid)} == {1}
    assert_same(got, want)
    with pytest.raises(ErofsFormatError, match="extra devices"):
        ErofsImage.open(img, devices=[blob, blob])


def test_null_chunks_read_as_zeros(msb_image: MsbImage, tmp_path: Path) -> None:
    raw = bytearray(msb_image.fsmeta.read_bytes())
    with ErofsImage.open(msb_image.fsmeta) as im:
        nid = im.lookup("big")
        ci = im.inode(nid).chunk
        assert ci is not None and ci.indexes and ci.count == 74
    struct.pack_into("<I", raw, ci.table_offset + 8 * 1 + 4, fmt.NULL_ADDR)  # chunk 1
    patched = tmp_path / "holes.erofs"
    patched.write_bytes(bytes(raw))
    want = bytearray(data(300_000, 3))
    want[4096:8192] = bytes(4096)
    with ErofsImage.open(patched, devices=msb_image.layers) as im:
        assert im.chunks(nid)[1] == (1, fmt.NULL_ADDR)
        assert im.read(nid) == bytes(want)
        assert im.read(nid, 4000, 200) == bytes(want[4000:4200])
        node = dict(tree_walk(im.to_tree()))[b"big"]
        assert node.content is None  # not contiguous any more
    with ErofsImage.open(patched) as im, pytest.raises(ErofsFormatError, match="device 1"):
        # flat mode on a file that is only the fsmeta: layer blocks lie past its end
        im.read(nid)


@pytest.mark.system
@pytest.mark.parametrize("variant", ["default", "compact-fixed-time", "chunk-indexes-8k"])
def test_corrupt_mkfs_images_raise_only_format_errors(
    variant: str, source: Path, tmp_path: Path
) -> None:
    img = mkfs(source, tmp_path / "img.erofs", MKFS_VARIANTS[variant])
    target = tmp_path / "fuzz.erofs"
    exercise(img, block_map=False)
    outcomes = {"ok": 0, "error": 0}
    for buf in mutations(img.read_bytes(), seed=100 + len(variant), count=200):
        target.write_bytes(buf)
        try:
            exercise(target, block_map=False)
            outcomes["ok"] += 1
        except ErofsFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0
