"""After :func:`reuse_large_buffers`, the ingest's pattern of large buffers (made in one
thread, freed in another, hundreds of them) reuses memory instead of faulting each new
buffer's pages in: the page faults stay those of the few buffers alive at once."""

from __future__ import annotations

import subprocess
import sys

_PROBE = r"""
import os, queue, resource, threading
from cachefs.ingest.allocator import reuse_large_buffers
reuse_large_buffers()
q = queue.Queue(4)
def produce():
    for i in range(1000):
        q.put(os.urandom(16) * (1 << 16))  # 1 MiB, as an inflate output chunk
    q.put(None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=produce)
t.start()
while (item := q.get()) is not None:
    del item  # freed in the consuming thread, as the tar parser frees chunks
t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_thousand_short_lived_1_mib_buffers_fault_in_only_a_few() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    faults = int(out.stdout)
    # 1000 buffers faulted anew would be 256,000 faults (4 KiB pages); reused, the pages
    # of the ~6 alive at once (queue, thread, the one being freed) and the thread's stack
    assert faults < 16 * 256, faults
