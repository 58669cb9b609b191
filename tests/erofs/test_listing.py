"""``erofs ls`` / ``erofs cat`` library side, on an image mkfs.erofs made from a real dir."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

from cachefs.erofs.listing import cat_file, format_ls_line, list_entries
from cachefs.erofs.reader import ErofsImage
from cachefs.errors import UsageError
from tests.fixtures.system import require_root, require_tool, run

BIG = random.Random(5).randbytes(200_000)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require_root()
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    os.chmod(src, 0o755)
    (src / "big").write_bytes(BIG)
    (src / "sub" / "small").write_bytes(b"small\n")
    os.chown(src / "sub" / "small", 1000, 2000)
    os.chmod(src / "sub" / "small", 0o640)
    os.symlink("sub/small", src / "link")
    os.mknod(src / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 1))
    os.chmod(src / "tty", 0o620)  # mknod is subject to the umask
    os.link(src / "big", src / "big2")
    os.setxattr(src / "big", "user.text", "héllo".encode())
    os.setxattr(src / "big", "user.bin", b"\xff\x00z")
    os.utime(src / "sub" / "small", (1700000000, 1700000000))
    out = tmp_path / "img.erofs"
    run([require_tool("mkfs.erofs"), "--quiet", str(out), str(src)])
    return out


@pytest.mark.system
def test_list_entries_match_lstat(image: Path) -> None:
    src = image.parent / "src"
    with ErofsImage.open(image) as im:
        entries = list_entries(im)
    json.dumps(entries)  # JSON-serialisable as is
    by_path = {e["path"]: e for e in entries}
    assert entries[0]["path"] == "/" and entries[0]["type"] == "dir"
    assert sorted(by_path) == ["/", "/big", "/big2", "/link", "/sub", "/sub/small", "/tty"]
    for path, e in by_path.items():
        st = os.lstat(str(src) + path)
        assert e["mode"] == f"{stat.S_IMODE(st.st_mode):04o}"
        assert (e["uid"], e["gid"], e["nlink"]) == (st.st_uid, st.st_gid, st.st_nlink)
        assert e["mtime"] == int(st.st_mtime)
    assert by_path["/big"]["size"] == len(BIG) and by_path["/big"]["nid"] == by_path["/big2"]["nid"]
    assert by_path["/link"]["target"] == "sub/small" and by_path["/link"]["type"] == "symlink"
    assert by_path["/tty"]["rdev"] == "4:1" and by_path["/tty"]["type"] == "chr"
    assert by_path["/big"]["xattrs"] == {"user.text": "héllo", "user.bin": "\\xff\x00z"}
    assert by_path["/sub/small"]["mode"] == "0640"


@pytest.mark.system
def test_format_ls_line(image: Path) -> None:
    with ErofsImage.open(image) as im:
        by_path = {e["path"]: e for e in list_entries(im)}
    small = format_ls_line(by_path["/sub/small"])
    assert small.startswith("-rw-r----- ")
    assert "1000" in small and "2000" in small and " 6 " in small
    assert small.endswith("2023-11-14 22:13 /sub/small")
    assert format_ls_line(by_path["/link"]).endswith("/link -> sub/small")
    assert format_ls_line(by_path["/link"]).startswith("lrwxrwxrwx")
    tty = format_ls_line(by_path["/tty"])
    assert tty.startswith("crw--w----") and "4, 1" in tty
    assert format_ls_line(by_path["/"]).startswith("drwxr-xr-x")


@pytest.mark.system
def test_cat_file_streams(image: Path) -> None:
    with ErofsImage.open(image) as im:
        pieces = list(cat_file(im, "/big", chunk_size=65536))
        assert [len(p) for p in pieces] == [65536, 65536, 65536, 200_000 - 3 * 65536]
        assert b"".join(pieces) == BIG
        assert b"".join(cat_file(im, b"sub/small")) == b"small\n"
        with pytest.raises(UsageError, match="no such file"):
            cat_file(im, "/nope")
        with pytest.raises(UsageError, match="not a regular file"):
            cat_file(im, "/sub")
        with pytest.raises(UsageError, match="not a regular file"):
            cat_file(im, "/link")  # symlinks are not followed
