"""A registry pull's first layer downloads, started beside the config request (issue 15).

Over a slow link a pull is bound by bandwidth once blob bytes flow, so its wall time is
"first blob byte + bytes / bandwidth + tail": every round trip before the first blob byte
is added to the whole pull. The layers' blobs are known from the manifest, but a layer's
cache key (its diff_id) only from the config, a round trip later; so the downloads of the
layers the pipeline would start first begin as soon as the manifest is read
(``RegistryClient.resolve(layers_known=…)``), and the layer provider adopts them once the
plan is made (docs/pull-profile.md, "Seventh round (early)").

Such a download is an ordinary one (``pull._Download``: the ``.part``, its resume rules,
the :class:`~cachefs.pipeline.growing.GrowingBlob` ingest follows), under the blob's
download lock like every other, so two pulls sharing a layer still download it once:

- the lock is only *tried*: when another process holds it, nothing starts early (the layer
  provider waits for it later, as without this);
- nothing starts when the blob or a ``.part`` of it is already on disk: a kept prefix is
  resumed by the provider as before, and an early download owns every byte of its
  ``.part``;
- a download nobody adopts (its layer turned out converted already, or found as an EROFS
  artifact; the config failed; the pull was cancelled before the plan) is cancelled, its
  ``.part`` removed under the lock, and the lock released. A blob completed before that
  stays, verified, as a reusable blob (``drop_leftovers`` removes it once its layer is
  valid). An adopted download follows the usual rule: kept for resume when interrupted,
  removed when the ingest reading it failed.

Only the largest ``EARLY_LAYERS`` distinct blobs, and never more than the layers the
pipeline has in flight at once: those it would start first anyway (largest first, see
:mod:`cachefs.pipeline.admission`), so the in-flight bound is kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from ..cache.locks import flock_exclusive
from ..errors import CachefsError, LockBusy
from ..models import Descriptor
from .admission import admission_order
from .progress import LayerPhase

if TYPE_CHECKING:
    from ..cache import GlobalCache
    from ..digest import Digest
    from ..models import LayerMetadata
    from .growing import GrowingBlob
    from .handover import Pace

log = logging.getLogger(__name__)

# Layers whose download starts beside the config (largest first). One flowing blob keeps a
# slow link busy; see the measurements in docs/pull-profile.md, "Seventh round (early)".
EARLY_LAYERS = 1
# An early start gains at most the config's round trip. When the manifest came back sooner
# than this after its request went out (loopback: 15-17 ms, this process's own imports
# included; a 20 ms link: ~49 ms), nothing starts early: the gain would be a few ms, for a
# lock and a connection more.
EARLY_MIN_MANIFEST_S = 0.025


class Report(Protocol):
    """Where a download's progress goes: the phase, the bytes on disk, and how long the
    download has been under way (a download adopted complete shows its rate from it)."""

    def __call__(self, phase: LayerPhase, n: int, seconds: float | None = None) -> None: ...


class Download(Protocol):
    """What ``pull._Download`` offers: run it to download; ``discard`` drops the ``.part``
    of a download that ends without completing."""

    growing: GrowingBlob
    discard: trio.Event
    pace: Pace

    def __call__(self) -> Awaitable[None]: ...


# (descriptor, the held lock, where its progress goes) → the download
StartDownload = Callable[[Descriptor, contextlib.AsyncExitStack, Report], Download]


class EarlyDownload:
    """One download started early: running in :class:`EarlyDownloads`' nursery until it
    ends, is dropped, or the pull ends."""

    def __init__(self, descriptor: Descriptor) -> None:
        self.descriptor = descriptor
        self.download: Download | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.error: Exception | None = None
        self.adopted = False
        self._report: Report | None = None
        self._last: tuple[LayerPhase, int, float | None] | None = None

    def report(self, phase: LayerPhase, n: int, seconds: float | None = None) -> None:
        """The download's progress: kept until adopted, then forwarded."""
        self._last = (phase, n, seconds)
        if self._report is not None:
            self._report(phase, n, seconds)

    def adopt(self, report: Report) -> None:
        """The layer provider takes it: progress goes to ``report`` from now on, and its
        ``.part`` is kept for resume when it is interrupted, as any download's."""
        assert self.download is not None
        self.adopted = True
        self.download.discard = trio.Event()
        self._report = report
        if self._last is not None:
            report(*self._last)

    def drop(self) -> None:
        """Not needed: cancelled, its ``.part`` removed (under the lock) as it ends."""
        self.scope.cancel()

    async def follow(self) -> None:
        """The adopted download's ``feed``: waits for its end and raises its error.
        Cancelled (the ingest failed, the pull stopped), it cancels the download and waits
        for it to clean up."""
        try:
            await self.done.wait()
        except BaseException:
            self.scope.cancel()
            with trio.CancelScope(shield=True):
                await self.done.wait()
            if self.error is not None:
                # it had failed on its own, and the ingest failed because it did (its reader
                # raised DownloadFailed, which then cancelled this): the cause is reported,
                # not a cancellation beside a DownloadFailed that says nothing of it
                raise self.error from None
            raise
        if self.error is not None:
            raise self.error


class EarlyDownloads:
    """The early downloads of one pull; use :meth:`running` around the whole pull."""

    def __init__(self, cache: GlobalCache, start: StartDownload, in_flight: int,
                 count: int = EARLY_LAYERS,
                 fits: Callable[[int], None] | None = None) -> None:
        self._cache = cache
        self._start = start
        # raises (CachefsError) when an image of this many layers cannot be pulled here
        # (the open-file budget): then nothing starts, the pipeline reports why
        self._fits = fits
        self.limit = max(0, min(count, in_flight))
        self._nursery: trio.Nursery | None = None
        self._started: dict[str, EarlyDownload] = {}  # by blob digest
        self._asked = False
        self._sent_at: float | None = None  # when the resolve's first request went out

    @property
    def connections(self) -> int:
        """Connections they will want beside the config's (to be warmed up beside the
        manifest request)."""
        return self.limit

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[EarlyDownloads]:
        """The downloads live as long as the pull (adopted ones are followed to their end
        by the ingest); on the way out every one still running is cancelled: one nobody
        adopted drops its ``.part``, an adopted one keeps it for resume as usual."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    self._nursery = None
                    for early in self._started.values():
                        if not early.adopted:
                            early.drop()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the pull's own error, alone in the group: the tasks here never raise
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    def request_sent(self) -> None:
        """The resolve's first request is going out (its ``location_known`` hook)."""
        if self._sent_at is None:
            self._sent_at = trio.current_time()

    def layers_known(self, layers: Sequence[Descriptor]) -> None:
        """The resolve's hook, on the trio thread: start the largest blobs' downloads,
        each only if its download lock is free and nothing of it is on disk. Never
        raises (a failure here only loses the gain)."""
        if self._nursery is None or self._asked or self.limit < 1:
            return
        self._asked = True  # the first location's manifest (mirrors: the same blobs)
        if self._sent_at is not None:
            waited = trio.current_time() - self._sent_at
            if waited < EARLY_MIN_MANIFEST_S:
                log.debug("no layer download started early: the manifest came back in "
                          "%.1f ms", waited * 1000)
                return
        try:
            if self._fits is not None:
                self._fits(len(layers))
        except CachefsError as err:
            log.debug("no layer download started early: %s", err)
            return
        first_of: dict[str, Descriptor] = {}
        for layer in layers:
            first_of.setdefault(layer.digest, layer)
        distinct = list(first_of.values())
        for i in admission_order([d.size for d in distinct])[: self.limit]:
            descriptor = distinct[i]
            try:
                self._try_start(self._nursery, descriptor)
            except (CachefsError, OSError) as err:
                log.debug("blob %s not started early: %s", descriptor.digest, err)

    def _try_start(self, nursery: trio.Nursery, descriptor: Descriptor) -> None:
        blob = descriptor.parsed_digest
        cache = self._cache
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(flock_exclusive(cache.download_lock_path(blob),
                                               blocking=False))
        except (LockBusy, OSError) as err:  # another pull downloads it: the provider waits
            log.debug("blob %s not started early: %s", blob, err)
            return
        try:
            # two stats, as the provider's own checks do on the trio thread
            if _exists(cache.tar_path(blob)) or _exists(cache.part_path(blob)):
                return
            early = EarlyDownload(descriptor)
            held = contextlib.AsyncExitStack()
            early.download = self._start(descriptor, held, early.report)
            # until adopted, whatever ends it (a drop, the pull's cancellation reaching it
            # first) drops its bytes: nothing would resume them
            early.download.discard.set()
            held.enter_context(lock.pop_all())  # the download releases it when it ends
            self._started[descriptor.digest] = early
            nursery.start_soon(self._run, early)
        finally:
            lock.close()  # released unless handed to the download

    @staticmethod
    async def _run(early: EarlyDownload) -> None:
        assert early.download is not None
        try:
            with early.scope:
                await early.download()
        except Exception as err:  # the layer provider raises it, if it adopts the download
            early.error = err
        finally:
            early.done.set()

    async def keep_needed(self, layers: Sequence[LayerMetadata], force: bool) -> None:
        """Once the plan is made: drop the downloads whose layers are converted already
        (cached before, or fetched as EROFS artifacts) and not to be rebuilt."""
        pending = {d: e for d, e in self._started.items() if not e.adopted}
        if not pending:
            return
        diff_ids = {layer.digest: layer.diff_digest for layer in layers}
        unknown = [e for d, e in pending.items() if d not in diff_ids]
        for early in unknown:
            early.drop()
        if force:
            return
        known = [(e, diff_ids[d]) for d, e in pending.items() if d in diff_ids]

        def converted() -> list[bool]:
            return [self._cache.is_layer_materialized(diff) for _, diff in known]

        for (early, _), done in zip(known, await trio.to_thread.run_sync(converted),
                                    strict=True):
            if done:
                early.drop()

    def take(self, digest: Digest | str) -> EarlyDownload | None:
        """The early download of this blob for the layer provider, lock included (None:
        there is none, or it was dropped)."""
        early = self._started.get(str(digest))
        if early is None or early.adopted or early.scope.cancel_called:
            return None
        return early


def _exists(path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return False
    return True


__all__ = ["EARLY_LAYERS", "EarlyDownload", "EarlyDownloads"]
