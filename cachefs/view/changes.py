"""Has anything changed in a few directories? One non-blocking ``read`` answers (inotify).

The view must see a pull or a removal at once, so every walk through an image directory
asks whether the index (msb's database, the metadata and reference-record directories)
changed. ``stat``-ing them costs tens of µs per walk, which over ``ls -lR`` of 1,000
images (12,000 walks) would be most of its time. The kernel queues an inotify event inside
the very syscall that makes the change, before that syscall returns, so an empty queue
at the start of a request means no change happened before it: the answer is exact for
changes made on this host.

Where inotify is unavailable (no watches left) or cannot be trusted (a network or FUSE
filesystem, where another host's changes raise no events) ``DirWatch`` says so and callers
fall back to their ``stat`` check on every question.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Everything that changes a directory's entries or one of its files.
CONTENT_EVENTS = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
                  | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
# (watched directory, name in it, event mask) -> is this event no change?
Ignore = Callable[[Path, str, int], bool]

_libc = ctypes.CDLL(None, use_errno=True)
_init1 = _libc.inotify_init1
_init1.argtypes = [ctypes.c_int]
_init1.restype = ctypes.c_int
_add_watch = _libc.inotify_add_watch
_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_add_watch.restype = ctypes.c_int
_statfs = _libc.statfs
_statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_statfs.restype = ctypes.c_int
# statfs f_type of filesystems changed behind the kernel's back (other hosts, daemons):
# NFS, SMB2, CIFS, FUSE, Ceph, 9p, AFS, GFS2, OCFS2, Lustre.
_REMOTE = {0x6969, 0xFE534D42, 0xFF534D42, 0x65735546, 0x00C36400, 0x01021997, 0x5346414F,
           0x01161970, 0x7461636F, 0x0BD00BD0}


def _remote(path: Path) -> bool:
    """Is ``path`` on a filesystem whose changes may come from elsewhere (no events)?"""
    buf = ctypes.create_string_buffer(256)
    if _statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in _REMOTE


def _events(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The (watch descriptor, mask, name) of each inotify event in ``data``."""
    pos = 0
    while pos + _EVENT.size <= len(data):
        wd, mask, _, length = _EVENT.unpack_from(data, pos)
        start = pos + _EVENT.size
        yield wd, mask, data[start : start + length].rstrip(b"\0")
        pos = start + length


class DirWatch:
    """Watches directories (and the files in them) for changes; ``changed()`` is cheap.

    A directory that does not exist yet is watched through its nearest existing ancestor
    (creation events), and added as soon as a check finds it there. ``usable`` is False
    when inotify cannot be had: then ``changed()`` always says True. ``ignore(directory,
    name, mask)`` names events that are no change (what the watcher's owner does itself).
    """

    def __init__(self, directories: Iterable[Path], *, ignore: Ignore | None = None) -> None:
        self._wanted = list(dict.fromkeys(Path(d) for d in directories))
        self._ignore = ignore
        self._watched: dict[int, Path] = {}
        self._missing = False
        self.fd = -1
        self._poll = select.poll()
        fd = _init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            log.info("no inotify (%s): freshness checks stat the index on every walk",
                     os.strerror(ctypes.get_errno()))
            return
        self.fd = fd
        self._poll.register(fd, select.POLLIN)
        self._arm()

    @property
    def usable(self) -> bool:
        return self.fd >= 0

    def _arm(self) -> None:
        """Add a watch on every wanted directory (or its nearest existing ancestor)."""
        self._missing = False
        for directory in self._wanted:
            target = directory
            while not target.is_dir() and target.parent != target:
                target = target.parent
            self._missing |= target != directory
            if _remote(target):
                log.info("%s is on a network filesystem: freshness checks stat the index "
                         "on every walk", target)
                self.close()
                return
            wd = _add_watch(self.fd, os.fsencode(target), CONTENT_EVENTS | IN_ONLYDIR)
            if wd < 0:
                err = ctypes.get_errno()
                log.warning("cannot watch %s (%s): freshness checks stat the index on "
                            "every walk", target, os.strerror(err))
                self.close()
                return
            self._watched[wd] = target

    def changed(self) -> bool:
        """Did anything happen in a watched directory since the last call?

        Drains the queue: the caller must act on True (check, rescan) before asking again.
        """
        if self.fd < 0:
            return True
        if not self._poll.poll(0):
            return False  # the common case, without the cost of an exception
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                log.warning("inotify read failed (%s): falling back to stat checks", err)
                self.close()
                return True
            if self._structure_changed(data):
                self._arm()
                seen = True
            elif not seen:
                seen = self._any_change(data)
        if seen and self._missing:
            self._arm()  # a wanted directory may have appeared
        return seen

    def _any_change(self, data: bytes) -> bool:
        """Is any event in ``data`` one that ``ignore`` does not name?"""
        if self._ignore is None:
            return bool(data)
        for wd, mask, name in _events(data):
            directory = self._watched.get(wd)
            if directory is None or not self._ignore(directory, os.fsdecode(name), mask):
                return True
        return False

    @staticmethod
    def _structure_changed(data: bytes) -> bool:
        """Did a watched directory go away or the queue overflow (re-arm the watches)?"""
        return any(mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF | IN_Q_OVERFLOW)
                   for _, mask, _ in _events(data))

    def close(self) -> None:
        if self.fd >= 0:
            self._poll.unregister(self.fd)
            os.close(self.fd)
            self.fd = -1
        self._watched.clear()
