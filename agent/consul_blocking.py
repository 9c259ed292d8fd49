"""Blocking-query rules as pure functions, and the result types that carry Consul's index.

Consul's contract (api-docs/features/blocking): a read with `?index=N` returns when the
result's index exceeds N or when `wait` runs out (default 5 min, capped at 10 min, plus up to
wait/16 of jitter added by the server). The client must reset its index to 0 when the returned
index goes backwards (snapshot restore, leader change on a stale read, a key deleted and
recreated) and must never block on an index below 1, which would return at once and busy-loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_WAIT = 300.0
"""Seconds Consul waits when a blocking query names no `wait` (`default_query_time`)."""

MAX_WAIT = 600.0
"""Seconds above which Consul clamps `wait` (`max_query_time`)."""

JITTER_FRACTION = 16
"""Consul adds up to wait/16 of random delay to spread out the herd of returning watches."""

Wait = float | str
"""A blocking wait: seconds, or a Go duration string such as "1s", "90s", "5m"."""

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string ("1s", "1m30s", "250ms"); ValueError if it is not one."""
    body = text.removeprefix("+")
    sign = 1.0
    if body.startswith("-"):
        sign, body = -1.0, body[1:]
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for match in _TERM.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        raise ValueError(
            f"{text!r} is not a Go duration (a number with a unit ns, us, ms, s, m or h, "
            'e.g. "10s" or "1m30s")'
        )
    return sign * total


def format_duration(seconds: float) -> str:
    """A Go duration string Consul parses back to the same value (to the millisecond)."""
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {seconds}")
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def duration_seconds(value: Wait) -> float:
    """Seconds in a `Wait` given either as a number or as a Go duration string."""
    return parse_duration(value) if isinstance(value, str) else float(value)


def effective_wait(wait: Wait | None) -> float:
    """The wait Consul will actually apply to a blocking query, in seconds."""
    seconds = DEFAULT_WAIT if wait is None else duration_seconds(wait)
    if seconds < 0:
        raise ValueError(f"wait must not be negative, got {wait!r}")
    if seconds == 0:
        return DEFAULT_WAIT
    return min(seconds, MAX_WAIT)


def blocking_deadline(wait: float, margin: float) -> float:
    """Client-side deadline for a blocking query: the server may hold it for wait * 17/16."""
    return wait + wait / JITTER_FRACTION + margin


def next_index(previous: int, returned: int) -> int:
    """The index to send with the next blocking query, given the last one sent and the answer.

    Backwards means Consul's state was replaced under us: start over with a non-blocking read
    (0). A returned index below 1 is a Consul bug; blocking on 0 would not block at all.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


@dataclass(frozen=True)
class Indexed(Generic[T]):
    """The result of an index-blocking read: the data and Consul's query metadata."""

    value: T
    index: int
    """`X-Consul-Index` as returned, never below 1."""
    next_index: int
    """What to pass as `index` on the next call: `index`, or 0 when the index went backwards."""
    known_leader: bool
    """`X-Consul-KnownLeader`: false means the data may be stale (no leader right now)."""
    last_contact: float
    """`X-Consul-LastContact` in seconds: how long since the answering server heard the leader."""

    @property
    def reset(self) -> bool:
        """True when the index went backwards and the watch must start over."""
        return self.next_index == 0


@dataclass(frozen=True)
class Hashed(Generic[T]):
    """The result of a hash-blocking agent read (`/v1/agent/service/:id`)."""

    value: T
    content_hash: str
    """Pass back as `hash` to block until the content differs. Opaque: no order, no reset."""
