"""Run a command, return wall seconds and its peak RSS.

Linux carries ``maxrss`` across fork *and* exec, so a command forked straight from this
(large) harness would report at least the harness's own RSS. The command is therefore
started by a fresh, minimal interpreter (``python -I -S``) that reports the ``wait4``
rusage of its child: the floor is that interpreter's few MiB, not the harness.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_rss_mib: float
    cpu_s: float = 0.0  # user + system seconds of the command and its children


_REPORTER = r"""
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss,
      usage.ru_utime + usage.ru_stime)
"""


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> Sample:
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _REPORTER, *cmd],
        env=env, capture_output=True, text=True,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "1 0 0 0"
    code, seconds, maxrss_kib, cpu = last.split()
    if int(code) != 0 or proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): {proc.stderr[-2000:]}")
    return Sample(float(seconds), int(maxrss_kib) / 1024, float(cpu))


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
