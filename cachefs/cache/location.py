"""Where the cache lives by default, without importing the cache store.

A module of its own because the CLI needs this answer for every command, ``--version``
and ``images`` included, and the store brings pydantic and trio with it (~0.1 s of start-up
that such commands should not pay).
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """``$CACHEFS_CACHE_DIR``, else ``$MSB_HOME/cache``, else ``~/.microsandbox/cache``."""
    env = os.environ if environ is None else environ
    if env.get("CACHEFS_CACHE_DIR"):
        return Path(env["CACHEFS_CACHE_DIR"])
    if env.get("MSB_HOME"):
        return Path(env["MSB_HOME"]) / "cache"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".microsandbox" / "cache"
