"""Marks every test that needs the system ``system``, so ``pytest -m "not system"``
(``make test-fast``) runs, without root, only tests that need nothing but Python.

A test is ``system`` when it says so (``pytestmark``/``@pytest.mark.system``) or when it
uses, directly or through other fixtures, a fixture declared with
``tests.fixtures.system.system_fixture`` (``msb``, ``registry_factory``, …). A test that is
neither but still reaches for root, a Debian tool or msb fails (see
``tests.fixtures.system.unmarked_test``): the marking cannot silently drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import system
from tests.fixtures.system import Msb, msb_binary, system_fixture


def _uses_system_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(getattr(d.func, "cachefs_system", False)
               for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _uses_system_fixture(item):
            item.add_marker(pytest.mark.system)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Arms the guard of ``tests.fixtures.system`` for an unmarked test, from before its
    first fixture (module-scoped ones included) until after its teardown."""
    marked = item.get_closest_marker("system") is not None
    system.unmarked_test = None if marked else item.nodeid
    try:
        return (yield)
    finally:
        system.unmarked_test = None


@pytest.fixture
@system_fixture
def msb(tmp_path: Path) -> Msb:
    """A real msb 0.7.11 with a private HOME under the test's tmp dir."""
    return Msb(msb_binary(), tmp_path / "msbhome")
