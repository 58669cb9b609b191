"""A pull loads only what a pull needs (issue 15).

Every module a pull imports is CPU time on one core before the first byte of a layer (or
after the last), on the critical path of every ``cachefs pull``. The check is on the
modules a fresh interpreter has loaded once a real pull from a real registry finished,
not on a time: it holds on a busy machine and fails the day a module-level import drags
a heavy module back onto the pull path.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.images import TestImage, layer_tar, reg
from tests.fixtures.registry import LocalRegistry, oci_layout, registry_factory  # noqa: F401

pytestmark = pytest.mark.system

# Not needed by a pull into a cache without msb's database: pydantic's validators
# (~60 ms of start-up), importlib.metadata (package metadata scans), msb's database
# (sqlite3), the archive reader (tarfile), pushing, the CLI's renderers, the view.
NOT_FOR_A_PULL = ("pydantic", "pydantic_core", "importlib.metadata", "sqlite3",
                  "cachefs.cache.msb_db", "cachefs.cache.index", "tarfile",
                  "cachefs.oci.archive", "cachefs.share.push", "rich", "click",
                  "cachefs.maintenance", "cachefs.view")

_PROBE = """
import sys
from pathlib import Path

import trio

from cachefs.cache import GlobalCache
from cachefs.pipeline.pull import pull


async def main() -> None:
    await pull(GlobalCache.new(Path(sys.argv[1])), sys.argv[2], insecure=True)

trio.run(main)
print(" ".join(sorted(m for m in {names!r} if m in sys.modules)))
"""

IMAGE = TestImage([layer_tar([reg("etc/os-release", b"ID=imports\n"), reg("bin/sh", b"sh")])])


def _loaded_after_pull(cache: Path, ref: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(names=NOT_FOR_A_PULL), str(cache), ref],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return proc.stdout.split()


@pytest.fixture
def pushed_ref(registry_factory: Callable[..., LocalRegistry],  # noqa: F811
               tmp_path: Path) -> str:
    registry = registry_factory()
    registry.push_oci_layout(oci_layout(IMAGE, tmp_path / "layout").path, "app/imports", "v1")
    return f"{registry.host}/app/imports:v1"


def test_a_pull_loads_none_of_the_modules_it_does_not_need(pushed_ref: str,
                                                          tmp_path: Path) -> None:
    cache = tmp_path / "home" / "cache"
    assert _loaded_after_pull(cache, pushed_ref) == []
    assert (cache / "manifests").is_dir() and any((cache / "fsmeta").iterdir())


def test_the_probe_sees_msb_database_writer_when_there_is_one(pushed_ref: str,
                                                              tmp_path: Path) -> None:
    """The probe itself works: with msb's database beside the cache, the pull records the
    image there, which loads sqlite3 and the writer."""
    cache = tmp_path / "home" / "cache"
    (cache.parent / "db").mkdir(parents=True)
    (cache.parent / "db" / "msb.db").write_bytes(b"")
    loaded = _loaded_after_pull(cache, pushed_ref)
    assert "sqlite3" in loaded and "cachefs.cache.msb_db" in loaded
