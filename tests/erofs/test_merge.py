"""The OCI merge (FORMATS.md §4.5) against an independent path→entry model of OCI layers."""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path as FsPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.erofs.fsmeta import write_fsmeta
from cachefs.erofs.merge import merge_layers, merge_layers_msb_compatible
from cachefs.erofs.tree import NULL_BLOCK, OPAQUE_XATTR, FileType, LayerBlocks, Node, walk
from cachefs.erofs.writer import write_layer_erofs
from cachefs.ingest.layer import Compression, ingest_layer
from tests.fixtures.images import TestImage, dir_, docker_archive, hardlink, layer_tar, reg, symlink
from tests.fixtures.system import Msb

Path = tuple[bytes, ...]

# -- building layer trees ---------------------------------------------------------------


class LayerBuilder:
    """A layer tree the way ingest leaves it after the writer assigned blocks."""

    _blocks = itertools.count(10)

    def __init__(self) -> None:
        self.root = Node.directory()

    def _dir(self, path: Path, create: bool = True) -> Node | None:
        node = self.root
        for comp in path:
            child = node.child(comp)
            if child is None:
                if not create:
                    return None
                child = node.children[comp] = Node.directory()  # type: ignore[index]
            if not child.is_dir:
                return None
            node = child
        return node

    def put(self, path: Path, node: Node) -> Node | None:
        parent = self._dir(path[:-1])
        if parent is None:
            return None
        old = parent.child(path[-1])
        if node.is_dir and old is not None and old.is_dir:
            old.mode, old.uid, old.mtime, old.xattrs = node.mode, node.uid, node.mtime, []
            return old
        if not node.is_dir and old is not None and old.is_dir:
            return None  # ingest refuses a non-dir onto a dir
        parent.children[path[-1]] = node  # type: ignore[index]
        return node

    def reg(self, path: str, size: int = 1, mode: int = 0o644, uid: int = 0) -> Node | None:
        node = Node(FileType.REG, mode, uid, size=size,
                    block=next(self._blocks) if size else NULL_BLOCK)
        return self.put(split(path), node)

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, mtime: int = 0) -> Node | None:
        return self.put(split(path), Node.directory(mode, uid, 0, mtime))

    def wh(self, path: str) -> Node | None:
        return self.put(split(path), Node(FileType.CHR, 0o644))

    def opq(self, path: str) -> None:
        d = self._dir(split(path))
        if d is not None and OPAQUE_XATTR not in d.xattrs:
            d.xattrs.append(OPAQUE_XATTR)

    def sym(self, path: str, target: str = "t") -> Node | None:
        return self.put(split(path), Node(FileType.SYMLINK, 0o777, target=target.encode()))

    def link(self, path: str, node: Node) -> Node | None:
        return self.put(split(path), node)


def split(path: str) -> Path:
    return tuple(p.encode() for p in path.split("/") if p)


# -- the independent model --------------------------------------------------------------

Entry = tuple  # ("reg", mode, uid, size, device, block, group) | ("dir", …) | ("sym", …)


def _entries(root: Node, i: int) -> Iterator[tuple[Path, Node]]:
    for p, node in walk(root):
        if p:
            yield tuple(p.split(b"/")), node


def _describe(node: Node, device: int, ids: dict[int, int]) -> Entry:
    if node.type is FileType.REG:
        group = ids.setdefault(id(node), len(ids))
        return ("reg", node.mode, node.uid, node.size, device, node.block, (device, group))
    if node.is_dir:
        xattrs = tuple(x for x in node.xattrs if x != OPAQUE_XATTR)
        return ("dir", node.mode, node.uid, node.gid, node.mtime, xattrs)
    return (node.type.name, node.mode, node.uid, node.target, node.rdev_major, node.rdev_minor)


def oci_model(layers: Sequence[Node]) -> dict[Path, Entry]:
    """OCI image-spec changeset application, written without looking at merge.py:
    deletions (whiteouts, opaque dirs) hit the lower state first, then the layer's entries
    are added; an entry over a different kind, or a non-dir over anything, drops the old
    subtree. Whiteouts never appear in the result."""
    state: dict[Path, Entry] = {}

    def drop_under(p: Path, inclusive: bool) -> None:
        for k in [k for k in state if k[: len(p)] == p and (inclusive or len(k) > len(p))]:
            del state[k]

    for i, root in enumerate(layers):
        ids: dict[int, int] = {}
        entries = list(_entries(root, i))
        if root.is_opaque:
            state.clear()
        for p, node in entries:
            if node.is_whiteout:
                drop_under(p, inclusive=True)
            elif node.is_opaque:
                drop_under(p, inclusive=False)
        for p, node in entries:
            if node.is_whiteout:
                continue
            old = state.get(p)
            if old is not None and not (old[0] == "dir" and node.is_dir):
                drop_under(p, inclusive=True)
            state[p] = _describe(node, i + 1, ids)
    return state


def flatten(root: Node) -> dict[Path, Entry]:
    """The merged tree in the model's terms (merged Nodes carry LayerBlocks, not .block)."""
    out: dict[Path, Entry] = {}
    groups: dict[int, tuple[int, int]] = {}
    per_device: dict[int, int] = {}
    for p, node in _entries(root, 0):
        if node.type is FileType.REG:
            c = node.content
            assert isinstance(c, LayerBlocks)
            if id(node) not in groups:
                groups[id(node)] = (c.device_id, per_device.get(c.device_id, 0))
                per_device[c.device_id] = per_device.get(c.device_id, 0) + 1
            out[p] = ("reg", node.mode, node.uid, node.size, c.device_id, c.start_block,
                      groups[id(node)])
        else:
            out[p] = _describe(node, 0, {})
    return out


def canon(state: dict[Path, Entry]) -> dict[Path, Entry]:
    """Renumber hardlink groups by first appearance in path order, so ids compare."""
    seen: dict[tuple[int, int], int] = {}
    out = {}
    for p in sorted(state):
        e = state[p]
        if e[0] == "reg":
            e = (*e[:-1], seen.setdefault(e[-1], len(seen)))
        out[p] = e
    return out


def check(layers: Sequence[Node]) -> Node:
    before = [copy.deepcopy(flatten_layer(r)) for r in layers]
    merged = merge_layers(layers)
    assert canon(flatten(merged)) == canon(oci_model(layers))
    assert (merged.mode, merged.uid, merged.gid, merged.mtime, merged.xattrs) == (
        0o755, 0, 0, 0, []
    )
    assert [flatten_layer(r) for r in layers] == before  # inputs untouched
    for _, node in walk(merged):
        assert OPAQUE_XATTR not in node.xattrs
        assert not node.is_whiteout
    return merged


def flatten_layer(root: Node) -> list[tuple[bytes, str, int, list[tuple[bytes, bytes]]]]:
    return [(p, n.type.name, n.mode, list(n.xattrs)) for p, n in walk(root)]


def at(root: Node, path: str) -> Node | None:
    node: Node | None = root
    for comp in split(path):
        node = node.child(comp) if node is not None else None
    return node


# -- examples ---------------------------------------------------------------------------


def test_whiteout_removes_file_and_subtree() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    l0.reg("a/f")
    l0.reg("a/sub/deep")
    l0.reg("keep")
    l1.wh("a/f")
    l1.wh("a/sub")
    l1.wh("never-existed")
    m = check([l0.root, l1.root])
    assert [p for p, _ in walk(m)] == [b"", b"a", b"keep"]


def test_opaque_dir_hides_lower_children_only() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    l0.reg("d/old")
    l0.reg("d/x/y")
    l1.dir("d", mode=0o700)
    l1.opq("d")
    l1.reg("d/new")
    m = check([l0.root, l1.root])
    assert [p for p, _ in walk(m)] == [b"", b"d", b"d/new"]
    d = at(m, "d")
    assert d is not None and (d.mode, d.xattrs) == (0o700, [])


def test_type_changes_across_layers() -> None:
    l0, l1, l2 = LayerBuilder(), LayerBuilder(), LayerBuilder()
    l0.reg("x/inner")
    l0.reg("y")
    l0.sym("z")
    l1.reg("x")  # file over dir: the dir's subtree goes
    l1.reg("y/now-a-dir")  # dir over file
    l1.dir("z")
    l2.sym("y", "elsewhere")
    m = check([l0.root, l1.root, l2.root])
    x, y = at(m, "x"), at(m, "y")
    assert x is not None and x.type is FileType.REG and x.content.device_id == 2  # type: ignore[union-attr]
    assert y is not None and y.type is FileType.SYMLINK and y.target == b"elsewhere"


def test_delete_then_recreate() -> None:
    l0, l1, l2 = LayerBuilder(), LayerBuilder(), LayerBuilder()
    l0.reg("d/a")
    l0.reg("d/b")
    l1.wh("d")
    l2.reg("d/c", size=5000)
    m = check([l0.root, l1.root, l2.root])
    assert [p for p, _ in walk(m)] == [b"", b"d", b"d/c"]
    c = at(m, "d/c")
    assert c is not None and c.size == 5000
    assert isinstance(c.content, LayerBlocks) and c.content.device_id == 3


def test_hardlinks_share_one_merged_node_per_layer() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    f = l0.reg("a", size=10)
    assert f is not None
    l0.link("b", f)
    l0.link("d/c", f)
    l1.reg("b", size=3)  # replaces one name only
    m = check([l0.root, l1.root])
    a, b, c = at(m, "a"), at(m, "b"), at(m, "d/c")
    assert a is c and a is not b
    assert a is not None and a is not f
    assert a.content == LayerBlocks(1, f.block)  # type: ignore[arg-type]


def test_provenance_and_empty_files() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    e = l0.reg("empty", size=0)
    l0.reg("over", size=7)
    top = l1.reg("over", size=9)
    m = check([l0.root, l1.root])
    assert at(m, "empty").content == LayerBlocks(1, NULL_BLOCK)  # type: ignore[union-attr]
    assert e is not None and top is not None
    assert at(m, "over").content == LayerBlocks(2, top.block)  # type: ignore[union-attr, arg-type]
    assert at(m, "over").size == 9  # type: ignore[union-attr]


def test_regular_file_without_block_is_refused() -> None:
    root = Node.directory()
    root.children[b"f"] = Node(FileType.REG, size=3)  # type: ignore[index]
    with pytest.raises(ValueError, match=r"without \.block"):
        merge_layers([root])


def test_implicit_parent_overwrites_lower_metadata_like_msb() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    l0.dir("etc", mode=0o700, uid=5, mtime=123)
    l0.reg("etc/old")
    l1.reg("etc/new")  # implicit etc: 0755 0:0 mtime 0
    m = check([l0.root, l1.root])
    etc = at(m, "etc")
    assert etc is not None and (etc.mode, etc.uid, etc.mtime) == (0o755, 0, 0)
    assert sorted(etc.children or {}) == [b"new", b"old"]


def test_nested_whiteout_in_new_dir_dropped_but_leaked_in_msb_mode() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    l0.reg("keep")
    l1.reg("newdir/file")
    l1.wh("newdir/ghost")
    m = check([l0.root, l1.root])
    assert at(m, "newdir/ghost") is None
    msb = merge_layers_msb_compatible([l0.root, l1.root])
    ghost = at(msb, "newdir/ghost")
    assert ghost is not None and ghost.is_whiteout


def test_root_opaque_hides_lower_layers_except_in_msb_mode() -> None:
    l0, l1 = LayerBuilder(), LayerBuilder()
    l0.reg("old")
    l1.reg("new")
    l1.opq("")
    m = check([l0.root, l1.root])
    assert sorted(m.children or {}) == [b"new"]
    assert sorted(merge_layers_msb_compatible([l0.root, l1.root]).children or {}) == [
        b"new", b"old"
    ]


def test_no_layers_is_an_empty_root() -> None:
    m = merge_layers([])
    assert (m.type, m.mode, m.children) == (FileType.DIR, 0o755, {})


# -- property ---------------------------------------------------------------------------

NAMES = [b"a", b"b", b"c"]
KINDS = ["reg", "reg", "dir", "wh", "opq", "sym", "chr", "link"]
op = st.tuples(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
    st.sampled_from(KINDS),
    st.integers(0, 3),
)


def build_layer(ops: list[tuple[list[bytes], str, int]]) -> Node:
    b = LayerBuilder()
    files: list[Node] = []
    for comps, kind, k in ops:
        path = "/".join(c.decode() for c in comps)
        if kind == "reg":
            n = b.reg(path, size=k * 3000, mode=0o600 + k, uid=k)
            if n is not None:
                files.append(n)
        elif kind == "dir":
            b.dir(path, mode=0o700 + k, uid=k, mtime=k)
        elif kind == "wh":
            b.wh(path)
        elif kind == "opq":
            b.opq(path if k else "/".join(c.decode() for c in comps[:-1]))
        elif kind == "sym":
            b.sym(path, f"t{k}")
        elif kind == "chr":
            b.put(split(path), Node(FileType.CHR, 0o600, rdev_major=1, rdev_minor=k))
        elif kind == "link" and files:
            b.link(path, files[k % len(files)])
    return b.root


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(op, max_size=10), min_size=1, max_size=4))
def test_merge_matches_oci_model(layer_ops: list[list[tuple[list[bytes], str, int]]]) -> None:
    check([build_layer(ops) for ops in layer_ops])


# -- byte identity with msb (through the real writers) ----------------------------------


def test_msb_compatible_merge_gives_msb_fsmeta_bytes(msb: Msb, tmp_path: FsPath) -> None:
    """Ingest → layer EROFS → msb-compatible merge → fsmeta equals msb's fsmeta exactly,
    on layers that exercise every §4.5 branch (nested whiteout leak included)."""
    tars = [
        layer_tar([dir_("etc/", mode=0o700, uid=5), reg("etc/passwd", b"root"),
                   reg("etc/shadow", b"x" * 5000), reg("d/a", b"a"), reg("d/b", b"b"),
                   reg("f", b"file"), symlink("s", "etc"), reg("gone/x", b"x")]),
        layer_tar([reg("etc/new", b"implicit parent"), reg(".wh.gone"), dir_("d/"),
                   reg("d/.wh..wh..opq"), reg("d/c", b"c"), reg("f/now-dir", b"d"),
                   reg("newdir/.wh.ghost"), reg("newdir/k", b"k"), reg("h1", b"hl"),
                   hardlink("h2", "h1")]),
        layer_tar([reg("etc/.wh.passwd"), reg("d", b"file over dir"), dir_("s/")]),
    ]
    archive = docker_archive(TestImage(tars), ["example.com/t/merge:1"], tmp_path / "a.tar")
    msb.load(archive)
    (want_path,) = (msb.cache / "fsmeta").glob("*.erofs")
    roots, blocks = [], []
    for tar in tars:
        spool = io.BytesIO()
        root = ingest_layer(io.BytesIO(tar), compression=Compression.NONE,
                            expected_diff_id=None, spool=spool, layer_label="t").root
        bm = write_layer_erofs(root, spool, io.BytesIO())
        roots.append(root)
        blocks.append(bm.total_blocks)
    out = io.BytesIO()
    write_fsmeta(merge_layers_msb_compatible(roots), blocks, out)
    assert out.getvalue() == want_path.read_bytes()
    # and our OCI-correct default differs only by the leaked whiteout
    oci = merge_layers(roots)
    assert at(oci, "newdir/ghost") is None
    assert at(merge_layers_msb_compatible(roots), "newdir/ghost") is not None


def test_a_file_in_a_new_directory_points_at_its_layer_like_any_other() -> None:
    """Files copied with their new directory get LayerBlocks built the merge's fast way:
    equal, hashable and frozen like ones built by the constructor."""
    l0 = LayerBuilder()
    f = l0.reg("d/e/f", size=5000)
    assert f is not None and f.block is not None
    m = check([l0.root])
    node = at(m, "d/e/f")
    assert node is not None and isinstance(node.content, LayerBlocks)
    got = node.content
    assert got == LayerBlocks(1, f.block) and hash(got) == hash(LayerBlocks(1, f.block))
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.start_block = 0  # type: ignore[misc]
