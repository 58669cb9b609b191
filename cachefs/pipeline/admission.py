"""Admission of an image's layers to a bounded stage in a fixed order: largest first.

Why an order at all: a pull builds only a few layers at once (one per core), so with
three layers the last one to be admitted is the one whose ingest, plan and image write
end the pull. trio wakes the tasks waiting for a ``CapacityLimiter`` in a deliberately
random order, so which layer that was changed from run to run: when the largest
layer came last, the pull waited for its whole ingest after the others were done (on a
3-layer Debian pull, 0.584 s against 0.570 s when it came first). Admitting the largest
layer first makes the smallest one finish last, every time.

The order is strict: a layer waits for every larger layer to have been admitted or to
have withdrawn (cached, failed, cancelled), even when a slot is free. Each layer reaches
the gate after a few milliseconds of lock and file checks, so this costs nothing in the
usual case; a larger layer that waits for another process's download lock holds the
smaller ones' ingest back until it gets it (their downloads go on meanwhile).

The spare slot: a layer whose turn it is may be admitted beyond the capacity while its
``spare()`` says so; the pull says so when the layer's blob is complete and a layer being
built waits for the network (:class:`cachefs.pipeline.materialize.BuildSlots`), and the
layers in flight say so when a download is about to end and its ingest keeps up
(:mod:`cachefs.pipeline.handover`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

# How often a layer waiting for its build turn asks whether it may take the spare slot.
SPARE_RECHECK_S = 0.01


def admission_order(sizes: Sequence[int | None]) -> list[int]:
    """The positions in the order they are admitted: the largest size first; an unknown
    size counts as 0, and equal sizes keep their order (bottom layer first). Also the
    order of the downloads started beside the config (:mod:`cachefs.pipeline.early`),
    which must be the layers admitted first."""
    return sorted(range(len(sizes)), key=lambda i: (-(sizes[i] or 0), i))


def largest_first(sizes: Sequence[int | None]) -> list[int]:
    """Each position's rank in :func:`admission_order` (0: admitted first)."""
    ranks = [0] * len(sizes)
    for rank, i in enumerate(admission_order(sizes)):
        ranks[i] = rank
    return ranks


class RankedAdmission:
    """At most ``capacity`` holders at once, admitted in rank order (0 first).

    Every rank must either :meth:`acquire` (then :meth:`release`) or :meth:`withdraw`,
    or the ranks after it wait forever; ``withdraw`` after ``acquire`` does nothing, so a
    ``finally: withdraw(rank)`` covers every way out of a task.
    """

    def __init__(self, capacity: int, ranks: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self._free = capacity
        self._passed = [False] * ranks
        self._turn = 0  # the lowest rank that has neither been admitted nor withdrawn
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, rank: int, *, spare: Callable[[], bool] | None = None,
                      polled: bool = True) -> bool:
        """Wait for ``rank``'s turn and a free slot. When none is free, the one spare slot
        beyond the capacity will do while ``spare()`` says so (looked at every
        ``SPARE_RECHECK_S``: it may turn true in another thread; not ``polled``: only at
        a :meth:`nudge` or a release). True if admitted into the spare slot."""
        while True:
            if self._passed[rank]:
                raise RuntimeError(f"rank {rank} already admitted or withdrawn")
            if self._turn == rank:
                if self._free > 0:
                    break
                if self._free == 0 and spare is not None and spare():
                    break
            if self._turn == rank and self._free == 0 and spare is not None and polled:
                with trio.move_on_after(SPARE_RECHECK_S):
                    await self._lot.park()
            else:
                await self._lot.park()
        self._free -= 1
        self._pass(rank)
        return self._free < 0

    def release(self) -> None:
        self._free += 1
        self._lot.unpark_all()

    def nudge(self) -> None:
        """A ``spare()`` may have turned true: the rank whose turn it is looks now rather
        than at its next recheck."""
        self._lot.unpark_all()

    def withdraw(self, rank: int) -> None:
        """``rank`` will not be admitted (or already was): the ranks after it go on."""
        if not self._passed[rank]:
            self._pass(rank)

    def _pass(self, rank: int) -> None:
        self._passed[rank] = True
        while self._turn < len(self._passed) and self._passed[self._turn]:
            self._turn += 1
        self._lot.unpark_all()
