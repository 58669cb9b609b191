"""The downloaded chunks reach the ingest's reader from memory (issue 15), and whatever
memory cannot give (a reader far behind, a restart, a second reader) comes from the
``.part`` file: the reader always sees exactly the blob's bytes, in order."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cachefs.errors import DownloadFailed
from cachefs.pipeline.growing import MEMORY_BYTES, GrowingBlob


class _Download:
    """Writes a blob into its ``.part`` the way ``fetch_blob`` does: file first, then the
    chunk offered (``arrived``), then reported (``written``)."""

    def __init__(self, tmp: Path) -> None:
        self.part, self.final = tmp / "blob.part", tmp / "blob"
        self.part.write_bytes(b"")
        self.blob = GrowingBlob(self.part, self.final)
        self.blob.written(0)
        self._f = self.part.open("r+b")
        self.size = 0

    def send(self, chunk: bytes) -> None:
        self._f.write(chunk)
        self._f.flush()
        self.blob.arrived(self.size, chunk)
        self.size += len(chunk)
        self.blob.written(self.size)

    def restart(self) -> None:
        self._f.truncate(0)
        self._f.seek(0)
        self.size = 0
        self.blob.written(0)

    def finish(self) -> None:
        self._f.close()
        os.rename(self.part, self.final)
        self.blob.finish(True)


def _consume(reader: object, size: int, got: bytearray,
             after_read: Callable[[], None] = lambda: None) -> threading.Thread:
    def run() -> None:
        while data := reader.read(size):  # type: ignore[attr-defined]
            got.extend(data)
            after_read()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.fixture
def preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes read back from the file by ``os.pread``."""
    counted: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        counted.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", pread)
    return counted


def test_a_reader_that_keeps_up_never_reads_the_file_back(tmp_path: Path,
                                                           preads: list[int]) -> None:
    download = _Download(tmp_path)
    reader = download.blob.open()
    content = os.urandom(3 << 20)
    got = bytearray()
    step = threading.Semaphore(0)
    # chunks of odd sizes, some smaller than a read (a paced link), some larger
    cuts = [0, 1000, 70_000, 400_000, 1_500_000, 1_500_100, len(content)]
    consumer = _consume(reader, 256 << 10, got, step.release)
    for a, b in itertools.pairwise(cuts):
        download.send(content[a:b])
        while len(got) < b:  # the reader drains what arrived before the next chunk
            assert step.acquire(timeout=60)
    download.finish()
    consumer.join(60)
    reader.close()
    assert bytes(got) == content
    assert preads == []


def test_a_reader_far_behind_reads_the_file_and_memory_stays_bounded(
    tmp_path: Path, preads: list[int]
) -> None:
    download = _Download(tmp_path)
    reader = download.blob.open()
    content = os.urandom(3 * MEMORY_BYTES)
    for i in range(0, len(content), 1 << 20):  # all of it before the reader starts
        download.send(content[i : i + (1 << 20)])
        assert download.blob._mem_bytes <= MEMORY_BYTES
    download.finish()
    got = bytearray()
    _consume(reader, 256 << 10, got).join(60)
    reader.close()
    assert bytes(got) == content
    assert sum(preads) >= len(content) - MEMORY_BYTES  # the file served what memory dropped


def test_a_restart_mid_blob_presents_the_whole_stream_once(tmp_path: Path) -> None:
    download = _Download(tmp_path)
    reader = download.blob.open()
    content = os.urandom(2 << 20)
    got = bytearray()
    download.send(content[: 1 << 20])
    got.extend(reader.read(300_000))
    download.restart()  # the same bytes come again from offset 0
    consumer = _consume(reader, 256 << 10, got)
    for i in range(0, len(content), 200_000):
        download.send(content[i : i + 200_000])
    download.finish()
    consumer.join(60)
    reader.close()
    assert bytes(got) == content


def test_a_second_reader_reads_the_file_and_a_failed_download_fails_both(
    tmp_path: Path,
) -> None:
    download = _Download(tmp_path)
    one, two = download.blob.open(), download.blob.open()
    download.send(b"a" * 5000)
    assert one.read(4096) == b"a" * 4096
    assert two.read(10_000) == b"a" * 5000
    download.blob.finish(False)
    for reader in (one, two):
        with pytest.raises(DownloadFailed):
            reader.read(4096)
        reader.close()
