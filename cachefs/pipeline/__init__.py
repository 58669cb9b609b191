"""The pipeline: a pull or a load, in order, from a source to published cache artifacts.

* ``pull.py`` — :func:`cachefs.pull` / :func:`load`: plan, download (or read the archive),
  ingest, publish under msb's locks, record the image. (``pull`` is not re-exported here:
  ``cachefs.pipeline.pull`` is the module.)
* :func:`materialize_layer` / :func:`stitch_image` (``materialize.py``) — layer EROFS,
  then fsmeta and VMDK, each written once.
* ``growing.py`` — ingest reading a blob while its download still writes it.
* ``progress.py`` — the events a pull reports (the CLI renders them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .materialize import materialize_layer, stitch_image
    from .pull import PullPolicy, PullResult, load

_LAZY = {
    "PullPolicy": ".pull", "PullResult": ".pull", "load": ".pull",
    "materialize_layer": ".materialize", "stitch_image": ".materialize",
}

__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = ["PullPolicy", "PullResult", "load", "materialize_layer", "stitch_image"]
