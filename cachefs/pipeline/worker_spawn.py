"""Starting layer-building worker processes, early (issue 15).

A worker (:mod:`cachefs.ingest.worker_main`) takes ~50 ms to start: an interpreter and
the ingest code. A pull spends its first ~0.2 s importing trio and httpx on
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

from ..errors import UsageError

WORKERS_ENV = "CACHEFS_LAYER_WORKERS"  # auto | never | always
IN_FLIGHT_ENV = "CACHEFS_LAYERS_IN_FLIGHT"
MAX_WORKERS = 4  # MATERIALIZE_PARALLELISM's cap: layers built at once
# ``auto`` uses workers from this many cores on. Measured on 2 cores (docs/pull-profile.md,
# issue 15): a 3-layer pull is CPU-bound there, not GIL-bound, and workers only add their
# start (~50 ms CPU each), the trees' trip back (~50 ms per large layer) and ~14 MiB each.
AUTO_MIN_CORES = 4

_lock = threading.Lock()
_prestarted: list[subprocess.Popen[bytes]] = []


def spawn() -> subprocess.Popen[bytes]:
    """A fresh worker: ``-P`` keeps the working directory off ``sys.path`` (a directory
    named ``cachefs`` there must not replace the package), stdio pipes are the protocol."""
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "cachefs.ingest.worker_main"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
    )


def workers_mode(environ: Mapping[str, str] | None = None) -> str:
    raw = (os.environ if environ is None else environ).get(WORKERS_ENV, "").strip() or "auto"
    if raw not in ("auto", "never", "always"):
        raise UsageError(f"{WORKERS_ENV}={raw!r}: expected auto, never or always")
    return raw


def workers_for(layers_to_build: int, parallelism: int,
                environ: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """How many worker processes a pull may use, building ``parallelism`` layers at once.

    ``auto``: none below ``AUTO_MIN_CORES`` cores or for one layer; else
    ``parallelism - 1``: the pull's own process builds one layer in a thread beside them
    (a layer it builds itself costs no worker start and no tree sent back).
    ``CACHEFS_LAYER_WORKERS=always`` puts every layer in a worker (from 2 layers built at
    once), ``never`` none.
    """
    mode = workers_mode(environ)
    if mode == "never" or parallelism < 2:
        return 0
    if mode == "always":
        return parallelism
    enough = (cores if cores is not None else os.cpu_count() or 1) >= AUTO_MIN_CORES
    return parallelism - 1 if enough and layers_to_build >= 2 else 0


def prestart_count(environ: Mapping[str, str] | None = None) -> int:
    """Workers worth starting before the pull knows its layers: every one with
    ``always``; with ``auto`` one at most (an unused one costs its start and ~14 MiB)."""
    env = os.environ if environ is None else environ
    n = min(MAX_WORKERS, os.cpu_count() or 1)
    try:
        n = min(n, int(env.get(IN_FLIGHT_ENV, "") or n))
        wanted = workers_for(2, n, env)
    except (ValueError, UsageError):
        return 0  # the pull itself rejects malformed values, with its own message
    return wanted if workers_mode(env) == "always" else min(wanted, 1)


def prestart(count: int | None = None) -> None:
    """Start ``count`` (default :func:`prestart_count`) workers for the coming pull."""
    n = prestart_count() if count is None else count
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
