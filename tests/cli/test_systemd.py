"""The units as systemd reads them, and the daemon as systemd runs it (Type=notify)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from cachefs import sdnotify
from cachefs.view.daemon import is_mountpoint
from tests.cli.conftest import CACHEFS, REF_A, LoadedCache, assert_one_line_error, run
from tests.fixtures.system import require_fuse, require_root, require_tool

UNITS = Path(__file__).resolve().parents[2] / "systemd"
# Options that give the service a private mount namespace: its FUSE mount would be
# invisible to the host.
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
               "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
               "ProtectControlGroups", "ReadOnlyPaths", "InaccessiblePaths", "ReadWritePaths",
               "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "MountFlags",
               "RootDirectory", "RootImage", "ProtectProc", "PrivateUsers")


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _defaults() -> dict[str, str]:
    out = {}
    for line in (UNITS / "cachefs.default").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("name", ["cachefs.service", "cachefs-user.service"])
def test_units_are_notify_services_without_a_private_mount_namespace(name: str) -> None:
    d = _directives(UNITS / name)
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    [exec_start] = d["ExecStart"]
    assert " mount --create --foreground --notify " in exec_start
    assert "${CACHEFS_MOUNTPOINT}" in exec_start and "$CACHEFS_OPTIONS" in exec_start
    assert not [k for k in d if k in NAMESPACING]
    if name == "cachefs.service":
        assert d["EnvironmentFile"] == ["-/etc/default/cachefs"]
        assert d["NoNewPrivileges"] == ["yes"]
        # ProtectClock= closes the device cgroup; the mount needs /dev/fuse.
        assert "/dev/fuse rw" in d.get("DeviceAllow", [])
    else:
        # fusermount3 is setuid: nothing that sets or implies NoNewPrivileges (systemd
        # implies it for these in a manager without CAP_SYS_ADMIN).
        implies_nnp = ("NoNewPrivileges", "LockPersonality", "RestrictAddressFamilies",
                       "RestrictRealtime", "RestrictNamespaces", "RestrictSUIDSGID",
                       "SystemCallArchitectures", "SystemCallFilter", "MemoryDenyWriteExecute",
                       "ProtectClock", "ProtectHostname", "DynamicUser")
        assert not [k for k in d if k in implies_nnp]


def test_defaults_file_sets_what_the_unit_reads() -> None:
    defaults = _defaults()
    assert set(defaults) == {"CACHEFS_CACHE_DIR", "CACHEFS_MOUNTPOINT", "CACHEFS_OPTIONS"}
    unit = (UNITS / "cachefs.service").read_text()
    for key in defaults:
        assert key in unit


@pytest.mark.system
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """ExecStart must exist for verify: in a private mount namespace, /usr/local/bin gets a
    tmpfs holding the link `make install-systemd` creates (the host is left alone)."""
    require_root()
    analyze = require_tool("systemd-analyze")
    unshare = require_tool("unshare")
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    user_unit = runtime / "cachefs.service"  # installed under this name
    user_unit.write_text((UNITS / "cachefs-user.service").read_text())
    script = (
        "set -e; mount -t tmpfs tmpfs /usr/local/bin; "
        f"ln -s {shlex.quote(CACHEFS)} /usr/local/bin/cachefs; "
        f"{analyze} verify {shlex.quote(str(UNITS / 'cachefs.service'))}; "
        f"XDG_RUNTIME_DIR={shlex.quote(str(runtime))} "
        f"{analyze} --user verify {shlex.quote(str(user_unit))}"
    )
    proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cachefs" not in proc.stderr, proc.stderr


def _exec_start(cache: Path, mountpoint: Path) -> list[str]:
    """The unit's ExecStart with systemd's expansion: ${X} stays one word, $X splits."""
    [line] = _directives(UNITS / "cachefs.service")["ExecStart"]
    env = {**_defaults(), "CACHEFS_CACHE_DIR": str(cache), "CACHEFS_MOUNTPOINT": str(mountpoint)}
    argv: list[str] = []
    for word in line.split():
        if m := re.fullmatch(r"\$([A-Z_]+)", word):
            argv += env[m.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], word))
    assert argv[0] == "/usr/local/bin/cachefs"
    return [CACHEFS, *argv[1:]]


def test_plays_systemd_ready_stopping_and_clean_unmount(loaded: LoadedCache,
                                                       tmp_path: Path) -> None:
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        proc = subprocess.Popen(_exec_start(loaded.root, mountpoint), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready = sock.recv(4096).decode()
            assert ready.splitlines()[0] == "READY=1", ready
            # READY=1 means live: the view answers at once.
            assert is_mountpoint(mountpoint)
            image_dir = mountpoint / "images" / REF_A
            assert "disk.vmdk" in os.listdir(image_dir)
            assert (image_dir / "fsmeta.erofs").read_bytes() == loaded.fsmeta(REF_A).read_bytes()
            status = run(loaded.root, "status", "--mountpoint", str(mountpoint))
            assert status.returncode == 0 and f"source:    view at {mountpoint}" in status.stdout
            proc.send_signal(signal.SIGTERM)
            stopping = sock.recv(4096).decode()
            assert stopping.splitlines()[0] == "STOPPING=1", stopping
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert proc.returncode == 0, err
    assert not is_mountpoint(mountpoint)
    assert "Traceback" not in err


def test_sdnotify_paths_and_the_abstract_namespace(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", environ={}) is False
    name = f"cachefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"READY=1"
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(100) == b"STOPPING=1"
    # A vanished socket is not an error for the daemon.
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_status_with_a_mountpoint_fails_when_no_view_answers_there(loaded: LoadedCache,
                                                                   tmp_path: Path) -> None:
    """The README's health check must not fall back to computing the status from the cache:
    nothing mounted, or a view whose daemon died, is a failure with a one-line reason."""
    require_fuse()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    line = assert_one_line_error(run(loaded.root, "status", "--mountpoint", str(mountpoint)), 13)
    assert f"no cachefs view is mounted at {mountpoint}" in line
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        proc = subprocess.Popen(_exec_start(loaded.root, mountpoint),
                                env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert sock.recv(4096).decode().startswith("READY=1")
            assert run(loaded.root, "status", "--mountpoint", str(mountpoint)).returncode == 0
            proc.kill()  # the daemon dies; the kernel keeps a dead mount
            proc.wait()
            line = assert_one_line_error(
                run(loaded.root, "status", "--mountpoint", str(mountpoint)), 13)
            assert f"the view at {mountpoint} is dead" in line
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert not is_mountpoint(mountpoint)
