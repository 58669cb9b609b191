"""A layer whose tree is ready before its image file is: the hand-over between a layer's
build and the image's fsmeta.

Once a layer's layout is planned, its tree carries every regular file's block and its
block count is final: that is all the fsmeta needs (FORMATS.md §4). Writing the image
itself (metadata, then 170 MB of file data copied in the kernel for a Debian layer) takes
as long again, so the pipeline hands the tree on at once and lets the image complete
separately; the fsmeta is merged and written meanwhile, and published only after every
layer it points at (``stitch_image``).

``ImageWrite`` is the whole contract of "completes separately": ``wait()`` returns once
the layer file is published and raises why otherwise. :class:`BackgroundWrite` runs the
write in a thread of this process; a builder in another process can hand back its own
``ImageWrite`` (one that waits for the worker's word) with the tree it sent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..erofs.tree import Node
from ..errors import CachefsError

log = logging.getLogger(__name__)


class ImageWrite(Protocol):
    def wait(self) -> None:
        """Block until the layer image is published; raise the error that stopped it."""

    def join(self) -> None:
        """Block until nothing of the write runs any more, the work after ``wait()`` too
        (so a failed pull reports only once every published layer's blob is gone)."""


@dataclass(frozen=True, eq=False)
class LayerTree:
    """A layer just built, as the fsmeta sees it: the tree its image is written from
    (regular files carry ``block``), the image's block count, and the image's write."""

    root: Node
    total_blocks: int
    image: ImageWrite


class Written:
    """An ``ImageWrite`` that is already over (the image was written before the hand-over)."""

    def wait(self) -> None:
        return None

    def join(self) -> None:
        return None


class BackgroundWrite:
    """``work`` (write + publish + clean up) in a thread of its own, started at once;
    ``then`` runs in that thread after ``wait()`` has been released (work nobody needs to
    wait for, such as giving a spool's pages back; it must not raise), preceded by
    ``then_if_done`` when ``work`` succeeded (removing the downloaded blob the published
    layer was built from: nothing needs it any more; it must not raise either).

    Not a daemon: an interpreter that exits on an error still lets the thread remove its
    temporary files and release its lock.
    """

    def __init__(self, work: Callable[[], None], name: str, *,
                 then: Callable[[], None] | None = None,
                 then_if_done: Callable[[], None] | None = None) -> None:
        self._error: BaseException | None = None
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(work, then, then_if_done),
                                        name=name)
        self._thread.start()

    def _run(self, work: Callable[[], None], then: Callable[[], None] | None,
             then_if_done: Callable[[], None] | None) -> None:
        try:
            work()
        except BaseException as err:  # raised by wait(), in the thread that needs it
            self._error = err
        finally:
            self._over.set()
            try:
                if then_if_done is not None and self._error is None:
                    then_if_done()
            finally:
                if then is not None:
                    then()

    def wait(self) -> None:
        self._over.wait()
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        self._thread.join()


def settle(images: Iterable[ImageWrite]) -> list[BaseException]:
    """Wait for every write (none is left running) and return their errors, each once."""
    errors: list[BaseException] = []
    for image in images:
        try:
            image.wait()
        except BaseException as err:
            if all(err is not seen for seen in errors):
                errors.append(err)
    return errors


def raise_first(errors: list[BaseException]) -> None:
    """Raise the error a user should see (the first typed one, else the first); the others
    go to the log (``-v``)."""
    if not errors:
        return
    chosen = next((e for e in errors if isinstance(e, CachefsError)), errors[0])
    for err in errors:
        if err is not chosen:
            log.info("also failed: %s: %s", type(err).__name__, err,
                     exc_info=(type(err), err, err.__traceback__))
    raise chosen
