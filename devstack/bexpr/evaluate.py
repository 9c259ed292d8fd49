"""A parsed expression checked against a schema once, then compiled into closures that walk data."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from devstack.bexpr.errors import FilterSchemaError
from devstack.bexpr.grammar import Ast, Match, Not, parse
from devstack.bexpr.regexp import GoRegexp, RegexpError, UnsupportedRegexp, compile_go_regexp
from devstack.bexpr.schema import (
    FALSE_WHEN_KEY_MISSING,
    NEGATED,
    IPAddress,
    Kind,
    ListOf,
    MapOf,
    Op,
    Scalar,
    Schema,
    Struct,
    child_schema,
    coercion_kind,
    operations,
)
from devstack.bexpr.strconv import NumError, coerce, go_quote

_Predicate: TypeAlias = Callable[[object], bool]

_ZERO: Final[dict[Kind, object]] = {
    Kind.BOOL: False,
    Kind.INT: 0,
    Kind.UINT8: 0,
    Kind.UINT16: 0,
    Kind.FLOAT64: 0.0,
    Kind.STRING: "",
}


def _scalar(kind: Kind, value: object) -> object:
    """A rendered JSON value as the Go field held it; absent or null is the zero value."""
    return _ZERO[kind] if value is None else value


def _sequence(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def _ip_bytes(value: object) -> list[object]:
    if not isinstance(value, str) or not value:
        return []
    try:
        return list(ipaddress.ip_address(value).packed)
    except ValueError:
        return []


def _leaf(schema: Schema, op: Op, operand: object) -> _Predicate:
    """The operator applied where the selector ends (evaluate.go's doMatch* functions)."""
    positive = NEGATED.get(op, op)
    test: _Predicate
    if isinstance(schema, Scalar):
        kind = schema.kind
        if positive is Op.EQUAL:

            def test(v: object) -> bool:
                return _scalar(kind, v) == operand

        elif positive is Op.IN:
            assert isinstance(operand, str)

            def test(v: object) -> bool:
                held = _scalar(kind, v)
                return isinstance(held, str) and operand in held

        else:
            assert isinstance(operand, GoRegexp)
            pattern = operand

            def test(v: object) -> bool:
                held = _scalar(kind, v)
                return isinstance(held, str) and pattern.search(held)

    elif isinstance(schema, MapOf):
        if positive is Op.IN:

            def test(v: object) -> bool:
                return isinstance(v, Mapping) and operand in v

        else:

            def test(v: object) -> bool:
                return not v

    else:
        items: Callable[[object], list[object]]
        if isinstance(schema, IPAddress):
            items, kind = _ip_bytes, Kind.UINT8
        else:
            assert isinstance(schema, ListOf)  # structs support no operator at all
            items = _sequence
            kind = schema.element.kind if isinstance(schema.element, Scalar) else Kind.STRING
        if positive is Op.IN:

            def test(v: object) -> bool:
                return any(_scalar(kind, item) == operand for item in items(v))

        else:

            def test(v: object) -> bool:
                return not items(v)

    if positive is op:
        return test
    return lambda v: not test(v)


def _walker(schema: Schema, path: tuple[str, ...], op: Op, leaf: _Predicate) -> _Predicate:
    """Follows the selector through the rendered JSON (evaluateMatchExpressionRecurse)."""
    if not path:
        return leaf
    if isinstance(schema, ListOf):
        # Slices are crossed without consuming a selector step: any element may match.
        each = _walker(schema.element, path, op, leaf)
        return lambda v: any(each(item) for item in _sequence(v))
    name, rest = path[0], path[1:]
    if isinstance(schema, MapOf):
        inner = _walker(schema.value, rest, op, leaf)
        missing = op not in FALSE_WHEN_KEY_MISSING

        def through_map(v: object) -> bool:
            if isinstance(v, Mapping) and name in v:
                return inner(v[name])
            return missing

        return through_map
    assert isinstance(schema, Struct)
    child = schema.field_schema(name)
    assert child is not None
    inner = _walker(child, rest, op, leaf)
    # A struct field absent from the JSON (omitempty, or a nil pointer) reads as its zero value.
    return lambda v: inner(v.get(name) if isinstance(v, Mapping) else None)


def _compile_match(node: Match, root: Schema) -> _Predicate:
    selector_text = ".".join(node.selector)
    schema = root
    for depth, part in enumerate(node.selector):
        child = child_schema(schema, part)
        if child is None:
            invalid = go_quote(".".join(node.selector[: depth + 1]))
            raise FilterSchemaError(f"Selector {invalid} is not valid")
        schema = child
    if node.op not in operations(schema):
        raise FilterSchemaError(
            f"Invalid match operator {go_quote(node.op.value)} "
            f"for selector {go_quote(selector_text)}"
        )
    operand: object = None
    if node.value is not None:
        kind = coercion_kind(schema)
        assert kind is not None
        try:
            operand = coerce(kind, node.value)
        except NumError as err:
            raise FilterSchemaError(
                f"Failed to coerce value {go_quote(node.value)} "
                f"for selector {go_quote(selector_text)}: {err}"
            ) from None
        if node.op in (Op.MATCHES, Op.NOT_MATCHES):
            assert isinstance(operand, str)
            regexp = operand
            try:
                operand = compile_go_regexp(regexp)
            except RegexpError as err:
                raise FilterSchemaError(
                    f"Failed to compile regular expression {go_quote(regexp)}: {err}"
                ) from None
            except UnsupportedRegexp as err:
                raise FilterSchemaError(
                    f"Failed to compile regular expression {go_quote(regexp)}: "
                    f"{err} not supported by the devstack"
                ) from None
    return _walker(root, node.selector, node.op, _leaf(schema, node.op, operand))


def _compile(node: Ast, root: Schema) -> _Predicate:
    # Operands in order, so the first error raised is the one go-bexpr's validate() returns.
    if isinstance(node, Match):
        return _compile_match(node, root)
    if isinstance(node, Not):
        operand = _compile(node.operand, root)
        return lambda v: not operand(v)
    operands = tuple(_compile(operand, root) for operand in node.operands)
    if node.is_and:
        return lambda v: all(operand(v) for operand in operands)
    return lambda v: any(operand(v) for operand in operands)


@dataclass(frozen=True)
class Filter:
    """A compiled filter expression; :meth:`matches` only walks data."""

    expression: str
    _predicate: _Predicate = field(repr=False, compare=False)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return self._predicate(obj)


def check_syntax(expression: str) -> None:
    """Parse ``expression`` only (go-bexpr's ``CreateEvaluator`` with no data type).

    Raises :class:`FilterSyntaxError`.
    """
    parse(expression)


def compile_filter(expression: str, schema: Schema) -> Filter:
    """Parse ``expression`` and check it against ``schema``, as Consul's ``CreateFilter`` does.

    Raises :class:`FilterSyntaxError` or :class:`FilterSchemaError`. An empty expression is
    go-bexpr's nil filter and matches everything; whitespace alone is a syntax error.
    """
    if expression == "":
        return Filter(expression, lambda _v: True)
    return Filter(expression, _compile(parse(expression), schema))
