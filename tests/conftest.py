from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.system import Msb, msb_binary


@pytest.fixture
def msb(tmp_path: Path) -> Msb:
    """A real msb 0.7.11 with a private HOME under the test's tmp dir."""
    return Msb(msb_binary(), tmp_path / "msbhome")
