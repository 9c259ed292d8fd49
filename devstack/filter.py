"""Consul's ``?filter=`` expression language, as Consul evaluates it.

Consul (every release up to the current one) pins hashicorp/go-bexpr at v0.1.2, the last release
that checks selectors against the Go type of the filtered data when the filter is created. This
module reproduces that release: its grammar (``grammar.peg``, parsed with pigeon's semantics so
that syntax errors carry pigeon's exact text), its compile-time validation (``validate.go`` and
``field_config.go``: unknown selectors, unsupported operators, literal coercion through Go's
``strconv``, regular-expression compilation) and its evaluation rules (``evaluate.go``: any-element
semantics through lists, Go's rules for absent map keys).

The filtered objects are the JSON dicts the devstack renders. A :class:`Schema` describes the Go
type behind that JSON, so that validation can happen once, in :func:`compile_filter`, and
:meth:`Filter.matches` only walks data.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import re2

__all__ = [
    "BOOL",
    "FLOAT64",
    "INT",
    "STRING",
    "UINT8",
    "UINT16",
    "Filter",
    "FilterError",
    "FilterSchemaError",
    "FilterSyntaxError",
    "IPAddress",
    "Kind",
    "ListOf",
    "MapOf",
    "Scalar",
    "Schema",
    "Struct",
    "compile_filter",
    "struct",
]


class FilterError(ValueError):
    """A filter expression go-bexpr would reject; ``str()`` is go-bexpr's message.

    Consul answers 500 with ``Failed to create boolean expression evaluator: <message>``.
    """


class FilterSyntaxError(FilterError):
    """The expression does not parse (pigeon's ``line:col (offset): ...`` messages)."""


class FilterSchemaError(FilterError):
    """The expression parses but does not fit the filtered type.

    The distinction matters for one endpoint: ``/v1/agent/checks`` creates its filter without a
    data type, so Consul only reports these errors when evaluating, without the ``Failed to
    create boolean expression evaluator:`` prefix, and not at all when there is nothing to filter.
    """


# --------------------------------------------------------------------------------------------
# Schemas: the Go types that selectors are checked against
# --------------------------------------------------------------------------------------------


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


class _Op(enum.Enum):
    # Values are go-bexpr's MatchOperator.String(), which its error messages quote.
    EQUAL = "Equal"
    NOT_EQUAL = "Not Equal"
    IN = "In"
    NOT_IN = "Not In"
    IS_EMPTY = "Is Empty"
    IS_NOT_EMPTY = "Is Not Empty"
    MATCHES = "Matches"
    NOT_MATCHES = "Not Matches"


_NEGATED: Final = {
    _Op.NOT_EQUAL: _Op.EQUAL,
    _Op.NOT_IN: _Op.IN,
    _Op.IS_NOT_EMPTY: _Op.IS_EMPTY,
    _Op.NOT_MATCHES: _Op.MATCHES,
}
_SCALAR_OPS: Final = frozenset({_Op.EQUAL, _Op.NOT_EQUAL})
_STRING_OPS: Final = _SCALAR_OPS | {_Op.IN, _Op.NOT_IN, _Op.MATCHES, _Op.NOT_MATCHES}
_EMPTINESS_OPS: Final = frozenset({_Op.IS_EMPTY, _Op.IS_NOT_EMPTY})
_CONTAINER_OPS: Final = _EMPTINESS_OPS | {_Op.IN, _Op.NOT_IN}
# When a map lacks the selected key, evaluate.go answers without looking further: false for
# these, true for every other operator (including "matches", a go-bexpr quirk kept on purpose).
_FALSE_WHEN_KEY_MISSING: Final = frozenset({_Op.EQUAL, _Op.IS_NOT_EMPTY, _Op.IN})


def _is_compound(schema: Schema) -> bool:
    return isinstance(schema, Struct | MapOf | ListOf)


def _child_schema(schema: Schema, name: str) -> Schema | None:
    """The schema one selector step below ``schema`` (field_config.go's SubFields)."""
    if isinstance(schema, Struct):
        return schema.field_schema(name)
    if isinstance(schema, MapOf):
        return schema.value
    if isinstance(schema, ListOf) and _is_compound(schema.element):
        # A slice exposes its element's sub-fields, not indexes.
        return _child_schema(schema.element, name)
    return None


def _operations(schema: Schema) -> frozenset[_Op]:
    if isinstance(schema, Scalar):
        return _STRING_OPS if schema.kind is Kind.STRING else _SCALAR_OPS
    if isinstance(schema, IPAddress | MapOf):
        return _CONTAINER_OPS
    if isinstance(schema, ListOf):
        return _EMPTINESS_OPS if _is_compound(schema.element) else _CONTAINER_OPS
    return frozenset()


def _coercion_kind(schema: Schema) -> Kind | None:
    if isinstance(schema, Scalar):
        return schema.kind
    if isinstance(schema, ListOf) and isinstance(schema.element, Scalar):
        return schema.element.kind
    if isinstance(schema, IPAddress):
        return Kind.UINT8
    if isinstance(schema, MapOf):
        return Kind.STRING
    return None


# --------------------------------------------------------------------------------------------
# Go formatting and strconv, for literal values and for error texts
# --------------------------------------------------------------------------------------------

_GO_CONTROL_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _go_quote(text: str) -> str:
    """Go's ``%q`` / ``strconv.Quote``; raw bytes survive as surrogate escapes and print as \\x."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif char in _GO_CONTROL_ESCAPES:
            out.append(_GO_CONTROL_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


class _UnquoteError(Exception):
    """strconv.ErrSyntax."""


_SIMPLE_ESCAPES: Final = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def _go_unquote(literal: str) -> str:
    """``strconv.Unquote`` for the two literal forms the grammar accepts."""
    body = literal[1:-1]
    if literal[0] == "`":
        return body.replace("\r", "")
    if "\n" in body:
        raise _UnquoteError
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _UnquoteError
        escape = body[i + 1]
        i += 2
        if escape in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[escape])
        elif escape == '"':
            out.append(ord('"'))
        elif escape in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[escape]
            digits = body[i : i + width]
            if len(digits) < width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _UnquoteError
            value = int(digits, 16)
            i += width
            if escape == "x":
                out.append(value)  # a single byte, possibly not UTF-8, like Go
            elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise _UnquoteError
            else:
                out += chr(value).encode()
        elif escape in "01234567":
            digits = escape + body[i : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise _UnquoteError
            value = int(digits, 8)
            if value > 255:
                raise _UnquoteError
            out.append(value)
            i += 2
        else:
            raise _UnquoteError
    return out.decode("utf-8", "surrogateescape")


class _NumError(Exception):
    """strconv.NumError; str() is Go's text."""

    def __init__(self, func: str, num: str, reason: str) -> None:
        super().__init__(f"strconv.{func}: parsing {_go_quote(num)}: {reason}")
        self.func = func
        self.reason = reason


_SYNTAX: Final = "invalid syntax"
_RANGE: Final = "value out of range"


def _underscore_ok(text: str) -> bool:
    """strconv's rule: underscores only between digits (a base prefix counts as a digit)."""
    if text[:1] in ("+", "-"):
        text = text[1:]
    saw = "^"
    i = 0
    hexadecimal = False
    if len(text) >= 2 and text[0] == "0" and text[1].lower() in "box":
        i = 2
        saw = "0"
        hexadecimal = text[1].lower() == "x"
    for char in text[i:]:
        if char.isascii() and (char.isdigit() or (hexadecimal and char.lower() in "abcdef")):
            saw = "0"
        elif char == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def _parse_uint(text: str, bits: int, func: str = "ParseUint") -> int:
    """``strconv.ParseUint(text, 0, bits)``: base prefixes, leading-0 octal, underscores."""
    if not text:
        raise _NumError(func, text, _SYNTAX)
    digits = text
    base = 10
    if text[0] == "0":
        if len(text) >= 3 and text[1].lower() in "box":
            base = {"b": 2, "o": 8, "x": 16}[text[1].lower()]
            digits = text[2:]
        else:
            base = 8
            digits = text[1:]
    limit = (1 << bits) - 1
    value = 0
    underscores = False
    for char in digits:
        if char == "_":
            underscores = True
            continue
        if "0" <= char <= "9":
            digit = ord(char) - ord("0")
        elif char.isascii() and "a" <= char.lower() <= "z":
            digit = ord(char.lower()) - ord("a") + 10
        else:
            raise _NumError(func, text, _SYNTAX)
        if digit >= base:
            raise _NumError(func, text, _SYNTAX)
        value = value * base + digit
        if value > limit:
            # Go reports overflow at the digit that causes it, before seeing later junk.
            raise _NumError(func, text, _RANGE)
    if underscores and not _underscore_ok(text):
        raise _NumError(func, text, _SYNTAX)
    return value


def _parse_int(text: str) -> int:
    """``strconv.ParseInt(text, 0, 64)`` (Go's ``int`` is 64 bits on Consul's platforms)."""
    if not text:
        raise _NumError("ParseInt", text, _SYNTAX)
    negative = text[0] == "-"
    unsigned = text[1:] if text[0] in "+-" else text
    try:
        magnitude = _parse_uint(unsigned, 64)
    except _NumError as err:
        if err.reason != _RANGE:
            raise _NumError("ParseInt", text, err.reason) from None
        magnitude = 1 << 64
    cutoff = 1 << 63
    if magnitude > cutoff or (magnitude == cutoff and not negative):
        raise _NumError("ParseInt", text, _RANGE)
    return -magnitude if negative else magnitude


_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _parse_bool(text: str) -> bool:
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise _NumError("ParseBool", text, _SYNTAX)


_GO_DECIMAL_FLOAT: Final = re.compile(r"[+-]?(?:[0-9_]+\.?[0-9_]*|\.[0-9_]+)(?:[eE][+-]?[0-9_]+)?")
_GO_HEX_FLOAT: Final = re.compile(
    r"[+-]?0[xX](?:[0-9a-fA-F_]+\.?[0-9a-fA-F_]*|\.[0-9a-fA-F_]+)[pP][+-]?[0-9_]+"
)
_GO_SPECIAL_FLOAT: Final = re.compile(r"[+-]?(?:inf|infinity)|nan", re.IGNORECASE)


def _parse_float(text: str) -> float:
    """``strconv.ParseFloat(text, 64)``, including hex floats, inf/nan and overflow."""
    if _GO_SPECIAL_FLOAT.fullmatch(text):
        return float(text)
    if _GO_HEX_FLOAT.fullmatch(text):
        cleaned = text.replace("_", "")
        mantissa, _, exponent = cleaned.lower().partition("p")
        value = float.fromhex(mantissa + "p" + exponent)
    elif _GO_DECIMAL_FLOAT.fullmatch(text) and any(c.isdigit() for c in text):
        value = float(text.replace("_", ""))
    else:
        raise _NumError("ParseFloat", text, _SYNTAX)
    if "_" in text and not _underscore_ok(text):
        raise _NumError("ParseFloat", text, _SYNTAX)
    if math.isinf(value):
        raise _NumError("ParseFloat", text, _RANGE)
    return value


def _coerce(kind: Kind, raw: str) -> object:
    if kind is Kind.STRING:
        return raw
    if kind is Kind.BOOL:
        return _parse_bool(raw)
    if kind is Kind.INT:
        return _parse_int(raw)
    if kind is Kind.UINT8:
        return _parse_uint(raw, 8)
    if kind is Kind.UINT16:
        return _parse_uint(raw, 16)
    return _parse_float(raw)


# --------------------------------------------------------------------------------------------
# Go regexp (RE2 syntax) on top of Python's re
# --------------------------------------------------------------------------------------------


class _RegexpError(Exception):
    """A regexp/syntax error; str() is Go's text."""

    def __init__(self, code: str, expr: str) -> None:
        super().__init__(f"error parsing regexp: {code}: `{expr}`")


class _UnsupportedRegexp(Exception):
    """Valid RE2 that Python's re cannot express; reported honestly rather than approximated."""


_PERL_CLASSES: Final = {"d": "0-9", "s": "\\t\\n\\f\\r ", "w": "0-9A-Za-z_"}
_POSIX_CLASSES: Final = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
# Go's \b is an ASCII word boundary; \z is Python's \Z (Go has no \Z).
_ASSERTIONS: Final = {"A": "\\A", "z": "\\Z", "b": "(?a:\\b)", "B": "(?a:\\B)"}
_REPEAT: Final = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")


def _code_point(code: int) -> str:
    return f"\\U{code:08x}"


@dataclass
class _Group:
    multiline: bool
    # Go's "(?i)" changes flags until the enclosing group ends; Python only has scoped groups,
    # so each one is opened here and closed (and reopened after "|") by the translator.
    flag_openers: list[str] = field(default_factory=list)


class _GoRegexpTranslator:
    """Rewrites RE2 syntax into an equivalent Python pattern, rejecting what RE2 rejects."""

    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.i = 0
        self.out: list[str] = []
        self.groups = [_Group(multiline=False)]
        self.can_repeat = False
        self.last_repeat_start: int | None = None

    def translate(self) -> str:
        while self.i < len(self.src):
            self._step()
        if len(self.groups) > 1:
            raise _RegexpError("missing closing )", self.src)
        self.out.append(")" * len(self.groups[0].flag_openers))
        return "".join(self.out)

    def _atom(self, text: str) -> None:
        self.out.append(text)
        self.can_repeat = True
        self.last_repeat_start = None

    def _step(self) -> None:
        char = self.src[self.i]
        if char in "*+?{":
            if self._repeat():
                return
            char = "{"  # not a well-formed repetition: a literal brace, as in Go
        if char == "\\":
            self._escape()
        elif char == "[":
            self._atom(self._char_class())
        elif char == "(":
            self._open_group()
        elif char == ")":
            self._close_group()
        elif char == "|":
            group = self.groups[-1]
            self.out.append(")" * len(group.flag_openers) + "|" + "".join(group.flag_openers))
            self.i += 1
            self.can_repeat = False
            self.last_repeat_start = None
        elif char == "$":
            self.i += 1
            self._atom("(?:$)" if self.groups[-1].multiline else "(?:\\Z)")
        elif char == "^":
            self.i += 1
            self._atom("(?:^)")
        elif char == ".":
            self.i += 1
            self._atom(".")
        else:
            self.i += 1
            self._atom(re.escape(char))

    def _repeat(self) -> bool:
        start = self.i
        if self.src[start] == "{":
            found = _REPEAT.match(self.src, start)
            if found is None or any(
                len(n) > 1 and n[0] == "0" for n in (found.group(1), found.group(3) or "")
            ):
                return False
            end = found.end()
            low = int(found.group(1))
            high = low if found.group(2) is None else int(found.group(3) or -1)
            if low > 1000 or high > 1000 or 0 <= high < low:
                raise _RegexpError("invalid repeat count", self.src[start:end])
        else:
            end = start + 1
        if end < len(self.src) and self.src[end] == "?":
            end += 1
        if self.last_repeat_start is not None:
            raise _RegexpError(
                "invalid nested repetition operator", self.src[self.last_repeat_start : end]
            )
        if not self.can_repeat:
            raise _RegexpError("missing argument to repetition operator", self.src[start:end])
        self.out.append(self.src[start:end])
        self.i = end
        self.last_repeat_start = start
        return True

    def _open_group(self) -> None:
        rest = self.src[self.i :]
        if not rest.startswith("(?"):
            self.i += 1
            self.out.append("(")
            self.groups.append(_Group(multiline=self.groups[-1].multiline))
            self.can_repeat = False
            self.last_repeat_start = None
            return
        named_p = len(rest) > 4 and rest.startswith("(?P<")
        if named_p or (len(rest) > 3 and rest.startswith("(?<")):
            close = rest.find(">")
            if close < 0:
                raise _RegexpError("invalid named capture", rest)
            name = rest[(4 if named_p else 3) : close]
            if not name or not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
                raise _RegexpError("invalid named capture", rest[: close + 1])
            self.i += close + 1
            self.out.append("(")  # names do not affect matching; Python's naming rules differ
            self.groups.append(_Group(multiline=self.groups[-1].multiline))
            self.can_repeat = False
            self.last_repeat_start = None
            return
        self._flags(rest)

    def _flags(self, rest: str) -> None:
        j = 2
        on: list[str] = []
        off: list[str] = []
        negated = False
        saw_flag = False
        while j < len(rest):
            char = rest[j]
            j += 1
            if char in "imsU":
                (off if negated else on).append(char)
                saw_flag = True
            elif char == "-" and not negated:
                negated = True
                saw_flag = False
            elif char in ":)" and not (negated and not saw_flag):
                self._apply_flags(on, off, scoped=char == ":")
                self.i += j
                return
            else:
                break
        raise _RegexpError("invalid or unsupported Perl syntax", rest[:j])

    def _apply_flags(self, on: list[str], off: list[str], *, scoped: bool) -> None:
        if "U" in on or "U" in off:
            raise _UnsupportedRegexp("the U (ungreedy) flag")
        group = self.groups[-1]
        multiline = ("m" in on or group.multiline) and "m" not in off
        opener = "(?" + "".join(on) + ("-" + "".join(off) if off else "") + ":"
        if opener == "(?:":
            opener = "(?:" if scoped else ""
        if scoped:
            self.out.append(opener)
            self.groups.append(_Group(multiline=multiline))
            self.can_repeat = False
            self.last_repeat_start = None
        elif opener:
            self.out.append(opener)
            group.flag_openers.append(opener)
            group.multiline = multiline

    def _close_group(self) -> None:
        if len(self.groups) == 1:
            raise _RegexpError("unexpected )", self.src)
        group = self.groups.pop()
        self.i += 1
        self._atom(")" * len(group.flag_openers) + ")")

    def _escape(self) -> None:
        start = self.i
        if start + 1 >= len(self.src):
            raise _RegexpError("trailing backslash at end of expression", "")
        char = self.src[start + 1]
        if char in _ASSERTIONS:
            self.i += 2
            self._atom("(?:" + _ASSERTIONS[char] + ")")
        elif char.lower() in _PERL_CLASSES:
            self.i += 2
            caret = "^" if char.isupper() else ""
            self._atom(f"[{caret}{_PERL_CLASSES[char.lower()]}]")
        elif char == "Q":
            end = self.src.find("\\E", start + 2)
            literal = self.src[start + 2 :] if end < 0 else self.src[start + 2 : end]
            self.i = len(self.src) if end < 0 else end + 2
            if literal:
                # Separate literals, as in Go: a following "*" repeats only the last one.
                self._atom(re.escape(literal))
        else:
            self._atom(_code_point(self._escaped_char()))

    def _escaped_char(self) -> int:
        """Go's parseEscape: one escaped code point; self.i is at the backslash."""
        start = self.i
        src = self.src
        if start + 1 >= len(src):
            raise _RegexpError("trailing backslash at end of expression", "")
        char = src[start + 1]
        self.i = start + 2
        if char in "pP":
            raise _UnsupportedRegexp("Unicode class escapes (\\p, \\P)")
        if char in "1234567" and (self.i >= len(src) or src[self.i] not in "01234567"):
            raise _RegexpError("invalid escape sequence", src[start : self.i])
        if char in "01234567":
            digits = char
            while len(digits) < 3 and self.i < len(src) and src[self.i] in "01234567":
                digits += src[self.i]
                self.i += 1
            return int(digits, 8)
        if char == "x":
            if src.startswith("{", self.i):
                # Go reads digit by digit and reports the text up to the first bad one.
                self.i += 1
                value = 0
                count = 0
                while self.i < len(src):
                    digit = src[self.i]
                    self.i += 1
                    if digit == "}" and count:
                        return value
                    if digit not in "0123456789abcdefABCDEF":
                        break
                    value = value * 16 + int(digit, 16)
                    count += 1
                    if value > 0x10FFFF:
                        break
                raise _RegexpError("invalid escape sequence", src[start : self.i])
            digits = src[self.i : self.i + 2]
            if len(digits) < 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.i = min(len(src), self.i + 2)
                raise _RegexpError("invalid escape sequence", src[start : self.i])
            self.i += 2
            return int(digits, 16)
        controls = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
        if char in controls:
            return controls[char]
        if char.isascii() and not char.isalnum():
            return ord(char)
        raise _RegexpError("invalid escape sequence", src[start : self.i])

    def _char_class(self) -> str:
        """A bracketed class. Go unions plain ranges with complemented sets (``[\\D_]``,
        ``[[:^alpha:]]``); Python classes cannot, so those become alternations and lookaheads."""
        start = self.i
        src = self.src
        self.i += 1
        negate = src.startswith("^", self.i)
        if negate:
            self.i += 1
        ranges: list[str] = []
        complemented: list[str] = []
        first = True
        while self.i >= len(src) or src[self.i] != "]" or first:
            if self.i >= len(src):
                raise _RegexpError("missing closing ]", src[start:])
            first = False
            if src.startswith("[:", self.i) and (close := src.find(":]", self.i + 2)) >= 0:
                name = src[self.i + 2 : close]
                if name.removeprefix("^") not in _POSIX_CLASSES:
                    raise _RegexpError("invalid character class range", src[self.i : close + 2])
                target = complemented if name.startswith("^") else ranges
                target.append(_POSIX_CLASSES[name.removeprefix("^")])
                self.i = close + 2
                continue
            letter = src[self.i + 1 : self.i + 2]
            if src[self.i] == "\\" and letter.lower() in _PERL_CLASSES and letter:
                target = ranges if letter.islower() else complemented
                target.append(_PERL_CLASSES[letter.lower()])
                self.i += 2
                continue
            range_start = self.i
            low = self._class_char(start)
            high = low
            if src.startswith("-", self.i) and self.i + 1 < len(src) and src[self.i + 1] != "]":
                self.i += 1
                high = self._class_char(start)
                if high < low:
                    raise _RegexpError("invalid character class range", src[range_start : self.i])
            ranges.append(_code_point(low) + ("" if low == high else "-" + _code_point(high)))
        self.i += 1
        plain = "".join(ranges)
        if not complemented:
            return f"[^{plain}]" if negate else f"[{plain}]"
        if not negate:
            alternatives = ([f"[{plain}]"] if plain else []) + [f"[^{c}]" for c in complemented]
            return "(?:" + "|".join(alternatives) + ")"
        # Not (plain or not A or not B) = not plain and A and B.
        guards = ([f"(?![{plain}])"] if plain else []) + [f"(?=[{c}])" for c in complemented[1:]]
        return "(?:" + "".join(guards) + f"[{complemented[0]}])"

    def _class_char(self, class_start: int) -> int:
        if self.i >= len(self.src):
            raise _RegexpError("missing closing ]", self.src[class_start:])
        if self.src[self.i] == "\\":
            return self._escaped_char()
        self.i += 1
        return ord(self.src[self.i - 1])


_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False


@dataclass(frozen=True)
class _GoRegexp:
    """A validated pattern, matched with RE2 as Go matches it: in time linear in the input.
    (Python's `re` backtracks: `^(a+)+$` against a 40-letter service name would hold the
    devstack's loop for ever, and any client may send `?filter=`.)"""

    compiled: Any

    def search(self, text: str) -> bool:
        try:
            return self.compiled.search(text) is not None
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800"): Go decodes it as U+FFFD.
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.compiled.search(fixed) is not None


def _compile_go_regexp(pattern: str) -> _GoRegexp:
    # The translator checks the syntax as Go does and words errors as Go does; a pattern it
    # accepts is then compiled by RE2, whose syntax Go's regexp shares.
    translated = _GoRegexpTranslator(pattern).translate()
    try:
        re.compile(translated)
    except re.error as err:  # RE2 accepts something Python does not; say so in Go's format
        raise _RegexpError(err.msg, pattern) from None
    try:
        return _GoRegexp(re2.compile(pattern, _RE2_OPTIONS))
    except re2.error:
        raise _UnsupportedRegexp(f"{pattern!r} (RE2 refuses it)") from None


# --------------------------------------------------------------------------------------------
# The grammar (go-bexpr v0.1.2 grammar.peg) with pigeon's parsing and error semantics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    selector: tuple[str, ...]
    op: _Op
    value: str | None


@dataclass(frozen=True)
class _Not:
    operand: _Ast


@dataclass(frozen=True)
class _Junction:
    """``a and b and c`` (or ``or``): grammar.peg nests these to the right; flat is equivalent
    (same operands, same left-to-right short-circuit) and keeps long chains off the stack."""

    is_and: bool
    operands: tuple[_Ast, ...]


_Ast: TypeAlias = _Match | _Not | _Junction


class _ParseState:
    """pigeon's parser state: position, farthest failure, recorded errors, rule stack."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.max_fail_pos = 0
        self.max_fail_expected: list[str] = []
        self.invert = False
        self.rules: list[_Rule] = []
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


class _Expr:
    def parse(self, st: _ParseState) -> tuple[bool, object]:
        raise NotImplementedError


class _Lit(_Expr):
    def __init__(self, literal: str) -> None:
        self.literal = literal
        self.want = _go_quote(literal)

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        if st.text.startswith(self.literal, start):
            st.pos += len(self.literal)
            st.fail_at(True, start, self.want)
            return True, self.literal
        st.fail_at(False, start, self.want)
        return False, None


class _Class(_Expr):
    def __init__(self, want: str, accepts: Callable[[str], bool]) -> None:
        self.want = want  # the class as written in grammar.peg, as pigeon reports it
        self.accepts = accepts

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        if start < len(st.text) and self.accepts(st.text[start]):
            st.pos += 1
            st.fail_at(True, start, self.want)
            return True, st.text[start]
        st.fail_at(False, start, self.want)
        return False, None


class _AnyChar(_Expr):
    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        if start >= len(st.text):
            st.fail_at(False, start, ".")
            return False, None
        st.pos += 1
        st.fail_at(True, start, ".")
        return True, st.text[start]


class _Seq(_Expr):
    def __init__(self, *items: _Expr) -> None:
        self.items = items

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        values: list[object] = []
        for item in self.items:
            ok, value = item.parse(st)
            if not ok:
                st.pos = start
                return False, None
            values.append(value)
        return True, values


class _Choice(_Expr):
    def __init__(self, *alternatives: _Expr) -> None:
        self.alternatives = alternatives

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        for alternative in self.alternatives:
            ok, value = alternative.parse(st)
            if ok:
                return True, value
        return False, None


class _Optional(_Expr):
    def __init__(self, item: _Expr) -> None:
        self.item = item

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        return True, self.item.parse(st)[1]


class _Repeat(_Expr):
    def __init__(self, item: _Expr, *, at_least_one: bool = False) -> None:
        self.item = item
        self.at_least_one = at_least_one

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        values: list[object] = []
        while True:
            ok, value = self.item.parse(st)
            if not ok:
                return bool(values) or not self.at_least_one, values
            values.append(value)


class _Lookahead(_Expr):
    def __init__(self, item: _Expr, *, negative: bool) -> None:
        self.item = item
        self.negative = negative

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        if self.negative:
            st.invert = not st.invert
        ok, _ = self.item.parse(st)
        if self.negative:
            st.invert = not st.invert
        st.pos = start
        return ok != self.negative, None


class _Action(_Expr):
    def __init__(self, item: _Expr, build: Callable[[Any, str], object]) -> None:
        self.item = item
        self.build = build

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        start = st.pos
        ok, value = self.item.parse(st)
        if not ok:
            return False, None
        try:
            return True, self.build(value, st.text[start : st.pos])
        except _UnquoteError:
            # An action's error is recorded and parsing continues, as pigeon does.
            st.add_error(start, "invalid syntax")
            return True, ""


class _Fail(_Expr):
    """``&{ return false, errors.New(message) }``: records the error where it stands."""

    def __init__(self, message: str) -> None:
        self.message = message

    def parse(self, st: _ParseState) -> tuple[bool, object]:
        st.add_error(st.pos, self.message)
        return False, None


class _Rule(_Expr):
    def __init__(self, name: str, display: str | None = None) -> None:
        self.name = name
        self.label = _go_quote(display) if display is not None else name
        self.body: _Expr = _Fail("undefined rule")

    def parse(self, st: _ParseState) -> tuple[bool, object]:
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


def _pick(index: int) -> Callable[[Any, str], object]:
    return lambda values, _text: values[index]


def _constant(value: object) -> Callable[[Any, str], object]:
    return lambda _values, _text: value


def _fold(is_and: bool) -> Callable[[Any, str], object]:
    def build(values: Any, _text: str) -> object:
        first: _Ast = values[0]
        rest: list[_Ast] = [tail[3] for tail in values[1]]
        return _Junction(is_and, (first, *rest)) if rest else first

    return build


def _negate(values: Any, _text: str) -> object:
    operand: _Ast = values[2]
    return operand.operand if isinstance(operand, _Not) else _Not(operand)


def _match_selector_first(values: Any, _text: str) -> object:
    return _Match(tuple(values[0]), values[1], values[2] if len(values) > 2 else None)


def _match_value_first(values: Any, _text: str) -> object:
    return _Match(tuple(values[2]), values[1], values[0])


def _build_grammar() -> _Rule:
    rules: dict[str, _Rule] = {}

    def rule(name: str, display: str | None = None) -> _Rule:
        return rules.setdefault(name, _Rule(name, display))

    ws = rule("_", "whitespace")
    ows = _Optional(ws)
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

    def operator(op: _Op, *parts: _Expr) -> _Expr:
        return _Action(_Seq(*parts), _constant(op))

    equal = operator(_Op.EQUAL, ows, _Lit("=="), ows)
    not_equal = operator(_Op.NOT_EQUAL, ows, _Lit("!="), ows)
    is_empty = operator(_Op.IS_EMPTY, ws, _Lit("is"), ws, _Lit("empty"))
    is_not_empty = operator(_Op.IS_NOT_EMPTY, ws, _Lit("is"), ws, _Lit("not"), ws, _Lit("empty"))
    in_op = operator(_Op.IN, ws, _Lit("in"), ws)
    not_in = operator(_Op.NOT_IN, ws, _Lit("not"), ws, _Lit("in"), ws)
    contains = operator(_Op.IN, ws, _Lit("contains"), ws)
    not_contains = operator(_Op.NOT_IN, ws, _Lit("not"), ws, _Lit("contains"), ws)
    matches = operator(_Op.MATCHES, ws, _Lit("matches"), ws)
    not_matches = operator(_Op.NOT_MATCHES, ws, _Lit("not"), ws, _Lit("matches"), ws)

    top = rule("Input")
    top.body = _Choice(
        _Action(_Seq(ows, _Lit("("), ows, or_expr, ows, _Lit(")"), ows, eof), _pick(3)),
        _Action(_Seq(ows, or_expr, ows, eof), _pick(1)),
    )
    or_expr.body = _Action(
        _Seq(and_expr, _Repeat(_Seq(ws, _Lit("or"), ws, and_expr))), _fold(is_and=False)
    )
    and_expr.body = _Action(
        _Seq(not_expr, _Repeat(_Seq(ws, _Lit("and"), ws, not_expr))), _fold(is_and=True)
    )
    not_expr.body = _Choice(_Action(_Seq(_Lit("not"), ws, not_expr), _negate), grouping)
    grouping.body = _Choice(
        _Action(_Seq(_Lit("("), ows, or_expr, ows, _Lit(")")), _pick(2)),
        match,
        _Seq(
            _Lit("("),
            ows,
            or_expr,
            ows,
            _Lookahead(_Lit(")"), negative=True),
            _Fail("Unmatched parentheses"),
        ),
    )
    match.body = _Choice(selector_op_value, selector_op, value_op_selector)
    selector_op_value.body = _Action(
        _Seq(
            selector,
            _Choice(equal, not_equal, contains, not_contains, matches, not_matches),
            value,
        ),
        _match_selector_first,
    )
    selector_op.body = _Action(
        _Seq(selector, _Choice(is_empty, is_not_empty)), _match_selector_first
    )
    value_op_selector.body = _Choice(
        _Action(_Seq(value, _Choice(in_op, not_in), selector), _match_value_first),
        _Seq(
            value,
            _Choice(in_op, not_in),
            _Lookahead(selector, negative=True),
            _Fail("Invalid selector"),
        ),
    )
    selector.body = _Action(
        _Seq(identifier, _Repeat(selector_or_index)), lambda v, _t: [v[0], *v[1]]
    )
    identifier.body = _Action(
        _Seq(
            _Class("[a-zA-Z]", lambda c: c.isascii() and c.isalpha()),
            _Repeat(_Class("[a-zA-Z0-9_]", lambda c: c.isascii() and (c.isalnum() or c == "_"))),
        ),
        lambda _v, text: text,
    )
    selector_or_index.body = _Choice(_Action(_Seq(_Lit("."), identifier), _pick(1)), index)
    index.body = _Choice(
        _Action(_Seq(_Lit("["), ows, string, ows, _Lit("]")), _pick(2)),
        _Seq(_Lit("["), ows, _Lookahead(string, negative=True), _Fail("Invalid index")),
        _Seq(
            _Lit("["),
            ows,
            string,
            ows,
            _Lookahead(_Lit("]"), negative=True),
            _Fail("Unclosed index expression"),
        ),
    )
    value.body = _Choice(
        _Action(selector, lambda v, _t: ".".join(v)),
        number,
        string,
    )
    minus = _Optional(_Lit("-"))
    number.body = _Choice(
        _Action(
            _Seq(minus, integer_or_float, _Lookahead(after_numbers, negative=False)),
            lambda _v, text: text,
        ),
        _Seq(
            minus,
            integer_or_float,
            _Lookahead(after_numbers, negative=True),
            _Fail("Invalid number literal"),
        ),
    )
    after_numbers.body = _Lookahead(_Choice(ws, eof, _Lit(")")), negative=False)
    digit = _Class("[0-9]", lambda c: "0" <= c <= "9")
    integer_or_float.body = _Seq(
        _Choice(_Lit("0"), _Seq(_Class("[1-9]", lambda c: "1" <= c <= "9"), _Repeat(digit))),
        _Optional(_Seq(_Lit("."), _Repeat(digit, at_least_one=True))),
    )
    backtick, quote = _Lit("`"), _Lit('"')
    string.body = _Choice(
        _Action(
            _Choice(
                _Seq(backtick, _Repeat(raw_char), backtick),
                _Seq(quote, _Repeat(double_char), quote),
            ),
            lambda _v, text: _go_unquote(text),
        ),
        _Seq(
            _Choice(_Seq(backtick, _Repeat(raw_char)), _Seq(quote, _Repeat(double_char))),
            eof,
            _Fail("Unterminated string literal"),
        ),
    )
    raw_char.body = _Seq(_Lookahead(backtick, negative=True), _AnyChar())
    double_char.body = _Seq(_Lookahead(quote, negative=True), _AnyChar())
    ws.body = _Repeat(_Class("[ \\t\\r\\n]", lambda c: c in " \t\r\n"), at_least_one=True)
    eof.body = _Lookahead(_AnyChar(), negative=True)
    return top


_GRAMMAR: Final = _build_grammar()


def _list_join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _parse(expression: str) -> _Ast:
    st = _ParseState(expression)
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
    assert isinstance(tree, _Match | _Not | _Junction)
    return tree


# --------------------------------------------------------------------------------------------
# Validation against a schema, and compilation into closures
# --------------------------------------------------------------------------------------------

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


def _leaf(schema: Schema, op: _Op, operand: object) -> _Predicate:
    """The operator applied where the selector ends (evaluate.go's doMatch* functions)."""
    positive = _NEGATED.get(op, op)
    test: _Predicate
    if isinstance(schema, Scalar):
        kind = schema.kind
        if positive is _Op.EQUAL:

            def test(v: object) -> bool:
                return _scalar(kind, v) == operand

        elif positive is _Op.IN:
            assert isinstance(operand, str)

            def test(v: object) -> bool:
                held = _scalar(kind, v)
                return isinstance(held, str) and operand in held

        else:
            assert isinstance(operand, _GoRegexp)
            pattern = operand

            def test(v: object) -> bool:
                held = _scalar(kind, v)
                return isinstance(held, str) and pattern.search(held)

    elif isinstance(schema, MapOf):
        if positive is _Op.IN:

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
        if positive is _Op.IN:

            def test(v: object) -> bool:
                return any(_scalar(kind, item) == operand for item in items(v))

        else:

            def test(v: object) -> bool:
                return not items(v)

    if positive is op:
        return test
    return lambda v: not test(v)


def _walker(schema: Schema, path: tuple[str, ...], op: _Op, leaf: _Predicate) -> _Predicate:
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
        missing = op not in _FALSE_WHEN_KEY_MISSING

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


def _compile_match(node: _Match, root: Schema) -> _Predicate:
    selector_text = ".".join(node.selector)
    schema = root
    for depth, part in enumerate(node.selector):
        child = _child_schema(schema, part)
        if child is None:
            invalid = _go_quote(".".join(node.selector[: depth + 1]))
            raise FilterSchemaError(f"Selector {invalid} is not valid")
        schema = child
    if node.op not in _operations(schema):
        raise FilterSchemaError(
            f"Invalid match operator {_go_quote(node.op.value)} "
            f"for selector {_go_quote(selector_text)}"
        )
    operand: object = None
    if node.value is not None:
        kind = _coercion_kind(schema)
        assert kind is not None
        try:
            operand = _coerce(kind, node.value)
        except _NumError as err:
            raise FilterSchemaError(
                f"Failed to coerce value {_go_quote(node.value)} "
                f"for selector {_go_quote(selector_text)}: {err}"
            ) from None
        if node.op in (_Op.MATCHES, _Op.NOT_MATCHES):
            assert isinstance(operand, str)
            regexp = operand
            try:
                operand = _compile_go_regexp(regexp)
            except _RegexpError as err:
                raise FilterSchemaError(
                    f"Failed to compile regular expression {_go_quote(regexp)}: {err}"
                ) from None
            except _UnsupportedRegexp as err:
                raise FilterSchemaError(
                    f"Failed to compile regular expression {_go_quote(regexp)}: "
                    f"{err} not supported by the devstack"
                ) from None
    return _walker(root, node.selector, node.op, _leaf(schema, node.op, operand))


def _compile(node: _Ast, root: Schema) -> _Predicate:
    # Operands in order, so the first error raised is the one go-bexpr's validate() returns.
    if isinstance(node, _Match):
        return _compile_match(node, root)
    if isinstance(node, _Not):
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
    _parse(expression)


def compile_filter(expression: str, schema: Schema) -> Filter:
    """Parse ``expression`` and check it against ``schema``, as Consul's ``CreateFilter`` does.

    Raises :class:`FilterSyntaxError` or :class:`FilterSchemaError`. An empty expression is
    go-bexpr's nil filter and matches everything; whitespace alone is a syntax error.
    """
    if expression == "":
        return Filter(expression, lambda _v: True)
    return Filter(expression, _compile(_parse(expression), schema))
