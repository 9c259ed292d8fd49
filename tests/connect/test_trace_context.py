"""Trace context parsing, the sampling decision and the settings' validation (pure)."""

from __future__ import annotations

import random

import pytest

from connect.trace_context import (
    Incoming,
    decide,
    extract,
    inject,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    strip_head,
    strip_names,
)
from connect.tracing_settings import TracingSettings, effective_tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
BOTH = ("w3c", "b3")


def test_traceparent_valid() -> None:
    got = parse_traceparent(f"00-{TRACE}-{SPAN}-01".encode(), [b"a=1", b"b=2"])
    assert got == Incoming(int(TRACE, 16), int(SPAN, 16), True, "a=1,b=2")
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode()) == Incoming(
        int(TRACE, 16), int(SPAN, 16), False
    )
    # A later version may append fields after a dash; its first four are read.
    later = parse_traceparent(f"cc-{TRACE}-{SPAN}-01-what-ever".encode())
    assert later is not None and later.trace_id == int(TRACE, 16)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 is exactly 55 characters
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
        f"00-{TRACE[:-1]}g-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0x",
        f"00_{TRACE}_{SPAN}_01",
        f"cc-{TRACE}-{SPAN}-01x",  # later version, appended without a dash
    ],
)
def test_traceparent_invalid(value: str) -> None:
    assert parse_traceparent(value.encode()) is None


def test_tracestate_dropped_when_invalid() -> None:
    tp = f"00-{TRACE}-{SPAN}-01".encode()
    got = parse_traceparent(tp, [b"a=1", b"bad member"])
    assert got is not None and got.tracestate == ""
    assert parse_traceparent(tp, [b"a=" + b"x" * 600]) == parse_traceparent(tp)
    many = b",".join(b"k%d=v" % i for i in range(33))
    got = parse_traceparent(tp, [many])
    assert got is not None and got.tracestate == ""


def test_b3_single() -> None:
    assert parse_b3_single(f"{TRACE}-{SPAN}-1".encode()) == Incoming(
        int(TRACE, 16), int(SPAN, 16), True
    )
    assert parse_b3_single(f"{TRACE}-{SPAN}".encode()) == Incoming(
        int(TRACE, 16), int(SPAN, 16), None
    )
    assert parse_b3_single(f"{TRACE[16:]}-{SPAN}-d-{SPAN}".encode()) == Incoming(
        int(TRACE[16:], 16), int(SPAN, 16), True
    )
    assert parse_b3_single(b"0") == Incoming(sampled=False)
    assert parse_b3_single(b"1") == Incoming(sampled=True)
    for bad in (b"", b"2", f"{TRACE}-{SPAN}-x".encode(), f"{TRACE}-zz".encode(), b"a-b-c-d-e"):
        assert parse_b3_single(bad) is None, bad


def test_b3_multi() -> None:
    fields = {b"x-b3-traceid": TRACE.encode(), b"x-b3-spanid": SPAN.encode()}
    assert parse_b3_multi({**fields, b"x-b3-sampled": b"0"}) == Incoming(
        int(TRACE, 16), int(SPAN, 16), False
    )
    assert parse_b3_multi({**fields, b"x-b3-flags": b"1"}) == Incoming(
        int(TRACE, 16), int(SPAN, 16), True
    )
    assert parse_b3_multi(fields) == Incoming(int(TRACE, 16), int(SPAN, 16), None)
    assert parse_b3_multi({b"x-b3-sampled": b"1"}) == Incoming(sampled=True)
    assert parse_b3_multi({**fields, b"x-b3-sampled": b"maybe"}) is None
    assert parse_b3_multi({b"x-b3-traceid": TRACE.encode()}) is None


def test_extract_order_and_duplicates() -> None:
    w3c = (b"Traceparent", f"00-{TRACE}-{SPAN}-01".encode())
    other = "a" * 32
    b3 = (b"b3", f"{other}-{SPAN}-0".encode())
    assert extract([w3c, b3], BOTH).trace_id == int(TRACE, 16)
    assert extract([w3c, b3], ("b3", "w3c")).trace_id == int(other, 16)
    assert extract([w3c, b3], ("w3c",)).sampled is True
    # Two traceparent fields: neither is believed; b3 is next.
    assert extract([w3c, w3c, b3], BOTH).trace_id == int(other, 16)
    # A malformed traceparent: a new trace (nothing extracted).
    assert extract([(b"traceparent", b"00-zz")], BOTH) == Incoming()
    # A bare decision is kept for a new trace.
    assert extract([(b"b3", b"0")], BOTH) == Incoming(sampled=False)
    assert extract([(b"host", b"x")], BOTH) == Incoming()


def test_decide() -> None:
    rng = random.Random(7)
    assert decide(Incoming(1, 1, False), 100.0, rng) is False
    assert decide(Incoming(1, 1, True), 0.0, rng) is True
    assert decide(Incoming(), 0.0, rng) is False
    assert decide(Incoming(), 100.0, rng) is True
    hits = sum(decide(Incoming(1, 1, None), 10.0, rng) for _ in range(20_000))
    assert 1_800 < hits < 2_200


def test_inject_and_strip() -> None:
    lines = inject(BOTH, int(TRACE, 16), int(SPAN, 16), True, parent_span_id=5, tracestate="a=1")
    assert (
        lines
        == (
            f"traceparent: 00-{TRACE}-{SPAN}-01\r\ntracestate: a=1\r\n"
            f"b3: {TRACE}-{SPAN}-1-0000000000000005\r\n"
            f"x-b3-traceid: {TRACE}\r\nx-b3-spanid: {SPAN}\r\nx-b3-sampled: 1\r\n"
            "x-b3-parentspanid: 0000000000000005\r\n"
        ).encode()
    )
    head = (
        b"GET /x HTTP/1.1\r\nhost: api\r\nTraceParent: junk\r\nX-B3-Sampled: 1\r\n"
        b"x-request-id: r1\r\n\r\n"
    )
    headers = [(b"host", b"api"), (b"TraceParent", b"junk"), (b"X-B3-Sampled", b"1")]
    seen: list[bytes] = []
    extract(headers, BOTH, strip_names(BOTH), seen)
    assert seen == [b"TraceParent", b"X-B3-Sampled"]
    out = strip_head(head, seen, b"traceparent: new\r\n")
    assert out == b"GET /x HTTP/1.1\r\ntraceparent: new\r\nhost: api\r\nx-request-id: r1\r\n\r\n"
    # Only the configured propagators' fields are replaced.
    seen = []
    extract(headers, ("w3c",), None, seen)
    assert seen == [b"TraceParent"]
    assert b"X-B3-Sampled" in strip_head(head, seen, b"")
    # Repeated fields all go.
    twice = b"GET / HTTP/1.1\r\nb3: 1\r\nhost: a\r\nb3: 0\r\n\r\n"
    assert strip_head(twice, [b"b3"], b"") == b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"


def test_settings_merge_and_refusals() -> None:
    mesh = {"otlp_endpoint": "http://127.0.0.1:4318/v1/traces", "sampling_percent": 10}
    assert effective_tracing(mesh) == TracingSettings("http://127.0.0.1:4318/v1/traces", 10.0, BOTH)
    merged = effective_tracing(mesh, {"sampling_percent": 100, "propagation": ["B3"]})
    assert merged.sampling_percent == 100.0
    assert merged.propagation == ("b3",)
    assert merged.otlp_endpoint == mesh["otlp_endpoint"]
    assert not effective_tracing(None).enabled
    for block, field in (
        ({"otlp_endpoint": "collector:4318"}, "otlp_endpoint"),
        ({"otlp_endpoint": "ftp://c/x"}, "otlp_endpoint"),
        ({"otlp_endpoint": "http://c:port/x"}, "otlp_endpoint"),
        ({"sampling_percent": 101}, "sampling_percent"),
        ({"sampling_percent": -1}, "sampling_percent"),
        ({"sampling_percent": "10"}, "sampling_percent"),
        ({"propagation": ["jaeger"]}, "propagation"),
        ({"propagation": []}, "propagation"),
        ({"sampling": 10}, "sampling"),
    ):
        with pytest.raises(ValueError, match=field):
            effective_tracing(block)
    with pytest.raises(ValueError, match=r"service proxy Config\.tracing\.sampling_percent"):
        effective_tracing(mesh, {"sampling_percent": 200})
