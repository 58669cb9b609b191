"""The units as shipped, run by a real systemd (PID 1 of a private namespace).

What `tests/cli/test_systemd.py` can only imitate (a notify socket played by the test),
these tests get from systemd itself: it starts the daemon, waits for READY=1, orders other
units after it, stops it with SIGTERM, restarts it after a crash, and runs the user unit
in a user's own manager.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from tests.service.conftest import SYSTEM_REF, USER, USER_REF
from tests.service.machine import Machine

MNT = "/mnt/cachefs"
UNIT = "cachefs.service"


def _state(m: Machine, *, user: str | None = None) -> dict[str, str]:
    return m.unit(UNIT, "ActiveState", "SubState", "Result", "MainPID", "NRestarts",
                  "ExecMainStatus", "ExecMainCode", "StatusText", user=user)


def _fuse_mounts_at(m: Machine, where: str) -> list[str]:
    return [opts for point, fstype, opts in m.mounts()
            if point == where and fstype.startswith("fuse")]


def _journal(m: Machine, pid: str) -> list[str]:
    """The unit's journal lines written by process ``pid``."""
    m.run("journalctl", "--sync")
    out = m.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
    return [entry.get("MESSAGE", "") for entry in map(json.loads, out.splitlines())
            if entry.get("_PID") == pid and isinstance(entry.get("MESSAGE"), str)]


def _cursor(m: Machine) -> str:
    """Where the journal ends now: later reads see only what happened after."""
    m.run("journalctl", "--sync")
    out = m.run("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
    return out.strip().rsplit("-- cursor: ", 1)[1]


def _systemd_journal(m: Machine, after: str) -> str:
    m.run("journalctl", "--sync")
    return m.run("journalctl", "-u", UNIT, "-o", "cat", "--no-pager",
                 f"--after-cursor={after}").stdout


@pytest.fixture
def system(machine: Machine) -> Iterator[Machine]:
    """Each test starts with the system unit stopped and its failure record cleared."""
    machine.run("systemctl", "stop", UNIT)
    machine.run("systemctl", "reset-failed", UNIT, check=False)
    yield machine
    machine.run("systemctl", "stop", UNIT)
    machine.run("systemctl", "reset-failed", UNIT, check=False)
    assert not _fuse_mounts_at(machine, MNT)


def test_install_systemd_installed_a_venv_of_its_own(machine: Machine) -> None:
    link = machine.run("readlink", "-f", "/usr/local/bin/cachefs").stdout.strip()
    assert link == "/opt/cachefs/bin/cachefs"
    # Nothing of the checkout is needed at run time: the package lives in the venv.
    where = machine.run("/opt/cachefs/bin/python", "-c",
                        "import cachefs; print(cachefs.__file__)", env={"PWD": "/"}).stdout
    assert where.startswith("/opt/cachefs/lib/"), where
    # The shared cache's home: setgid, group cachefs, not world-readable.
    stat = machine.run("stat", "-c", "%a %U %G", "/var/lib/cachefs").stdout.split()
    assert stat == ["2750", "root", "cachefs"]
    # Another user can run the installed CLI (the venv is readable by all).
    machine.run("cachefs", "--version", user=USER)


def test_the_shared_cache_is_readable_by_group_cachefs_only(machine: Machine) -> None:
    machine.run("useradd", "--create-home", "--user-group", "--groups", "cachefs", "vmm")
    shared = {"CACHEFS_CACHE_DIR": "/var/lib/cachefs/cache"}
    images = machine.run("cachefs", "images", "--json", user="vmm", env=shared)
    assert SYSTEM_REF in images.stdout
    refused = machine.run("cachefs", "images", user=USER, env=shared, check=False)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr and "Traceback" not in refused.stderr


def test_start_is_ready_only_when_the_view_answers(system: Machine) -> None:
    m = system
    m.run("systemctl", "start", UNIT, timeout=120)  # returns once systemd has READY=1
    # Nothing is waited for here: READY=1 promised a live mount.
    listing = m.run("ls", f"{MNT}/images/{SYSTEM_REF}").stdout.split()
    assert "disk.vmdk" in listing and "rootfs.img" in listing
    state = _state(m)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert state["StatusText"] == f"serving /var/lib/cachefs/cache at {MNT}"
    status = m.run("systemctl", "status", UNIT, "--no-pager", check=False).stdout
    assert f'Status: "serving /var/lib/cachefs/cache at {MNT}"' in status
    # The README's health check, with the installed CLI.
    health = m.run("cachefs", "status", "--mountpoint", MNT)
    assert f"view at {MNT}" in health.stdout
    [opts] = _fuse_mounts_at(m, MNT)
    assert "allow_other" in opts
    # The daemon's own log lines reach the journal (-v in ExecStart).
    lines = _journal(m, state["MainPID"])
    assert any(MNT in line for line in lines), lines


def test_a_unit_ordered_after_it_finds_the_view_mounted(system: Machine) -> None:
    m = system
    probe = m.path("/etc/systemd/system/vmm-probe.service")
    probe.write_text(
        "[Unit]\nRequires=cachefs.service\nAfter=cachefs.service\n"
        "[Service]\nType=oneshot\n"
        f"ExecStart=/bin/sh -c 'stat -f -c %%T {MNT} > /run/probe.out; "
        f"cat \"{MNT}/images/{SYSTEM_REF}/status\" >> /run/probe.out'\n")
    try:
        m.run("systemctl", "daemon-reload")
        # Starting the probe pulls cachefs in; the probe runs only after READY=1.
        m.run("systemctl", "start", "vmm-probe.service", timeout=120)
        fstype, status = m.run("cat", "/run/probe.out").stdout.split()
        assert fstype.startswith("fuse")
        assert status == "ready"
    finally:
        probe.unlink()
        m.run("systemctl", "daemon-reload")


def test_stop_unmounts_cleanly_and_leaves_the_unit_inactive(system: Machine) -> None:
    m = system
    m.run("systemctl", "start", UNIT, timeout=120)
    pid = _state(m)["MainPID"]
    # systemd logs the notifications it accepts at debug level.
    m.run("systemctl", "log-level", "debug")
    cursor = _cursor(m)
    try:
        m.run("systemctl", "stop", UNIT, timeout=120)
    finally:
        m.run("systemctl", "log-level", "info")
    state = _state(m)
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
    assert not _fuse_mounts_at(m, MNT)
    journal = _systemd_journal(m, cursor)
    # STOPPING=1 accepted from the main process (NotifyAccess=main), then exit 0.
    assert f"Got notification message from PID {pid} (STOPPING=1" in journal, journal[-3000:]
    assert "Main process exited, code=exited, status=0/SUCCESS" in journal, journal[-3000:]
    assert "Failed with result" not in journal
    # The daemon unmounted itself (ExecStopPost had nothing left to detach).
    assert any(f"unmounted {MNT}" in line for line in _journal(m, pid))


def test_kill_9_is_restarted_on_a_fresh_mount(system: Machine) -> None:
    m = system
    m.run("systemctl", "start", UNIT, timeout=120)
    before = _state(m)
    os.kill(m.host_pid(before["MainPID"]), signal.SIGKILL)  # a crash, from outside

    def restarted() -> bool:
        s = _state(m)
        return (s["NRestarts"] != before["NRestarts"] and s["ActiveState"] == "active"
                and s["SubState"] == "running")

    m.wait_for("cachefs.service to be restarted", restarted, timeout=120)
    after = _state(m)
    assert after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    # ExecStopPost detached the dead mount: exactly one (live) mount, no corpse beneath.
    assert len(_fuse_mounts_at(m, MNT)) == 1
    listing = m.run("ls", f"{MNT}/images/{SYSTEM_REF}").stdout.split()
    assert "disk.vmdk" in listing
    assert m.run("cat", f"{MNT}/images/{SYSTEM_REF}/status").stdout.strip() == "ready"


def test_user_unit_serves_the_users_own_cache(machine: Machine) -> None:
    m = machine
    uid = m.run("id", "-u", USER).stdout.strip()
    mnt = f"/home/{USER}/cachefs"
    m.run("systemctl", "start", f"user@{uid}.service", timeout=120)
    try:
        m.run("systemctl", "--user", "start", UNIT, user=USER, env=m.user_env(USER),
              timeout=120)
        state = _state(m, user=USER)
        assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
        listing = m.run("ls", f"{mnt}/images/{USER_REF}", user=USER).stdout.split()
        assert "disk.vmdk" in listing
        # Her own cache, not the system one.
        names = m.run("ls", f"{mnt}/images/example.com/service", user=USER).stdout.split()
        assert names == [USER_REF.rsplit("/", 1)[1]]
        [opts] = _fuse_mounts_at(m, mnt)
        assert f"user_id={uid}" in opts
        m.run("systemctl", "--user", "stop", UNIT, user=USER, env=m.user_env(USER),
              timeout=120)
        state = _state(m, user=USER)
        assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state
        assert not _fuse_mounts_at(m, mnt)
    finally:
        m.run("systemctl", "stop", f"user@{uid}.service", timeout=120)
