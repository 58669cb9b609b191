"""A downloading blob file that ingest reads while it grows (pull's download/ingest overlap).

The bytes stay in ``tmp/<blob>.part`` until the download has verified and renamed them
(FORMATS.md §1.6), exactly as without the overlap; ingest may read unverified bytes only
because nothing is published before the reader reaches the end, and the end comes only
after verification. A failed download makes the reader raise instead.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DownloadFailed


class GrowingBlob:
    """A blob file that a download is still writing, readable as it grows (FORMATS.md §1.6:
    the bytes stay in ``tmp/<blob>.part`` until verified and renamed, as without this).

    Ingest may read unverified bytes because nothing is published before the reader hits
    its end, and the end comes only after the download verified the whole blob; a failed
    download makes the reader raise instead. A restart that truncates the file rewrites
    the same content-addressed bytes at the same offsets, so the reader just waits for them
    again (and the diff_id check covers whatever was read).
    """

    def __init__(self, path: Path, final: Path) -> None:
        self._path = path
        self._final = final
        self._cond = threading.Condition()
        self._size = -1  # -1: the download has not prepared the file yet
        self._updates = 0  # counts written() calls: a reader waits for the next one
        self._done = False
        self._failed = False
        self._watcher: Callable[[], None] | None = None
        self._starved = False  # a reader is waiting for bytes the download has not written
        self._asked = -1  # the furthest position a reader of this process has asked for

    @property
    def path(self) -> Path:
        return self._path

    @property
    def final(self) -> Path:
        return self._final

    def written(self, size: int) -> None:
        with self._cond:
            self._size = size
            self._updates += 1
            self._cond.notify_all()
        self._notify()

    def finish(self, ok: bool) -> None:
        with self._cond:
            self._done = True
            self._failed = not ok
            self._cond.notify_all()
        self._notify()

    def watch(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (in the writer's thread) after every ``written``/``finish``;
        None stops. How a reader in another process hears of the download
        (:mod:`cachefs.pipeline.workers`): a condition variable does not cross processes."""
        with self._cond:
            self._watcher = callback

    def _notify(self) -> None:
        with self._cond:
            callback = self._watcher
        if callback is not None:
            callback()

    def state(self) -> tuple[int, int, bool, bool]:
        """(bytes on disk, updates so far, ended, failed): what a remote reader is told."""
        with self._cond:
            return self._size, self._updates, self._done, self._failed

    def wait(self, pos: int) -> int:
        """Bytes readable at ``pos`` (blocking until there are some); 0 at the verified end."""
        with self._cond:
            self._asked = max(self._asked, pos)
            while True:
                if self._failed:
                    raise DownloadFailed(f"download of {self._path.name} failed")
                if self._size > pos:
                    return self._size - pos
                if self._done:
                    return 0
                self._starved = True
                self._cond.wait()
                self._starved = False

    @property
    def starved(self) -> bool:
        """Whether a reader is waiting for the download right now: its ingest is bound by
        the network, not by a core (the pull's spare build slot, see ``BuildSlots``)."""
        with self._cond:
            return self._starved

    @property
    def backlog(self) -> int | None:
        """Bytes on disk that a reader of this process has not asked for yet (None: none
        has started, or it reads in another process): how far ingest is behind the
        download (:mod:`cachefs.pipeline.handover`)."""
        with self._cond:
            return None if self._asked < 0 else max(0, self._size - self._asked)

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._done

    def wait_update(self, seen: int) -> None:
        """Block until the download reports again after update number ``seen`` (or ends)."""
        with self._cond:
            while self._updates == seen and not self._done and not self._failed:
                self._cond.wait()

    @property
    def updates(self) -> int:
        with self._cond:
            return self._updates

    def __call__(self) -> BinaryIO:
        """The blob as a :data:`~cachefs.ingest.image.BlobOpener`."""
        return self.open()

    def open(self) -> BinaryIO:
        self.wait(-1)  # the file exists once the download has prepared it
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:  # already complete and renamed (or failed and removed)
            with self._cond:
                while not self._done:
                    self._cond.wait()
            if self._failed:
                raise DownloadFailed(f"download of {self._path.name} failed") from None
            fd = os.open(self._final, os.O_RDONLY)
        # a RawIOBase reads like a binary file, but typeshed does not count it a BinaryIO
        return GrowingReader(self, fd)  # type: ignore[return-value]


class GrowingReader(io.RawIOBase):
    def __init__(self, blob: GrowingBlob, fd: int) -> None:
        self._blob = blob
        self._fd = fd
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes straight into a new ``bytes`` (``RawIOBase.read`` would read
        into a bytearray and copy it: 60 MB more memcpy per Debian layer)."""
        if size < 0:
            return self.readall()
        if size == 0:
            return b""
        while True:
            seen = self._blob.updates
            avail = self._blob.wait(self._pos)
            if not avail:
                return b""
            data = os.pread(self._fd, min(size, avail), self._pos)
            if data:
                self._pos += len(data)
                return data
            self._blob.wait_update(seen)  # truncated by a restart: see readinto

    def readinto(self, b: Any) -> int:
        while True:
            seen = self._blob.updates
            avail = self._blob.wait(self._pos)
            if not avail:
                return 0
            with memoryview(b) as view:
                n = os.preadv(self._fd, [view[: min(len(view), avail)]], self._pos)
            if n:
                self._pos += n
                return n
            # The file is shorter than reported: a restart truncated it after ``seen``;
            # the same bytes come again at the same offsets. Not an end of file.
            self._blob.wait_update(seen)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
