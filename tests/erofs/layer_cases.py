"""Layer tars that cover every rule of FORMATS.md §3, shared by the writer and fsmeta tests.

"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cachefs.erofs.tree import Node
from cachefs.ingest.layer import Compression, ingest_layer
from tests.fixtures.images import Entry, device, dir_, hardlink, layer_tar, reg, symlink


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating-per-block bytes, so misplaced blocks are caught."""
    block = bytes((i * 31 + seed) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def everything_entries() -> list[Entry]:
    long_dir = "p" * 60 + "/" + "q" * 60
    deep = "/".join("abcdefghij")
    entries: list[Entry] = [
        dir_("etc/", mtime=1600000000),
        reg("etc/empty"),
        reg("etc/one", b"x"),
        reg("etc/f4095", pattern(4095, 1)),
        reg("etc/f4096", pattern(4096, 2)),
        reg("etc/f4097", pattern(4097, 3)),
        reg("big.bin", pattern(1536 * 1024 + 7, 4), mode=0o600),
        reg("n" * 255, b"long name"),
        reg(long_dir + "/" + "r" * 40, b"pax path"),
        reg("ünï/çødé.txt", "unicode ✓".encode()),
        reg("!bang", b"sorts before dot"),
        reg("#hash", b""),
        reg("-dash", b"d"),
        reg("hl/a", b"hardlinked data" * 300),
        hardlink("hl/b", "hl/a"),
        hardlink("other/c", "hl/a"),
        reg(".wh.gone", b""),
        dir_("opq/", mode=0o700, uid=5, gid=6),
        reg("opq/.wh..wh..opq", b""),
        reg("opq/kept", b"kept"),
        symlink("s9", "123456789"),
        symlink("s100", "t" * 100),
        symlink("s3001", "u" * 3001),
        symlink("s4091", "v" * 4091),
        device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        device("dev/big", tarfile.BLKTYPE, 300, 70000, mode=0o660),
        device("dev/fifo", tarfile.FIFOTYPE, mode=0o644),
        reg("suid", b"#!/bin/sh\n", mode=0o4755),
        dir_("tmp/", mode=0o1777),
        reg("owned", b"o", uid=3000000, gid=4000000),
        reg(deep + "/leaf", b"deep leaf"),
        dir_("a/b/", mode=0o750, mtime=1234),
    ]
    entries += [reg(f"many/entry-{i:03d}-" + "z" * 20, b"") for i in range(400)]
    return entries


def everything_tar() -> bytes:
    return layer_tar(everything_entries())


def small_tars() -> list[bytes]:
    """A few small layers that hit the inline/plain boundary decisions differently."""
    return [
        layer_tar([reg("a", b"1"), symlink("l", "a")]),
        layer_tar([dir_("d/"), reg("d/.wh.x", b""), reg(".wh..wh..opq", b""), reg("d/k", b"k")]),
        layer_tar([reg(f"f{i:02d}", pattern(i * 1000, i)) for i in range(12)]),
        layer_tar([symlink(f"s{i}", "y" * (i * 150)) for i in range(1, 27)]),
    ]


def tar_to_tree(tar_bytes: bytes, spool: BinaryIO) -> Node:
    """Ingest an uncompressed layer tar with the real ``cachefs.ingest.layer`` (bytes → spool)."""
    return ingest_layer(
        io.BytesIO(tar_bytes), compression=Compression.NONE, expected_diff_id=None,
        spool=spool, layer_label="test",
    ).root


def layer_trees(tars: Sequence[bytes], spool: BinaryIO) -> list[Node]:
    return [tar_to_tree(t, spool) for t in tars]


# --- An independent oracle: what the kernel must show for a stack of layer tars. ---------


@dataclass(eq=False)
class Want:
    """Expected inode (shared object = hardlink group), computed straight from tar headers."""

    kind: str  # reg dir sym chr blk fifo
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    opaque: bool = False
    children: dict[bytes, Want] = field(default_factory=dict)

    @property
    def whiteout(self) -> bool:
        return self.kind == "chr" and self.rdev == (0, 0)


_KINDS = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "sym", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk",
          tarfile.FIFOTYPE: "fifo"}


def want_layer(tar_bytes: bytes) -> Want:
    """FORMATS.md §3.12 applied with ``tarfile`` (tests never use PAX mtime)."""
    root = Want("dir")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tf:
        for ti in tf:
            parts = [p for p in ti.name.encode("utf-8", "surrogateescape").split(b"/")
                     if p not in (b"", b".")]
            if not parts:
                continue
            parent = root
            for p in parts[:-1]:
                parent = parent.children.setdefault(p, Want("dir"))
            name = parts[-1]
            meta = dict(mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid, mtime=int(ti.mtime))
            if (ti.isreg() or ti.issym()) and name == b".wh..wh..opq":
                parent.opaque = True
            elif (ti.isreg() or ti.issym()) and name.startswith(b".wh.") and len(name) > 4:
                parent.children[name[4:]] = Want("chr", **meta)
            elif ti.islnk():
                target = root
                for p in ti.linkname.encode("utf-8", "surrogateescape").strip(b"/").split(b"/"):
                    target = target.children[p]
                parent.children[name] = target
            elif ti.isdir() and (old := parent.children.get(name)) is not None \
                    and old.kind == "dir":
                old.mode, old.uid, old.gid, old.mtime = (meta[k] for k in ("mode", "uid",
                                                                             "gid", "mtime"))
                old.opaque = False
            else:
                w = Want(_KINDS[ti.type], **meta)
                if w.kind == "reg":
                    w.data = tf.extractfile(ti).read()  # type: ignore[union-attr]
                elif w.kind == "sym":
                    w.target = ti.linkname.encode("utf-8", "surrogateescape")
                elif w.kind in ("chr", "blk"):
                    w.rdev = (ti.devmajor, ti.devminor)
                parent.children[name] = w
    return root


def want_merged(tars: Sequence[bytes], *, msb_quirks: bool = False) -> Want:
    """FORMATS.md §4.5 over ``want_layer`` trees, then the opaque marker stripped.

    OCI semantics by default: whiteouts inside a new dir vanish and a layer root's opaque
    marker hides everything below. ``msb_quirks``: msb keeps nested whiteouts as 0:0
    devices and ignores a root opaque marker.
    """
    merged = Want("dir")

    def drop_whiteouts(w: Want) -> None:
        for name, c in list(w.children.items()):
            if c.whiteout:
                del w.children[name]
            elif c.kind == "dir":
                drop_whiteouts(c)

    def into(dst: Want, src: Want) -> None:
        for name, s in src.children.items():
            d = dst.children.get(name)
            if s.whiteout:
                dst.children.pop(name, None)
            elif s.kind == "dir" and d is not None and d.kind == "dir":
                if s.opaque:
                    d.children.clear()
                d.mode, d.uid, d.gid, d.mtime = s.mode, s.uid, s.gid, s.mtime
                into(d, s)
            else:
                if s.kind == "dir" and not msb_quirks:
                    drop_whiteouts(s)
                dst.children[name] = s

    for t in tars:
        layer = want_layer(t)
        if layer.opaque and not msb_quirks:
            merged.children.clear()
        into(merged, layer)
    stack = [merged]
    while stack:
        w = stack.pop()
        w.opaque = False
        stack.extend(c for c in w.children.values() if c.kind == "dir")
    return merged


def overlay_tars() -> list[bytes]:
    """Three layers exercising every §4.5 rule (whiteouts, opaque, type changes, quirks)."""
    return [
        layer_tar([
            dir_("etc/", mode=0o751, uid=1, gid=2, mtime=1500000000),
            reg("etc/passwd", b"root:x:0:0\n"),
            reg("etc/group", pattern(5000, 9)),
            reg("hl/a", b"shared" * 1000),
            hardlink("hl/b", "hl/a"),
            hardlink("hl/c", "hl/a"),
            reg("gone/x", b"x"),
            dir_("gone/sub/"),
            reg("tochange", b"was a file"),
            reg("dirtofile/inner", b"i"),
            reg("opq/old1", b"1"),
            reg("opq/old2", b"2"),
            dir_("keepme/", mode=0o700, uid=7, gid=7, mtime=1400000000),
            reg("keepme/deep/file", b"f"),
            symlink("link", "etc/passwd"),
            device("dev/tty", tarfile.CHRTYPE, 5, 0),
            reg("big", pattern(3 * 4096 + 5, 1)),
        ]),
        layer_tar([
            reg(".wh.gone", b""),
            reg("hl/.wh.b", b""),
            dir_("tochange/", mode=0o705),
            reg("tochange/now", b"a dir now"),
            reg("dirtofile", b"a file now"),
            dir_("opq/", mode=0o770),
            reg("opq/.wh..wh..opq", b""),
            reg("opq/new", b"new"),
            reg("keepme/deep/file2", b"f2"),
            reg("newdir/.wh.ghost", b""),
            reg("newdir/real", b"r"),
            reg(".wh.nothing-below", b""),
        ]),
        layer_tar([
            reg("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n"),
            reg("link", b"link is a file now"),
            symlink("tochange/up", ".."),
            reg("hl/d", b"not linked"),
            reg(".wh..wh..opq", b""),
            reg("empty", b""),
        ]),
    ]


def many_layer_tars(n: int = 25) -> list[bytes]:
    """``n`` small layers: the device table runs past block 0 (meta_blkaddr 2)."""
    tars = []
    for i in range(n):
        entries = [reg(f"l{i:02d}/f", pattern(100 * i + 1, i)), reg("shared", f"{i}".encode())]
        if i:
            entries.append(reg(f".wh.l{i - 1:02d}", b""))
        tars.append(layer_tar(entries))
    return tars


Row = tuple[object, ...]


def flatten(root: Want) -> tuple[dict[bytes, Row], set[frozenset[bytes]]]:
    """path → (kind, mode, uid, gid, mtime, size, sha256, target, rdev, nlink, opaque) and
    the hardlink groups (sets of paths sharing an inode, only those with > 1 name)."""
    names: dict[int, list[bytes]] = {}
    rows: dict[bytes, Row] = {}
    stack: list[tuple[bytes, Want]] = [(b"", root)]
    while stack:
        path, w = stack.pop()
        names.setdefault(id(w), []).append(path)
        for name, c in w.children.items():
            stack.append((path + b"/" + name if path else name, c))
    objs: dict[int, Want] = {}
    stack2: list[Want] = [root]
    while stack2:
        w = stack2.pop()
        objs[id(w)] = w
        stack2.extend(c for c in w.children.values() if c.kind == "dir")
        for c in w.children.values():
            objs[id(c)] = c
    for key, paths in names.items():
        w = objs[key]
        for path in paths:
            if w.kind == "dir":
                nlink = 2 if path == b"" else 2 + sum(c.kind == "dir" for c in w.children.values())
            else:
                nlink = len(paths)
            size = len(w.data) if w.kind == "reg" else len(w.target) if w.kind == "sym" else 0
            rows[path] = (w.kind, w.mode, w.uid, w.gid, w.mtime, size,
                          hashlib.sha256(w.data).hexdigest() if w.kind == "reg" else None,
                          w.target if w.kind == "sym" else None,
                          w.rdev if w.kind in ("chr", "blk") else None, nlink, w.opaque)
    groups = {frozenset(p) for p in names.values() if len(p) > 1}
    return rows, groups


_STAT_KIND = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "sym",
              stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}


def scan_mount(top: Path) -> tuple[dict[bytes, Row], set[frozenset[bytes]]]:
    """The same shape as ``flatten``, read from a mounted filesystem."""
    rows: dict[bytes, Row] = {}
    by_ino: dict[int, list[bytes]] = {}
    base = os.fsencode(top)
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = base + b"/" + rel if rel else base
        st = os.lstat(full)
        kind = _STAT_KIND[stat.S_IFMT(st.st_mode)]
        by_ino.setdefault(st.st_ino, []).append(rel)
        sha = target = rdev = None
        if kind == "reg":
            h = hashlib.sha256()
            with open(full, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            sha = h.hexdigest()
        elif kind == "sym":
            target = os.readlink(full)
        elif kind in ("chr", "blk"):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        opaque = False
        if kind == "dir":
            opaque = b"trusted.overlay.opaque" in [
                os.fsencode(x) for x in os.listxattr(full, follow_symlinks=False)]
            stack.extend(rel + b"/" + n if rel else n for n in os.listdir(full))
        rows[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime),
                     st.st_size if kind in ("reg", "sym") else 0, sha, target, rdev,
                     st.st_nlink, opaque)
    groups = {frozenset(p) for p in by_ino.values() if len(p) > 1}
    return rows, groups
