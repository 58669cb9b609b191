"""One layer blob → its layer EROFS image under ``tmp/``: the work between the cache's
lock and its rename (:func:`cachefs.pipeline.materialize.materialize_layer` holds those).

A module of its own so a layer-building worker process (:mod:`cachefs.ingest.worker_main`)
can run exactly this code while importing only the ingest and EROFS writer code: no
cache store (its models, the cache layout), no trio, no httpx.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from ..cache.publish import naming
from ..digest import Digest
from ..erofs.tree import BlockMap, Node
from ..erofs.writer import LayerLayout, plan_layer, write_layer
from ..heap import collector_paused
from .allocator import reuse_large_buffers
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


def open_spool(path: Path) -> BinaryIO:
    """The spool file. Whoever removes its name (the caller, whatever happens) should close
    it late: giving 170 MB of pages back (~10–15 ms) happens at the last ``close``, not at
    the unlink, so the pipeline closes it after the layer is published, off its path."""
    # A large buffer: most files are small, and each flush releases the GIL the
    # decompressing thread then competes for.
    with naming(path):
        return path.open("wb+", buffering=4 << 20)


def close_quietly(spool: BinaryIO) -> None:
    """Close a spool whose bytes are no longer needed (or whose layer failed): a failing
    close has nothing left to lose and must not replace the error being reported."""
    with contextlib.suppress(OSError):
        spool.close()


def _unbuffered(spool: BinaryIO) -> BinaryIO:
    """The spool's raw file, once ingest has written (and flushed) it: the image only copies
    from its descriptor, so the 4 MiB write buffer is freed now rather than after the image
    is written, while the next layer's ingest already runs (peak RSS of a parallel load)."""
    detach = getattr(spool, "detach", None)
    if detach is None:
        return spool
    raw: BinaryIO = detach()
    return raw


@dataclass(frozen=True, eq=False)
class PlannedImage:
    """A layer blob ingested and its image laid out, not yet written: ``root`` carries every
    regular file's block, which is all an fsmeta needs; ``spool`` holds the file bytes
    (the caller closes it once the image is written)."""

    root: Node
    layout: LayerLayout
    spool: BinaryIO


def plan_layer_image(
    blob: Path | BlobOpener, *, compression: Compression | None, diff_id: Digest,
    layer_label: str, spool_path: Path,
) -> PlannedImage:
    """Ingest ``blob`` (verified against ``diff_id``) into a spool and plan its image.

    ``compression=None`` sniffs the magic bytes. On failure nothing is left open.
    """
    reuse_large_buffers()
    spool = open_spool(spool_path)
    try:
        with open_blob(blob) as stream, collector_paused():  # the tree is acyclic
            if compression is None:
                compression = sniff(stream)
            with naming(spool_path):
                ingested = ingest_layer(
                    stream, compression=compression, expected_diff_id=diff_id, spool=spool,
                    layer_label=layer_label,
                )
                spool.flush()
            spool = _unbuffered(spool)
            layout = plan_layer(ingested.root)
        return PlannedImage(ingested.root, layout, spool)
    except BaseException:
        close_quietly(spool)
        raise


def write_planned_image(planned: PlannedImage, part: Path) -> None:
    """Write the planned image to ``part`` (the caller publishes and removes it)."""
    with naming(part), part.open("wb") as out, collector_paused():
        write_layer(planned.layout, planned.spool, out, padded_spool=True)


def build_layer_image(
    blob: Path | BlobOpener, *, compression: Compression | None, diff_id: Digest,
    layer_label: str, spool_path: Path, part: Path,
) -> tuple[Node, BlockMap]:
    """Ingest ``blob`` (verified against ``diff_id``) through ``spool_path`` into the
    image ``part``; the tree it was written from and its block map.

    ``compression=None`` sniffs the magic bytes. The caller owns both files: it removes
    them whatever happens and publishes ``part`` only after this returned. (The pull's own
    process runs the two halves apart instead: ``materialize.start_layer``.)
    """
    planned = plan_layer_image(blob, compression=compression, diff_id=diff_id,
                               layer_label=layer_label, spool_path=spool_path)
    try:
        write_planned_image(planned, part)
    finally:
        close_quietly(planned.spool)
    return planned.root, planned.layout.block_map()
