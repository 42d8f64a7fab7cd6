"""A message class's wire schema, read once from its dataclass fields.

The generic encoder writes each field into a typed column of the envelope in declaration
order, and reads it back the same way; the schema says which column and how many values.
Unsupported field types fail when the message is registered, not when it is first sent.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from meshfl.core.params import Params, ParamsSlice

SCALARS = {int: "int", bool: "bool", float: "float", str: "str"}
SEQUENCES = {int: "ints", float: "floats", str: "strs"}
TENSORS = {Params: "params", ParamsSlice: "slice"}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # int bool float str ints floats strs intset record records params slice codec
    record: Schema | None = None


@dataclass(frozen=True)
class Schema:
    cls: type
    fields: tuple[FieldSpec, ...]

    @property
    def has_codec(self) -> bool:
        return any(f.kind == "codec" for f in self.fields)

    @property
    def tensor_fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.kind in ("params", "slice"))


@cache
def schema_of(cls: type) -> Schema:
    """The schema of a message or record dataclass; TypeError naming the field it cannot encode."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        specs.append(_field_spec(cls, f.name, hints[f.name]))
    return Schema(cls, tuple(specs))


def _field_spec(cls: type, name: str, hint: Any) -> FieldSpec:
    if name == "codec" and getattr(hint, "__name__", "") == "Codec":
        return FieldSpec(name, "codec")
    if hint in SCALARS:
        return FieldSpec(name, SCALARS[hint])
    if hint in TENSORS:
        return FieldSpec(name, TENSORS[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = args[0]
        if item in SEQUENCES:
            return FieldSpec(name, SEQUENCES[item])
        if _is_record(item):
            return FieldSpec(name, "records", _record_schema(cls, name, item))
    if origin is frozenset and args == (int,):
        return FieldSpec(name, "intset")
    if _is_record(hint):
        return FieldSpec(name, "record", _record_schema(cls, name, hint))
    raise TypeError(f"{cls.__name__}.{name}: type {hint!r} cannot travel on the wire "
                    f"(use int, bool, float, str, tuple[int|float|str, ...], frozenset[int], a record dataclass "
                    f"or a tuple of them, Params or ParamsSlice)")


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _record_schema(cls: type, name: str, record: type) -> Schema:
    schema = schema_of(record)
    if any(f.kind in ("params", "slice", "codec") for f in schema.fields):
        raise TypeError(f"{cls.__name__}.{name}: records may not hold tensors or a codec")
    return schema
