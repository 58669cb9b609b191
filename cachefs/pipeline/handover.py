"""The next layer's download requested while the last bytes of one still cross the link.

Why: a pull keeps ``layers_in_flight()`` layers downloading or ingesting at once, and a
layer's slot is released only once its ingest and plan are done. Over a link that is the
bottleneck the ingest follows the download, so the slot comes free a little after the
blob's last byte, and only then did the next layer's request go out: the link idled for
the slot's hand-over, the new download's thread hops and its request's round trip
(3 Debian layers over 40 MB/s with 20 ms round trips: 45-54 ms between the two large
blobs' last bytes and the small one's first, docs/pull-profile.md "handover").

So while a layer is in flight, its download's own measurements say when it is about to
end: once the bytes it still has to fetch arrive within the time its own first byte took
(from the moment it was wanted: admission, thread hops, request, round trip), the next
layer is admitted into the one spare slot (:class:`cachefs.pipeline.admission.RankedAdmission`)
and its first byte arrives about when this blob ends. Only when the ingest keeps up with
the download too: on loopback the download outruns the ingest, the slot comes free long
after the last byte, and starting the next download then would only take a core from the
two ingests (the same bound, ``layers_in_flight() + 1`` downloads at most, is kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Pace:
    """One download's measurements: when it was wanted, its first byte, its rate since.

    Fed on the trio thread by the download (``written``: bytes on disk, the first call
    being the kept prefix before the request) and by the pull (``wanted``: its admission).
    """

    def __init__(self, total: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._total = total if total else None
        self._clock = clock
        self._wanted: float | None = None  # the earliest of admission and download start
        self._base: int | None = None  # bytes on disk before the request (a kept prefix)
        self._first: tuple[float, int] | None = None  # (when, bytes on disk) at the 1st byte
        self._last: tuple[float, int] | None = None  # the same at the latest report
        # told at every report once the download is near its end (the pull's admission)
        self.near_end: Callable[[], None] | None = None

    def wanted(self, at: float | None = None) -> None:
        """The download was wanted at ``at`` (default: now); its latency counts from the
        earliest such moment (an early download starts before its layer's admission)."""
        at = self._clock() if at is None else at
        if self._wanted is None or at < self._wanted:
            self._wanted = at

    def written(self, n: int) -> None:
        """The download holds ``n`` bytes on disk."""
        now = self._clock()
        if self._base is None or (self._last is not None and n < self._last[1]):
            # the kept prefix, or a restart that truncated the file: measured afresh
            self._base, self._first, self._last = n, None, None
            return
        if self._first is None:
            if n > self._base:
                self._first = self._last = (now, n)
            return
        self._last = (now, n)
        if self.near_end is not None and self.is_near_end():
            self.near_end()

    def window(self) -> float | None:
        """Bytes this download receives in the time its first byte took: its rate since
        its first byte, times (first byte − wanted); None until both are measured."""
        if self._first is None or self._last is None or self._wanted is None:
            return None
        (t0, n0), (t1, n1) = self._first, self._last
        if t1 <= t0 or n1 <= n0:
            return None
        return (n1 - n0) / (t1 - t0) * max(0.0, t0 - self._wanted)

    def left(self) -> int | None:
        """Bytes still to come (None: size unknown or nothing received yet)."""
        if self._total is None or self._last is None:
            return None
        return max(0, self._total - self._last[1])

    def is_near_end(self) -> bool:
        """The bytes still to come arrive within one first-byte latency."""
        window, left = self.window(), self.left()
        return window is not None and left is not None and left <= window


class Following(Protocol):
    """What the handover needs of a blob that ingest follows (:class:`GrowingBlob`)."""

    @property
    def backlog(self) -> int | None: ...

    @property
    def ended(self) -> bool: ...


def ingest_keeps_up(pace: Pace, blob: Following | None) -> bool:
    """The download is near its end, still under way, and its reader is within one window
    of what is on disk: the layer's slot comes free about when its last byte arrives.

    A download that has ended says nothing of when its slot comes free: that waits for an
    ingest bound by a core. On loopback (the reader ~20 MB behind when the last byte came)
    a rule without this admitted the third Debian layer 60-115 ms before a slot was free,
    its download beside the two ingests, and the quiet runs of an A/B were ~10 ms slower.
    A reader elsewhere (a worker process) is not seen, so never counts as keeping up."""
    if blob is None or blob.ended or not pace.is_near_end():
        return False
    window, backlog = pace.window(), blob.backlog
    return window is not None and backlog is not None and backlog <= window
