"""Errors a pull survives or does not report are still seen under ``-v`` (issue 12): a
progress display that raises, and the other failures of parallel layer work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from cachefs.cache.store import GlobalCache
from cachefs.errors import CachefsError, UsageError
from cachefs.pipeline.progress import Event
from cachefs.pipeline.pull import first_error, load
from tests.fixtures.images import TestImage, docker_archive, layer_tar, reg


def test_a_failing_progress_display_is_logged_once_and_the_load_completes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    image = TestImage([layer_tar([reg("a", b"a" * 5000)]), layer_tar([reg("b", b"b" * 70)])])
    archive = docker_archive(image, ["progress/broken:1"], tmp_path / "img.tar")
    cache = GlobalCache.new(tmp_path / "cache")
    calls: list[Event] = []

    def broken(event: Event) -> None:
        calls.append(event)
        raise RuntimeError("terminal went away")

    with caplog.at_level(logging.INFO, logger="cachefs.pipeline.pull"):
        trio.run(lambda: load(cache, archive, progress=broken))
    assert len(calls) > 2  # it kept being called, and kept failing
    logged = [r for r in caplog.records if "progress display failed" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and "terminal went away" in str(logged[0].exc_info[1])
    assert cache.read_image_metadata("progress/broken:1") is not None


def test_the_errors_not_reported_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    reported = UsageError("layer 0: digest mismatch")
    other = OSError(28, "No space left on device")
    group = BaseExceptionGroup("layers", [other, ExceptionGroup("inner", [reported])])
    with caplog.at_level(logging.INFO, logger="cachefs.pipeline.pull"):
        assert first_error(group) is reported
    [record] = [r for r in caplog.records if "also failed" in r.getMessage()]
    assert "No space left on device" in record.getMessage()
    assert isinstance(reported, CachefsError)
