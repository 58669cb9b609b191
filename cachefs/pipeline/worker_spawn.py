"""Starting layer-building worker processes, early (issue 15).

A worker (:mod:`cachefs.ingest.worker_main`) takes ~50 ms to start: an interpreter and
the ingest code. A pull spends its first ~0.2 s importing trio, httpx and pydantic on
one core while the other idles, so a worker started before those imports is ready when
the first layer's bytes arrive, at no cost in wall time. This module therefore imports
nothing heavy: ``cachefs pull`` (and the benchmark's worker) runs in :func:`prestarted`,
and the pull's pool (:mod:`cachefs.pipeline.workers`) adopts those processes.
Whatever is not adopted is ended by :func:`discard_prestarted` when the pull ends; a
worker also exits by itself as soon as this process does (its stdin closes).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping

WORKERS_ENV = "CACHEFS_LAYER_WORKERS"  # auto | never | always
IN_FLIGHT_ENV = "CACHEFS_LAYERS_IN_FLIGHT"
MAX_WORKERS = 4  # MATERIALIZE_PARALLELISM's cap: layers built at once

_lock = threading.Lock()
_prestarted: list[subprocess.Popen[bytes]] = []


def spawn() -> subprocess.Popen[bytes]:
    """A fresh worker: ``-P`` keeps the working directory off ``sys.path`` (a directory
    named ``cachefs`` there must not replace the package), stdio pipes are the protocol."""
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "cachefs.ingest.worker_main"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
    )


def workers_wanted(environ: Mapping[str, str] | None = None) -> int:
    """How many workers a multi-layer pull will use (``workers_for`` in
    :mod:`cachefs.pipeline.workers`, which this must not import): one per layer built at
    once (the cores, at most ``MAX_WORKERS`` and ``CACHEFS_LAYERS_IN_FLIGHT``), less the
    one the pull builds itself unless ``CACHEFS_LAYER_WORKERS=always``; 0 with ``never``.
    Malformed values count as unset here: the pull itself rejects them."""
    env = os.environ if environ is None else environ
    mode = env.get(WORKERS_ENV, "").strip()
    n = min(MAX_WORKERS, os.cpu_count() or 1)
    try:
        n = min(n, int(env.get(IN_FLIGHT_ENV, "") or n))
    except ValueError:
        pass
    if mode == "never" or n < 2:
        return 0
    return n if mode == "always" else n - 1


def prestart(count: int | None = None) -> None:
    """Start ``count`` (default :func:`workers_wanted`) workers for the coming pull."""
    n = workers_wanted() if count is None else count
    started = []
    try:
        for _ in range(n):
            started.append(spawn())
    except OSError:
        pass  # the pull starts its own when it needs them (and reports why it cannot)
    with _lock:
        _prestarted.extend(started)


@contextlib.contextmanager
def prestarted(count: int | None = None) -> Iterator[None]:
    """:func:`prestart` now, :func:`discard_prestarted` when the block ends, however."""
    prestart(count)
    try:
        yield
    finally:
        discard_prestarted()


def adopt() -> subprocess.Popen[bytes] | None:
    """A prestarted worker still alive, or None."""
    with _lock:
        while _prestarted:
            proc = _prestarted.pop(0)
            if proc.poll() is None:
                return proc
            _close_pipes(proc)
    return None


def discard_prestarted() -> None:
    """End the workers nobody adopted: closing stdin makes an idle worker exit at once."""
    with _lock:
        left = list(_prestarted)
        _prestarted.clear()
    for proc in left:
        _close_pipes(proc)
    for proc in left:
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:
                pass
