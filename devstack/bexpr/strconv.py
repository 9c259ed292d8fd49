"""Go's strconv and %q formatting: how go-bexpr reads literal values and quotes them in errors."""

from __future__ import annotations

import math
import re
from typing import Final

from devstack.bexpr.schema import Kind

_GO_CONTROL_ESCAPES: Final = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def go_quote(text: str) -> str:
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


class UnquoteError(Exception):
    """strconv.ErrSyntax."""


_SIMPLE_ESCAPES: Final = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}


def go_unquote(literal: str) -> str:
    """``strconv.Unquote`` for the two literal forms the grammar accepts."""
    body = literal[1:-1]
    if literal[0] == "`":
        return body.replace("\r", "")
    if "\n" in body:
        raise UnquoteError
    out = bytearray()
    i = 0
    while i < len(body):
        char = body[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise UnquoteError
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
                raise UnquoteError
            value = int(digits, 16)
            i += width
            if escape == "x":
                out.append(value)  # a single byte, possibly not UTF-8, like Go
            elif value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                raise UnquoteError
            else:
                out += chr(value).encode()
        elif escape in "01234567":
            digits = escape + body[i : i + 2]
            if len(digits) < 3 or any(d not in "01234567" for d in digits):
                raise UnquoteError
            value = int(digits, 8)
            if value > 255:
                raise UnquoteError
            out.append(value)
            i += 2
        else:
            raise UnquoteError
    return out.decode("utf-8", "surrogateescape")


class NumError(Exception):
    """strconv.NumError; str() is Go's text."""

    def __init__(self, func: str, num: str, reason: str) -> None:
        super().__init__(f"strconv.{func}: parsing {go_quote(num)}: {reason}")
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
        raise NumError(func, text, _SYNTAX)
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
            raise NumError(func, text, _SYNTAX)
        if digit >= base:
            raise NumError(func, text, _SYNTAX)
        value = value * base + digit
        if value > limit:
            # Go reports overflow at the digit that causes it, before seeing later junk.
            raise NumError(func, text, _RANGE)
    if underscores and not _underscore_ok(text):
        raise NumError(func, text, _SYNTAX)
    return value


def _parse_int(text: str) -> int:
    """``strconv.ParseInt(text, 0, 64)`` (Go's ``int`` is 64 bits on Consul's platforms)."""
    if not text:
        raise NumError("ParseInt", text, _SYNTAX)
    negative = text[0] == "-"
    unsigned = text[1:] if text[0] in "+-" else text
    try:
        magnitude = _parse_uint(unsigned, 64)
    except NumError as err:
        if err.reason != _RANGE:
            raise NumError("ParseInt", text, err.reason) from None
        magnitude = 1 << 64
    cutoff = 1 << 63
    if magnitude > cutoff or (magnitude == cutoff and not negative):
        raise NumError("ParseInt", text, _RANGE)
    return -magnitude if negative else magnitude


_GO_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _parse_bool(text: str) -> bool:
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise NumError("ParseBool", text, _SYNTAX)


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
        raise NumError("ParseFloat", text, _SYNTAX)
    if "_" in text and not _underscore_ok(text):
        raise NumError("ParseFloat", text, _SYNTAX)
    if math.isinf(value):
        raise NumError("ParseFloat", text, _RANGE)
    return value


def coerce(kind: Kind, raw: str) -> object:
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
