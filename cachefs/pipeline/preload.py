"""Modules a pull needs only once its image is resolved, imported while the resolve waits.

Before its first request a pull has ~0.15 s of imports on one core; ~15 ms of them (the
EROFS writer, ingest, the build pipeline, ...) serve only after the manifest and config
arrive (issue 15). A :class:`Preload` imports those in a thread started once the first
request is under way, so over a slow link they run while the process waits for the
registry instead of before it asks.

Correctness never depends on the thread: every user of these modules imports them itself
(a function-level import), and :meth:`Preload.wait` joins the thread first, so the build
path never races it. Were they to race anyway, Python's per-module import locks make the
second importer wait for the first. A failure in the thread is only logged: the user's
own import then raises the real error where it is needed.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading

from ..heap import collector_paused

log = logging.getLogger(__name__)


class Preload:
    """Imports ``modules`` once, in a background thread (:meth:`start`)."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Begin the imports in a thread, unless begun already or all loaded."""
        with self._lock:
            if self._thread is not None or all(m in sys.modules for m in self.modules):
                return
            self._thread = threading.Thread(target=self._run, name="cachefs-preload",
                                            daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until the thread (if any) is done; the caller then imports what it needs (a
        dictionary look-up for what the thread loaded)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            with collector_paused():  # the modules' objects live as long as the process
                for name in self.modules:
                    importlib.import_module(name)
        except BaseException as err:  # the user's own import reports it, where needed
            log.debug("preloading the pull's modules failed: %s: %s", type(err).__name__, err)
