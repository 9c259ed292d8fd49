"""go-bexpr v0.1.2's grammar.peg on the PEG engine, and the expression tree it builds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from devstack.bexpr.errors import FilterSyntaxError
from devstack.bexpr.peg import (
    Action,
    AnyChar,
    Choice,
    Class,
    Expr,
    Fail,
    Lit,
    Lookahead,
    Optional,
    ParseState,
    Repeat,
    Rule,
    Seq,
)
from devstack.bexpr.schema import Op
from devstack.bexpr.strconv import go_unquote


@dataclass(frozen=True)
class Match:
    selector: tuple[str, ...]
    op: Op
    value: str | None


@dataclass(frozen=True)
class Not:
    operand: Ast


@dataclass(frozen=True)
class _Junction:
    """``a and b and c`` (or ``or``): grammar.peg nests these to the right; flat is equivalent
    (same operands, same left-to-right short-circuit) and keeps long chains off the stack."""

    is_and: bool
    operands: tuple[Ast, ...]


Ast: TypeAlias = Match | Not | _Junction


def _pick(index: int) -> Callable[[Any, str], object]:
    return lambda values, _text: values[index]


def _constant(value: object) -> Callable[[Any, str], object]:
    return lambda _values, _text: value


def _fold(is_and: bool) -> Callable[[Any, str], object]:
    def build(values: Any, _text: str) -> object:
        first: Ast = values[0]
        rest: list[Ast] = [tail[3] for tail in values[1]]
        return _Junction(is_and, (first, *rest)) if rest else first

    return build


def _negate(values: Any, _text: str) -> object:
    operand: Ast = values[2]
    return operand.operand if isinstance(operand, Not) else Not(operand)


def _match_selector_first(values: Any, _text: str) -> object:
    return Match(tuple(values[0]), values[1], values[2] if len(values) > 2 else None)


def _match_value_first(values: Any, _text: str) -> object:
    return Match(tuple(values[2]), values[1], values[0])


def _build_grammar() -> Rule:
    rules: dict[str, Rule] = {}

    def rule(name: str, display: str | None = None) -> Rule:
        return rules.setdefault(name, Rule(name, display))

    ws = rule("_", "whitespace")
    ows = Optional(ws)
    eof = rule("EOF")
    or_expr = rule("OrExpression")
    and_expr = rule("AndExpression")
    not_expr = rule("NotExpression")
    grouping = rule("ParenthesizedExpression", "grouping")
    match = rule("MatchExpression", "match")
    selector_op_value = rule("MatchSelectorOpValue", "match")
    selector_op = rule("MatchSelectorOp", "match")
    value_op_selector = rule("MatchValueOpSelector", "match")
    selector = rule("Selector", "selector")
    identifier = rule("Identifier")
    selector_or_index = rule("SelectorOrIndex")
    index = rule("IndexExpression", "index")
    value = rule("Value", "value")
    number = rule("NumberLiteral", "number")
    after_numbers = rule("AfterNumbers")
    integer_or_float = rule("IntegerOrFloat")
    string = rule("StringLiteral", "string")
    raw_char = rule("RawStringChar")
    double_char = rule("DoubleStringChar")

    def operator(op: Op, *parts: Expr) -> Expr:
        return Action(Seq(*parts), _constant(op))

    equal = operator(Op.EQUAL, ows, Lit("=="), ows)
    not_equal = operator(Op.NOT_EQUAL, ows, Lit("!="), ows)
    is_empty = operator(Op.IS_EMPTY, ws, Lit("is"), ws, Lit("empty"))
    is_not_empty = operator(Op.IS_NOT_EMPTY, ws, Lit("is"), ws, Lit("not"), ws, Lit("empty"))
    in_op = operator(Op.IN, ws, Lit("in"), ws)
    not_in = operator(Op.NOT_IN, ws, Lit("not"), ws, Lit("in"), ws)
    contains = operator(Op.IN, ws, Lit("contains"), ws)
    not_contains = operator(Op.NOT_IN, ws, Lit("not"), ws, Lit("contains"), ws)
    matches = operator(Op.MATCHES, ws, Lit("matches"), ws)
    not_matches = operator(Op.NOT_MATCHES, ws, Lit("not"), ws, Lit("matches"), ws)

    top = rule("Input")
    top.body = Choice(
        Action(Seq(ows, Lit("("), ows, or_expr, ows, Lit(")"), ows, eof), _pick(3)),
        Action(Seq(ows, or_expr, ows, eof), _pick(1)),
    )
    or_expr.body = Action(
        Seq(and_expr, Repeat(Seq(ws, Lit("or"), ws, and_expr))), _fold(is_and=False)
    )
    and_expr.body = Action(
        Seq(not_expr, Repeat(Seq(ws, Lit("and"), ws, not_expr))), _fold(is_and=True)
    )
    not_expr.body = Choice(Action(Seq(Lit("not"), ws, not_expr), _negate), grouping)
    grouping.body = Choice(
        Action(Seq(Lit("("), ows, or_expr, ows, Lit(")")), _pick(2)),
        match,
        Seq(
            Lit("("),
            ows,
            or_expr,
            ows,
            Lookahead(Lit(")"), negative=True),
            Fail("Unmatched parentheses"),
        ),
    )
    match.body = Choice(selector_op_value, selector_op, value_op_selector)
    selector_op_value.body = Action(
        Seq(
            selector,
            Choice(equal, not_equal, contains, not_contains, matches, not_matches),
            value,
        ),
        _match_selector_first,
    )
    selector_op.body = Action(Seq(selector, Choice(is_empty, is_not_empty)), _match_selector_first)
    value_op_selector.body = Choice(
        Action(Seq(value, Choice(in_op, not_in), selector), _match_value_first),
        Seq(
            value,
            Choice(in_op, not_in),
            Lookahead(selector, negative=True),
            Fail("Invalid selector"),
        ),
    )
    selector.body = Action(Seq(identifier, Repeat(selector_or_index)), lambda v, _t: [v[0], *v[1]])
    identifier.body = Action(
        Seq(
            Class("[a-zA-Z]", lambda c: c.isascii() and c.isalpha()),
            Repeat(Class("[a-zA-Z0-9_]", lambda c: c.isascii() and (c.isalnum() or c == "_"))),
        ),
        lambda _v, text: text,
    )
    selector_or_index.body = Choice(Action(Seq(Lit("."), identifier), _pick(1)), index)
    index.body = Choice(
        Action(Seq(Lit("["), ows, string, ows, Lit("]")), _pick(2)),
        Seq(Lit("["), ows, Lookahead(string, negative=True), Fail("Invalid index")),
        Seq(
            Lit("["),
            ows,
            string,
            ows,
            Lookahead(Lit("]"), negative=True),
            Fail("Unclosed index expression"),
        ),
    )
    value.body = Choice(
        Action(selector, lambda v, _t: ".".join(v)),
        number,
        string,
    )
    minus = Optional(Lit("-"))
    number.body = Choice(
        Action(
            Seq(minus, integer_or_float, Lookahead(after_numbers, negative=False)),
            lambda _v, text: text,
        ),
        Seq(
            minus,
            integer_or_float,
            Lookahead(after_numbers, negative=True),
            Fail("Invalid number literal"),
        ),
    )
    after_numbers.body = Lookahead(Choice(ws, eof, Lit(")")), negative=False)
    digit = Class("[0-9]", lambda c: "0" <= c <= "9")
    integer_or_float.body = Seq(
        Choice(Lit("0"), Seq(Class("[1-9]", lambda c: "1" <= c <= "9"), Repeat(digit))),
        Optional(Seq(Lit("."), Repeat(digit, at_least_one=True))),
    )
    backtick, quote = Lit("`"), Lit('"')
    string.body = Choice(
        Action(
            Choice(
                Seq(backtick, Repeat(raw_char), backtick),
                Seq(quote, Repeat(double_char), quote),
            ),
            lambda _v, text: go_unquote(text),
        ),
        Seq(
            Choice(Seq(backtick, Repeat(raw_char)), Seq(quote, Repeat(double_char))),
            eof,
            Fail("Unterminated string literal"),
        ),
    )
    raw_char.body = Seq(Lookahead(backtick, negative=True), AnyChar())
    double_char.body = Seq(Lookahead(quote, negative=True), AnyChar())
    ws.body = Repeat(Class("[ \\t\\r\\n]", lambda c: c in " \t\r\n"), at_least_one=True)
    eof.body = Lookahead(AnyChar(), negative=True)
    return top


_GRAMMAR: Final = _build_grammar()


def _list_join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def parse(expression: str) -> Ast:
    st = ParseState(expression)
    try:
        ok, tree = _GRAMMAR.parse(st)
    except RecursionError:
        # Go's goroutine stacks grow; Python's do not. Nobody nests a Consul filter this deep.
        raise FilterSyntaxError("expression is nested too deeply for this server") from None
    if not ok and not st.errors:
        expected = set(st.max_fail_expected)
        at_end = "!." in expected
        expected.discard("!.")
        wanted = sorted(expected) + (["EOF"] if at_end else [])
        st.errors.append(
            f"{st.position(st.max_fail_pos)}: no match found, expected: {_list_join(wanted)}"
        )
    if st.errors:
        raise FilterSyntaxError("\n".join(dict.fromkeys(st.errors)))
    assert isinstance(tree, Match | Not | _Junction)
    return tree
