"""The cyclic garbage collector, kept off the objects that outlive a pull anyway.

A pull builds a tree of ~10,000 ``Node`` objects per layer (plus their dicts and lists),
and every few thousand allocations Python's collector walks the young objects; each
time enough of them survive, it walks *everything*, including the ~100,000 objects that
importing trio, httpx and cachefs left behind. Measured on the Debian minbase pull:
0.033-0.043 CPU-s of collections per pull, 0.013 with this (issue 15). ``gc.freeze()``
moves every object alive at the start into a permanent generation the collector skips;
``gc.unfreeze()`` at the end puts them back, so a long-running process (the FUSE view)
still collects whatever cyclic garbage it had.

While a layer is built (tar → tree → plan → image) and while the fsmeta is merged, the
collector is paused (:func:`collector_paused`): those structures are acyclic and freed by
reference counts, and the full collections that their size triggers were the largest
single cost of a pull of many small files. The rest of a pull (the downloads, trio, httpx)
leaves a few thousand cyclic objects whatever the image's size (measured: ~2,700 for a
1-layer Debian image, a 3-layer one and 60,000 small files alike), so the pause does not
let garbage grow with the work.

Before that, :func:`imports_uncollected` keeps the collector off while those imports run:
they only create objects that stay.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # nested or concurrent pulls in one process: the last one out unfreezes


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Skip the objects alive now in every collection until the block ends."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()


@contextlib.contextmanager
def imports_uncollected() -> Iterator[None]:
    """No collections while a block imports modules; what it made is then frozen.

    Importing trio, httpx and the pipeline creates ~40,000 objects that live as long as
    the process; meanwhile the collector walks them ~70 times and finds nothing to free:
    8–10 ms of CPU at the start of every pull (issue 15). The objects are frozen at the
    end, as :func:`frozen_heap` would freeze them, and the collector is back on, unless it
    was off already.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


_paused = 0  # threads inside collector_paused(); the last one out turns the collector back on
_paused_reenable = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collections while a block builds a large acyclic structure.

    Merging two layer trees of 30,000 files each and planning their fsmeta creates
    ~200,000 objects that all stay alive until the fsmeta is written; every few thousand
    of them the collector runs, and each time enough survive it walks the layer trees
    too: 2/3 of the merge's CPU (issue 15). Ingesting, planning and writing a layer image
    are the same (on 60,000 small files, three full collections took 150-210 ms of one
    pull, every thread stopped). Those objects are freed by reference counts, so nothing
    is lost by not collecting meanwhile. Counted, so overlapping blocks in two
    threads leave the collector on only when the last one ends (and only if it was on).

    Inside a :func:`frozen_heap` block (a pull), the last one out also freezes what was
    built meanwhile: otherwise the first young collection after the pause walks all of it
    (59 young collections took 45 ms of a 60,000-file pull, most of it in the few right
    after a pause).
    """
    global _paused, _paused_reenable
    with _lock:
        _paused += 1
        if _paused == 1:
            _paused_reenable = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0:
                if _depth:
                    # inside a pull (frozen_heap): what the block built is frozen too, so
                    # the first collection after it does not walk it; the pull's end
                    # unfreezes everything, as it does start-up's objects
                    gc.freeze()
                if _paused_reenable:
                    gc.enable()
