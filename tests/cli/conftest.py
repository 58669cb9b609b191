"""Fixtures for the CLI tests: caches filled by the real msb, and lock holders in other
processes (flock is per open file, so "another process holds it" must be a process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cachefs.cache.store import GlobalCache
from cachefs.cli import main
from cachefs.reference import Reference
from tests.fixtures.images import TestImage, dir_, docker_archive, layer_tar, reg, symlink
from tests.fixtures.system import Msb

CACHEFS = str(Path(sys.executable).parent / "cachefs")
REF_A = "example.com/cli/a:1"
REF_B = "example.com/cli/b:1"

_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "sh" else fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_other_process(path: Path, *, shared: bool = True) -> Iterator[None]:
    """Another process holds flock(LOCK_SH or LOCK_EX) on ``path`` until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), "sh" if shared else "ex"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@dataclass
class LoadedCache:
    """Two images loaded by msb that share their bottom layer."""

    msb: Msb
    cache: GlobalCache
    a: TestImage
    b: TestImage

    @property
    def root(self) -> Path:
        return self.cache.root

    def metadata(self, ref: str):  # type: ignore[no-untyped-def]
        md = self.cache.read_image_metadata(ref)
        assert md is not None
        return md

    def layer(self, diff_id: str) -> Path:
        return self.cache.layer_erofs_path(diff_id)

    def fsmeta(self, ref: str) -> Path:
        return self.cache.fsmeta_erofs_path(self.metadata(ref).manifest_digest)

    def vmdk(self, ref: str) -> Path:
        return self.cache.vmdk_path(self.metadata(ref).manifest_digest)

    def json(self, ref: str) -> Path:
        return self.cache.image_metadata_path(Reference.parse(ref))

    def files(self) -> dict[str, int]:
        """Every regular file under the cache (relative path → size)."""
        out = {}
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                p = Path(dirpath) / name
                out[str(p.relative_to(self.root))] = p.lstat().st_size
        return out


def base_layer() -> bytes:
    return layer_tar([dir_("bin"), dir_("etc"), reg("etc/hostname", b"cachefs\n"),
                      reg("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
                      symlink("bin/t", "tool")])


@pytest.fixture
def loaded(msb: Msb, tmp_path: Path) -> LoadedCache:
    a = TestImage([base_layer(), layer_tar([reg("a.txt", b"a" * 5000)])],
                  config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})
    b = TestImage([base_layer(), layer_tar([dir_("data"), reg("data/b.txt", b"b" * 9000)])])
    msb.load(docker_archive(a, [REF_A], tmp_path / "a.tar"))
    msb.load(docker_archive(b, [REF_B], tmp_path / "b.tar", compress=True))
    return LoadedCache(msb, GlobalCache(msb.cache), a, b)


def cli(cache: Path | None, *args: str) -> Result:
    """Run the CLI in-process (click's runner); stdout and stderr are kept apart."""
    prefix = ["--cache", str(cache)] if cache is not None else []
    return CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)


def run(cache: Path | None, *args: str, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run the installed ``cachefs`` console script as a real subprocess."""
    prefix = ["--cache", str(cache)] if cache is not None else []
    return subprocess.run([CACHEFS, *prefix, *args], capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess[str] | Result, code: int) -> str:
    rc = proc.returncode if isinstance(proc, subprocess.CompletedProcess) else proc.exit_code
    assert rc == code, (rc, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cachefs: ")
    assert "Traceback" not in proc.stderr
    return lines[0]
