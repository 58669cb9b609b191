"""A real systemd as PID 1 of a private PID namespace: where the units are tested.

The units' promises (``Type=notify``, ``NotifyAccess=main``, ``ExecStopPost=``,
``Restart=on-failure``, ``KillMode=``, the user unit) only mean something under systemd
itself, and this machine has none running (nor a system bus, so ``systemd-nspawn`` is out).
``unshare --pid --fork --mount`` gives systemd a PID namespace of its own and a mount
namespace whose mounts vanish with it; ``chroot`` into a Debian root with systemd, fuse3
and python3 (``mmdebstrap``, cached under ``/var/tmp/cachefs-systemd/`` keyed by date like
the bench inputs) gives it a system to manage. The root is the lower layer of an overlay,
so every run starts from the same pristine tree and writes only to its own upper layer.

The namespace's init ignores SIGTERM (PID 1 has no default handlers): it is stopped with
SIGKILL from outside, which kills every process of the namespace and drops its mounts.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tests.fixtures.system import missing, require_root, require_tool

ROOTS_DIR = Path("/var/tmp/cachefs-systemd")
SUITE = "bookworm"
# systemd and what the units call (fusermount3, mkdir); libpam-systemd gives a user
# manager its $XDG_RUNTIME_DIR; python3-venv and make for `make install-systemd`.
PACKAGES = "systemd,systemd-sysv,libpam-systemd,fuse3,dbus,python3,python3-venv,make"
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 120.0

# Run by `unshare` as the namespace's first process; it becomes systemd.
_BOOT = r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
# No consoles to log in on: gettys would wait 90 s for a tty device that never appears.
ln -sfn /dev/null "$root/etc/systemd/system/getty.target"
ln -sfn /dev/null "$root/etc/systemd/system/serial-getty@.service"
exec chroot "$root" /lib/systemd/systemd --system
"""


def _today() -> str:
    return datetime.date.today().strftime("%Y%m%d")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder at a time: two test runs must not debootstrap into the same place."""
    ROOTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(ROOTS_DIR / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def debian_root() -> Path:
    """Today's pristine root directory, built by mmdebstrap if missing (~20 s, ~260 MB)."""
    require_root()
    mmdebstrap = require_tool("mmdebstrap")
    name = f"{SUITE}-systemd-{_today()}-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]}"
    out = ROOTS_DIR / name
    with _locked("root"):
        if out.is_dir():
            return out
        part = ROOTS_DIR / f"{name}.part"
        shutil.rmtree(part, ignore_errors=True)
        log = ROOTS_DIR / f"{name}.log"
        with log.open("wb") as f:
            proc = subprocess.run(
                [mmdebstrap, "--variant=minbase", "--format=directory",
                 f"--include={PACKAGES}", SUITE, str(part)],
                stdout=f, stderr=subprocess.STDOUT, check=False, timeout=900,
            )
        if proc.returncode != 0:
            shutil.rmtree(part, ignore_errors=True)
            missing(f"a Debian root from mmdebstrap (exit {proc.returncode}, see {log})")
        os.replace(part, out)
        for old in ROOTS_DIR.glob(f"{SUITE}-systemd-*"):  # yesterday's roots and logs
            if old.is_dir() and old != out:
                shutil.rmtree(old, ignore_errors=True)
            elif old.suffix == ".log" and old != log:
                old.unlink(missing_ok=True)
    return out


def wheelhouse(checkout: Path) -> Path:
    """Wheels of cachefs's dependencies (and its build backend) for an offline install.

    The root has no business reaching PyPI while a test runs; the host's pip fetches the
    wheels once a day per dependency list and ``make install-systemd`` installs from them
    with ``--no-index``. cachefs itself is not among them: the target builds the checkout.
    """
    key = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()[:12]
    out = ROOTS_DIR / f"wheels-{_today()}-{key}"
    with _locked("wheels"):
        if out.is_dir():
            return out
        part = ROOTS_DIR / f"{out.name}.part"
        shutil.rmtree(part, ignore_errors=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(part), str(checkout),
             "setuptools>=68", "wheel"],
            capture_output=True, text=True, check=False, timeout=900,
            cwd=ROOTS_DIR,
        )
        if proc.returncode != 0:
            shutil.rmtree(part, ignore_errors=True)
            missing(f"wheels of cachefs's dependencies (pip wheel: {proc.stderr[-300:]})")
        for own in part.glob("cachefs-*.whl"):
            own.unlink()
        os.replace(part, out)
        for old in ROOTS_DIR.glob("wheels-*"):
            if old != out and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return out


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _processes_in(namespace: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_namespace(int(entry)) == namespace:
            out.append(int(entry))
    return out


class Machine:
    """A booted systemd; commands run inside its namespaces and root via ``nsenter``."""

    def __init__(self, lower: Path, scratch: Path) -> None:
        self.lower = lower
        self.scratch = scratch
        self._unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's pid as the host sees it
        self.namespace = ""

    # -- life cycle --------------------------------------------------------------------

    def boot(self) -> None:
        unshare = require_tool("unshare")
        require_tool("nsenter")
        dirs = [self.scratch / d for d in ("upper", "work", "root")]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        log = (self.scratch / "boot.log").open("wb")
        self._unshare = subprocess.Popen(
            [unshare, "--pid", "--fork", "--kill-child", "--mount", "--propagation",
             "private", "sh", "-c", _BOOT, "boot", str(self.lower), *map(str, dirs)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.pid:
            self._check_alive()
            children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
            with contextlib.suppress(OSError):
                for child in children.read_text().split():
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.pid = int(child)
            self._wait_a_little(deadline, "systemd to start")
        self.namespace = _pid_namespace(self.pid) or ""
        # `is-system-running --wait` needs the manager's socket; it appears during boot.
        while True:
            proc = self.run("systemctl", "is-system-running", "--wait", check=False,
                            timeout=BOOT_TIMEOUT_S)
            if proc.stdout.strip() in ("running", "degraded"):
                return
            self._check_alive()
            self._wait_a_little(deadline, f"boot to finish (last: {proc.stdout.strip()!r} "
                                          f"{proc.stderr.strip()!r})")

    def _check_alive(self) -> None:
        assert self._unshare is not None
        if self._unshare.poll() is not None:
            text = (self.scratch / "boot.log").read_text(errors="replace")
            raise AssertionError(f"the namespace died while booting: {text[-2000:]}")

    def _wait_a_little(self, deadline: float, what: str) -> None:
        """Poll interval while waiting for a state only visible by looking."""
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)

    def kill(self) -> list[int]:
        """SIGKILL the namespace from outside; the pids that outlived it (should be none)."""
        if self._unshare is None:
            return []
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self._unshare.send_signal(signal.SIGKILL)
        self._unshare.wait(timeout=60)
        self._unshare = None
        survivors: list[int] = []
        if self.namespace:
            deadline = time.monotonic() + 30
            while (survivors := _processes_in(self.namespace)) and time.monotonic() < deadline:
                time.sleep(0.1)
        return survivors

    # -- inside ------------------------------------------------------------------------

    def run(self, *argv: str, user: str | None = None, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the machine (root, PID and mount namespace), clean environment."""
        home = "/root" if user is None else f"/home/{user}"
        variables = {"PATH": PATH_INSIDE, "HOME": home, "LANG": "C.UTF-8", **(env or {})}
        prefix: list[str] = []
        if user is not None:
            prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        cmd = ["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", "--", *prefix,
               "env", "-i", *(f"{k}={v}" for k, v in variables.items()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the machine, {' '.join(argv)} failed "
                                 f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def host_pid(self, pid: str) -> int:
        """The host's pid of the machine's process ``pid`` (its ``NSpid`` line)."""
        for host in _processes_in(self.namespace):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{host}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == pid:
                        return host
        raise AssertionError(f"no process {pid} in the machine")

    def path(self, inside: str) -> Path:
        """A path of the machine's tree as the host reaches it (through systemd's root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def copy_in(self, source: Path, inside: str, names: Sequence[str] | None = None) -> None:
        """Copy ``source`` (a file, or the listed files of a directory) into the machine."""
        target = self.path(inside)
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            return
        for name in names if names is not None else os.listdir(source):
            dst = target / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dst)

    def unit(self, name: str, *props: str, user: str | None = None) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        cmd = ["systemctl", *(["--user"] if user else []), "show", name,
               *(f"--property={p}" for p in props)]
        out = self.run(*cmd, user=user, env=self.user_env(user)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def user_env(self, user: str | None) -> dict[str, str] | None:
        if user is None:
            return None
        uid = self.run("id", "-u", user).stdout.strip()
        return {"XDG_RUNTIME_DIR": f"/run/user/{uid}"}

    def mounts(self) -> list[tuple[str, str, str]]:
        """(mountpoint, fstype, super options) of every mount in the machine."""
        out = []
        for line in self.run("cat", "/proc/self/mountinfo").stdout.splitlines():
            left, _, right = line.partition(" - ")
            fstype, _source, opts = right.split(" ")[:3]
            out.append((left.split(" ")[4], fstype, opts))
        return out

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        """Poll ``predicate`` until true: unit states change on their own, with no event."""
        deadline = time.monotonic() + timeout
        while not predicate():
            self._wait_a_little(deadline, what)


def checkout_files(checkout: Path) -> list[str]:
    """What `make install-systemd` may read: tracked and new files, not .venv or build/."""
    git = require_tool("git")
    out = subprocess.run([git, "-C", str(checkout), "ls-files", "-co", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.splitlines() if (checkout / name).is_file()]
