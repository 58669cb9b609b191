"""``DirWatch``: the one-read freshness question the view asks on every image-dir walk."""

from __future__ import annotations

import os
from pathlib import Path

from cachefs.view.changes import DirWatch


def test_changes_are_seen_once_and_missing_directories_are_armed_later(tmp_path: Path
                                                                       ) -> None:
    later = tmp_path / "sub" / "later"
    watch = DirWatch([tmp_path, later])
    assert watch.usable
    assert not watch.changed()
    (tmp_path / "a.json").write_text("{}")
    assert watch.changed()
    assert not watch.changed()  # drained: the caller acts on True before asking again
    with open(tmp_path / "a.json", "r+") as f:  # in place: same inode, same dir mtime
        f.write("[]")
    assert watch.changed()
    later.mkdir(parents=True)  # seen through the nearest existing ancestor...
    assert watch.changed()
    (later / "rec").write_text("x")  # ...and watched itself from then on
    assert watch.changed()
    os.unlink(later / "rec")
    assert watch.changed()
    assert not watch.changed()
    watch.close()
    assert not watch.usable and watch.changed()  # without inotify: always "maybe"
