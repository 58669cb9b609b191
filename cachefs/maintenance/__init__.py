"""What the maintenance commands do to a whole cache: list, inspect, rm/gc, df, verify,
and the low-level tools on loose files.

One module per job; this package only re-exports them. The facts they act on — which
images a cache holds, whether each is usable, where the bytes are — come from
``cache.catalog`` and ``cache.health``, the same answers the view gives.

* ``images``: ``cachefs images``/``inspect`` reports;
* ``remove``: ``rm`` and ``gc`` under msb's deletion protocol;
* ``usage``: ``df``;
* ``verify``: ``verify`` and ``verify --repair``;
* ``lowlevel``: ``cachefs erofs …``/``cachefs vmdk`` on loose files.
"""

from __future__ import annotations

from ..cache.catalog import (
    SOURCE_CACHEFS,
    SOURCE_JSON,
    ImageInfo,
    References,
    find_image,
    list_images,
    referenced,
)
from ..cache.msb_index import SOURCE_MSB_DB, DbImage, default_msb_db, read_msb_db
from .images import image_summary, inspect_image, layer_path, missing_parts

__all__ = [
    "SOURCE_CACHEFS",
    "SOURCE_JSON",
    "SOURCE_MSB_DB",
    "DbImage",
    "ImageInfo",
    "References",
    "default_msb_db",
    "find_image",
    "image_summary",
    "inspect_image",
    "layer_path",
    "list_images",
    "missing_parts",
    "read_msb_db",
    "referenced",
]
