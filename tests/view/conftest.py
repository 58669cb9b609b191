"""Fixtures for the view: msb-filled caches and a real FUSE mount in a daemon subprocess."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.view.daemon import READY_LINE
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg, symlink
from tests.fixtures.system import Msb, missing, require_fuse, require_root, require_tool
from tests.fixtures.view_daemon import stop_daemon

START_DEADLINE_S = 20.0
DAEMON_LOG_LINES = 60  # of its stderr, printed when the test using a mount fails


# How long a change in the cache may take to show in the view before a test fails. A bound
# for failures only: every wait ends the moment its condition holds, so a loaded machine
# slows the tests down instead of failing them, and no test asserts a refresh period.
REFRESH_DEADLINE_S = 60.0


def wait_for(predicate: Callable[[], bool], timeout: float = REFRESH_DEADLINE_S,
             step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (bounded; not a sleep-as-sync)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def image_one() -> TestImage:
    """One layer: a small tree."""
    return TestImage(
        [layer_tar([dir_("etc"), reg("etc/motd", b"hello from one\n"),
                    symlink("etc/link", "motd")])],
        config={"Cmd": ["/bin/sh"], "Env": ["A=1"]},
    )


def image_three() -> TestImage:
    """Three layers, one file overwritten and one bigger than a block."""
    return TestImage(
        [
            layer_tar([dir_("data"), reg("data/a.txt", b"a1\n"), reg("data/keep", b"k\n")]),
            layer_tar([reg("data/a.txt", b"a2 overwritten\n"),
                       reg("data/big.bin", bytes(range(256)) * 64)]),
            layer_tar([dir_("srv"), reg("srv/top", b"top layer\n")]),
        ],
        config={"Entrypoint": ["/srv/top"], "Labels": {"x": "y"}},
    )


def image_two() -> TestImage:
    return TestImage([layer_tar([reg("two.txt", b"second image\n")]),
                      layer_tar([reg("more.txt", b"more\n")])])


def load(msb: Msb, tmp: Path, image: TestImage, tags: list[str], name: str) -> None:
    msb.load(docker_archive(image, tags, tmp / f"{name}.tar"))


@dataclass
class ViewMount:
    mnt: Path
    proc: subprocess.Popen[str]
    stderr_lines: list[str]

    def image_dir(self, ref: str) -> Path:
        return self.mnt / "images" / ref

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def view_mount(cache: Path, mnt: Path, *, msb_db: Path | None = None,
               allow_other: bool = False) -> Iterator[ViewMount]:
    """Run ``python -m cachefs.view.daemon`` and wait for its ready line; always unmount."""
    require_fuse()
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cachefs.view.daemon", "--cache", str(cache), str(mnt)]
    if msb_db is not None:
        cmd += ["--msb-db", str(msb_db)]
    if allow_other:
        cmd.append("--allow-other")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    err_lines: list[str] = []
    ready = threading.Event()

    def pump_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == READY_LINE:
                ready.set()

    def pump_err() -> None:
        assert proc.stderr is not None
        err_lines.extend(proc.stderr)

    threads = [threading.Thread(target=pump_out, daemon=True),
               threading.Thread(target=pump_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        if not wait_for(lambda: ready.is_set() or proc.poll() is not None, START_DEADLINE_S):
            raise AssertionError("view daemon did not become ready")
        if not ready.is_set():
            threads[1].join(2)
            raise AssertionError(f"view daemon exited {proc.returncode}: {''.join(err_lines)}")
        try:
            yield ViewMount(mnt, proc, err_lines)
        except BaseException:
            # The daemon's own account of a failure (its warnings: a rescan that could not
            # read msb's database, a disk file it could not open) is in the test's report.
            stop_daemon(proc, mnt)
            threads[1].join(2)
            print("view daemon's log:\n" + "".join(err_lines[-DAEMON_LOG_LINES:]))
            raise
    finally:
        stop_daemon(proc, mnt)


@pytest.fixture
def mounted(msb: Msb, tmp_path: Path) -> Iterator[ViewMount]:
    """A cache with a 1-layer image (two tags) and a 3-layer image, mounted."""
    load(msb, tmp_path, image_one(), ["one:1", "127.0.0.1:5000/team/one:latest"], "one")
    load(msb, tmp_path, image_three(), ["three:v3"], "three")
    with view_mount(msb.cache, tmp_path / "mnt") as vm:
        yield vm


OTHER_USER = "nobody"


@dataclass
class OtherUser:
    """Run commands as an unprivileged user, as libvirt runs QEMU (``setpriv``, no PAM).

    ``python`` is an interpreter that user may execute (the venv's lives under /root) with
    this checkout and its site-packages on ``PYTHONPATH``, for running cachefs itself.
    """

    name: str
    uid: int
    gid: int
    python: str
    pythonpath: str

    def argv(self, *cmd: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", *cmd]

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CACHEFS_CACHE_DIR", "MSB_HOME", "XDG_STATE_HOME")}
        env.update(HOME=str(home), PYTHONPATH=self.pythonpath)
        return env

    def run(self, *cmd: str, home: Path, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*cmd), capture_output=True, text=True,
                              env=self.env(home), timeout=timeout, cwd="/")

    def cachefs(self, *args: str, home: Path, timeout: float = 120.0
                ) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "cachefs.cli", *args, home=home, timeout=timeout)


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    return find_other_user()


def find_other_user() -> OtherUser:
    """``nobody`` with a Python it can run this checkout with (fails under
    CACHEFS_REQUIRE_SYSTEM=1 when there is none)."""
    import pwd
    import sysconfig

    require_root()
    require_tool("setpriv")
    try:
        pw = pwd.getpwnam(OTHER_USER)
    except KeyError:
        missing(f"user {OTHER_USER}")
    repo = str(Path(__file__).resolve().parents[2])
    pythonpath = f"{sysconfig.get_paths()['purelib']}:{sysconfig.get_paths()['platlib']}:{repo}"
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = shutil.which(minor, path="/usr/local/bin:/usr/bin:/bin") or minor
    user = OtherUser(OTHER_USER, pw.pw_uid, pw.pw_gid, system_python, pythonpath)
    probe = user.run(user.python, "-c", "import cachefs.cli, pyfuse3", home=Path("/"))
    if probe.returncode != 0:
        missing(f"a {minor} that user {OTHER_USER} can run with this checkout: "
                f"{probe.stderr.strip()[-300:]}")
    return user


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with shared_tmpdir() as path:
        yield path


@contextlib.contextmanager
def shared_tmpdir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are root-only): for
    mountpoints and outputs of the other user. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cachefs-shared-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def artifacts(cache: Path, ref: str) -> list[Path]:
    """fsmeta then layers, bottom first: the disk's byte order."""
    from cachefs.cache.store import GlobalCache

    gc = GlobalCache(cache)
    meta = gc.read_image_metadata(ref)
    assert meta is not None
    return [gc.fsmeta_erofs_path(meta.manifest_digest),
            *(gc.layer_erofs_path(d) for d in meta.diff_ids)]


def concat(paths: list[Path]) -> bytes:
    return b"".join(p.read_bytes() for p in paths)


def write_concat(paths: list[Path], out: Path) -> Path:
    out.write_bytes(concat(paths))
    return out


__all__ = ["OtherUser", "ViewMount", "concat", "image_one", "image_three", "image_two", "load",
           "view_mount", "wait_for", "write_concat"]
