"""The collector policies of :mod:`cachefs.heap`: what they switch off comes back on."""

from __future__ import annotations

import gc

from cachefs.heap import frozen_heap, imports_uncollected


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
