"""Ingest: a layer blob becomes a tree of nodes whose file bytes sit in a spool.

* :func:`ingest_layer` (``layer.py``) — decompression, the limits every layer is held to,
  the diff_id check, the tree and the spool.
* :class:`TarReader` (``tarstream.py``) — tar headers, PAX and GNU records, bounded.
* ``zstd_stream.py`` — zstd frames as a stream of chunks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .layer import Compression, IngestedLayer, detect_compression, ingest_layer
    from .tarstream import TarEntry, TarReader

_LAZY = {
    "Compression": ".layer", "IngestedLayer": ".layer", "detect_compression": ".layer",
    "ingest_layer": ".layer", "TarEntry": ".tarstream", "TarReader": ".tarstream",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "Compression",
    "IngestedLayer",
    "TarEntry",
    "TarReader",
    "detect_compression",
    "ingest_layer",
]
