"""Where the cache lives by default, without importing the cache store.

A module of its own because the CLI needs this answer for every command, ``--version``
and ``images`` included, and the store brings the models with it (start-up that such
commands should not pay).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import GlobalCache


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """``$CACHEFS_CACHE_DIR``, else ``$MSB_HOME/cache``, else ``~/.microsandbox/cache``."""
    env = os.environ if environ is None else environ
    if env.get("CACHEFS_CACHE_DIR"):
        return Path(env["CACHEFS_CACHE_DIR"])
    if env.get("MSB_HOME"):
        return Path(env["MSB_HOME"]) / "cache"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".microsandbox" / "cache"


def default_msb_db(cache: GlobalCache) -> Path:
    """``<cache>/../db/msb.db``: msb keeps cache/ and db/ side by side (FORMATS.md §1.1).

    Here, not with the database reader, so a pull can ask whether msb's database exists
    without loading sqlite3 and the reader when it does not."""
    return cache.root.parent / "db" / "msb.db"
