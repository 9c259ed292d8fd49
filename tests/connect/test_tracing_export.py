"""Export never holds the proxy: with a collector that accepts connections and never answers,
spans past the bounded queue are dropped and counted, and making them never waits for it."""

from __future__ import annotations

import socket
import sys
import threading

from connect.http1.exchange import Exchange
from connect.http1_headers import NO_LENGTH
from connect.observe import Telemetry
from connect.tracing_settings import TracingSettings

HEAD = b"GET /x HTTP/1.1\r\nhost: api\r\nx-request-id: r1\r\n\r\n"


def test_a_stuck_collector_costs_dropped_spans_not_waiting() -> None:
    with socket.socket() as stuck:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(1)  # connections queue in the backlog; nothing ever answers
        port = stuck.getsockname()[1]
        telemetry = Telemetry("web", "spiffe://d/ns/default/dc/dc1/svc/web")
        telemetry.set_tracing(TracingSettings(f"http://127.0.0.1:{port}/v1/traces", 100.0))
        assert "opentelemetry.sdk.trace" in sys.modules
        side = telemetry.http(telemetry.upstream("api", "http"))
        for _ in range(5000):
            ex = Exchange(b"GET", HEAD, [(b"host", b"api")], NO_LENGTH, True)
            side.request(ex, None)
            assert ex.span is not None
            assert b"\r\ntraceparent: 00-" in ex.head
            ex.status = 200
            side.done(ex, None, 0.001)
        counters = telemetry.tracing_counters()
        telemetry.set_tracing(None)
    # The flush at shutdown runs on threads of the SDK's own, which retry with jitter drawn from
    # the global `random`; left running they would disturb later tests (Hypothesis notices).
    for thread in threading.enumerate():
        if thread.name.startswith(("meshlet tracing shutdown", "OtelBatchSpanProcessor")):
            thread.join(timeout=60)
            assert not thread.is_alive(), f"{thread.name} still exporting after 60 s"
    assert counters["dropped"] > 0, counters
    assert counters["exported"] == 0
    # Off again: the counters stay (they only grow).
    assert telemetry.tracing_counters()["dropped"] == counters["dropped"]
