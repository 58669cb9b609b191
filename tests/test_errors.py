"""Errors survive pickling (a worker process hands its error to the parent) unchanged."""

from __future__ import annotations

import pickle

import pytest

from cachefs.errors import CachefsError, DigestMismatch, LayerFormatError, NotCachedError


@pytest.mark.parametrize("err", [
    CachefsError("plain"),
    NotCachedError("x is not cached", hint="run: cachefs pull x"),
    DigestMismatch("layer l diff_id", "sha256:" + "a" * 64, "sha256:" + "b" * 64),
    LayerFormatError("path has a '..' component", layer="sha256:" + "c" * 64, entry="a/../b"),
])
def test_errors_pickle_as_the_same_class_message_and_attributes(err: CachefsError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert back.one_line() == err.one_line()
    assert back.args == err.args
    assert back.__dict__ == err.__dict__
    assert back.exit_code == err.exit_code
