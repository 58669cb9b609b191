"""The error hierarchy: one family per exit code, every class in errors.py, and errors
survive pickling (a worker process hands its error to the parent) unchanged."""

from __future__ import annotations

import builtins
import importlib
import pickle
import pkgutil
import re

import pytest

import cachefs
from cachefs import errors
from cachefs.errors import (
    EXIT_CODES,
    CachefsError,
    DigestMismatch,
    LayerFormatError,
    NotCachedError,
)


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


def _defines_code(cls: type[CachefsError]) -> bool:
    return "exit_code" in vars(cls)


def test_every_exit_code_belongs_to_one_family() -> None:
    """Two classes share a code only when one inherits it from the other (a
    ``RegistryNotFound`` is a ``RegistryError`` to a script); unrelated classes never do."""
    classes = [getattr(errors, name) for name in EXIT_CODES]
    owners: dict[int, type[CachefsError]] = {}
    for cls in classes:
        if _defines_code(cls):
            assert cls.exit_code not in owners, (cls, owners.get(cls.exit_code))
            owners[cls.exit_code] = cls
    for cls in classes:
        owner = owners[cls.exit_code]
        assert issubclass(cls, owner), (cls, owner)
        # nothing between the class and its owner takes another code
        assert all(k.exit_code == owner.exit_code for k in cls.__mro__
                   if isinstance(k, type) and issubclass(k, owner))
    assert len(set(EXIT_CODES.values())) == len(owners)
    assert {errors.InvalidReference.exit_code, errors.DigestError.exit_code} == {3, 14}


def test_every_error_class_is_in_errors_py_its_table_and_its_docstring_tree() -> None:
    """Every exception class in the package lives in errors.py, is in EXIT_CODES (and so in
    ``--help``), appears in the module docstring's tree with its code, and no name shadows a
    builtin (``ReferenceError`` did)."""
    for info in pkgutil.walk_packages(cachefs.__path__, "cachefs."):
        if not info.name.endswith(".__main__"):  # running it is its whole job
            importlib.import_module(info.name)
    found = _subclasses(BaseException)
    ours = [cls for cls in found if cls.__module__.split(".")[0] == "cachefs"]
    assert {cls.__module__ for cls in ours} == {"cachefs.errors"}
    tree = errors.__doc__ or ""
    for cls in ours:
        assert not hasattr(builtins, cls.__name__), cls
        if issubclass(cls, CachefsError):
            assert EXIT_CODES[cls.__name__] == cls.exit_code
            assert re.search(rf"[─ ]{cls.__name__} \({cls.exit_code}\)\n", tree), cls
        else:
            assert re.search(rf"\n    {cls.__name__} \(", tree), cls
    assert set(EXIT_CODES) == {cls.__name__ for cls in ours if issubclass(cls, CachefsError)}


def _subclasses(root: type) -> set[type]:
    found: set[type] = set()
    for sub in root.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found
