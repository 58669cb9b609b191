from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefs.cache.publish import (
    atomic_output,
    fsync_dir,
    publish_file,
    remove_quietly,
)


def test_publish_renames_and_replaces(tmp_path: Path) -> None:
    final = tmp_path / "f"
    final.write_bytes(b"old")
    old_inode = final.stat().st_ino
    tmp = tmp_path / "f.part"
    tmp.write_bytes(b"new")
    publish_file(tmp, final, durable=True)
    assert final.read_bytes() == b"new" and not tmp.exists()
    assert final.stat().st_ino != old_inode  # a new file, so open readers keep the old one


def test_atomic_output_leaves_no_temp_when_publishing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final, tmp = tmp_path / "meta.json", tmp_path / "meta.json.part"
    with atomic_output(final, tmp, durable=True) as f:
        f.write(b"{}")
    assert final.read_bytes() == b"{}"

    def fail(*a: object, **k: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr("cachefs.cache.publish.os.rename", fail)
    with pytest.raises(OSError, match="rename failed"), \
            atomic_output(final, tmp, durable=False) as f:
        f.write(b"{new}")
    assert final.read_bytes() == b"{}"
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]


def test_atomic_output_publishes_only_on_success(tmp_path: Path) -> None:
    final, tmp = tmp_path / "out", tmp_path / "work" / "out.part"
    with pytest.raises(RuntimeError), atomic_output(final, tmp) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert not final.exists() and not tmp.exists()
    with atomic_output(final, tmp, durable=True) as f:
        f.write(b"whole")
    assert final.read_bytes() == b"whole" and not tmp.exists()


def test_remove_quietly_and_fsync_dir(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_text("x")
    assert remove_quietly(p) is True
    assert remove_quietly(p) is False
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "file").write_text("")
        fsync_dir(tmp_path / "file")
