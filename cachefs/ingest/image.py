"""One layer blob → its layer EROFS image under ``tmp/``: the work between the cache's
lock and its rename (:func:`cachefs.pipeline.materialize.materialize_layer` holds those).

A module of its own so a layer-building worker process (:mod:`cachefs.ingest.worker_main`)
can run exactly this code while importing only the ingest and EROFS writer code: no
cache store (pydantic), no trio, no httpx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ..cache.publish import naming
from ..digest import Digest
from ..erofs.tree import BlockMap, Node
from ..erofs.writer import write_layer_erofs
from .layer import Compression, detect_compression, ingest_layer

BlobOpener = Callable[[], BinaryIO]


class LayerImageBuilder(Protocol):
    """What :func:`build_layer_image` is: ``materialize_layer`` takes another (a worker
    process's) in its place."""

    def __call__(
        self, blob: Path | BlobOpener, *, compression: Compression | None, diff_id: Digest,
        layer_label: str, spool_path: Path, part: Path,
    ) -> tuple[Node, BlockMap]: ...


def open_blob(blob: Path | BlobOpener) -> BinaryIO:
    return blob.open("rb") if isinstance(blob, Path) else blob()


def sniff(stream: BinaryIO) -> Compression:
    """Magic bytes without consuming them: seek back, or peek on a buffered stream."""
    if stream.seekable():
        head = stream.read(4)
        stream.seek(0)
        return detect_compression(head)
    peek = getattr(stream, "peek", None)
    if peek is None:
        raise TypeError("a non-seekable blob stream must support peek() to sniff compression")
    return detect_compression(peek(4)[:4])


@contextlib.contextmanager
def _spool(path: Path) -> Iterator[BinaryIO]:
    """The spool file, whose close never hides the error that is failing the layer.

    Closing flushes the buffer: after an ENOSPC that flush fails again, and its bare
    error (no file name) would replace the first one, which names the spool.
    """
    # A large buffer: most files are small, and each flush releases the GIL the
    # decompressing thread then competes for.
    spool = path.open("wb+", buffering=4 << 20)
    try:
        yield spool
    except BaseException:
        with contextlib.suppress(OSError):
            spool.close()
        raise
    with naming(path):
        spool.close()


def build_layer_image(
    blob: Path | BlobOpener, *, compression: Compression | None, diff_id: Digest,
    layer_label: str, spool_path: Path, part: Path,
) -> tuple[Node, BlockMap]:
    """Ingest ``blob`` (verified against ``diff_id``) through ``spool_path`` into the
    image ``part``; the tree it was written from and its block map.

    ``compression=None`` sniffs the magic bytes. The caller owns both files: it removes
    them whatever happens and publishes ``part`` only after this returned.
    """
    with open_blob(blob) as stream, _spool(spool_path) as spool:
        if compression is None:
            compression = sniff(stream)
        with naming(spool_path):
            ingested = ingest_layer(
                stream, compression=compression, expected_diff_id=diff_id, spool=spool,
                layer_label=layer_label,
            )
            spool.flush()
        with naming(part), part.open("wb") as out:
            block_map = write_layer_erofs(ingested.root, spool, out, padded_spool=True)
    return ingested.root, block_map
