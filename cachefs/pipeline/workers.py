"""Layer images built in worker processes, one core each (issue 15).

Threads of one process take turns on one GIL, and the tar parser and the tree building
are Python, so layers built in threads share one core's worth of Python. A
:class:`LayerWorkers` pool gives each layer being built a process of its own
(:mod:`cachefs.ingest.worker_main`: a fresh interpreter that imports only the ingest and
EROFS writer code, ~50 ms to start). Fresh interpreters rather than ``fork``: forking a
trio program with threads running (downloads, inflate threads of other layers) copies
locks in whatever state they are in, and the child would carry the parent's whole heap.

Division of labour. The parent keeps everything that talks to the registry or the cache:
the download (it tells the worker how many bytes of the ``.part`` file are on disk and
how the download ended), ``materialize_layer``'s lock, validity checks and rename, and
the removal of the spool and image temp files whatever happens. The worker only reads
the blob and writes those two temp files, then sends back the tree and block map
(pickled: ~20 ms to load for the 8,743-entry Debian layer against ~70 ms to read the
tree back from the image) for the fsmeta.

Errors cross back as themselves (a ``CachefsError`` pickles with its class, message and
attributes; an ``OSError`` with its errno and file name). A worker that dies before it
answers is :class:`~cachefs.errors.WorkerFailed`. A cancelled build (another layer
failed, Ctrl-C) stops its worker: SIGTERM, then SIGKILL after ``STOP_DEADLINE``, and
only then does ``materialize_layer`` remove the temp files, so nothing is left behind.
No worker outlives the pool: :meth:`LayerWorkers.aclose` ends them the same way.

How many: :func:`~cachefs.pipeline.worker_spawn.workers_for`. Never more than the layers
built at once, which the pull bounds by the cores (``MATERIALIZE_PARALLELISM``) and by
``CACHEFS_LAYERS_IN_FLIGHT``; by default one fewer, since the pull's own process builds a
layer too, and none below 4 cores: on 2, a loopback pull is CPU-bound rather than
GIL-bound, and workers measured slower there (their start, the trees' trip back; see
docs/pull-profile.md, third round).
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..errors import WorkerFailed
from ..ingest.image import BlobOpener, build_layer_image
from ..ingest.worker_main import (
    RESULT_HEADER,
    Job,
    end_message,
    job_message,
    result_length,
    size_message,
)
from . import worker_spawn
from .growing import GrowingBlob
from .worker_spawn import workers_for as workers_for  # the pull's question, answered there

if TYPE_CHECKING:
    from ..digest import Digest
    from ..erofs.tree import BlockMap, Node
    from ..ingest.layer import Compression

STOP_DEADLINE = 2.0  # seconds a stopped worker gets before SIGKILL


class _Worker:
    """One worker process: its two pipes as trio streams, and a pidfd to wait on."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.pid = process.pid
        self._pidfd = os.pidfd_open(process.pid)
        self._send = trio.lowlevel.FdStream(os.dup(process.stdin.fileno()))
        self._receive = trio.lowlevel.FdStream(os.dup(process.stdout.fileno()))
        process.stdin.close()
        process.stdout.close()

    @classmethod
    async def start(cls) -> _Worker:
        adopted = worker_spawn.adopt()
        return cls(adopted if adopted is not None else await trio.to_thread.run_sync(
            worker_spawn.spawn))

    async def wait(self) -> int:
        """The exit status (negative: the signal), once the process has ended."""
        while (code := self.process.poll()) is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        return code

    async def run(self, job: Job, growing: GrowingBlob | None, label: str) -> bytes:
        """Send the job, tell the worker how the download goes, return its pickled answer."""
        try:
            await self._send.send_all(job_message(job))
        except trio.BrokenResourceError:
            raise await self._died(label) from None
        if growing is None:
            return await self._answer(label)
        failure: WorkerFailed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow, growing)
            try:
                answer = await self._answer(label)
            except WorkerFailed as err:  # raised out here: a nursery would wrap it in a group
                failure = err
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return answer

    async def _follow(self, growing: GrowingBlob) -> None:
        """Forward the download's news: the latest size (intermediate ones may be skipped,
        the reader only needs the newest), then how it ended. A worker that died stops
        this quietly: its missing answer is what reports it."""
        token = trio.lowlevel.current_trio_token()
        changed = trio.Event()

        def wake() -> None:
            token.run_sync_soon(changed.set)

        growing.watch(wake)
        try:
            told = 0
            while True:
                size, updates, done, failed = growing.state()
                if updates != told:
                    told = updates
                    await self._send.send_all(size_message(size))
                if done:
                    await self._send.send_all(end_message(not failed))
                    return
                await changed.wait()
                changed = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            growing.watch(None)

    async def _answer(self, label: str) -> bytes:
        header = await self._exactly(RESULT_HEADER)
        data = await self._exactly(result_length(header)) if header is not None else None
        if data is None:
            raise await self._died(label)
        return data

    async def _died(self, label: str) -> WorkerFailed:
        return WorkerFailed(f"layer {label}: the worker process building it "
                            f"{await self._death()}", hint=_DIED_HINT)

    async def _exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self._receive.receive_some(min(n - len(buf), 1 << 20))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    async def _death(self) -> str:
        code = None
        with trio.move_on_after(STOP_DEADLINE):
            code = await self.wait()
        if code is None:
            await self.stop()
            return "stopped answering"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    async def close(self) -> None:
        """End an idle worker: it exits when its stdin ends; else it is stopped."""
        with trio.CancelScope(shield=True):
            await self._send.aclose()
            with trio.move_on_after(STOP_DEADLINE):
                await self.wait()
            await self.stop()

    async def stop(self) -> None:
        """SIGTERM, SIGKILL after ``STOP_DEADLINE``; returns once the process is gone
        (reaped) and its pipes and pidfd are closed."""
        with trio.CancelScope(shield=True):
            if self.process.poll() is None:
                self.process.terminate()
                with trio.move_on_after(STOP_DEADLINE):
                    await self.wait()
            if self.process.poll() is None:
                self.process.kill()
                await self.wait()
            await self._send.aclose()
            await self._receive.aclose()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1


_DIED_HINT = ("nothing was published; out of memory (see the kernel log) or killed by "
              "someone? pull again")


class LayerWorkers:
    """The worker processes of one pull: started on demand, reused, all ended by
    :meth:`aclose`. Use :meth:`builder` as ``materialize_layer``'s ``build`` hook; it is
    called in a thread (``trio.to_thread``) of the pull's trio run."""

    def __init__(self, limit: int) -> None:
        self._free = limit  # workers that may still be claimed (started or idle)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self.started = 0  # for tests and measurements: how many processes this pool ran

    def _claim(self) -> bool:
        """Reserve a worker for a build (on the trio thread: no race between callers)."""
        if self._free <= 0:
            return False
        self._free -= 1
        return True

    async def build(self, job: Job, growing: GrowingBlob | None) -> bytes:
        """The pickled answer of a worker (claimed by :meth:`_claim`) to ``job``; a
        cancelled build stops its worker."""
        try:
            worker = self._idle.pop() if self._idle else await self._start()
        except BaseException:
            self._free += 1
            raise
        self._busy.add(worker)
        answered = False
        try:
            answer = await worker.run(job, growing, job.layer_label)
            answered = True
            return answer
        finally:
            self._busy.discard(worker)
            self._free += 1
            if answered:
                self._idle.append(worker)
            else:  # cancelled or dead: its state is unknown, it cannot take another job
                await worker.stop()

    async def _start(self) -> _Worker:
        worker = await _Worker.start()
        self.started += 1
        return worker

    async def aclose(self) -> None:
        workers, self._idle = [*self._idle, *self._busy], []
        self._busy.clear()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for worker in workers:
                    nursery.start_soon(worker.close)
            await trio.to_thread.run_sync(worker_spawn.discard_prestarted)

    def builder(self, blob: Path | BlobOpener, *, compression: Compression | None,
                diff_id: Digest, layer_label: str, spool_path: Path,
                part: Path) -> tuple[Node, BlockMap]:
        """:class:`~cachefs.ingest.image.LayerImageBuilder` in a worker process, for a file
        or a growing download, when one is free; else here (so is any other stream: an
        archive member)."""
        if not isinstance(blob, GrowingBlob | Path) or not trio.from_thread.run_sync(
                self._claim):
            return build_layer_image(blob, compression=compression, diff_id=diff_id,
                                     layer_label=layer_label, spool_path=spool_path, part=part)
        if isinstance(blob, GrowingBlob):
            growing: GrowingBlob | None = blob
            job = Job(blob.path, blob.final, compression, diff_id, layer_label, spool_path, part)
        else:
            growing = None
            job = Job(blob, None, compression, diff_id, layer_label, spool_path, part)
        answer = trio.from_thread.run(functools.partial(self.build, job, growing))
        result = _loads(answer)
        if result[0] == "error":
            raise result[1]
        return result[1], result[2]


def _loads(data: bytes) -> tuple:  # type: ignore[type-arg]
    """Unpickle with the collector paused: loading ~10,000 new objects would otherwise
    trigger collections that walk them all (half the load time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        result = pickle.loads(data)
    finally:
        if enabled:
            gc.enable()
    assert isinstance(result, tuple)
    return result
