"""Go `time.Duration` text, as Consul reads and writes it (`10s`, `1m30s`, `1.5s`).

The parser and formatter are traffic.durations' (one implementation, exact to Go's integer
arithmetic); devstack adds its own error type and the JSON form Consul also accepts.
"""

from __future__ import annotations

from traffic import durations as _go

format_duration = _go.format_duration


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> int:
    """Parse Go duration text into nanoseconds, with Go's error wording."""
    try:
        return _go.parse_duration(text)
    except ValueError as err:
        raise DurationError(str(err)) from None


def duration_from_json(value: object) -> int:
    """Consul accepts a duration as Go text or as a number of nanoseconds."""
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise DurationError(f"invalid duration {value!r}")


__all__ = ["DurationError", "duration_from_json", "format_duration", "parse_duration"]
