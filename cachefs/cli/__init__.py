"""The ``cachefs`` command line: ``commands`` parses and dispatches, ``render`` formats
(tables, progress bars, sizes); the logic lives in the library."""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
