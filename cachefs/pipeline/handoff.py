"""The download's side of handing its chunks to the ingest in memory (pull, registry).

Each chunk the download has written to ``tmp/<blob>.part`` is also offered to the
:class:`~cachefs.pipeline.growing.GrowingBlob`, whose reader in this process takes it
from memory instead of reading it back from the file. Memory is bounded there; what
keeps the reader *able* to use it is that the download waits for the reader once it is
``AHEAD`` bytes ahead, until the reader is back within ``BEHIND``. A reader that does not
catch up within ``PATIENCE_S`` (stalled, or not reading yet) stops the waiting for that
blob for good: the download then runs free and the reader reads the file, as without
this. A cancelled download stops waiting at once; nothing here is needed for
correctness, only for speed.
"""

from __future__ import annotations

import contextlib

import trio

from .growing import AHEAD, GrowingBlob

PATIENCE_S = 1.0


class ChunkHandoff:
    """``await handoff(offset, chunk)``: the ``tee`` of ``RegistryClient.fetch_blob``."""

    def __init__(self, growing: GrowingBlob) -> None:
        self._growing = growing
        self._patient = True

    async def __call__(self, offset: int, chunk: bytes) -> None:
        growing = self._growing
        if growing.arrived(offset, chunk) <= AHEAD or not self._patient:
            return
        token = trio.lowlevel.current_trio_token()
        room = trio.Event()

        def wake() -> None:  # in the reader's thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(room.set)

        if not growing.on_room(wake):
            return
        try:
            with trio.move_on_after(PATIENCE_S) as waited:
                await room.wait()
            if waited.cancelled_caught:
                self._patient = False
        finally:
            growing.on_room(None)
