"""The view's memory is linear in the number of names (issue 10 #7): one image with
thousands of tags must not hold thousands of rendered image.json documents, each listing
every tag."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.pipeline.pull import load
from tests.fixtures.images import docker_archive
from tests.view.conftest import image_one, view_mount

pytestmark = pytest.mark.system

TAGS = 2000
# Per name the view keeps a directory of small nodes and the parsed metadata (~ a few
# KiB); rendered documents listing every tag would be TAGS * TAGS * ~40 bytes (160 MB).
MAX_GROWTH_MB = 60


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _daemon_peak_mb(cache: GlobalCache, mnt: Path, ref: str) -> tuple[float, dict[str, object]]:
    with view_mount(cache.root, mnt) as vm:
        d = vm.image_dir(ref)
        doc = json.loads((d / "image.json").read_text())
        # getattr of every image.json (its size is the rendered length) and a full walk.
        for dirpath, _, files in os.walk(vm.mnt / "images"):
            for name in files:
                os.stat(os.path.join(dirpath, name))
        return _rss_mb(vm.proc.pid), doc


def test_memory_linear_in_tags(tmp_path: Path) -> None:
    small = GlobalCache.new(tmp_path / "small")
    trio.run(load, small, docker_archive(image_one(), ["many:0"], tmp_path / "one.tar"))
    base, _ = _daemon_peak_mb(small, tmp_path / "m1", "docker.io/library/many:0")

    big = GlobalCache.new(tmp_path / "big")
    tags = [f"many:{i}" for i in range(TAGS)]
    trio.run(load, big, docker_archive(image_one(), tags, tmp_path / "many.tar"))
    peak, doc = _daemon_peak_mb(big, tmp_path / "m2", "docker.io/library/many:7")
    assert len(doc["references"]) == TAGS  # every tag is still listed, rendered on read
    assert peak - base < MAX_GROWTH_MB, f"view daemon peak {peak:.0f} MB, baseline {base:.0f} MB"
