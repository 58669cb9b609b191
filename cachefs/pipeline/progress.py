"""Progress events of a pull or load, for the CLI's bars and for scripts.

The pipeline only *emits* these; rendering (rich bars, JSON lines, nothing) is the
caller's business, so the library never prints.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

LayerPhase = Literal["cached", "download", "verify", "materialize", "done"]


@dataclass(frozen=True, slots=True)
class Resolved:
    reference: str
    manifest_digest: str
    layers: tuple[tuple[str, int | None], ...]  # (diff_id, compressed size) bottom first
    cached: bool = False
    # the layers' compressed (blob) digests, bottom first: what registries and msb show
    blobs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LayerProgress:
    """``done``: bytes of the blob so far, downloaded (on disk, so a resumed download
    starts at what it kept) or, for ``materialize`` of a load, read from the archive.

    ``seconds``: for a download, how long it has been under way. A display samples its own
    rate, but a download that began before the display knew the layer (started beside the
    config, :mod:`cachefs.pipeline.early`) may be complete by its first event."""

    index: int
    diff_id: str
    phase: LayerPhase
    done: int = 0
    total: int | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Stitching:
    manifest_digest: str


@dataclass(frozen=True, slots=True)
class Finished:
    reference: str
    manifest_digest: str
    cached: bool


Event = Resolved | LayerProgress | Stitching | Finished
ProgressCallback = Callable[[Event], None]


def ignore(_: Event) -> None:
    """The quiet mode."""


class CountingReader(io.RawIOBase):
    """A stream that reports how many bytes were read from it so far, at most once per
    ``every`` bytes and once at the end, so progress costs nothing per small read."""

    def __init__(self, raw: BinaryIO, report: Callable[[int], None],
                 every: int = 1 << 20) -> None:
        super().__init__()
        self._raw = raw
        self._report = report
        self._every = every
        self._done = 0
        self._reported = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            self._done += n
            if self._done - self._reported >= self._every:
                self._reported = self._done
                self._report(self._done)
        elif self._reported != self._done:
            self._reported = self._done
            self._report(self._done)
        return n or 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def reporting(opener: Callable[[], BinaryIO],
              report: Callable[[int], None]) -> Callable[[], BinaryIO]:
    """``opener`` whose streams report the bytes read from them (a load's conversion
    reads the archive: that is its progress). Buffered, so ``peek`` sniffs compression."""

    def open_reporting() -> BinaryIO:
        return io.BufferedReader(
            CountingReader(opener(), report), buffer_size=1 << 20)

    return open_reporting
