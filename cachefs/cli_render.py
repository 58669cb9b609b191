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


def render_status(doc: dict[str, Any], source: str) -> str:
    """The view's ``status.json`` (or the same document computed) for people."""
    images = doc.get("images") or {}
    lines = [f"cache:     {doc.get('cache')}", f"source:    {source}",
             f"images:    {images.get('ready', 0)} ready of {images.get('total', 0)}"]
    layers = doc.get("layers") or {}
    lines.append(f"layers:    {layers.get('total', 0)} ({layers.get('corrupt', 0)} corrupt)")
    sizes = doc.get("bytes") or {}
    lines.append("bytes:     " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sizes.items()))
    downloads = doc.get("downloads_in_flight") or []
    lines.append(f"downloads: {len(downloads)} in flight")
    for image in images.get("list") or []:
        state = "ready" if image.get("ready") else "NOT READY"
        lines.append(f"  {image.get('reference')}  {short_digest(image.get('manifest_digest'))}"
                     f"  {state}")
    problems = doc.get("problems") or []
    if problems:
        lines.append(f"problems:  {len(problems)}")
        for p in problems:
            fix = f" (fix: {p['fix']})" if p.get("fix") else ""
            lines.append(f"  {p.get('scope')}: {p.get('problem')}{fix}")
    return "\n".join(lines)


class PullProgress:
    """Rich progress bars fed by the pipeline's events (``cachefs.progress``).

    One bar per layer, relabelled as the layer moves through download → verify →
    materialize (or straight to ``cached``), then one bar for stitching fsmeta + VMDK.
    Disabled (every call a no-op) unless ``enabled``: not a terminal, or ``-q``.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self._progress: Any = None
        self._layers: dict[int, Any] = {}
        self._stitch: Any = None
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
                TextColumn("{task.description:<28}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def _layer_task(self, index: int, diff_id: str, total: int | None) -> Any:
        task = self._layers.get(index)
        if task is None:
            task = self._progress.add_task(f"{short_digest(diff_id)} waiting", total=total)
            self._layers[index] = task
        return task

    def __call__(self, event: Any) -> None:
        if self._progress is None:
            return
        from .progress import Finished, LayerProgress, Resolved, Stitching

        bar = self._progress
        if isinstance(event, Resolved):
            for i, (diff_id, size) in enumerate(event.layers):
                self._layer_task(i, diff_id, size)
        elif isinstance(event, LayerProgress):
            task = self._layer_task(event.index, event.diff_id, event.total)
            label = f"{short_digest(event.diff_id)} {event.phase}"
            if event.phase in ("cached", "done"):
                total = bar.tasks[task].total or event.total or 1
                bar.update(task, description=label, total=total, completed=total)
            else:
                bar.update(task, description=label, completed=event.done,
                           **({"total": event.total} if event.total else {}))
        elif isinstance(event, Stitching):
            if self._stitch is None:
                self._stitch = bar.add_task("stitch fsmeta + vmdk", total=None)
        elif isinstance(event, Finished) and self._stitch is not None:
            bar.update(self._stitch, total=1, completed=1)


__all__ = ["PullProgress", "human_bytes", "render_status", "short_digest", "table"]
