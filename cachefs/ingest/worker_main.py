"""A layer-building worker process: ``python -P -m cachefs.ingest.worker_main``.

Why a process: the tar parser and the tree building are Python, so layers built in
threads of one process take turns on one GIL; a worker per core builds them side by
side (issue 15). The parent (:mod:`cachefs.pipeline.workers`) keeps the download, the
cache's locks and the publication; a worker runs only
:func:`cachefs.ingest.image.build_layer_image` and imports only what that needs (no
trio, httpx or cache store), so it starts in a few tens of milliseconds.

The protocol, on the worker's stdin (from the parent) and stdout (to it), integers
little-endian::

    parent → worker   b"J" u32 n, pickle(Job)   build a layer image
                      b"S" u64 n                the growing blob has n bytes on disk
                      b"E" u8 ok                its download ended (1: verified, renamed)
    worker → parent   u64 n, pickle(("ok", root, block_map) | ("error", exception))

One job at a time; a worker that answered takes the next one. The end of stdin (the
parent closed it, or died) ends the worker at once, whatever it was doing. SIGINT is
ignored: a Ctrl-C reaches the whole process group, and the parent is the one that
decides (it stops its workers when the pull is cancelled).
"""

from __future__ import annotations

import gc
import os
import pickle
import queue
import signal
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..digest import Digest
from ..pipeline.growing import GrowingBlob
from .image import build_layer_image
from .layer import Compression

JOB, SIZE, END = b"J", b"S", b"E"
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Pickling a tree recurses a few frames per directory level; MAX_DEPTH is 128 levels.
_RECURSION = 5000


@dataclass(frozen=True)
class Job:
    """One layer to build. ``final`` is set when ``blob`` is the ``.part`` file of a
    download still running: it is where the download renames the verified blob."""

    blob: Path
    final: Path | None
    compression: Compression | None
    diff_id: Digest
    layer_label: str
    spool_path: Path
    part: Path


def job_message(job: Job) -> bytes:
    data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
    return JOB + _U32.pack(len(data)) + data


def size_message(size: int) -> bytes:
    return SIZE + _U64.pack(size)


def end_message(ok: bool) -> bytes:
    return END + bytes([ok])


def result_header(data: bytes) -> bytes:
    return _U64.pack(len(data))


def result_length(header: bytes) -> int:
    return int(_U64.unpack(header)[0])


RESULT_HEADER = _U64.size


def _exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _control(stream: BinaryIO, jobs: queue.Queue[tuple[Job, GrowingBlob | None]]) -> None:
    """The reader thread: jobs to the main thread, download news to the job's blob."""
    growing: GrowingBlob | None = None
    try:
        while tag := stream.read(1):
            if tag == JOB:
                job: Job = pickle.loads(_exact(stream, _U32.unpack(_exact(stream, 4))[0]))
                growing = GrowingBlob(job.blob, job.final) if job.final is not None else None
                jobs.put((job, growing))
            elif tag == SIZE and growing is not None:
                growing.written(_U64.unpack(_exact(stream, 8))[0])
            elif tag == END and growing is not None:
                growing.finish(_exact(stream, 1) == b"\x01")
            else:
                break  # not our protocol: stop rather than guess
    except (EOFError, OSError):
        pass
    os._exit(0)  # the parent is done with us (or gone): nothing here is worth finishing


def _build(job: Job, growing: GrowingBlob | None) -> tuple[object, ...]:
    try:
        root, block_map = build_layer_image(
            growing if growing is not None else job.blob, compression=job.compression,
            diff_id=job.diff_id, layer_label=job.layer_label, spool_path=job.spool_path,
            part=job.part,
        )
    except Exception as err:
        return ("error", err)
    return ("ok", root, block_map)


def _encode(result: tuple[object, ...]) -> bytes:
    try:
        return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # what does not pickle still says what it was
        failure = result[1] if result[0] == "error" else err
        text = f"{type(failure).__name__}: {failure}"
        return pickle.dumps(("error", RuntimeError(text)), protocol=pickle.HIGHEST_PROTOCOL)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setrecursionlimit(_RECURSION)
    gc.freeze()  # the imports' objects: never worth walking in this short-lived process
    # The protocol owns the pipes; stray output (a warning, a print) goes to stderr.
    control = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    jobs: queue.Queue[tuple[Job, GrowingBlob | None]] = queue.Queue()
    threading.Thread(target=_control, args=(control, jobs), name="control", daemon=True).start()
    while True:
        job, growing = jobs.get()
        data = _encode(_build(job, growing))
        del job, growing
        answers.write(result_header(data))
        answers.write(data)
        answers.flush()


if __name__ == "__main__":
    main()
