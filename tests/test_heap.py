"""The collector policies of :mod:`cachefs.heap`: what they switch off comes back on."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from cachefs.heap import collector_paused, frozen_heap, imports_uncollected


def test_imports_run_uncollected_and_what_they_made_is_frozen() -> None:
    gc.unfreeze()
    assert gc.isenabled()
    try:
        with imports_uncollected():
            assert not gc.isenabled()
            made = [[i] for i in range(5_000)]  # tracked containers
            # far past the threshold, and no collection ran (it would reset the count)
            assert gc.get_count()[0] > 4 * gc.get_threshold()[0]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with imports_uncollected():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_pull_unfreezes_what_start_up_froze() -> None:
    """frozen_heap's end gives every frozen object back to the collector, start-up's too:
    a long-running process (the view) collects as before."""
    try:
        with imports_uncollected():
            _ = [[i] for i in range(100)]
        with frozen_heap():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_paused_collector_runs_no_collection_and_comes_back_on() -> None:
    assert gc.isenabled()
    try:
        with collector_paused():
            assert not gc.isenabled()
            _ = [[i] for i in range(5_000)]
            assert gc.get_count()[0] > 4 * gc.get_threshold()[0]
        assert gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_pauses_in_two_threads_end_with_the_last_one() -> None:
    """The fsmeta of one pull may be merged while another thread's pause is open: the
    first to end must not switch the collector back on under the other."""
    inside, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with collector_paused():
            inside.set()
            assert release.wait(10)
            seen.append(gc.isenabled())

    t = threading.Thread(target=other)
    try:
        with collector_paused():
            t.start()
            assert inside.wait(10)
        assert not gc.isenabled()  # the other thread is still inside
        release.set()
        t.join(10)
        assert seen == [False]
        assert gc.isenabled()
    finally:
        release.set()
        gc.enable()


def test_a_collector_that_was_off_stays_off_after_a_pause() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_layer_is_ingested_planned_and_written_without_a_collection(tmp_path: Path) -> None:
    """Building a layer's tree makes ~10 objects per entry that live until the image is
    written: the collector stays off meanwhile (its full walks of the growing tree were
    the largest cost of a many-small-files pull), and is on again afterwards, when one
    young collection takes what the stage left."""
    import io

    from cachefs.ingest.image import plan_layer_image, write_planned_image
    from cachefs.ingest.layer import Compression, ingest_layer
    from tests.fixtures.images import dir_, layer_tar, reg

    tar = layer_tar([dir_(f"d{d}") for d in range(10)]
                    + [reg(f"d{i % 10}/f{i}", b"x" * (i % 300)) for i in range(3_000)])
    blob = tmp_path / "layer.tar"
    blob.write_bytes(tar)
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with (tmp_path / "unpaused").open("wb+") as spool:  # the same work, collector on
            ingest_layer(io.BytesIO(tar), compression=Compression.NONE,
                         expected_diff_id=None, spool=spool, layer_label="t")
        unpaused = len(collections)
        collections.clear()
        planned = plan_layer_image(blob, compression=None, diff_id=None,  # type: ignore[arg-type]
                                   layer_label="t", spool_path=tmp_path / "spool")
        try:
            write_planned_image(planned, tmp_path / "image.erofs")
        finally:
            planned.spool.close()
        # each paused stage leaves its young objects to one collection when it ends
        assert len(collections) <= 2 < unpaused, (collections, unpaused)
        assert 2 not in collections  # no full walk of the tree
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(count)


def test_inside_a_pull_what_a_pause_built_is_frozen_until_the_pull_ends() -> None:
    """So the first young collection after a layer's build does not walk its tree; outside
    a pull (the view, a worker process) nothing is frozen behind the caller's back."""
    gc.unfreeze()
    try:
        with collector_paused():
            outside = [[i] for i in range(3_000)]
        assert gc.get_freeze_count() == 0
        with frozen_heap():
            before = gc.get_freeze_count()
            with collector_paused():
                built = [[i] for i in range(3_000)]
            assert gc.get_freeze_count() >= before + len(built)
            assert gc.isenabled()
        assert gc.get_freeze_count() == 0
        del outside, built
    finally:
        gc.unfreeze()
        gc.enable()
