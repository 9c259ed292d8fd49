"""Frozen dataclasses to JSON-ready values and back, driven by their type hints (pure).

    raw = to_wire(spec)                      # dicts, lists, str, int, float, bool, None
    spec = from_wire(SidecarSpec, raw)       # ValueError naming the path of a bad field

Every `init` field of a dataclass travels, so a field another change adds to a spec type
rides along without touching this module; a field computed in `__post_init__` (init=False)
is computed again on the other side. What the hints may use: dataclasses, bool, int, float,
str, bytes (as latin-1 text), None, unions, Literal, enums (by value), tuple, frozenset,
Mapping/dict (an object when keys are str, else a list of pairs), compiled regexes, Any
(passed as is: it must already be JSON-ready). Decoding is strict: an unknown field, a
missing one without a default, or a value of the wrong type is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["from_wire", "to_wire"]


def to_wire(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in _fields(type(value))}
    if isinstance(value, enum.Enum):
        return to_wire(value.value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, re.Pattern):
        pattern = value.pattern
        text = pattern.decode("latin-1") if isinstance(pattern, bytes) else pattern
        return [text, value.flags]
    if isinstance(value, frozenset | set):
        # Sorted so one value always has one encoding (the agent compares what it sends).
        return sorted((to_wire(v) for v in value), key=repr)
    if isinstance(value, tuple | list):
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: to_wire(v) for k, v in value.items()}
        return [[to_wire(k), to_wire(v)] for k, v in value.items()]
    raise TypeError(f"cannot encode {type(value).__name__}")


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.init)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_wire(tp: Any, raw: Any, where: str = "") -> Any:
    """`raw` read as a value of type `tp`; `ValueError` saying where it does not fit."""
    try:
        return _decode(tp, raw, where or "value")
    except RecursionError:
        raise ValueError(f"{where or 'value'}: nested too deeply") from None


def _fail(where: str, expected: str, raw: Any) -> ValueError:
    return ValueError(f"{where}: expected {expected}, got {type(raw).__name__}")


def _decode(tp: Any, raw: Any, where: str) -> Any:
    if tp is Any:
        return raw
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _union(typing.get_args(tp), raw, where)
    if origin is typing.Literal:
        if raw not in typing.get_args(tp) or isinstance(raw, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise ValueError(f"{where}: {raw!r} is not one of {typing.get_args(tp)}")
        return raw
    if tp is type(None):
        if raw is not None:
            raise _fail(where, "null", raw)
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, raw, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(raw)
        except ValueError:
            raise ValueError(f"{where}: {raw!r} is not a {tp.__name__}") from None
    if tp is bool:
        if not isinstance(raw, bool):
            raise _fail(where, "a boolean", raw)
        return raw
    if tp is int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _fail(where, "an integer", raw)
        return raw
    if tp is float:
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            raise _fail(where, "a number", raw)
        return float(raw)
    if tp is str:
        if not isinstance(raw, str):
            raise _fail(where, "a string", raw)
        return raw
    if tp is bytes:
        if not isinstance(raw, str):
            raise _fail(where, "a string", raw)
        try:
            return raw.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: not latin-1 text") from None
    if origin is re.Pattern or tp is re.Pattern:
        return _pattern(typing.get_args(tp), raw, where)
    if origin is tuple:
        return _tuple(typing.get_args(tp), raw, where)
    if origin in (frozenset, set):
        (item,) = typing.get_args(tp)
        return frozenset(_items(item, raw, where))
    if origin in (list,):
        (item,) = typing.get_args(tp)
        return list(_items(item, raw, where))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        args = typing.get_args(tp) or (str, Any)
        return _mapping(args[0], args[1], raw, where)
    raise ValueError(f"{where}: the codec cannot read type {tp!r}")


def _union(args: tuple[Any, ...], raw: Any, where: str) -> Any:
    if raw is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _decode(arg, raw, where)
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError("; ".join(errors) or f"{where}: no type fits")


def _dataclass(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise _fail(where, f"an object ({cls.__name__})", raw)
    fields = _fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(k for k in raw if k not in names)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} of {cls.__name__}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name in raw:
            kwargs[f.name] = _decode(hints[f.name], raw[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: missing field {f.name!r} of {cls.__name__}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {cls.__name__} refused: {exc}") from None


def _items(item: Any, raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list):
        raise _fail(where, "a list", raw)
    return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(raw)]


def _tuple(args: tuple[Any, ...], raw: Any, where: str) -> tuple[Any, ...]:
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_items(args[0], raw, where))
    if not isinstance(raw, list) or len(raw) != len(args):
        raise _fail(where, f"a list of {len(args)}", raw)
    pairs = enumerate(zip(args, raw, strict=True))
    return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in pairs)


def _mapping(key: Any, value: Any, raw: Any, where: str) -> dict[Any, Any]:
    if key is str:
        if not isinstance(raw, dict):
            raise _fail(where, "an object", raw)
        return {k: _decode(value, v, f"{where}[{k!r}]") for k, v in raw.items()}
    out: dict[Any, Any] = {}
    for i, pair in enumerate(_items(Any, raw, where)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _fail(f"{where}[{i}]", "a [key, value] pair", pair)
        out[_decode(key, pair[0], f"{where}[{i}][0]")] = _decode(value, pair[1], f"{where}[{i}]")
    return out


def _pattern(args: tuple[Any, ...], raw: Any, where: str) -> re.Pattern[Any]:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not isinstance(raw[0], str)
        or not isinstance(raw[1], int)
    ):
        raise _fail(where, "[pattern, flags]", raw)
    text: str | bytes = raw[0].encode("latin-1") if args and args[0] is bytes else raw[0]
    try:
        # The flags of a compiled pattern include the implied ones (UNICODE for str): they
        # are the same when compiled again.
        flags = raw[1] & ~re.UNICODE if isinstance(text, bytes) else raw[1]
        return re.compile(text, flags)
    except (re.error, ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{where}: not a regular expression: {exc}") from None
