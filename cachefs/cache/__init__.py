"""The msb-compatible on-disk cache: paths, metadata, locks, leases, publication."""

from .store import GlobalCache, RefRecord, default_cache_dir, read_metadata_file

__all__ = ["GlobalCache", "RefRecord", "default_cache_dir", "read_metadata_file"]
