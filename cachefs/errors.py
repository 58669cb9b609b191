"""One exception hierarchy for everything cachefs can refuse or fail at.

Every error carries enough context for a person to act on it, renders as a single
line (``str(err)``), and maps to an exit code so scripts can tell families apart
without parsing text. Every class lives here; the tree, with exit codes::

    CachefsError (1)
    ├── UsageError (2)
    ├── InvalidReference (3)
    ├── NotCachedError (4)
    ├── RegistryError (5)
    │   ├── RegistryNotFound (5)
    │   ├── TransferTooSlow (5)
    │   ├── AuthError (6)
    │   └── RegistryBlocked (21)
    ├── DigestMismatch (7)
    ├── LayerFormatError (8)
    ├── ErofsFormatError (9)
    ├── CacheCorrupt (10)
    │   ├── CacheUnreadable (10)
    │   ├── VmdkError (10)
    │   └── MsbDbUnreadable (10)
    ├── LockBusy (11)
    ├── ArchiveError (12)
    ├── MountError (13)
    ├── DigestError (14)
    ├── ResourceLimit (17)
    ├── ConfigError (20)
    ├── MsbDatabaseError (24)
    │   └── MsbSchemaUnknown (24)
    ├── GuestError (25)
    └── WorkerFailed (26)

    DownloadFailed (an Exception, not a CachefsError: never reported, see its docstring)
    ValidationError (a ValueError, not a CachefsError: a JSON document of the wrong shape,
      which the reader turns into its own error; see cachefs.jsonmodel)

A code belongs to one family: a subclass either takes a code of its own (scripts must
tell ``AuthError`` from other registry failures) or inherits its parent's (a
``RegistryNotFound`` is handled like any ``RegistryError``); two unrelated classes never
share one. ``EXIT_CODES`` and the table in ``cachefs --help`` are generated from the
classes, so they cannot drift from this tree (``tests/test_errors.py`` checks both).
"""

from __future__ import annotations

from typing import Any


class CachefsError(Exception):
    """Base of all cachefs errors. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{text} ({self.hint})" if self.hint else text

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle without calling ``__init__`` again: subclasses take other arguments
        (``DigestMismatch(what, expected, actual)``), and an error raised in a layer-building
        worker process must arrive as the same class with the same message and attributes."""
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[CachefsError], args: tuple[object, ...], state: dict[str, object]
) -> CachefsError:
    err = cls.__new__(cls, *args)
    err.__dict__.update(state)
    return err


class UsageError(CachefsError):
    """The caller asked for something malformed (bad option combination, bad path)."""

    exit_code = 2


class InvalidReference(CachefsError):
    """An image reference that cannot be parsed or normalised."""

    exit_code = 3


class DigestError(CachefsError):
    """A digest string that is not ``algorithm:encoded`` of a supported form."""

    exit_code = 14


class NotCachedError(CachefsError):
    """The image or artifact is not in the cache (and policy forbids fetching it)."""

    exit_code = 4


class RegistryError(CachefsError):
    """The registry answered with an error, or could not be reached."""

    exit_code = 5


class AuthError(RegistryError):
    """Credentials are missing, wrong, or refused (HTTP 401/403)."""

    exit_code = 6


class DigestMismatch(CachefsError):
    """Bytes whose sha256 is not what their descriptor or config promised."""

    exit_code = 7

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class LayerFormatError(CachefsError):
    """A layer blob that cannot be turned into an EROFS image (bad compression, tar, limits)."""

    exit_code = 8

    def __init__(
        self, message: str, *, layer: str | None = None, entry: str | None = None
    ) -> None:
        parts = []
        if layer:
            parts.append(f"layer {layer}")
        if entry:
            parts.append(f"entry {entry!r}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.layer = layer
        self.entry = entry


class ErofsFormatError(CachefsError):
    """An EROFS image that does not parse (bad magic, out-of-range block, broken dirent)."""

    exit_code = 9


class CacheCorrupt(CachefsError):
    """A cache artifact exists but is invalid; ``cachefs verify --repair`` may fix it."""

    exit_code = 10


class LockBusy(CachefsError):
    """A lock or lease is held by another process and we were asked not to wait."""

    exit_code = 11


class ArchiveError(CachefsError):
    """A docker-archive or OCI layout that is malformed or incomplete."""

    exit_code = 12


class MountError(CachefsError):
    """The FUSE view could not be mounted or unmounted."""

    exit_code = 13


class ResourceLimit(CachefsError):
    """The work needs more of a process resource (open files) than this process may have."""

    exit_code = 17


class ConfigError(CachefsError):
    """A configuration file cachefs reads (registries.conf, an auth file) is malformed."""

    exit_code = 20


class RegistryBlocked(RegistryError):
    """registries.conf marks the registry (or namespace) the reference names as blocked."""

    exit_code = 21


class CacheUnreadable(CacheCorrupt):
    """A cache file or directory a decision depends on cannot be read or parsed.

    Raised where guessing would destroy data (``gc``/``rm`` would count an unreadable
    image's layers as unused); the command stops and deletes nothing.
    """

    def __init__(self, path: object, err: BaseException) -> None:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        super().__init__(f"cannot read {path}: {' '.join(reason.split()[:30])}")
        self.path = str(path)


class MsbDatabaseError(CachefsError):
    """msb's database could not be changed (another schema, busy, or a sandbox uses the
    image); nothing in it or in the cache was changed."""

    exit_code = 24



class RegistryNotFound(RegistryError):
    """404: the repository, tag, manifest or blob does not exist."""


class TransferTooSlow(RegistryError):
    """A host missed a deadline: no response headers in time, or a body slower than the
    minimum rate. Not retried: the bound already allowed for a slow network."""


class VmdkError(CacheCorrupt):
    """A VMDK descriptor that cannot be written or parsed (a corrupt cache artifact)."""


class MsbSchemaUnknown(MsbDatabaseError):
    """Not msb 0.7.11's database: left alone, whatever the command."""


class GuestError(CachefsError):
    """The guest could not be prepared, did not boot, or did not report its result."""

    exit_code = 25


class DownloadFailed(Exception):
    """What the reader of a growing blob raises when its download failed or was cancelled.

    Not a CachefsError: the download's own error is the one to report (``first_error``),
    and a ``CachefsError`` here could be reported in its place.
    """


class ValidationError(ValueError):
    """A document that does not have the shape its model needs."""

    def __init__(self, model: str, loc: tuple[str | int, ...], msg: str) -> None:
        self.model = model
        self.loc = loc
        self.msg = msg
        where = ".".join(str(part) for part in loc)
        super().__init__(f"{model}: {where}: {msg}" if where else f"{model}: {msg}")

    def errors(self) -> list[dict[str, Any]]:
        """The first (and only) problem, as ``{"loc": ..., "msg": ...}``: what callers
        format into their one-line errors."""
        return [{"loc": self.loc, "msg": self.msg}]


class WorkerFailed(CachefsError):
    """A layer-building worker process died before it answered (killed by a signal, out
    of memory); nothing it was building was published."""

    exit_code = 26


class MsbDbUnreadable(CacheCorrupt):
    """msb's database exists but could not be read (busy beyond the wait, a migration
    half-way, an I/O error): its list of images is unknown, not empty."""


def _family(root: type[CachefsError]) -> list[type[CachefsError]]:
    """``root`` and every subclass defined in this module, depth first."""
    found = [root] if root.__module__ == __name__ else []
    for sub in root.__subclasses__():
        found += _family(sub)
    return found


def exit_codes() -> dict[str, int]:
    """Every error class's name and exit code, generated from the classes themselves (the
    CLI's ``--help`` table and the tests read this, so no list can forget a class)."""
    return {cls.__name__: cls.exit_code for cls in _family(CachefsError)}


EXIT_CODES: dict[str, int] = exit_codes()
