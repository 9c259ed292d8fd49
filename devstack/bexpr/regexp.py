"""Go regexp (RE2) syntax checked and worded as Go does, matched by RE2 in linear time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import re2


class RegexpError(Exception):
    """A regexp/syntax error; str() is Go's text."""

    def __init__(self, code: str, expr: str) -> None:
        super().__init__(f"error parsing regexp: {code}: `{expr}`")


class UnsupportedRegexp(Exception):
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
            raise RegexpError("missing closing )", self.src)
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
                raise RegexpError("invalid repeat count", self.src[start:end])
        else:
            end = start + 1
        if end < len(self.src) and self.src[end] == "?":
            end += 1
        if self.last_repeat_start is not None:
            raise RegexpError(
                "invalid nested repetition operator", self.src[self.last_repeat_start : end]
            )
        if not self.can_repeat:
            raise RegexpError("missing argument to repetition operator", self.src[start:end])
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
                raise RegexpError("invalid named capture", rest)
            name = rest[(4 if named_p else 3) : close]
            if not name or not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
                raise RegexpError("invalid named capture", rest[: close + 1])
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
        raise RegexpError("invalid or unsupported Perl syntax", rest[:j])

    def _apply_flags(self, on: list[str], off: list[str], *, scoped: bool) -> None:
        if "U" in on or "U" in off:
            raise UnsupportedRegexp("the U (ungreedy) flag")
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
            raise RegexpError("unexpected )", self.src)
        group = self.groups.pop()
        self.i += 1
        self._atom(")" * len(group.flag_openers) + ")")

    def _escape(self) -> None:
        start = self.i
        if start + 1 >= len(self.src):
            raise RegexpError("trailing backslash at end of expression", "")
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
            raise RegexpError("trailing backslash at end of expression", "")
        char = src[start + 1]
        self.i = start + 2
        if char in "pP":
            raise UnsupportedRegexp("Unicode class escapes (\\p, \\P)")
        if char in "1234567" and (self.i >= len(src) or src[self.i] not in "01234567"):
            raise RegexpError("invalid escape sequence", src[start : self.i])
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
                raise RegexpError("invalid escape sequence", src[start : self.i])
            digits = src[self.i : self.i + 2]
            if len(digits) < 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.i = min(len(src), self.i + 2)
                raise RegexpError("invalid escape sequence", src[start : self.i])
            self.i += 2
            return int(digits, 16)
        controls = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
        if char in controls:
            return controls[char]
        if char.isascii() and not char.isalnum():
            return ord(char)
        raise RegexpError("invalid escape sequence", src[start : self.i])

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
                raise RegexpError("missing closing ]", src[start:])
            first = False
            if src.startswith("[:", self.i) and (close := src.find(":]", self.i + 2)) >= 0:
                name = src[self.i + 2 : close]
                if name.removeprefix("^") not in _POSIX_CLASSES:
                    raise RegexpError("invalid character class range", src[self.i : close + 2])
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
                    raise RegexpError("invalid character class range", src[range_start : self.i])
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
            raise RegexpError("missing closing ]", self.src[class_start:])
        if self.src[self.i] == "\\":
            return self._escaped_char()
        self.i += 1
        return ord(self.src[self.i - 1])


_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False


@dataclass(frozen=True)
class GoRegexp:
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


def compile_go_regexp(pattern: str) -> GoRegexp:
    # The translator checks the syntax as Go does and words errors as Go does; a pattern it
    # accepts is then compiled by RE2, whose syntax Go's regexp shares.
    translated = _GoRegexpTranslator(pattern).translate()
    try:
        re.compile(translated)
    except re.error as err:  # RE2 accepts something Python does not; say so in Go's format
        raise RegexpError(err.msg, pattern) from None
    try:
        return GoRegexp(re2.compile(pattern, _RE2_OPTIONS))
    except re2.error:
        raise UnsupportedRegexp(f"{pattern!r} (RE2 refuses it)") from None
