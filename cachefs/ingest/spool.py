"""Where ingest appends file bytes: the spool file, written with gathered ``writev`` calls.

Why not a buffered file: most files of a layer are small, so a ``BufferedWriter`` copies
each one into its buffer and then the kernel copies the buffer again, 170 MB twice for a
Debian layer. The file bytes already sit in the decompressed chunks the tar reader holds
(immutable ``bytes``), so this writer keeps views of them and hands up to
``_BATCH_BYTES`` or ``IOV_MAX`` of them, padding included, to one ``os.writev``: the
kernel copies each byte once, and a thousand small files cost one system call.

Memory stays bounded: a pending view keeps its chunk (≤ 1 MiB) alive, and at most
``_BATCH_BYTES`` of views are pending, so at most a few chunks more than the reader's.
Any other spool (a buffered file, ``BytesIO``) gets its plain ``write``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any, BinaryIO

_BATCH_BYTES = 2 << 20
_MAX_IOV = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024


class GatherWriter:
    """Appends byte views to a raw file's descriptor at its current position; the views
    must stay unchanged until :meth:`flush` (``bytes`` and views of ``bytes`` do)."""

    __slots__ = ("_fd", "_iov", "_pending")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._iov: list[Any] = []
        self._pending = 0

    def write(self, data: Any) -> None:
        iov = self._iov
        iov.append(data)
        self._pending += len(data)
        if self._pending >= _BATCH_BYTES or len(iov) >= _MAX_IOV:
            self.flush()

    def flush(self) -> None:
        """Write every pending view (a short write is resumed where it stopped; an error,
        ENOSPC say, is raised as the ``OSError`` it is)."""
        iov, left = self._iov, self._pending
        self._iov, self._pending = [], 0
        while left:
            n = os.writev(self._fd, iov)
            left -= n
            if not left:
                break
            while n >= len(iov[0]):  # drop what was written whole, cut the first partial
                n -= len(iov[0])
                iov.pop(0)
            if n:
                iov[0] = memoryview(iov[0])[n:]


def spool_sink(spool: BinaryIO) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    """(write, flush) for appending to ``spool`` from its current position: gathered
    ``writev`` on a raw (unbuffered) file, the file's own methods on anything else."""
    if isinstance(spool, io.FileIO):
        gather = GatherWriter(spool.fileno())
        return gather.write, gather.flush
    return spool.write, _nothing


def _nothing() -> None:
    pass
