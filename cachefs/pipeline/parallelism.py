"""How many layers one process builds at once: a fact both the pull (its admission) and
the build slots of :mod:`cachefs.pipeline.materialize` need, kept here so the pull can
know it without importing the build machinery before its first request (issue 15)."""

from __future__ import annotations

import os

# Layers being ingested or written at once in this process. A layer holds its slot until
# its image is written, not only until its tree is handed on: each holds buffers and a plan
# (a 3-layer load peaked ~8 MiB higher when a third ingest could start beside two images
# still being written), and ingest is CPU-bound, so more than the cores only contend.
BUILDS_AT_ONCE = max(1, min(4, os.cpu_count() or 1))
