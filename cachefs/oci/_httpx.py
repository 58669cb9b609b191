"""``httpx``, imported without ``httpx._main``, its command-line tool (rich, click, pygments).

httpx imports that module only to export ``httpx.main`` and falls back to a stub on
ImportError, which a ``None`` entry in ``sys.modules`` produces: ~40 ms off the start of
every ``cachefs pull``. The entry is removed right after, so code that imports
``httpx._main`` later still gets the real module. Import httpx from here
(``from ._httpx import httpx``) so whichever cachefs module loads it first skips the tool.

Also here: the size of one socket read. httpcore reads a response body 64 KiB at a time,
and each read climbs through httpcore, httpx and trio before our loop writes and hashes
it; a 60 MB layer is ~1,000 of those trips. On a fast link (loopback, a LAN) a read
finds far more than 64 KiB waiting, so 1 MiB reads cut the download's CPU time by a third
(measured: 0.11 → 0.075 CPU-s for 60 MB on loopback). Memory stays bounded: one read is
at most 1 MiB, per connection.
"""

from __future__ import annotations

import sys


def _import_without_cli() -> None:
    if "httpx" in sys.modules or "httpx._main" in sys.modules:
        return
    # None in sys.modules makes the import fail (documented in the import system);
    # typeshed types the values as modules only
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

BODY_READ_BYTES = 1 << 20


def _larger_reads() -> None:
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # another httpcore layout: its default read size stays
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", BODY_READ_BYTES) < BODY_READ_BYTES:
        AsyncHTTP11Connection.READ_NUM_BYTES = BODY_READ_BYTES


_larger_reads()

__all__ = ["httpx"]
