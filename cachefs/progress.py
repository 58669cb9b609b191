"""Progress events of a pull or load, for the CLI's bars and for scripts.

The pipeline only *emits* these; rendering (rich bars, JSON lines, nothing) is the
caller's business, so the library never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

LayerPhase = Literal["cached", "download", "verify", "materialize", "done"]


@dataclass(frozen=True, slots=True)
class Resolved:
    reference: str
    manifest_digest: str
    layers: tuple[tuple[str, int | None], ...]  # (diff_id, compressed size) bottom first
    cached: bool = False


@dataclass(frozen=True, slots=True)
class LayerProgress:
    index: int
    diff_id: str
    phase: LayerPhase
    done: int = 0  # bytes (download) so far
    total: int | None = None


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
