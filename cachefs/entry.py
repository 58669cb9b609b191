"""The ``cachefs`` console script: the CLI, then an exit that skips tearing Python down.

A successful command has finished its work (files published and closed, locks released,
threads joined: nothing is left to ``atexit`` in cachefs). What remains at interpreter
exit is freeing every object the imports made (trio, httpx, cachefs) and a last full
garbage collection: ~0.07 CPU-s of a ~1.0 s ``cachefs pull`` (issue 15). So after a
success the streams and logging handlers are flushed and the process leaves with
``os._exit``. A failure takes the ordinary exit, which costs the same as before.

Only the console script does this; ``cachefs.cli.main`` itself (what tests invoke in
process) exits as usual.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def _flushed() -> bool:
    ok = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except (OSError, ValueError):
            ok = False  # e.g. a reader that left: let the ordinary exit report it
    return ok


def leave(code: object) -> NoReturn:
    """Exit with ``code``; on success without the interpreter's teardown."""
    if code in (0, None):
        logging.shutdown()
        if _flushed():
            os._exit(0)
        sys.exit(0)
    sys.exit(code)  # type: ignore[arg-type]


def run() -> NoReturn:
    from .heap import imports_uncollected

    with imports_uncollected():
        from .cli import main

    try:
        main()
        code: object = 0
    except SystemExit as done:
        code = done.code
    leave(code)
