"""Library side of ``cachefs erofs ls`` and ``cachefs erofs cat``: the CLI only renders.

Entries are plain JSON-serialisable dicts so that ``--json`` output and the human
``ls -l``-like lines come from one source. EROFS names, link targets and xattr values
are raw bytes; they are shown as UTF-8 with backslash escapes for anything that is not
valid UTF-8, so nothing is lost silently and the output stays printable.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from typing import Any

from cachefs.erofs.reader import ErofsImage
from cachefs.erofs.tree import FileType
from cachefs.errors import UsageError

_TYPE_NAMES: dict[FileType, str] = {
    FileType.REG: "file",
    FileType.DIR: "dir",
    FileType.SYMLINK: "symlink",
    FileType.CHR: "chr",
    FileType.BLK: "blk",
    FileType.FIFO: "fifo",
    FileType.SOCK: "sock",
}

CAT_CHUNK = 1 << 20


def show(raw: bytes) -> str:
    """Raw bytes as text: UTF-8 where valid, ``\\xNN`` escapes elsewhere."""
    return raw.decode("utf-8", "backslashreplace")


def list_entries(image: ErofsImage) -> list[dict[str, Any]]:
    """One dict per path in pre-order (root "/" first), hardlinks under every name.

    Keys: path, type, mode (permission bits as an octal string, e.g. "0755"), uid, gid,
    size, mtime, mtime_nsec, nlink, nid, target (symlinks, else None), rdev ("maj:min"
    for devices, else None), xattrs (name → value, in on-disk order).
    """
    out: list[dict[str, Any]] = []
    for path, nid, ino in image.walk():
        target = show(image.readlink(nid)) if ino.type is FileType.SYMLINK else None
        rdev = None
        if ino.type in (FileType.CHR, FileType.BLK):
            major, minor = ino.rdev
            rdev = f"{major}:{minor}"
        out.append({
            "path": "/" + show(path),
            "type": _TYPE_NAMES[ino.type],
            "mode": f"{ino.perm:04o}",
            "uid": ino.uid,
            "gid": ino.gid,
            "size": ino.size,
            "mtime": ino.mtime,
            "mtime_nsec": ino.mtime_nsec,
            "nlink": ino.nlink,
            "nid": nid,
            "target": target,
            "rdev": rdev,
            "xattrs": {show(name): show(value) for name, value in ino.xattrs},
        })
    return out


def format_ls_line(entry: dict[str, Any]) -> str:
    """``drwxr-xr-x   2     0     0       4096 2023-11-14 22:13 /etc`` (mtime in UTC)."""
    type_bits = {
        "file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK,
        "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK,
    }[entry["type"]]
    mode = stat.filemode(type_bits | int(entry["mode"], 8))
    size = entry["rdev"].replace(":", ", ") if entry["rdev"] else str(entry["size"])
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry["mtime"]))
    line = (f"{mode} {entry['nlink']:>3} {entry['uid']:>5} {entry['gid']:>5} "
            f"{size:>10} {when} {entry['path']}")
    if entry["target"] is not None:
        line += f" -> {entry['target']}"
    return line


def cat_file(image: ErofsImage, path: bytes | str, chunk_size: int = CAT_CHUNK) -> Iterator[bytes]:
    """The contents of regular file ``path``, streamed in ``chunk_size`` pieces.

    The path is checked before this returns (not at the first ``next()``), so the
    caller can report "not found" / "not a regular file" before writing any output.
    """
    shown = show(path) if isinstance(path, bytes) else path
    try:
        nid = image.lookup(path)
    except FileNotFoundError:
        raise UsageError(f"{shown}: no such file in {image.path}") from None
    ino = image.inode(nid)
    if ino.type is not FileType.REG:
        raise UsageError(
            f"{shown} in {image.path} is a {_TYPE_NAMES[ino.type]}, not a regular file"
        )
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")

    def stream() -> Iterator[bytes]:
        for off in range(0, ino.size, chunk_size):
            yield image.read(nid, off, chunk_size)

    return stream()
