"""Strict readers for Consul's JSON: a field of the wrong type is an error, not a None.

Only fields Consul may legitimately omit or send as null get defaults (lists and maps Consul
renders as null in some versions, omitempty fields). Everything raises `ShapeError`, which the
client turns into `ConsulBadResponse` naming the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

JSONObject = Mapping[str, Any]


class ShapeError(ValueError):
    """A JSON value does not have the shape Consul's API documents."""


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def as_object(value: object, what: str) -> JSONObject:
    if not isinstance(value, dict):
        raise ShapeError(f"{what}: expected an object, got {_kind(value)}")
    return value


def as_list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ShapeError(f"{what}: expected a list, got {_kind(value)}")
    return value


def get_object(obj: JSONObject, key: str) -> JSONObject:
    value = obj.get(key)
    if value is None:
        raise ShapeError(f"{key}: missing")
    return as_object(value, key)


def get_optional_object(obj: JSONObject, key: str) -> JSONObject | None:
    value = obj.get(key)
    return None if value is None else as_object(value, key)


def get_str(obj: JSONObject, key: str, default: str | None = None) -> str:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise ShapeError(f"{key}: expected a string, got {_kind(value)}")
    return value


def get_int(obj: JSONObject, key: str, default: int | None = None) -> int:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    # bool is an int in Python, never in Consul's JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ShapeError(f"{key}: expected an integer, got {_kind(value)}")
    return value


def get_bool(obj: JSONObject, key: str, default: bool | None = None) -> bool:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, bool):
        raise ShapeError(f"{key}: expected true or false, got {_kind(value)}")
    return value


def str_tuple(value: object, what: str) -> tuple[str, ...]:
    """A list of strings; null reads as empty (older Consul versions render nil lists so)."""
    if value is None:
        return ()
    items = as_list(value, what)
    if not all(isinstance(item, str) for item in items):
        raise ShapeError(f"{what}: expected a list of strings")
    return tuple(items)


def str_map(value: object, what: str) -> Mapping[str, str]:
    """A read-only string-to-string map; null reads as empty."""
    if value is None:
        return MappingProxyType({})
    obj = as_object(value, what)
    if not all(isinstance(v, str) for v in obj.values()):
        raise ShapeError(f"{what}: expected string values")
    return MappingProxyType(dict(obj))


def any_map(value: object, what: str) -> Mapping[str, Any]:
    """An opaque map (proxy and upstream `Config`), read-only at the top level."""
    if value is None:
        return MappingProxyType({})
    return MappingProxyType(dict(as_object(value, what)))
