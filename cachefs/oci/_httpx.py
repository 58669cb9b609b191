"""``httpx``, imported without ``httpx._main``, its command-line tool (rich, click, pygments).

httpx imports that module only to export ``httpx.main`` and falls back to a stub on
ImportError, which a ``None`` entry in ``sys.modules`` produces: ~40 ms off the start of
every ``cachefs pull``. The entry is removed right after, so code that imports
``httpx._main`` later still gets the real module. Import httpx from here
(``from ._httpx import httpx``) so whichever cachefs module loads it first skips the tool.
"""

from __future__ import annotations

import sys


def _import_without_cli() -> None:
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
    try:
        import httpx  # noqa: F401
    except ImportError:
        # an httpx that needs its CLI module after all: forget the half import, and the
        # plain import below loads everything
        for name in [n for n in sys.modules if n == "httpx" or n.startswith("httpx.")]:
            del sys.modules[name]
    finally:
        if "httpx._main" in sys.modules and sys.modules["httpx._main"] is None:
            del sys.modules["httpx._main"]


_import_without_cli()

import httpx  # noqa: E402

__all__ = ["httpx"]
