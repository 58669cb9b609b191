"""Run a command, return wall seconds and its peak RSS; or the peak memory of its tree.

Linux carries ``maxrss`` across fork *and* exec, so a command forked straight from this
(large) harness would report at least the harness's own RSS. The command is therefore
started by a fresh, minimal interpreter (``python -I -S``) that reports the ``wait4``
rusage of its child: the floor is that interpreter's few MiB, not the harness.

``ru_maxrss`` is the largest *single* process, though: a command that builds in worker
processes would hide them. :func:`peak_tree_memory` measures what the whole process tree
holds at once: the sum of PSS (``/proc/PID/smaps_rollup``: each page shared by several
processes counted once, split between them) over the command and all its descendants,
sampled every ``TREE_SAMPLE_S``, the largest sum seen. Reading ``smaps_rollup`` costs the
kernel time, so this runs in a separate, untimed run of the command.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .worker import FIRST_CONNECT


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_rss_mib: float
    cpu_s: float = 0.0  # user + system seconds of the command and its children
    # spawn → the command's first TCP connection, when it says (bench.worker does)
    startup_s: float | None = None


_REPORTER = r"""
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss,
      usage.ru_utime + usage.ru_stime, start)
"""


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> Sample:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _REPORTER, *cmd],
        env=env, capture_output=True, text=True,
    )
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else "1 0 0 0 0"
    code, seconds, maxrss_kib, cpu, spawned = last.split()
    if int(code) != 0 or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {proc.stderr[-2000:]}")
    begins = [float(line.split()[1]) for line in lines if line.startswith(FIRST_CONNECT + " ")]
    startup = begins[0] - float(spawned) if begins else None
    return Sample(float(seconds), int(maxrss_kib) / 1024, float(cpu), startup)


TREE_SAMPLE_S = 0.005


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return out


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += _children(p)
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass  # it exited between the listing and the read: it holds nothing any more
    return 0


def peak_tree_memory(cmd: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Peak MiB of the sum of PSS over ``cmd``'s process tree (see the module docstring)."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=errors)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(TREE_SAMPLE_S)  # the sampling period, not a synchronisation
        errors.seek(0)
        err = errors.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return peak / 1024


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def drop_page_cache() -> bool:
    """Cold-cache runs need root; say whether it worked instead of pretending."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
