"""The spool written with gathered ``writev`` calls (a raw file, as the pipeline opens it)
holds exactly what the buffered path writes: every file at the offset its node records,
padded with zeros to 4 KiB, across batches, chunk boundaries and the iovec limit."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

from cachefs.erofs.tree import FileType, Node
from cachefs.ingest.layer import SPOOL_ALIGN, Compression, ingest_layer
from tests.fixtures.images import layer_tar, reg


def _offsets(root: Node) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def walk(node: Node) -> None:
        for child in (node.children or {}).values():
            if child.type is FileType.DIR:
                walk(child)
            elif child.type is FileType.REG and child.size:
                assert child.content is not None
                out.append((child.content.offset, child.size))

    walk(root)
    return sorted(out)


def test_gathered_spool_matches_the_buffered_one(tmp_path: Path) -> None:
    entries = [reg(f"small/{i:04d}", os.urandom(i % 700 + 1)) for i in range(1500)]
    entries += [reg("big", os.urandom(5 << 20)), reg("odd", os.urandom(SPOOL_ALIGN + 1))]
    entries += [reg(f"tail/{i}", bytes([i]) * (i * 97)) for i in range(1, 200)]
    blob = gzip.compress(layer_tar(entries), compresslevel=1)

    buffered = io.BytesIO()
    want = ingest_layer(io.BytesIO(blob), compression=Compression.GZIP,
                        expected_diff_id=None, spool=buffered, layer_label="t")
    path = tmp_path / "layer.spool"
    with path.open("wb+", buffering=0) as raw:
        got = ingest_layer(io.BytesIO(blob), compression=Compression.GZIP,
                           expected_diff_id=None, spool=raw, layer_label="t")
        assert raw.tell() == len(buffered.getvalue())
    assert path.read_bytes() == buffered.getvalue()
    assert got.diff_id == want.diff_id
    extents = _offsets(got.root)
    assert extents == _offsets(want.root)
    assert len(extents) == 1500 + 2 + 199
    data = path.read_bytes()
    for offset, size in extents:  # each file's bytes start a 4 KiB block, zeros after
        assert offset % SPOOL_ALIGN == 0
        end = offset + size
        assert data[end : end + (-end % SPOOL_ALIGN)].count(0) == -end % SPOOL_ALIGN
