"""A PEG engine with pigeon's parsing and error semantics, so syntax errors carry its exact text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from devstack.bexpr.strconv import UnquoteError, go_quote


class ParseState:
    """pigeon's parser state: position, farthest failure, recorded errors, rule stack."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.max_fail_pos = 0
        self.max_fail_expected: list[str] = []
        self.invert = False
        self.rules: list[Rule] = []
        self.errors: list[str] = []
        self.memo: dict[tuple[str, int, bool], tuple[bool, object, int]] = {}

    def fail_at(self, matched: bool, pos: int, want: str) -> None:
        # pigeon records a failure to match, or a match inside a negative lookahead.
        if matched != self.invert or pos < self.max_fail_pos:
            return
        if pos > self.max_fail_pos:
            self.max_fail_pos = pos
            self.max_fail_expected.clear()
        self.max_fail_expected.append("!" + want if self.invert else want)

    def position(self, index: int) -> str:
        """pigeon's ``line:col (offset)``: rune columns, byte offsets, col 0 on a newline."""
        line, col = 1, 0
        for char in self.text[: index + 1]:
            col += 1
            if char == "\n":
                line, col = line + 1, 0
        if index >= len(self.text):
            col += 1
        offset = len(self.text[:index].encode("utf-8", "surrogatepass"))
        return f"{line}:{col} ({offset})"

    def add_error(self, index: int, message: str) -> None:
        prefix = self.position(index)
        if self.rules:
            prefix += f": rule {self.rules[-1].label}"
        self.errors.append(f"{prefix}: {message}")


class Expr:
    def parse(self, st: ParseState) -> tuple[bool, object]:
        raise NotImplementedError


class Lit(Expr):
    def __init__(self, literal: str) -> None:
        self.literal = literal
        self.want = go_quote(literal)

    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        if st.text.startswith(self.literal, start):
            st.pos += len(self.literal)
            st.fail_at(True, start, self.want)
            return True, self.literal
        st.fail_at(False, start, self.want)
        return False, None


class Class(Expr):
    def __init__(self, want: str, accepts: Callable[[str], bool]) -> None:
        self.want = want  # the class as written in grammar.peg, as pigeon reports it
        self.accepts = accepts

    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        if start < len(st.text) and self.accepts(st.text[start]):
            st.pos += 1
            st.fail_at(True, start, self.want)
            return True, st.text[start]
        st.fail_at(False, start, self.want)
        return False, None


class AnyChar(Expr):
    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        if start >= len(st.text):
            st.fail_at(False, start, ".")
            return False, None
        st.pos += 1
        st.fail_at(True, start, ".")
        return True, st.text[start]


class Seq(Expr):
    def __init__(self, *items: Expr) -> None:
        self.items = items

    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        values: list[object] = []
        for item in self.items:
            ok, value = item.parse(st)
            if not ok:
                st.pos = start
                return False, None
            values.append(value)
        return True, values


class Choice(Expr):
    def __init__(self, *alternatives: Expr) -> None:
        self.alternatives = alternatives

    def parse(self, st: ParseState) -> tuple[bool, object]:
        for alternative in self.alternatives:
            ok, value = alternative.parse(st)
            if ok:
                return True, value
        return False, None


class Optional(Expr):
    def __init__(self, item: Expr) -> None:
        self.item = item

    def parse(self, st: ParseState) -> tuple[bool, object]:
        return True, self.item.parse(st)[1]


class Repeat(Expr):
    def __init__(self, item: Expr, *, at_least_one: bool = False) -> None:
        self.item = item
        self.at_least_one = at_least_one

    def parse(self, st: ParseState) -> tuple[bool, object]:
        values: list[object] = []
        while True:
            ok, value = self.item.parse(st)
            if not ok:
                return bool(values) or not self.at_least_one, values
            values.append(value)


class Lookahead(Expr):
    def __init__(self, item: Expr, *, negative: bool) -> None:
        self.item = item
        self.negative = negative

    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        if self.negative:
            st.invert = not st.invert
        ok, _ = self.item.parse(st)
        if self.negative:
            st.invert = not st.invert
        st.pos = start
        return ok != self.negative, None


class Action(Expr):
    def __init__(self, item: Expr, build: Callable[[Any, str], object]) -> None:
        self.item = item
        self.build = build

    def parse(self, st: ParseState) -> tuple[bool, object]:
        start = st.pos
        ok, value = self.item.parse(st)
        if not ok:
            return False, None
        try:
            return True, self.build(value, st.text[start : st.pos])
        except UnquoteError:
            # An action's error is recorded and parsing continues, as pigeon does.
            st.add_error(start, "invalid syntax")
            return True, ""


class Fail(Expr):
    """``&{ return false, errors.New(message) }``: records the error where it stands."""

    def __init__(self, message: str) -> None:
        self.message = message

    def parse(self, st: ParseState) -> tuple[bool, object]:
        st.add_error(st.pos, self.message)
        return False, None


class Rule(Expr):
    def __init__(self, name: str, display: str | None = None) -> None:
        self.name = name
        self.label = go_quote(display) if display is not None else name
        self.body: Expr = Fail("undefined rule")

    def parse(self, st: ParseState) -> tuple[bool, object]:
        # Memoizing is invisible: a replay would only re-record failures and errors that the
        # first attempt already recorded, and pigeon de-duplicates errors by message.
        key = (self.name, st.pos, st.invert)
        cached = st.memo.get(key)
        if cached is not None:
            ok, value, end = cached
            st.pos = end
            return ok, value
        st.rules.append(self)
        ok, value = self.body.parse(st)
        st.rules.pop()
        st.memo[key] = (ok, value, st.pos)
        return ok, value
