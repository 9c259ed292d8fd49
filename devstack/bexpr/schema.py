"""The Go types a filter's selectors are checked against, and the operators each allows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, TypeAlias


class Kind(enum.Enum):
    """Go primitive kinds that appear in Consul's filtered types."""

    BOOL = "bool"
    INT = "int"
    UINT8 = "uint8"
    UINT16 = "uint16"
    FLOAT64 = "float64"
    STRING = "string"


@dataclass(frozen=True)
class Scalar:
    """A Go primitive: ``==``/``!=`` always, plus ``in`` and ``matches`` for strings."""

    kind: Kind


@dataclass(frozen=True)
class ListOf:
    """A Go slice. Selecting through it means "any element"."""

    element: Schema


@dataclass(frozen=True)
class MapOf:
    """A Go ``map[string]X``: ``in`` tests keys, ``Map.key`` (or ``Map["key"]``) selects values."""

    value: Schema


@dataclass(frozen=True)
class IPAddress:
    """Go's ``net.IP``: a ``[]uint8`` to bexpr, rendered as a string in JSON (serf members)."""


@dataclass(frozen=True)
class Struct:
    """A Go struct; only its exported, bexpr-visible fields are selectable."""

    fields: tuple[tuple[str, Schema], ...]
    _index: dict[str, Schema] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.fields))

    def field_schema(self, name: str) -> Schema | None:
        return self._index.get(name)


Schema: TypeAlias = Scalar | ListOf | MapOf | IPAddress | Struct

BOOL: Final = Scalar(Kind.BOOL)
INT: Final = Scalar(Kind.INT)
UINT8: Final = Scalar(Kind.UINT8)
UINT16: Final = Scalar(Kind.UINT16)
FLOAT64: Final = Scalar(Kind.FLOAT64)
STRING: Final = Scalar(Kind.STRING)


def struct(**fields: Schema) -> Struct:
    """``struct(Name=STRING, Port=INT)``; keyword order is kept for readable reprs."""
    return Struct(tuple(fields.items()))


class Op(enum.Enum):
    # Values are go-bexpr's MatchOperator.String(), which its error messages quote.
    EQUAL = "Equal"
    NOT_EQUAL = "Not Equal"
    IN = "In"
    NOT_IN = "Not In"
    IS_EMPTY = "Is Empty"
    IS_NOT_EMPTY = "Is Not Empty"
    MATCHES = "Matches"
    NOT_MATCHES = "Not Matches"


NEGATED: Final = {
    Op.NOT_EQUAL: Op.EQUAL,
    Op.NOT_IN: Op.IN,
    Op.IS_NOT_EMPTY: Op.IS_EMPTY,
    Op.NOT_MATCHES: Op.MATCHES,
}
_SCALAR_OPS: Final = frozenset({Op.EQUAL, Op.NOT_EQUAL})
_STRING_OPS: Final = _SCALAR_OPS | {Op.IN, Op.NOT_IN, Op.MATCHES, Op.NOT_MATCHES}
_EMPTINESS_OPS: Final = frozenset({Op.IS_EMPTY, Op.IS_NOT_EMPTY})
_CONTAINER_OPS: Final = _EMPTINESS_OPS | {Op.IN, Op.NOT_IN}
# When a map lacks the selected key, evaluate.go answers without looking further: false for
# these, true for every other operator (including "matches", a go-bexpr quirk kept on purpose).
FALSE_WHEN_KEY_MISSING: Final = frozenset({Op.EQUAL, Op.IS_NOT_EMPTY, Op.IN})


def _is_compound(schema: Schema) -> bool:
    return isinstance(schema, Struct | MapOf | ListOf)


def child_schema(schema: Schema, name: str) -> Schema | None:
    """The schema one selector step below ``schema`` (field_config.go's SubFields)."""
    if isinstance(schema, Struct):
        return schema.field_schema(name)
    if isinstance(schema, MapOf):
        return schema.value
    if isinstance(schema, ListOf) and _is_compound(schema.element):
        # A slice exposes its element's sub-fields, not indexes.
        return child_schema(schema.element, name)
    return None


def operations(schema: Schema) -> frozenset[Op]:
    if isinstance(schema, Scalar):
        return _STRING_OPS if schema.kind is Kind.STRING else _SCALAR_OPS
    if isinstance(schema, IPAddress | MapOf):
        return _CONTAINER_OPS
    if isinstance(schema, ListOf):
        return _EMPTINESS_OPS if _is_compound(schema.element) else _CONTAINER_OPS
    return frozenset()


def coercion_kind(schema: Schema) -> Kind | None:
    if isinstance(schema, Scalar):
        return schema.kind
    if isinstance(schema, ListOf) and isinstance(schema.element, Scalar):
        return schema.element.kind
    if isinstance(schema, IPAddress):
        return Kind.UINT8
    if isinstance(schema, MapOf):
        return Kind.STRING
    return None
