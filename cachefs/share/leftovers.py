"""What EROFS-artifact work leaves behind when its process dies, for ``cachefs gc``.

Fetches, pushes and ``verify --deep`` work in cachefs's own ``cachefs/tmp/`` under names
carrying their process id, and remove their files when they end; a crash leaves them. A
provenance record outlives its layer file when the layer is converted again or removed.
Neither is in msb's part of the cache, and neither is removed while its owner runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from ..cache.store import CACHEFS_DIR, GlobalCache
from ..errors import DigestError
from .provenance import FETCHED, layer_origin

_SCRATCH = re.compile(
    r"^(?:[a-z0-9]+_[0-9a-f]+\.(?P<pid>\d+)\.[0-9a-f]{8}\.(?:erofs|fsmeta)"
    r"|(?:push|deep)-(?P<dpid>\d+)-[0-9a-f]{8})$")
_RECORD = re.compile(r"^(?P<alg>[a-z0-9]+)_(?P<hex>[0-9a-f]+)\.json$")


def leftovers(cache: GlobalCache, pid_alive: Callable[[int], bool]) -> list[Path]:
    """Scratch files of dead processes, and provenance records of layers no longer there."""
    out: list[Path] = []
    tmp = cache.root / CACHEFS_DIR / "tmp"
    for name in _names(tmp):
        m = _SCRATCH.match(name)
        if m is not None and not pid_alive(int(m.group("pid") or m.group("dpid"))):
            out.append(tmp / name)
    records = cache.root / CACHEFS_DIR / "provenance"
    for name in _names(records):
        m = _RECORD.match(name)
        if m is None:
            continue
        try:
            stale = layer_origin(cache, f"{m['alg']}:{m['hex']}")["origin"] != FETCHED
        except DigestError:
            continue  # not a name we write: leave it alone
        if stale:
            out.append(records / name)
    return out


def _names(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
