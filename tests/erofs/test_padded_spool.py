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
import tempfile
from pathlib import Path

from cachefs.erofs.writer import write_layer_erofs
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
