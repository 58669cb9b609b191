"""The view's inode tables: numbers stable across refreshes, size bounded under churn.

A long-running daemon over a cache whose references come and go must not grow: the
operations count the kernel's references (lookups, readdirplus entries) and ``forget``
drops them, and a path that left the tree is forgotten once the kernel lets it go.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.maintenance.remove import remove_images
from cachefs.pipeline.pull import load
from tests.fixtures.images import docker_archive
from tests.fixtures.system import require_root
from tests.view.conftest import image_one, view_mount

pytestmark = pytest.mark.system

BASE = "docker.io/library/base:0"
CYCLES = 10_000
WARM_UP = 1_000  # tables
# RSS: caches and allocator arenas grow over the first few thousand cycles (every
# reference is a new string), bounded; so measured after a warm-up.
RSS_WARM_UP = 5_000


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _cache_with_base(tmp_path: Path) -> GlobalCache:
    cache = GlobalCache.new(tmp_path / "cache")
    trio.run(load, cache, docker_archive(image_one(), ["base:0"], tmp_path / "one.tar"))
    return cache


def _add_reference(cache: GlobalCache, typed: str) -> None:
    """A synthetic pull: metadata json + cachefs record, written by the cache's own API
    (as bench/view.py makes its 1,000 images), naming the base image's manifest."""
    meta = cache.read_image_metadata(BASE)
    assert meta is not None
    cache.write_image_metadata(typed, meta)
    cache.record_reference(typed, typed, meta.manifest, "load")


def _remove_reference(cache: GlobalCache, typed: str) -> None:
    """The synthetic rm: record and metadata json deleted by the cache's own API."""
    assert cache.forget_reference(typed) and cache.delete_image_metadata(typed)


def test_inode_numbers_stable_across_refreshes(tmp_path: Path) -> None:
    require_root()  # to drop the kernel's dentry and inode caches
    cache = _cache_with_base(tmp_path)
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        paths = [vm.image_dir(BASE) / name for name in
                 ("", "status", "rootfs.img", "disk.vmdk", "layers", "image.json")]
        paths.append(vm.mnt / "images" / "docker.io" / "library")
        before = [os.stat(p).st_ino for p in paths]
        assert len(set(before)) == len(before)
        for i in range(3):  # each pull and removal is a rescan and a new tree
            ref = f"docker.io/library/other:{i}"
            _add_reference(cache, ref)
            assert (vm.image_dir(ref) / "status").read_text() == "ready\n"
            assert [os.stat(p).st_ino for p in paths] == before
            remove_images(cache, [ref])
            assert not vm.image_dir(ref).exists()
            assert [os.stat(p).st_ino for p in paths] == before
        # The kernel forgets every inode it is not using; the view keeps the numbers of
        # paths still in its tree.
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("2\n")
        assert [os.stat(p).st_ino for p in paths] == before
        assert vm.alive()


@pytest.mark.slow  # ~4 minutes: 10,000 rescans and 40,000 walks through the view
def test_tables_and_rss_flat_over_10000_pull_rm_cycles(tmp_path: Path) -> None:
    require_root()
    cache = _cache_with_base(tmp_path)
    with view_mount(cache.root, tmp_path / "mnt") as vm:
        warm_rss = warm_files = 0
        for i in range(CYCLES):
            ref = f"churn.local/team{i % 7}/app{i}:v1"
            _add_reference(cache, ref)
            st = os.stat(vm.image_dir(ref) / "status")  # at once: no wait
            assert st.st_size == len(b"ready\n"), i
            os.listdir(vm.image_dir(ref))  # readdirplus: references the kernel counts
            _remove_reference(cache, ref)
            assert not vm.image_dir(ref).exists(), i
            if i == WARM_UP:
                warm_files = os.statvfs(vm.mnt).f_files
            if i == RSS_WARM_UP:
                warm_rss = _rss_kb(vm.proc.pid)
        end_rss, end_files = _rss_kb(vm.proc.pid), os.statvfs(vm.mnt).f_files
        assert vm.alive()
    # f_files is the daemon's inode table: what the tree holds plus what the kernel holds,
    # not every path ever seen (that would be ~10 per cycle).
    assert end_files <= warm_files + 50, (warm_files, end_files)
    assert end_files < CYCLES, end_files
    assert end_rss <= warm_rss * 1.10, f"RSS {warm_rss} kB after {RSS_WARM_UP}, {end_rss} kB at end"
