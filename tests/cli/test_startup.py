"""The CLI's start-up imports only what the command needs (issue 15).

``cachefs --version`` or ``--help`` once paid ~0.25 s of imports (trio, httpx, pydantic,
the cache store) before printing a line. The check is on the modules a fresh interpreter
has loaded, not on a time, so it holds on a busy machine and fails the day a module-level
import drags the heavy libraries back in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("trio", "httpx", "httpcore", "pydantic", "cachefs.cache.store",
         "cachefs.pipeline.pull")

_PROBE = """
import sys
from click.testing import CliRunner
from cachefs.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
assert result.exit_code == 0, result.output
print(" ".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _loaded_after(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return proc.stdout.split()


def test_version_and_help_load_no_heavy_module() -> None:
    assert _loaded_after("--version") == []
    assert _loaded_after("--help") == []


def test_package_metadata_is_read_only_for_version() -> None:
    """``importlib.metadata`` (~25 ms with the lookup) once ran for every command."""
    probe = _PROBE.replace("{heavy!r}", repr(("importlib.metadata",)))
    def loaded(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=60, check=True)
        return proc.stdout.split()
    assert loaded("--help") == []
    assert loaded("--version") == ["importlib.metadata"]


def test_the_probe_sees_a_heavy_import(tmp_path: Path) -> None:
    """The probe itself works: a command that reads the cache does load the store."""
    loaded = _loaded_after("--cache", str(tmp_path), "images", "--json")
    assert "cachefs.cache.store" in loaded


def test_images_lists_a_cache_without_the_event_loop_or_the_network_stack(
        tmp_path: Path) -> None:
    """``cachefs images`` reads files: trio (~60 ms, once loaded by the lock module),
    httpx and sqlite3 (when msb's database is absent), and the layer builders stay out
    of its start-up."""
    from cachefs.cache import GlobalCache
    from cachefs.models import CachedImageMetadata
    from tests.test_models import WH1

    cache = GlobalCache.new(tmp_path / "cache")
    cache.write_image_metadata("docker.io/library/listed:1",
                               CachedImageMetadata.from_json_bytes(WH1))
    names = ("trio", "httpx", "httpcore", "pydantic", "sqlite3", "cachefs.cache.store",
             "cachefs.cache.health", "cachefs.pipeline.materialize", "cachefs.erofs.writer",
             "cachefs.ingest.layer")
    probe = _PROBE.replace("{heavy!r}", repr(names))
    proc = subprocess.run([sys.executable, "-c", probe, "--cache", str(cache.root), "images",
                           "--json"], capture_output=True, text=True, timeout=60, check=True)
    # the store and the health check did run (the image was listed), nothing heavier
    assert proc.stdout.split() == ["cachefs.cache.health", "cachefs.cache.store"]
