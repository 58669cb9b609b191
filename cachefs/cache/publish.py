"""Publishing files into the cache so readers never see half-written content.

Everything goes through a temp file on the same filesystem and ``rename()``. Durable
publication (file fsync, rename, directory fsync) is what msb does for metadata json
(FORMATS.md §1.4); artifacts are renamed without fsync, like msb, because they can be
re-derived and their validity is checked on every use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Make an ``OSError`` raised inside name ``path`` if it names no file.

    A ``write()`` that hits ENOSPC or EIO names nothing, and "No space left on device"
    alone does not say which filesystem filled up (cache, tmp, a bind mount).
    """
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, final: Path, *, durable: bool = False) -> None:
    """Rename ``tmp`` over ``final``; with ``durable``, fsync the file first and the dir after."""
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with naming(tmp):
                os.fsync(fd)
        finally:
            os.close(fd)
    os.rename(tmp, final)
    if durable:
        fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_output(final: Path, tmp: Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """Yield ``tmp`` opened for writing; publish it as ``final`` only if the block succeeds."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with naming(tmp), open(tmp, "wb") as f:
            yield f
        publish_file(tmp, final, durable=durable)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_quietly(path: Path) -> bool:
    """Unlink if present; True if something was removed. Other processes may race us."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
