"""The library side of the low-level commands (``cachefs erofs …``, ``cachefs vmdk``).

These work on loose files, not on a cache: no locks, no leases, no metadata. Each
output is written beside its final name and renamed into place, so a failed or
interrupted command never leaves a half-written image that looks valid.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..cache.publish import atomic_output
from ..digest import Digest
from ..errors import UsageError


def _part(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.part")


def erofs_from_tar(blob: Path, out: Path) -> Digest:
    """Layer blob (gzip, zstd or plain tar, told apart by magic bytes) → layer EROFS.

    Returns the diff_id (sha256 of the whole decompressed stream, padding included).
    File contents are spooled to a temporary file beside ``out`` so the writer can copy
    them in the kernel and memory stays flat whatever the layer size.
    """
    from ..erofs.writer import write_layer_erofs
    from ..ingest.layer import detect_compression, ingest_layer

    try:
        f = open(blob, "rb")  # noqa: SIM115 - closed below, spans two steps
    except OSError as err:
        raise UsageError(f"cannot read layer blob {blob}: {err.strerror}") from None
    with f, tempfile.TemporaryFile(dir=out.parent, prefix=".spool-") as spool:
        compression = detect_compression(f.read(8))
        f.seek(0)
        layer = ingest_layer(f, compression=compression, expected_diff_id=None, spool=spool,
                             layer_label=blob.name)
        with atomic_output(out, _part(out)) as dst:
            write_layer_erofs(layer.root, spool, dst, padded_spool=True)
    return layer.diff_id


def fsmeta_from_layers(out: Path, layers: Sequence[Path], *, msb_quirks: bool = False) -> int:
    """fsmeta for layer EROFS files given bottom first (§4.7); returns its block count."""
    from ..erofs.fsmeta import fsmeta_from_layer_images

    if not layers:
        raise UsageError("an fsmeta needs at least one layer")
    for layer in layers:
        if not layer.is_file():
            raise UsageError(f"layer image {layer} does not exist")
    with atomic_output(out, _part(out)) as dst:
        return fsmeta_from_layer_images(list(layers), dst, msb_quirks=msb_quirks)


def vmdk_for_extents(
    out: Path, extents: Sequence[Path], *, relative_to: Path | None = None
) -> str:
    """Write a flat VMDK descriptor over ``extents`` in disk order; returns its text."""
    from ..vmdk import descriptor_for_paths

    if not extents:
        raise UsageError("a VMDK needs at least one extent")
    for extent in extents:
        if not extent.is_file():
            raise UsageError(f"extent {extent} does not exist")
    text = descriptor_for_paths(list(extents), relative_to=relative_to)
    with atomic_output(out, _part(out)) as dst:
        dst.write(text.encode())
    return text


__all__ = ["erofs_from_tar", "fsmeta_from_layers", "vmdk_for_extents"]
