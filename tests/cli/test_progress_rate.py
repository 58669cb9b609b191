"""A layer's bar shows a rate even when its download was complete by the first event the
bar saw (a download started beside the config, issue 15): from how long it took."""

from __future__ import annotations

import io

from cachefs.cli.render import PullProgress
from cachefs.pipeline.progress import LayerProgress, Resolved

DIFF = "sha256:" + "b" * 64
BLOB = "sha256:" + "c" * 64


def _render(*events: object) -> str:
    out = io.StringIO()
    with PullProgress(True, stream=out) as progress:
        progress(Resolved("example.com/x:1", "sha256:" + "a" * 64, ((DIFF, 3 << 20),),
                          blobs=(BLOB,)))
        for event in events:
            progress(event)
    return out.getvalue()


def test_a_download_complete_at_its_first_event_shows_its_rate() -> None:
    text = _render(LayerProgress(0, DIFF, "download", 3 << 20, 3 << 20, seconds=0.5),
                   LayerProgress(0, DIFF, "done"))
    assert "cccccccccccc done" in text
    assert "6.0 MiB/s" in text  # 3 MiB in half a second


def test_without_its_duration_such_a_download_shows_no_made_up_rate() -> None:
    text = _render(LayerProgress(0, DIFF, "download", 3 << 20, 3 << 20),
                   LayerProgress(0, DIFF, "done"))
    assert "3.0 MiB" in text and "/s" not in text
