"""Open-file budget of a pull or load: checked before the work starts, not discovered as
``EMFILE`` halfway through it.

A pull holds one lease file per layer for its whole duration (msb's protocol) plus a
bounded number of files per layer in flight, so an image's layer count decides how many
descriptors it needs. The soft ``RLIMIT_NOFILE`` is raised towards the hard one when that is
not enough (what Go and systemd do for their daemons); past the hard limit the pull fails
at once, naming the numbers and the fix.
"""

from __future__ import annotations

import os
import resource

from .errors import ResourceLimit

BASELINE_FILES = 64  # the interpreter, stdio, sockets, trio's wakeup pipes, locks
FILES_PER_LAYER_IN_FLIGHT = 8  # download lock, .part writer and reader, layer locks, socket
# (a layer built in a worker process: its two pipes and pidfd here, the reader, spool and
# image there; cachefs.pipeline.workers)


# the layer a pull admits beyond those in flight while a download ends
# (cachefs.pipeline.handover): its download lock, .part and socket are open meanwhile
HANDOVER_LAYERS = 1


def files_needed(leases: int, in_flight: int) -> int:
    return (leases + (in_flight + HANDOVER_LAYERS) * FILES_PER_LAYER_IN_FLIGHT
            + BASELINE_FILES)


def open_files_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def ensure_open_files(needed: int, what: str) -> None:
    """Make sure ``needed`` more descriptors fit under RLIMIT_NOFILE, or raise ResourceLimit."""
    needed += open_files_in_use()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard == resource.RLIM_INFINITY or needed <= hard:
        target = needed * 2 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            pass
    raise ResourceLimit(
        f"{what} needs about {needed} open files, but this process may open only {soft} "
        f"(hard limit {hard})",
        hint="raise it (ulimit -n, or LimitNOFILE= in the systemd unit)",
    )
