"""Where a view daemon's messages go, so that a failure is never silent.

* Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) stderr is the journal:
  log there, ``journalctl -u <unit>`` shows it.
* A background daemon (``cachefs mount`` without ``--foreground``) has no terminal once
  its parent returned: it logs to a file in cachefs's state directory
  (``$XDG_STATE_HOME/cachefs``, else ``~/.local/state/cachefs``), one per mountpoint,
  rotated so it stays bounded. ``status.json`` (and so ``cachefs status``) names it.
* Until it is ready, a background daemon also writes to stderr, which its parent reads:
  a failed start (e.g. fusermount3 refusing ``allow_other``) is printed by ``cachefs
  mount`` itself.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import sys
from pathlib import Path

LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 2
_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL = "journal (systemd)"


def under_systemd(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def state_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(
        env.get("HOME") or str(Path.home()), ".local", "state")
    return Path(base) / "cachefs"


def log_path(mountpoint: Path, environ: dict[str, str] | None = None) -> Path:
    """``<state>/view-<last component>-<hash of the absolute path>.log``."""
    absolute = os.path.abspath(mountpoint)
    tag = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(absolute).name)
    return state_dir(environ) / f"view-{name or 'root'}-{tag}.log"


def open_log_file(path: Path) -> logging.Handler:
    """A rotating handler on ``path`` (directory created 0700). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_MAX_BYTES,
                                                   backupCount=LOG_BACKUPS, delay=False)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def stderr_handler() -> logging.Handler:
    """Bare messages: before READY they are what ``cachefs mount`` prints as the reason."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def detach_stderr(log_file: Path | None) -> None:
    """Point fd 2 at the log file (or /dev/null) once the parent stopped listening, so
    late writes (fusermount3, a traceback) neither fail on a closed pipe nor vanish."""
    target = str(log_file) if log_file is not None else os.devnull
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 2)
    os.close(fd)
