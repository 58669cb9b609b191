"""Sharing converted EROFS through the registry (OCI 1.1 referrers), both directions.

* :func:`push_erofs` — publish an image's layer EROFS and fsmeta as an artifact.
* :func:`fetch_erofs` — a pull's hook: download, check and publish them instead of
  converting layer tars.
* :func:`layer_origin` — where a cached layer came from (converted / fetched).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .fetch import ArtifactPolicy, FetchOutcome, fetch_erofs
    from .provenance import layer_origin
    from .push import PushReport, push_erofs

_LAZY = {
    "ArtifactPolicy": ".fetch", "FetchOutcome": ".fetch", "fetch_erofs": ".fetch",
    "layer_origin": ".provenance", "PushReport": ".push", "push_erofs": ".push",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ArtifactPolicy",
    "FetchOutcome",
    "PushReport",
    "fetch_erofs",
    "layer_origin",
    "push_erofs",
]
