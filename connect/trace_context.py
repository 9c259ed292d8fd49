"""Trace context in HTTP/1 headers: W3C Trace Context and B3, read, decided on, written.
Pure: bytes in, values out (connect/tracing.py is the shell around the OpenTelemetry SDK).

Reading: the propagators configured are tried in order; the first that yields a valid
context is the parent. A malformed or forged value (bad length, upper-case or non-hex digits,
an all-zero ID, version ff, two `traceparent` fields) yields nothing: the request starts a
new trace, and the bad header is not passed on (`strip_head` removes every header of the
configured propagators before ours are written), so it cannot poison the trace downstream.

Sampling (`decide`): a parent's decision is kept (parent-based: made once at the edge); a
request without one is sampled with probability `percent`/100.

References: W3C Trace Context Level 1 (§3.2 traceparent, §3.3 tracestate) and the B3
specification in openzipkin/b3-propagation (single header `b3: {TraceId}-{SpanId}-
{SamplingState}-{ParentSpanId}`, multiple `X-B3-*` headers, `X-B3-Flags: 1` debug).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import NamedTuple

from connect.tracing_settings import B3, W3C

__all__ = [
    "Incoming",
    "decide",
    "extract",
    "inject",
    "parse_b3_multi",
    "parse_b3_single",
    "parse_traceparent",
    "strip_head",
    "strip_names",
]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3_SINGLE = b"b3"
B3_TRACE = b"x-b3-traceid"
B3_SPAN = b"x-b3-spanid"
B3_PARENT = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"

_NAMES = {
    W3C: frozenset({TRACEPARENT, TRACESTATE}),
    B3: frozenset({B3_SINGLE, B3_TRACE, B3_SPAN, B3_PARENT, B3_SAMPLED, B3_FLAGS}),
}
_HEX = frozenset(b"0123456789abcdef")
_TRACESTATE_MAX = 512
"""W3C §3.3.1.5: a vendor may drop tracestate past 512 characters; so do we, whole."""
_TRACESTATE_MEMBERS = 32


class Incoming(NamedTuple):
    """What a request's headers say of its trace (a tuple: made per request, cheaply)."""

    trace_id: int = 0
    """0: no parent (a new trace starts here)."""
    span_id: int = 0
    sampled: bool | None = None
    """The upstream's decision; None: none made (B3 may defer it)."""
    tracestate: str = ""


NONE = Incoming()


def _hex(value: bytes, size: int) -> int:
    """`size` lower-case hex digits, not all zero; 0 when it is anything else."""
    if len(value) != size or not _HEX.issuperset(value):
        return 0
    return int(value, 16)


def _tracestate(values: Sequence[bytes]) -> str:
    """The combined tracestate fields, or "" when they are not a list of key=value members
    of printable ASCII within W3C's bounds (it is then dropped, never forwarded)."""
    joined = b",".join(values)
    if not joined or len(joined) > _TRACESTATE_MAX:
        return ""
    members = [m.strip() for m in joined.split(b",") if m.strip()]
    if len(members) > _TRACESTATE_MEMBERS:
        return ""
    for m in members:
        key, eq, val = m.partition(b"=")
        if not eq or not key or not val or not all(0x20 < c < 0x7F for c in m):
            return ""
    return b",".join(members).decode("ascii")


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(.*)", re.S)


def parse_traceparent(value: bytes, tracestate: Sequence[bytes] = ()) -> Incoming | None:
    """W3C traceparent `version-traceid-parentid-flags`; None when it is not valid."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace, span, flags, rest = m.groups()
    if version == b"ff" or (rest and (version == b"00" or rest[:1] != b"-")):
        # ff is invalid; 00 has exactly four fields; a later version may append fields,
        # always after a dash.
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    state = _tracestate(tracestate) if tracestate else ""
    return Incoming(trace_id, span_id, bool(int(flags, 16) & 1), state)


def _b3_id(value: bytes, *, trace: bool) -> int:
    """A B3 ID: 16 hex digits, or 32 for a trace ID (a 64-bit one is zero-extended)."""
    value = value.strip().lower()
    if trace and len(value) == 16:
        return _hex(value, 16)
    return _hex(value, 32 if trace else 16)


def parse_b3_single(value: bytes) -> Incoming | None:
    """`b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or the sampling state
    alone (`0`, `1`, `d`: a decision without IDs). None when it is not valid."""
    parts = value.strip().lower().split(b"-")
    if len(parts) == 1:
        state = parts[0]
        if state == b"0":
            return Incoming(sampled=False)
        if state in (b"1", b"d"):
            return Incoming(sampled=True)
        return None
    if len(parts) > 4:
        return None
    trace_id, span_id = _b3_id(parts[0], trace=True), _b3_id(parts[1], trace=False)
    if not trace_id or not span_id:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        state = parts[2]
        if state not in (b"0", b"1", b"d"):
            return None
        sampled = state != b"0"
    if len(parts) == 4 and not _b3_id(parts[3], trace=False):
        return None
    return Incoming(trace_id, span_id, sampled)


def parse_b3_multi(fields: dict[bytes, bytes]) -> Incoming | None:
    """The `x-b3-*` headers (names lower-case); None when absent or not valid."""
    flags = fields.get(B3_FLAGS, b"").strip()
    raw_sampled = fields.get(B3_SAMPLED, b"").strip().lower()
    sampled: bool | None
    if flags == b"1":
        sampled = True  # debug implies sampled
    elif raw_sampled in (b"1", b"true"):
        sampled = True
    elif raw_sampled in (b"0", b"false"):
        sampled = False
    elif raw_sampled:
        return None
    else:
        sampled = None
    raw_trace, raw_span = fields.get(B3_TRACE), fields.get(B3_SPAN)
    if raw_trace is None and raw_span is None:
        return Incoming(sampled=sampled) if sampled is not None else None
    trace_id = _b3_id(raw_trace or b"", trace=True)
    span_id = _b3_id(raw_span or b"", trace=False)
    if not trace_id or not span_id:
        return None
    return Incoming(trace_id, span_id, sampled)


def extract(
    headers: Sequence[tuple[bytes, bytes]],
    propagation: Sequence[str],
    names: frozenset[bytes] | None = None,
    seen: list[bytes] | None = None,
) -> Incoming:
    """The parent context the request's headers carry (`NONE` when none is valid). A
    decision without IDs (B3 `0`/`1`) is kept as a decision for a new trace. `names`:
    `strip_names(propagation)`, when the caller keeps it; `seen` gets the names (as sent) of
    the propagators' fields the request has, for `strip_head`."""
    wanted: dict[bytes, list[bytes]] = {}
    if names is None:
        names = strip_names(propagation)
    for name, value in headers:
        lower = name.lower()
        if lower in names:
            wanted.setdefault(lower, []).append(value)
            if seen is not None and name not in seen:
                seen.append(name)
    if not wanted:
        return NONE
    decision: Incoming | None = None
    for prop in propagation:
        got: Incoming | None = None
        if prop == W3C:
            parents = wanted.get(TRACEPARENT)
            if parents is not None and len(parents) == 1:  # two: which one? neither
                got = parse_traceparent(parents[0], wanted.get(TRACESTATE, ()))
        elif prop == B3:
            single = wanted.get(B3_SINGLE)
            if single is not None and len(single) == 1:
                got = parse_b3_single(single[0])
            if got is None or not got.trace_id:
                multi = {k: v[0] for k, v in wanted.items() if k in _NAMES[B3] and len(v) == 1}
                got = parse_b3_multi(multi) or got
        if got is None:
            continue
        if got.trace_id:
            return got
        decision = decision or got
    return decision or NONE


def decide(incoming: Incoming, percent: float, rng: random.Random) -> bool:
    """Sampled or not: the parent's decision when it made one, else `percent` % of the time."""
    if incoming.sampled is not None:
        return incoming.sampled
    return percent >= 100.0 or (percent > 0.0 and rng.random() * 100.0 < percent)


def inject(
    propagation: Sequence[str],
    trace_id: int,
    span_id: int,
    sampled: bool,
    *,
    parent_span_id: int = 0,
    tracestate: str = "",
) -> bytes:
    """The header lines (`name: value\\r\\n` each) that carry this span on to the next hop."""
    trace, span, flag = b"%032x" % trace_id, b"%016x" % span_id, b"1" if sampled else b"0"
    out: list[bytes] = []
    for prop in propagation:
        if prop == W3C:
            out.append(b"traceparent: 00-%s-%s-0%s\r\n" % (trace, span, flag))
            if tracestate:
                out.append(b"tracestate: %s\r\n" % tracestate.encode("ascii"))
        elif prop == B3:
            parent = b"-%016x" % parent_span_id if parent_span_id else b""
            out.append(b"b3: %s-%s-%s%s\r\n" % (trace, span, flag, parent))
            out.append(
                b"x-b3-traceid: %s\r\nx-b3-spanid: %s\r\nx-b3-sampled: %s\r\n" % (trace, span, flag)
            )
            if parent_span_id:
                out.append(b"x-b3-parentspanid: %016x\r\n" % parent_span_id)
    return b"".join(out)


def strip_names(propagation: Sequence[str]) -> frozenset[bytes]:
    """Every header name the configured propagators own (lower-case)."""
    out: frozenset[bytes] = frozenset()
    for prop in propagation:
        out |= _NAMES.get(prop, frozenset())
    return out


def strip_head(head: bytes, names: Sequence[bytes], lines: bytes) -> bytes:
    """`head` (a serialized request head, fields as `Name: value`) without the fields whose
    name is one of `names` (as sent: `extract`'s `seen`), with `lines` added after the
    request line. Most requests carry none: then nothing is searched."""
    for name in names:
        marker = b"\r\n" + name + b":"
        at = head.find(marker)
        while at >= 0:
            head = head[:at] + head[head.find(b"\r\n", at + 2) :]
            at = head.find(marker, at)
    cut = head.find(b"\r\n") + 2
    return head[:cut] + lines + head[cut:]
