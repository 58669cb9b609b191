"""One booted systemd for the service tests, with cachefs installed by `make install-systemd`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg
from tests.fixtures.system import require_fuse, system_fixture
from tests.service.machine import Machine, checkout_files, debian_root, wheelhouse

CHECKOUT = Path(__file__).resolve().parents[2]
SYSTEM_REF = "example.com/service/system:1"
USER_REF = "example.com/service/user:1"
USER = "alice"
WHEELS_INSIDE = "/var/cache/cachefs-wheels"
SOURCE_INSIDE = "/usr/src/cachefs"


def _image(name: str) -> TestImage:
    return TestImage([layer_tar([dir_("etc"), reg("etc/hostname", name.encode() + b"\n")]),
                      layer_tar([reg(f"{name}.txt", name.encode() * 1000)])],
                     config={"Cmd": ["/bin/sh"]})


@pytest.fixture(scope="module")
@system_fixture
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """systemd booted over today's Debian root; cachefs installed the documented way.

    Inside it: ``make install-systemd`` from a copy of this checkout (offline, from a
    wheelhouse), an image loaded into the system cache ``/var/lib/cachefs/cache`` by the
    installed CLI the way msb would share it (``MSB_HOME=/var/lib/cachefs``), and a user
    ``alice`` with an image of her own in ``~/.microsandbox/cache``.
    """
    require_fuse()
    lower = debian_root()
    wheels = wheelhouse(CHECKOUT)
    scratch = tmp_path_factory.mktemp("machine")
    m = Machine(lower, scratch)
    try:
        m.boot()
        m.copy_in(CHECKOUT, SOURCE_INSIDE, checkout_files(CHECKOUT))
        m.copy_in(wheels, WHEELS_INSIDE)
        m.run("make", "-C", SOURCE_INSIDE, "install-systemd",
              f"PIP_INSTALL_ARGS=--no-index --find-links {WHEELS_INSIDE}", timeout=600)
        archives = scratch / "archives"
        archives.mkdir()
        m.copy_in(docker_archive(_image("system"), [SYSTEM_REF], archives / "system.tar"),
                  "/tmp/system.tar")
        m.copy_in(docker_archive(_image("user"), [USER_REF], archives / "user.tar"),
                  "/tmp/user.tar")
        m.run("cachefs", "load", "/tmp/system.tar", env={"MSB_HOME": "/var/lib/cachefs"})
        m.run("useradd", "--create-home", "--user-group", USER)
        m.run("cachefs", "load", "/tmp/user.tar", user=USER)
        yield m
    finally:
        survivors = m.kill()
    assert not survivors, f"processes outlived the machine: {survivors}"
