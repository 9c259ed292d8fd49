"""Go `time.Duration` text, as Consul reads (`time.ParseDuration`) and writes (`String()`) it.

Durations are kept as integer nanoseconds, as Go keeps them, so that what is read back renders
exactly as Consul renders it.
"""

from __future__ import annotations

import re

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_NUMBER = re.compile(r"(\d+(?:\.\d*)?|\.\d+)$")
_MAX = 2**63 - 1


def parse_duration(text: str) -> int:
    """Nanoseconds of Go duration text; ValueError with Go's wording otherwise."""
    s = text
    sign = 1
    if s[:1] in ("+", "-") and s:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            if _NUMBER.match(s, pos):
                raise ValueError(f'time: missing unit in duration "{text}"')
            raise ValueError(f'time: invalid duration "{text}"')
        whole, _, frac = m.group(1).partition(".")
        unit = _UNITS_NS[m.group(2)]
        part = int(whole or "0") * unit
        if frac:
            # Go truncates the fraction's extra precision rather than rounding through a float.
            part += int(frac) * unit // 10 ** len(frac)
        total += part
        if total > _MAX:
            raise ValueError(f'time: invalid duration "{text}"')
        pos = m.end()
    return sign * total


def _fraction(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(ns: int) -> str:
    """Render nanoseconds exactly as Go's `Duration.String` does."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_fraction(ns, 1_000)}\u00b5s"
    if ns < 1_000_000_000:
        return f"{sign}{_fraction(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _fraction(rest, 1_000_000_000)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"
