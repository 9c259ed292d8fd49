"""Config-entry bodies decoded as Consul's `structs.DecodeConfigEntry` decodes them.

Consul decodes the JSON body into `map[string]interface{}` and then into the kind's struct with
mapstructure (`WeaklyTypedInput`, `decode.HookTranslateKeys`, `StringToTimeDurationHookFunc`):

- a key matches a field by its name, case-insensitively, or by the field's snake_case `alias`;
- input is weakly typed: "3" fills an integer, 3 fills a string, a single value fills a list,
  a duration is Go text ("10s") or a number of nanoseconds;
- type errors are collected as mapstructure reports them (`N error(s) decoding:`), keys that
  match no field as `invalid config key "X"` (a go-multierror list).

The output is plain data keyed by the canonical (CamelCase) field names, so nothing downstream
ever sees the caller's spelling.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from traffic.durations import parse_duration
from traffic.errors import EntryDecodeError


@dataclass(frozen=True)
class Scalar:
    # "string", "bool", "int", "uint32", "uint64", "float32", "time.Duration", "interface {}"
    go_type: str


STRING = Scalar("string")
BOOL = Scalar("bool")
INT = Scalar("int")
UINT32 = Scalar("uint32")
UINT64 = Scalar("uint64")
FLOAT32 = Scalar("float32")
DURATION = Scalar("time.Duration")
ANY = Scalar("interface {}")


@dataclass(frozen=True)
class ListOf:
    item: Spec


@dataclass(frozen=True)
class MapOf:
    value: Spec


@dataclass(frozen=True)
class Struct:
    """A Go struct: canonical field names, and the snake_case aliases its `alias:` tags give."""

    name: str
    fields: Mapping[str, Spec | Callable[[], Spec]]
    aliases: tuple[str, ...] = ()
    _alias_of: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for canonical in self.aliases:
            self._alias_of[_snake(canonical)] = canonical

    def spec_of(self, canonical: str) -> Spec:
        spec = self.fields[canonical]
        if isinstance(spec, Scalar | ListOf | MapOf | Struct):
            return spec
        return spec()


Spec = Scalar | ListOf | MapOf | Struct


def _snake(name: str) -> str:
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def _go_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def _go_kind(value: object) -> str:
    if isinstance(value, list):
        return "slice"
    if isinstance(value, dict):
        return "map"
    return _go_type(value)


_GO_VALUE_DEPTH = 32
"""How deep `_go_value` renders (Go's %v has no limit, but Python's stack has: a value nested
900 levels, which json.loads accepts, would otherwise end in RecursionError)."""


def _go_value(value: object, depth: int = 0) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if isinstance(value, list | dict) and depth >= _GO_VALUE_DEPTH:
        return "..."
    if isinstance(value, list):
        return "[" + " ".join(_go_value(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        inner = " ".join(f"{k}:{_go_value(v, depth + 1)}" for k, v in sorted(value.items()))
        return f"map[{inner}]"
    return str(value)


def float32(value: float) -> float:
    """`value` rounded to the nearest float32, as Go's float32 conversion does."""
    try:
        result: float = struct.unpack("f", struct.pack("f", value))[0]
        return result
    except OverflowError:
        return math.copysign(math.inf, value)


class _Decoder:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.unused: list[str] = []

    def decode(self, value: Any, spec: Spec, name: str) -> Any:
        if isinstance(spec, Struct):
            return self._struct(value, spec, name)
        if isinstance(spec, ListOf):
            return self._list(value, spec, name)
        if isinstance(spec, MapOf):
            return self._map(value, spec, name)
        return self._scalar(value, spec, name)

    def _struct(self, value: Any, spec: Struct, name: str) -> dict[str, Any]:
        # decode.HookWeakDecodeFromSlice: HCL hands blocks over as a list of one map.
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            value = value[0]
        elif isinstance(value, list) and not value:
            value = {}
        if not isinstance(value, dict):
            self.errors.append(f"'{name}' expected a map, got '{_go_kind(value)}'")
            return {}
        keys = {str(k): v for k, v in value.items()}
        # decode.HookTranslateKeys: an alias is renamed to its field unless the field is given.
        for key in list(keys):
            canonical = spec._alias_of.get(key.lower())
            if canonical is not None and not any(k.lower() == canonical.lower() for k in keys):
                keys[canonical] = keys.pop(key)
        out: dict[str, Any] = {}
        used: set[str] = set()
        for canonical in spec.fields:
            found = canonical if canonical in keys else None
            if found is None:
                found = next((k for k in keys if k.lower() == canonical.lower()), None)
            if found is None:
                continue
            used.add(found)
            item = keys[found]
            if item is None:
                continue
            path = f"{name}.{canonical}" if name else canonical
            out[canonical] = self.decode(item, spec.spec_of(canonical), path)
        for key in keys:
            if key not in used:
                self.unused.append(f"{name}.{key}" if name else key)
        return out

    def _list(self, value: Any, spec: ListOf, name: str) -> list[Any]:
        if isinstance(value, dict) and not value:
            return []
        if not isinstance(value, list):
            value = [value]  # WeaklyTypedInput lifts a single value into a slice
        return [self.decode(v, spec.item, f"{name}[{i}]") for i, v in enumerate(value)]

    def _map(self, value: Any, spec: MapOf, name: str) -> dict[str, Any]:
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            merged: dict[str, Any] = {}
            for v in value:
                merged.update(v)
            value = merged
        if not isinstance(value, dict):
            self.errors.append(f"'{name}' expected a map, got '{_go_kind(value)}'")
            return {}
        return {str(k): self.decode(v, spec.value, f"{name}[{k}]") for k, v in value.items()}

    def _unconvertible(self, value: Any, spec: Scalar, name: str) -> None:
        self.errors.append(
            f"'{name}' expected type '{spec.go_type}', got unconvertible type "
            f"'{_go_type(value)}', value: '{_go_value(value)}'"
        )

    def _scalar(self, value: Any, spec: Scalar, name: str) -> Any:
        kind = spec.go_type
        if kind == "interface {}":
            return value
        if kind == "string":
            return self._string(value, spec, name)
        if kind == "bool":
            return self._bool(value, spec, name)
        if kind == "float32":
            return self._float(value, spec, name)
        if kind == "time.Duration":
            if isinstance(value, str):
                try:
                    return parse_duration(value)
                except ValueError as err:
                    self.errors.append(f"error decoding '{name}': {err}")
                    return 0
            return self._int(value, Scalar("int64"), name)
        return self._int(value, spec, name)

    def _string(self, value: Any, spec: Scalar, name: str) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else repr(value)
        self._unconvertible(value, spec, name)
        return None

    def _bool(self, value: Any, spec: Scalar, name: str) -> bool | None:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            return value != 0
        if isinstance(value, str):
            text = value
            if text == "":
                return False
            if text in ("1", "t", "T", "true", "TRUE", "True"):
                return True
            if text in ("0", "f", "F", "false", "FALSE", "False"):
                return False
            self.errors.append(
                f"cannot parse '{name}' as bool: strconv.ParseBool: parsing "
                f'"{text}": invalid syntax'
            )
            return None
        self._unconvertible(value, spec, name)
        return None

    def _float(self, value: Any, spec: Scalar, name: str) -> float | None:
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, int | float):
            return float32(float(value))
        if isinstance(value, str):
            try:
                if value.strip() != value:
                    raise ValueError(value)
                return float32(float(value))
            except ValueError:
                self.errors.append(
                    f"cannot parse '{name}' as float: strconv.ParseFloat: "
                    f'parsing "{value}": invalid syntax'
                )
                return None
        self._unconvertible(value, spec, name)
        return None

    def _int(self, value: Any, spec: Scalar, name: str) -> int | None:
        kind = spec.go_type
        number: int
        if isinstance(value, bool):
            number = int(value)
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float):
            if not math.isfinite(value):
                self._unconvertible(value, spec, name)
                return None
            number = int(value)  # Go truncates a float toward zero
        elif isinstance(value, str):
            try:
                number = int(value, 0) if value else 0
            except ValueError:
                base = "uint" if kind.startswith("uint") else "int"
                self.errors.append(
                    f"cannot parse '{name}' as {base}: strconv.Parse"
                    f'{base.capitalize()}: parsing "{value}": invalid syntax'
                )
                return None
        else:
            self._unconvertible(value, spec, name)
            return None
        if kind.startswith("uint"):
            if number < 0:
                self.errors.append(f"cannot parse '{name}', {number} overflows uint")
                return None
            bits = 32 if kind == "uint32" else 64
            if number >= 2**bits:
                self.errors.append(f"cannot parse '{name}', {number} overflows uint")
                return None
        elif not -(2**63) <= number < 2**63:
            self.errors.append(f"cannot parse '{name}', {number} overflows int")
            return None
        return number


def decode_entry(body: Mapping[str, Any], spec: Struct) -> dict[str, Any]:
    """Decode one config-entry body; EntryDecodeError carries Consul's 400 text."""
    decoder = _Decoder()
    out = decoder.decode(dict(body), spec, "")
    if decoder.errors:
        points = sorted(f"* {e}" for e in decoder.errors)
        raise EntryDecodeError(
            f"Request decoding failed: {len(points)} error(s) decoding:\n\n" + "\n".join(points)
        )
    problems = [_unused_problem(k) for k in decoder.unused if k not in _IGNORED_UNUSED]
    if problems:
        noun = "error" if len(problems) == 1 else "errors"
        listed = "".join(f"\t* {p}\n" for p in problems)
        raise EntryDecodeError(
            f"Request decoding failed: {len(problems)} {noun} occurred:\n{listed}\n"
        )
    result: dict[str, Any] = out
    return result


_IGNORED_UNUSED = frozenset({"CreateIndex", "ModifyIndex", "kind", "Kind"})


def _unused_problem(key: str) -> str:
    # validateUnusedKeys in consul agent/structs/config_entry.go (CE has no namespaces/partitions
    # on the entry itself).
    lowered = key.lower()
    if lowered.endswith("namespace"):
        return f'invalid config key "{key}", namespaces are a consul enterprise feature'
    if "partition" in lowered:
        return f'invalid config key "{key}", partitions are a consul enterprise feature'
    return f'invalid config key "{key}"'
