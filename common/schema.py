"""Typed records read from JSON: a dataclass is built from a parsed dict and every field is checked
against its annotation, so a missing or mistyped field in a hand-edited or foreign file is one
`UserError` naming the field (`manifest.json: field shards[3].sha256: expected str, got 12`), never a
KeyError or TypeError deep in the code that uses it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar

from common.cli import UserError

T = TypeVar("T")


class SchemaError(UserError):
    """A JSON document that does not fit its schema; the message names the document and the field."""


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def check_value(where: str, value: Any, hint: Any) -> Any:
    """`value` checked (and for dataclasses, built) as `hint`; `where` names it in errors."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check_value(where, value, options[0])
        raise TypeError(f"unsupported union {hint}")  # a schema bug, not a user error
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise SchemaError(f"{where}: expected one of {_type_name(hint)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [check_value(f"{where}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        return {key: check_value(f"{where}.{key}", item, args[1]) for key, item in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # JSON writes 1.0 as 1 in some producers
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"{where}: expected a finite number, got {value!r}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise SchemaError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from `data`, checking every field; unknown keys are refused too (a typo in a
    hand edit would otherwise be silently ignored)."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SchemaError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{where}: missing field {name!r}")
            continue
        values[name] = check_value(f"{where}.{name}", data[name], hints[name])
    return cls(**values)
