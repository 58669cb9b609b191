"""A pull loads only what a pull needs (issue 15).

Every module a pull imports is CPU time on one core before the first byte of a layer (or
after the last), on the critical path of every ``cachefs pull``. The check is on the
modules a fresh interpreter has loaded once a real pull from a real registry finished,
not on a time: it holds on a busy machine and fails the day a module-level import drags
a heavy module back onto the pull path.
"""

from __future__ import annotations

import ast
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


# Who imports a pull's build modules, and when, as the process saw it: an import hook
# notes the thread importing each one and how many requests the client had begun by then
# (its ``send`` wrapped), without any timing.
_ORDER_PROBE = """
import sys
import threading
from pathlib import Path

import trio

from cachefs.cache import GlobalCache
from cachefs.oci._httpx import httpx
from cachefs.pipeline import pull as pull_module

WATCHED = ("cachefs.erofs.writer", "cachefs.pipeline.materialize", "cachefs.ingest.layer",
           "cachefs.pipeline.workers")
sent = []  # the urls of the requests begun so far, in order
seen = {{}}  # module -> (importing thread, requests begun before its import began)


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and name not in seen:
            seen[name] = (threading.current_thread().name, len(sent))
        return None


sys.meta_path.insert(0, Watch())
send = httpx.AsyncClient.send


async def recording_send(self, request, **kw):
    sent.append(str(request.url))
    return await send(self, request, **kw)


httpx.AsyncClient.send = recording_send
if {no_preload!r}:
    pull_module.AFTER_RESOLVE.start = lambda: None


async def main() -> None:
    await pull_module.pull(GlobalCache.new(Path(sys.argv[1])), sys.argv[2], insecure=True)

assert not any(m in sys.modules for m in WATCHED), "loaded before the pull"
if {cli!r}:  # the command line's pull: its own imports, the same order
    from click.testing import CliRunner

    from cachefs.cli import main as cli
    result = CliRunner().invoke(cli, ["--cache", sys.argv[1], "pull", "--insecure", "-q",
                                      sys.argv[2]])
    assert result.exit_code == 0, result.output
else:
    trio.run(main)
print(repr((seen, sent)))
"""


def _import_order(cache: Path, ref: str, *, no_preload: bool = False, cli: bool = False
                  ) -> tuple[dict[str, tuple[str, int]], list[str]]:
    probe = _ORDER_PROBE.format(no_preload=no_preload, cli=cli)
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(cache), ref],
        capture_output=True, text=True, timeout=120, check=True,
    )
    seen, sent = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    return seen, sent


@pytest.mark.parametrize("cli", [False, True], ids=["pull()", "cachefs pull"])
def test_the_build_modules_load_beside_the_first_request_not_before_it(
        pushed_ref: str, tmp_path: Path, cli: bool) -> None:
    """The EROFS writer, ingest and the build pipeline are not imported on the way to the
    first request: the pull's thread never imports them; a thread started as the resolve
    goes out does (its imports overlap the round trips), and the build then uses them."""
    cache = tmp_path / "home" / "cache"
    seen, sent = _import_order(cache, pushed_ref, cli=cli)
    for name in ("cachefs.erofs.writer", "cachefs.pipeline.materialize",
                 "cachefs.ingest.layer", "cachefs.pipeline.workers"):
        assert seen[name][0] == "cachefs-preload", (name, seen)
        # the thread starts only once the resolve waits, and (--insecure: no ping) its
        # first wait is in sending the manifest request
        assert seen[name][1] >= 1, (name, seen, sent)
    assert "/manifests/v1" in sent[0]
    assert any("/blobs/" in url for url in sent)
    assert any((cache / "fsmeta").iterdir())


def test_without_the_preload_thread_the_build_path_imports_what_it_needs(
        pushed_ref: str, tmp_path: Path) -> None:
    """The preload is an optimisation only: with its thread never started, the pull
    imports the same modules itself (on its own thread) and completes."""
    cache = tmp_path / "home" / "cache"
    seen, _ = _import_order(cache, pushed_ref, no_preload=True)
    assert seen["cachefs.erofs.writer"][0] == "MainThread", seen
    assert seen["cachefs.pipeline.materialize"][0] == "MainThread", seen
    assert any((cache / "fsmeta").iterdir()) and (cache / "manifests").is_dir()
