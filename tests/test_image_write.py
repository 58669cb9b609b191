"""The hand-over between a layer's build and the fsmeta: a write that completes separately
is always waited for, and the error a user sees is the first real one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cachefs.errors import LayerFormatError
from cachefs.pipeline.growing import GrowingBlob
from cachefs.pipeline.image_write import BackgroundWrite, raise_first, settle


def test_settle_waits_for_every_write_and_keeps_each_error_once() -> None:
    release = threading.Event()
    finished: list[str] = []

    def slow() -> None:
        assert release.wait(60)
        finished.append("slow")

    def broken() -> None:
        raise OSError(28, "No space left on device")

    slow_write = BackgroundWrite(slow, "slow")
    broken_write = BackgroundWrite(broken, "broken")
    waiter = threading.Thread(target=lambda: finished.append(
        f"settled {len(settle([broken_write, slow_write, broken_write]))}"))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and finished == []  # still waiting for the slow one
    release.set()
    waiter.join(60)
    assert finished == ["slow", "settled 1"]


def test_then_runs_after_the_waiters_are_released() -> None:
    order: list[str] = []
    gate = threading.Event()

    def then() -> None:
        assert gate.wait(60)  # blocks until the test has seen wait() return
        order.append("then")

    write = BackgroundWrite(lambda: order.append("work"), "w", then=then)
    write.wait()
    order.append("waited")
    gate.set()
    assert order[:2] == ["work", "waited"]


def test_the_typed_error_is_raised_before_a_bare_one() -> None:
    bare, typed = OSError("disk"), LayerFormatError("bad tar")
    with pytest.raises(LayerFormatError):
        raise_first([bare, typed])
    with pytest.raises(OSError):
        raise_first([bare, OSError("other")])
    raise_first([])


def test_growing_reader_follows_a_restarted_download(tmp_path: Path) -> None:
    """read() hands back the file's bytes as they arrive, and after a restart that
    truncated the file, the bytes written again, never the zeros of a hole."""
    part, final = tmp_path / "blob.part", tmp_path / "blob"
    blob = GrowingBlob(part, final)
    content = os.urandom(3 << 20)
    part.write_bytes(b"")
    blob.written(0)
    reader = blob.open()
    got = bytearray()

    def consume() -> None:
        while data := reader.read(1 << 20):
            got.extend(data)

    consumer = threading.Thread(target=consume)
    consumer.start()
    with part.open("r+b") as f:
        f.write(content[: 1 << 20])
        f.flush()
        blob.written(1 << 20)
        f.truncate(0)  # a restart: the same bytes come again from 0
        f.seek(0)
        blob.written(0)
        f.write(content)
        f.flush()
        blob.written(len(content))
    os.rename(part, final)
    blob.finish(True)
    consumer.join(60)
    reader.close()
    assert bytes(got) == content
