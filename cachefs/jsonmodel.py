"""Dataclass models of JSON documents, checked field by field against their type hints.

Why not pydantic: building its validators cost every process that touched a document
~60 ms of CPU before its first request (import ~16 ms, schema building for the models in
:mod:`cachefs.models` ~30 ms, plugin discovery through ``importlib.metadata`` ~10 ms): on
one core, at the start of every ``cachefs pull`` (issue 15). The documents cachefs reads
are small and their shapes few, so a checker over the type hints does the same job.

What a model accepts (as strict as serde, which msb parses the same documents with):

* ``str``, ``int`` (not ``bool``), ``float`` (an ``int`` too), ``bool``, ``Any``,
  ``X | None``, ``list[X]``, ``dict[str, X]`` and nested models; nothing is coerced
  (``"5"`` is not a size);
* a field is read from its JSON name (``field(metadata=json_name("os.version"))``) or its
  Python name; an absent field takes its default, else the document is refused;
* unknown keys are ignored (registries add fields).

A refusal is a :class:`ValidationError` naming where (``layers.0.digest``) and what.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from .errors import ValidationError

__all__ = ["JsonModel", "ValidationError", "json_name"]

M = TypeVar("M", bound="JsonModel")
_ALIAS = "json_name"
_Loc = tuple[str | int, ...]


def json_name(name: str) -> dict[str, str]:
    """Field metadata: the key the field has in the JSON document."""
    return {_ALIAS: name}


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    keys: tuple[str, ...]  # JSON name first, then the Python name
    hint: Any
    default: Any
    factory: Callable[[], Any] | None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING and self.factory is None


class JsonModel:
    """Base of the document dataclasses (each subclass is a ``@dataclass``)."""

    _fields_cache: ClassVar[dict[type, tuple[_Field, ...]]] = {}
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @dataclass

    @classmethod
    def model_validate(cls: type[M], data: Any) -> M:
        """The model of an already parsed JSON value, or :class:`ValidationError`."""
        return _build(cls, data, ())

    @classmethod
    def model_validate_json(cls: type[M], data: bytes | str) -> M:
        """The model of a JSON text, or :class:`ValidationError` (bad JSON included)."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as err:  # RecursionError: hostile nesting
            raise ValidationError(cls.__name__, (), f"invalid JSON: {err}") from None
        return _build(cls, doc, ())

    def model_dump(self) -> dict[str, Any]:
        """The fields by Python name, nested models as dicts, lists and dicts copied."""
        return dataclasses.asdict(self)


def _fields(cls: type[JsonModel]) -> tuple[_Field, ...]:
    """The fields of ``cls`` with their resolved type hints, computed once per class."""
    known = JsonModel._fields_cache.get(cls)
    if known is None:
        hints = typing.get_type_hints(cls)
        known = tuple(
            _Field(
                f.name,
                tuple(dict.fromkeys((f.metadata.get(_ALIAS, f.name), f.name))),
                hints[f.name],
                f.default,
                None if f.default_factory is dataclasses.MISSING else f.default_factory,
            )
            for f in dataclasses.fields(cls)
            if f.init
        )
        JsonModel._fields_cache[cls] = known
    return known


def _build(cls: type[M], data: Any, loc: _Loc) -> M:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ValidationError(cls.__name__, loc, f"expected an object, got {_kind(data)}")
    values: dict[str, Any] = {}
    for f in _fields(cls):
        for key in f.keys:
            if key in data:
                values[f.name] = _check(f.hint, data[key], (*loc, key), cls.__name__)
                break
        else:
            if f.required:
                raise ValidationError(cls.__name__, (*loc, f.keys[0]), "field required")
    try:
        return cls(**values)
    except ValidationError as err:  # a model's own check (__post_init__)
        raise ValidationError(cls.__name__, (*loc, *err.loc), err.msg) from None


def _check(hint: Any, value: Any, loc: _Loc, model: str) -> Any:
    """``value`` if it has the shape ``hint`` says (models built from their dicts)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = (arg for arg in args if arg is not type(None))  # only X | None is used
        return _check(inner, value, loc, model)
    if origin is list:
        if not isinstance(value, list):
            raise ValidationError(model, loc, f"expected a list, got {_kind(value)}")
        (item,) = typing.get_args(hint)
        return [_check(item, v, (*loc, i), model) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValidationError(model, loc, f"expected an object, got {_kind(value)}")
        _, item = typing.get_args(hint)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(model, (*loc, str(k)), "expected a string key")
            out[k] = _check(item, v, (*loc, k), model)
        return out
    if isinstance(hint, type) and issubclass(hint, JsonModel):
        return _build(hint, value, loc)
    if not _SCALARS[hint](value):
        raise ValidationError(model, loc, f"expected {_NAMES[hint]}, got {_kind(value)}")
    return float(value) if hint is float else value


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    str: lambda v: isinstance(v, str),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
}
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)
