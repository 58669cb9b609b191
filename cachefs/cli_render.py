"""Rendering for the CLI: byte sizes, plain tables, and pull/load progress bars.

Tables are plain aligned text, not rich tables: their output is read by scripts and
pasted into issues, and must not depend on the terminal width. Progress bars use rich
and appear only on a terminal (and not with ``-q``); elsewhere progress is silent and
the command prints its result only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short_digest(digest: str | None, width: int = 12) -> str:
    if not digest:
        return "-"
    return digest.partition(":")[2][:width] or digest[:width]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces; columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _field(event: Any, *names: str) -> Any:
    for name in names:
        if isinstance(event, dict) and name in event:
            return event[name]
        if hasattr(event, name):
            return getattr(event, name)
    return None


class PullProgress:
    """A rich progress display fed by pull/load progress events.

    Events carry a layer (or none, for image-wide stages such as stitching), a stage
    name, and byte or step counts. One bar per layer, relabelled as the layer moves
    through download → verify → materialize, plus one bar for image-wide stages.
    Disabled (every call a no-op) unless ``enabled``.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._stream = stream or sys.stderr

    def __enter__(self) -> PullProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def __call__(self, event: Any) -> None:
        if self._progress is None:
            return
        layer = _field(event, "layer", "diff_id", "digest")
        stage = str(_field(event, "stage", "kind", "phase") or "")
        done = _field(event, "done", "completed", "bytes_done", "current")
        total = _field(event, "total", "bytes_total", "size")
        key = str(layer) if layer else "image"
        label = f"{short_digest(str(layer))} {stage}" if layer else stage
        task = self._tasks.get(key)
        if task is None:
            task = self._progress.add_task(label, total=total)
            self._tasks[key] = task
        update: dict[str, Any] = {"description": label}
        if total is not None:
            update["total"] = total
        if done is not None:
            update["completed"] = done
        elif str(_field(event, "status", "state") or "") in ("done", "finished"):
            update["completed"] = total or 1
            update.setdefault("total", total or 1)
        self._progress.update(task, **update)


__all__ = ["PullProgress", "human_bytes", "short_digest", "table"]
