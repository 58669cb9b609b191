"""Mount, serve and unmount the view: the entry points the CLI (and systemd) call.

``mount`` runs pyfuse3 under trio in the calling process until SIGINT/SIGTERM or an
external unmount, then unmounts cleanly. pyfuse3 keeps one session per process, so
``foreground=False`` starts a separate daemon process (``python -m cachefs.view.daemon``)
and returns once its mount is live instead of forking a process that already runs trio.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ..cache.store import GlobalCache
from ..errors import CachefsError, MountError
from .logs import JOURNAL, detach_stderr, log_path, open_log_file, stderr_handler, under_systemd
from .operations import ViewOperations

log = logging.getLogger(__name__)

READY_LINE = "cachefs-view: ready"
_START_TIMEOUT_S = 30.0
READAHEAD_KIB = 1024


def _fusermount() -> str:
    path = shutil.which("fusermount3") or shutil.which("fusermount")
    if path is None:
        raise MountError("fusermount3 not found", hint="install the 'fuse3' package")
    return path


def _unescape_mount_path(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mountpoint(path: Path) -> bool:
    """True if ``path`` is a mount point, including a dead FUSE mount (ENOTCONN).

    ``os.path.ismount`` says False for a dead FUSE mount (its ``stat`` fails), so ask the
    kernel's mount table instead.
    """
    target = os.path.join(os.path.realpath(Path(path).parent), Path(path).name)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape_mount_path(line.split()[4]) == target for line in f)
    except OSError:
        return os.path.ismount(path)


def _stale(mountpoint: Path) -> MountError:
    return MountError(
        f"{mountpoint} is a stale mount (transport endpoint is not connected)",
        hint=f"unmount it first: cachefs umount --lazy {mountpoint} "
        f"(or fusermount3 -u -z {mountpoint})",
    )


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mountpoint that is missing, not a directory, mounted already or non-empty.

    A crashed daemon's mount may still answer ``stat`` and even ``readdir`` from the
    kernel's caches, so a name nobody ever looked up is probed as well: that lookup always
    needs the (dead) daemon and fails with ENOTCONN.
    """
    try:
        st = os.stat(mountpoint)
        entries = os.listdir(mountpoint) if stat.S_ISDIR(st.st_mode) else None
        if entries is not None:
            probe = mountpoint / f".cachefs-probe-{os.getpid()}-{time.monotonic_ns()}"
            with contextlib.suppress(FileNotFoundError):
                os.stat(probe)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise _stale(mountpoint) from None
        raise MountError(f"mountpoint {mountpoint}: {err.strerror}") from None
    if entries is None:
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if is_mountpoint(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point",
                         hint=f"unmount it first: cachefs umount {mountpoint}")
    if entries:
        raise MountError(f"mountpoint {mountpoint} is not empty ({len(entries)} entries)",
                         hint="mount on an empty directory")


def fuse_options(allow_other: bool) -> set[str]:
    opts = {"fsname=cachefs", "subtype=cachefs", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    return opts


def mount(
    cache: GlobalCache,
    mountpoint: Path,
    *,
    allow_other: bool = False,
    msb_db: Path | None = None,
    foreground: bool = True,
    ready: Callable[[], None] | None = None,
    stopping: Callable[[], None] | None = None,
    log_target: str | None = None,
    links: bool = False,
) -> None:
    """Mount the view of ``cache`` on ``mountpoint``.

    Foreground: serve until SIGINT/SIGTERM or an external unmount; ``ready`` is called once
    the mount answers requests, ``stopping`` as soon as shutdown begins (before the unmount,
    so a supervisor such as systemd knows at once). Background: start a daemon process,
    wait until its mount is live, call ``ready`` and return. Raises ``MountError`` for an
    unusable mountpoint.
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    cache = GlobalCache(Path(os.path.abspath(cache.root)))
    check_mountpoint(mountpoint)
    if not foreground:
        _spawn_daemon(cache, mountpoint, allow_other=allow_other, msb_db=msb_db, links=links)
        if ready is not None:
            ready()
        return
    if log_target is None:
        log_target = JOURNAL if under_systemd() else "stderr"
    ops = ViewOperations(cache, msb_db, log_target=log_target, links=links)
    trio.run(_serve, ops, mountpoint, fuse_options(allow_other), ready, stopping)


async def _serve(ops: ViewOperations, mountpoint: Path, options: set[str],
                 ready: Callable[[], None] | None,
                 stopping: Callable[[], None] | None = None) -> None:
    import pyfuse3

    try:
        pyfuse3.init(ops, str(mountpoint), options)
    except RuntimeError as err:
        raise MountError(f"cannot mount {mountpoint}: {err}",
                         hint="is /dev/fuse available and are you allowed to mount?") from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope)
            nursery.start_soon(ops.refresh_loop)

            async def serve() -> None:
                await pyfuse3.main()
                nursery.cancel_scope.cancel()  # unmounted from outside

            nursery.start_soon(serve)
            # In a thread: this looks at the mount, which needs main() running. The stat
            # returns once the kernel's INIT is answered, which resets the readahead.
            await trio.to_thread.run_sync(os.stat, mountpoint)
            await trio.to_thread.run_sync(_raise_readahead, mountpoint)
            log.info("serving %s at %s", ops.cache.root, mountpoint)
            if ready is not None:
                await trio.to_thread.run_sync(ready)
    finally:
        if stopping is not None:
            try:
                stopping()
            except Exception as err:  # a notification must never block the unmount
                log.warning("stopping notification failed: %s", err)
        with trio.CancelScope(shield=True):
            pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


def _raise_readahead(mountpoint: Path, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel read ahead 1 MiB per FUSE request instead of 128 KiB.

    FUSE caps readahead at the kernel's 128 KiB default; a VMM streaming rootfs.img pays a
    Python round trip per request, so bigger requests roughly quadruple throughput. The
    knob is the mount's BDI in sysfs (root only); failure just leaves the default.
    """
    target = os.path.join(os.path.realpath(mountpoint.parent), mountpoint.name)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if _unescape_mount_path(fields[4]) == target:
                    Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb").write_text(f"{kib}\n")
                    return
    except OSError as err:
        log.info("cannot raise readahead on %s (%s); keeping the default", mountpoint, err)


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received signal %d, unmounting", signum)
            scope.cancel()
            return


def _spawn_daemon(cache: GlobalCache, mountpoint: Path, *, allow_other: bool,
                  msb_db: Path | None, links: bool = False) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "cachefs.view.daemon", "--cache", str(cache.root),
           str(mountpoint)]
    if allow_other:
        cmd.append("--allow-other")
    if links:
        cmd.append("--symlinks")
    if msb_db is not None:
        cmd += ["--msb-db", str(msb_db)]
    log_file = None if under_systemd() else log_path(mountpoint)
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    # stderr is read only if the start fails: before READY_LINE the daemon writes little
    # (its reason, fusermount3's message), far below a pipe's buffer; after it, the
    # daemon points its stderr at the log file.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()  # the daemon prints READY_LINE or exits
    if line.strip() != READY_LINE:
        try:
            _, err = proc.communicate(timeout=_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise MountError(
            f"the view daemon for {mountpoint} failed to start (exit {proc.returncode}): "
            f"{_reason(err)}",
            hint=None if log_file is None else f"its log: {log_file}")
    proc.stdout.close()
    proc.stderr.close()
    return proc


def _reason(stderr: str, limit: int = 2000) -> str:
    """The child's stderr as one line (bounded): its own message and fusermount3's."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    text = "; ".join(dict.fromkeys(lines)) or "no message"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def umount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount the view; ``lazy`` (or a crashed daemon's stale mount) uses ``-z``."""
    mountpoint = Path(mountpoint)
    if not is_mountpoint(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    cmd = [_fusermount(), "-u", *(["-z"] if lazy else []), str(mountpoint)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return
    if not lazy and "not connected" in proc.stderr:
        subprocess.run([_fusermount(), "-u", "-z", str(mountpoint)], check=False,
                       capture_output=True)
        if not is_mountpoint(mountpoint):
            return
    raise MountError(f"cannot unmount {mountpoint}: {proc.stderr.strip()}",
                     hint="files may be in use; try a lazy unmount (-z)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachefs.view.daemon",
                                     description="Serve the cachefs view of an msb cache.")
    parser.add_argument("--cache", required=True, type=Path, help="the cache/ directory")
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--msb-db", type=Path, default=None)
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--symlinks", action="store_true",
                        help="fsmeta.erofs and layers/* as symlinks into the cache")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="log here once ready (until then, also to stderr)")
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    early = stderr_handler()
    root.addHandler(early)
    log_target = JOURNAL if under_systemd() else "stderr"
    if args.log_file is not None:
        try:
            root.addHandler(open_log_file(args.log_file))
            log_target = str(args.log_file)
        except OSError as err:
            log.warning("cannot log to %s (%s): logging to stderr", args.log_file, err)
            args.log_file = None

    def ready() -> None:
        print(READY_LINE, flush=True)
        if args.log_file is not None:
            root.removeHandler(early)  # the parent stops reading stderr now
            detach_stderr(args.log_file)

    try:
        mount(GlobalCache(Path(os.path.abspath(args.cache))), args.mountpoint,
              allow_other=args.allow_other, msb_db=args.msb_db, ready=ready,
              log_target=log_target, links=args.symlinks)
    except CachefsError as err:
        log.error("%s", err.one_line())  # to stderr (the parent) and the log file
        return err.exit_code
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
