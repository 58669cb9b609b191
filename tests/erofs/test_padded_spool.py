"""Run copies from a padded spool (issue 15) write the same image as per-file copies.

``ingest_layer`` pads each file to 4 KiB in the spool so ``write_layer_erofs`` can copy
runs of adjacent files in one kernel call. The image must not change by a byte: here the
same tree is written both ways, into real files (the copy_file_range path) and into a
pipe-like buffer (the read/write fallback), with file sizes around the block size, hard
links, directories whose dirent blocks sit in the data area between files, a long
symlink, and a tar order that is not the image's walk order (runs must break there).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest

from cachefs.erofs import writer
from cachefs.erofs.writer import write_layer_erofs
from cachefs.errors import LayerFormatError
from cachefs.ingest.layer import Compression, ingest_layer
from tests.fixtures.images import dir_, hardlink, layer_tar, reg, symlink


def _entries() -> list:  # type: ignore[type-arg]
    sizes = [0, 1, 4095, 4096, 4097, 10_000, 65_536 + 3]
    out = [dir_("a"), dir_("big"), dir_("z")]
    out += [reg(f"a/f{i}", bytes([65 + i]) * n) for i, n in enumerate(sizes)]
    # ~300 names: "big"'s dirents take data blocks between a/* and z/* files
    out += [reg(f"big/{'n' * 40}{i:04d}", bytes([i % 251]) * (i * 37 % 5000)) for i in range(300)]
    out += [symlink("a/long", "t" * 3000), hardlink("a/h", "a/f3")]
    # out of walk order: z/ files arrive before some of a/'s
    out += [reg("z/2", b"late" * 2000), reg("z/1", b"early" * 999), reg("a/0", b"first" * 901)]
    return out


def _image(padded: bool, out_dir: Path, entries: list | None = None) -> bytes:  # type: ignore[type-arg]
    blob = io.BytesIO(layer_tar(_entries() if entries is None else entries))
    with tempfile.TemporaryFile(dir=out_dir) as spool:
        layer = ingest_layer(blob, compression=Compression.NONE, expected_diff_id=None,
                             spool=spool, layer_label="t")
        path = out_dir / f"padded-{padded}.erofs"
        with path.open("wb") as f:
            write_layer_erofs(layer.root, spool, f, padded_spool=padded)
        buffered = io.BytesIO()  # not seekable-by-fd: the read/write path
        write_layer_erofs(layer.root, spool, buffered, padded_spool=padded)
    data = path.read_bytes()
    assert buffered.getvalue() == data
    return data


def test_run_copies_write_the_same_image(tmp_path: Path) -> None:
    per_file, runs = _image(False, tmp_path), _image(True, tmp_path)
    assert len(runs) % 4096 == 0 and len(runs) > 400 * 1024
    assert runs == per_file


def test_files_spread_over_directories_write_the_same_image(tmp_path: Path) -> None:
    """A tar that visits directories round robin (file i in d{i % 7}) leaves one run per
    file (plus one large run): the run-copied image must still equal the per-file one."""
    entries = [dir_(f"d{d}") for d in range(7)]
    entries += [reg(f"d{i % 7}/f{i:04d}", bytes([i % 251]) * (i * 131 % 9000))
                for i in range(700)]
    entries += [reg("d3/large", b"L" * (300 << 10))]
    assert _image(True, tmp_path, entries) == _image(False, tmp_path, entries)


def _spread_entries(files: int = 400) -> list:  # type: ignore[type-arg]
    entries = [dir_(f"d{d}") for d in range(5)]
    entries += [reg(f"d{i % 5}/f{i:04d}", bytes([i % 251]) * (1 + i * 97 % 7000))
                for i in range(files)]
    return entries


def test_gathered_runs_break_at_the_batch_bounds(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs gathered into vectored writes (``_Sink._gather``): batches cut by the iovec
    count and by small windows of the spool, as well as by gaps, still write every byte
    in its place; no window maps more of the spool than the bound (or one run)."""
    expected = _image(False, tmp_path, _spread_entries())
    real_mmap = writer.mmap.mmap
    mapped: list[int] = []

    def recording_mmap(fd: int, length: int, **kwargs: int) -> object:
        mapped.append(length)
        return real_mmap(fd, length, **kwargs)

    monkeypatch.setattr(writer, "_GATHER_IOVECS", 3)
    monkeypatch.setattr(writer, "_GATHER_WINDOW", 20_000)
    monkeypatch.setattr(writer.mmap, "mmap", recording_mmap)
    assert _image(True, tmp_path, _spread_entries()) == expected
    assert len(mapped) > 10 and max(mapped) <= 20_000


def test_gathered_writes_resume_after_a_short_write(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``pwritev`` may write less than asked (a signal, a full disk's last blocks): the
    rest, from the middle of a piece, is written at the right offset."""
    expected = _image(False, tmp_path, _spread_entries())
    real = os.pwritev
    calls = []

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        total = sum(len(b) for b in buffers)
        calls.append(total)
        if total > 5000:  # write 4999 bytes of it: ends inside a piece
            return os.pwrite(fd, b"".join(bytes(b) for b in buffers)[:4999], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(writer.os, "pwritev", short)
    assert _image(True, tmp_path, _spread_entries()) == expected
    assert any(n > 5000 for n in calls)


def test_a_spool_shorter_than_its_runs_fails_naming_a_file(tmp_path: Path) -> None:
    blob = io.BytesIO(layer_tar(_spread_entries(50)))
    with tempfile.TemporaryFile(dir=tmp_path) as spool:
        layer = ingest_layer(blob, compression=Compression.NONE, expected_diff_id=None,
                             spool=spool, layer_label="t")
        spool.flush()
        spool.truncate(8192)
        with (tmp_path / "x.erofs").open("wb") as f, \
                pytest.raises(LayerFormatError, match="spool ends") as err:
            write_layer_erofs(layer.root, spool, f, padded_spool=True)
    assert err.value.entry is not None and err.value.entry.startswith("d")
