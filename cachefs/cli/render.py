"""Rendering for the CLI: byte sizes, plain tables, and pull/load progress bars.

Tables are plain aligned text, not rich tables: their output is read by scripts and
pasted into issues, and must not depend on the terminal width. Progress bars use rich
and appear only on a terminal (and not with ``-q``); elsewhere progress is silent and
the command prints its result only.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..maintenance.image_report import LayerDetail

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


def render_layers(layers: Sequence[LayerDetail]) -> str:
    """``inspect``'s layer table: the compressed blob (digest and size, as registries,
    skopeo and msb show it) beside the diff_id and the layer EROFS."""
    rows = [[i, layer.get("digest") or "-", human_bytes(layer.get("size_bytes")),
             layer["diff_id"], human_bytes(layer.get("erofs_size")),
             "ok" if layer.get("valid") else "MISSING", _origin(layer)]
            for i, layer in enumerate(layers)]
    text = table(["#", "BLOB DIGEST", "COMPRESSED", "DIFF_ID", "EROFS", "STATE", "ORIGIN"],
                 rows, right=(0, 2, 4))
    return "\n".join("  " + line for line in text.splitlines())


def _origin(layer: LayerDetail) -> str:
    """Where the layer EROFS came from (EROFS artifacts, ``push-erofs``)."""
    if layer.get("origin") == "fetched-erofs":
        return f"fetched as EROFS from {layer.get('origin_source')}"
    return "converted from tar"


def render_status(doc: Mapping[str, Any], source: str) -> str:
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


def _columns() -> tuple[Any, ...]:
    """Progress columns in the CLI's own units: MiB (binary, one decimal), MiB/s."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Bytes(ProgressColumn):
        def render(self, task: Any) -> Text:
            if not task.fields.get("bytes", True):
                return Text("")
            done = human_bytes(int(task.completed))
            total = human_bytes(int(task.total)) if task.total else "?"
            return Text(f"{done:>10} / {total:<10}")

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            seconds = task.fields.get("seconds")
            if not speed and seconds and task.completed:
                # no samples of its own: a download that was (nearly) complete by the
                # first event the bar saw; its rate from how long it took
                speed = task.completed / seconds
            if not speed or not task.fields.get("bytes", True):
                return Text("")
            return Text(f"{human_bytes(int(speed))}/s", justify="right")

    return (TextColumn("{task.description:<26}"), BarColumn(), Bytes(), Speed(),
            TimeRemainingColumn())


class PullProgress:
    """Rich progress bars fed by the pipeline's events (``cachefs.pipeline.progress``).

    A header names the image, its digest and layer count; then one bar per layer,
    labelled by its compressed digest (what registries, docker and msb show), counting
    bytes in MiB with the speed: downloaded bytes for a pull (a resumed download starts
    at what is on disk), bytes read from the archive while a load converts; then an
    overall bar over all layers, and a line for stitching fsmeta + VMDK.
    Disabled (every call a no-op) unless ``enabled``: not a terminal, or ``-q``.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None,
                 verb: str = "pulling") -> None:
        self.enabled = enabled
        self._verb = verb
        self._progress: Any = None
        self._layers: dict[int, Any] = {}
        self._labels: dict[int, str] = {}
        self._sizes: dict[int, int] = {}
        self._overall: Any = None
        self._stitch: Any = None
        self._stream = stream or sys.stderr

    def __enter__(self) -> PullProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(*_columns(), console=Console(file=self._stream))
            self._progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None

    def _resolved(self, event: Any) -> None:
        bar = self._progress
        layers = len(event.layers)
        state = " (cached)" if event.cached else ""
        bar.console.print(f"{self._verb} {event.reference} {short_digest(event.manifest_digest)}: "
                          f"{layers} layer{'s' if layers != 1 else ''}{state}")
        # bars for a new image of a load start afresh
        for task in [*self._layers.values(), self._overall, self._stitch]:
            if task is not None:
                bar.update(task, visible=False)
        self._layers, self._labels, self._sizes = {}, {}, {}
        self._stitch = None
        seen: set[str] = set()
        for i, (diff_id, size) in enumerate(event.layers):
            if diff_id in seen:  # a repeated layer is built once
                continue
            seen.add(diff_id)
            blob = event.blobs[i] if i < len(event.blobs) else diff_id
            self._labels[i] = short_digest(blob)
            self._sizes[i] = size or 0
            if event.cached:  # a cache hit: nothing to fetch or convert
                self._layers[i] = bar.add_task(f"{self._labels[i]} cached", total=size or 1,
                                               completed=size or 1)
            else:
                self._layers[i] = bar.add_task(f"{self._labels[i]} waiting", total=size or None)
        total = sum(self._sizes.values()) or None
        self._overall = bar.add_task("total", total=total,
                                     completed=(total or 0) if event.cached else 0)

    def _layer(self, event: Any) -> None:
        bar = self._progress
        task = self._layers.get(event.index)
        if task is None:
            return
        label = f"{self._labels[event.index]} {event.phase}"
        if event.total and not self._sizes[event.index]:
            self._sizes[event.index] = event.total
            bar.update(task, total=event.total)
            bar.update(self._overall, total=sum(self._sizes.values()))
        if event.phase in ("cached", "done"):
            total = bar.tasks[task].total or self._sizes[event.index] or 1
            bar.update(task, description=label, total=total, completed=total)
        elif event.phase == "download" or event.done:
            # how long the download took, for a bar with no rate samples (Speed)
            took = {"seconds": event.seconds} if event.seconds else {}
            bar.update(task, description=label, completed=event.done, **took)
        else:  # a phase change without bytes (verify; materialize of a pull)
            bar.update(task, description=label)
        done = sum(min(t.completed, t.total or t.completed) for t in bar.tasks
                   if t.id in self._layers.values())
        bar.update(self._overall, completed=done)

    def __call__(self, event: Any) -> None:
        if self._progress is None:
            return
        from ..pipeline.progress import Finished, LayerProgress, Resolved, Stitching

        bar = self._progress
        if isinstance(event, Resolved):
            self._resolved(event)
        elif isinstance(event, LayerProgress):
            self._layer(event)
        elif isinstance(event, Stitching):
            if self._stitch is None:
                self._stitch = bar.add_task("stitch fsmeta + vmdk", total=None, bytes=False)
        elif isinstance(event, Finished):
            if self._stitch is not None:
                bar.update(self._stitch, total=1, completed=1)
            if self._overall is not None:
                total = bar.tasks[self._overall].total
                if total:
                    bar.update(self._overall, completed=total)


__all__ = ["PullProgress", "human_bytes", "render_layers", "render_status", "short_digest",
           "table"]
