"""Spans for the HTTP exchanges a sidecar proxies, exported with the OpenTelemetry SDK over
OTLP/HTTP. Imported only once tracing is turned on (connect.observe.Telemetry.set_tracing):
the SDK, its exporter and `requests` are never loaded by a sidecar that does not trace.

Per exchange (connect.observe.HTTPSide calls in): at its head, the parent is read from the
request's headers (connect.trace_context), the sampling decision taken (the parent's, else
`sampling_percent`), a span started when sampled, and the request head sent on rewritten to
carry this span as the parent (the tracing headers of the configured propagators replaced by
ours, whatever the client sent). The caller's sidecar makes a CLIENT span, the callee's a
SERVER span, child of the caller's through those headers. When the exchange is over the span
gets the response's attributes and ends.

Export never holds the proxy: spans go to a `BatchSpanProcessor` whose worker thread sends
them; in front of it a gate counts the spans queued and drops (and counts) any that would
overflow `MAX_QUEUE`, so a slow or dead collector costs dropped spans, not latency.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from connect.http1_headers import REQUEST_ID
from connect.observe import Side, verdict_rule
from connect.trace_context import decide, extract, inject, strip_head, strip_names
from connect.tracing_settings import TracingSettings

if TYPE_CHECKING:
    from connect.http1.exchange import Exchange
    from connect.seams import Peer

log = logging.getLogger("meshlet.tracing")

__all__ = ["MAX_QUEUE", "OpenSpan", "Tracing"]

MAX_QUEUE = 2048
"""Spans waiting for export at most; past it new spans are dropped (counted)."""
_BATCH = 512
_DELAY_MS = 1000
_EXPORT_TIMEOUT = 5.0
"""Seconds one export may take (the exporter's retries included), on its own thread."""


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting what left the queue (exported or failed)."""

    def __init__(self, inner: SpanExporter, gate: _Gate) -> None:
        self.inner = inner
        self.gate = gate

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("span export failed")
            result = SpanExportResult.FAILURE
        with self.gate.lock:
            self.gate.left += len(spans)
            if result is SpanExportResult.SUCCESS:
                self.gate.exported += len(spans)
            else:
                self.gate.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Gate(SpanProcessor):
    """In front of the batch processor: a span that would overflow its queue is dropped here
    and counted (the SDK's own queue would drop the oldest silently)."""

    def __init__(self, batch: BatchSpanProcessor | None = None) -> None:
        self.lock = threading.Lock()
        self.batch = batch
        self.queued = 0
        self.left = 0
        self.exported = 0
        self.failed = 0
        self.dropped = 0

    def on_start(self, span: object, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        batch = self.batch
        if batch is None:
            return
        if self.queued - self.left >= MAX_QUEUE:
            self.dropped += 1
            return
        self.queued += 1
        batch.on_end(span)

    def shutdown(self) -> None:
        if self.batch is not None:
            self.batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis) if self.batch is not None else True


class _Pipeline:
    """Provider, gate, batch processor and exporter for one OTLP endpoint."""

    def __init__(self, endpoint: str, service: str) -> None:
        self.endpoint = endpoint
        self.gate = _Gate()
        exporter = _CountingExporter(
            OTLPSpanExporter(endpoint=endpoint, timeout=_EXPORT_TIMEOUT), self.gate
        )
        self.gate.batch = BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            max_export_batch_size=_BATCH,
            schedule_delay_millis=_DELAY_MS,
        )
        # Sampling is decided before a span is made (connect.trace_context.decide): every
        # span the SDK is asked for is one to record.
        self.provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=Resource.create({"service.name": service}),
            shutdown_on_exit=False,
        )
        self.provider.add_span_processor(self.gate)
        self.tracer = self.provider.get_tracer("meshlet")

    def close(self) -> None:
        """Flush what is queued and stop, on a thread of its own: never on the loop."""
        threading.Thread(
            target=self.provider.shutdown, name="meshlet tracing shutdown", daemon=True
        ).start()


class OpenSpan:
    """One traced exchange between its head and its end."""

    __slots__ = ("kind", "span", "start_ns", "tracing")

    def __init__(self, tracing: Tracing, span: trace_api.Span, kind: trace_api.SpanKind) -> None:
        self.tracing = tracing
        self.span = span
        self.kind = kind
        self.start_ns = time.time_ns()

    def finish(
        self, side: Side, ex: Exchange, peer: Peer | None, duration: float, dest: str
    ) -> None:
        span = self.span
        status = ex.status
        attrs: dict[str, str | int] = {"meshlet.response_flags": ex.flags}
        if status:
            attrs["http.response.status_code"] = status
        if ex.upstream:
            host, _, port = ex.upstream.rpartition(":")
            if port.isdigit():
                attrs["network.peer.address"] = host
                attrs["network.peer.port"] = int(port)
        if self.kind is trace_api.SpanKind.SERVER:
            attrs["meshlet.source.principal"] = peer.uri if peer is not None else "unknown"
            attrs["meshlet.destination.principal"] = side.local_principal
            attrs["meshlet.destination.service"] = side.local_service
            if ex.verdict is not None:
                attrs["meshlet.intention"] = "deny" if ex.denied else "allow"
                attrs["meshlet.intention.rule"] = verdict_rule(ex.verdict)
            failed = status >= 500 or status == 0
        else:
            attrs["meshlet.source.principal"] = side.local_principal
            attrs["meshlet.source.service"] = side.local_service
            attrs["meshlet.destination.service"] = dest
            attrs["meshlet.upstream_cluster"] = ex.cluster or side.remote_service
            failed = status >= 400 or status == 0
        span.set_attributes(attrs)
        if failed:
            span.set_attribute("error.type", str(status) if status else ex.flags)
            span.set_status(trace_api.StatusCode.ERROR)
        span.end(end_time=self.start_ns + int(duration * 1e9))


class Tracing:
    """A sidecar's tracer: the settings in force and the export pipeline of their endpoint.
    `update` swaps settings at any time; an open span ends on the pipeline it began on."""

    def __init__(self, service: str, settings: TracingSettings, rng: random.Random | None = None):
        self.service = service
        self.rng = rng if rng is not None else random.Random()
        self.settings = settings
        self._pipeline = _Pipeline(settings.otlp_endpoint, service)
        self._names = strip_names(settings.propagation)
        self.dropped_before = 0
        """Drops of pipelines replaced since (counters only grow)."""
        self.exported_before = 0

    def update(self, settings: TracingSettings) -> None:
        if settings.otlp_endpoint != self._pipeline.endpoint:
            old = self._pipeline
            self._pipeline = _Pipeline(settings.otlp_endpoint, self.service)
            self.dropped_before += old.gate.dropped
            self.exported_before += old.gate.exported
            old.close()
        self.settings = settings
        self._names = strip_names(settings.propagation)

    def close(self) -> None:
        self._pipeline.close()

    def counters(self) -> dict[str, int]:
        gate = self._pipeline.gate
        return {
            "dropped": self.dropped_before + gate.dropped,
            "exported": self.exported_before + gate.exported,
            "failed": gate.failed,
            "queued": gate.queued - gate.left,
        }

    def request(self, side: Side, ex: Exchange, peer: Peer | None) -> None:
        """The exchange's head: decide, maybe start a span, rewrite the head sent on."""
        settings = self.settings
        seen: list[bytes] = []
        incoming = extract(ex.headers, settings.propagation, self._names, seen)
        sampled = decide(incoming, settings.sampling_percent, self.rng)
        rng = self.rng
        if sampled:
            kinds = trace_api.SpanKind
            kind = kinds.SERVER if side.reporter == "destination" else kinds.CLIENT
            parent: Context | None = None
            if incoming.trace_id:
                parent = trace_api.set_span_in_context(
                    trace_api.NonRecordingSpan(
                        trace_api.SpanContext(
                            incoming.trace_id,
                            incoming.span_id,
                            is_remote=True,
                            trace_flags=trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED),
                        )
                    )
                )
            open_span = OpenSpan(self, trace_api.INVALID_SPAN, kind)
            span = self._pipeline.tracer.start_span(
                ex.method.decode("latin-1"),
                context=parent,
                kind=kind,
                attributes=_request_attributes(side, ex),
                start_time=open_span.start_ns,
            )
            open_span.span = span
            ex.span = open_span
            ctx = span.get_span_context()
            trace_id, span_id = ctx.trace_id, ctx.span_id
        if not sampled or not trace_id:
            # Unsampled (or the SDK disabled by OTEL_SDK_DISABLED, which makes no span): the
            # context still travels on, with IDs of our own.
            trace_id = incoming.trace_id or rng.getrandbits(128) or 1
            span_id = rng.getrandbits(64) or 1
        lines = inject(
            settings.propagation,
            trace_id,
            span_id,
            sampled,
            parent_span_id=incoming.span_id,
            tracestate=incoming.tracestate,
        )
        ex.head = strip_head(ex.head, seen, lines)


def _request_attributes(side: Side, ex: Exchange) -> dict[str, Any]:
    """OpenTelemetry's HTTP semantic conventions (stable, v1.23+) for the request's head."""
    head = ex.head
    first = head[: head.find(b"\r\n")]
    target = first[len(ex.method) + 1 : first.rfind(b" ")].decode("latin-1")
    host = user_agent = ""
    for name, value in ex.headers:
        lower = name.lower()
        if lower == b"host":
            host = value.decode("latin-1")
        elif lower == b"user-agent":
            user_agent = value.decode("latin-1")
    path, sep, query = target.partition("?")
    attrs: dict[str, Any] = {
        "http.request.method": ex.method.decode("latin-1"),
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "url.scheme": "http",
    }
    if side.reporter == "destination":
        attrs["url.path"] = path
        if sep:
            attrs["url.query"] = query
    else:
        attrs["url.full"] = f"http://{host or side.remote_service}{target}"
    if host:
        address, colon, port = host.rpartition(":")
        if colon and port.isdigit():
            attrs["server.address"] = address
            attrs["server.port"] = int(port)
        else:
            attrs["server.address"] = host
    if user_agent:
        attrs["user_agent.original"] = user_agent
    at = head.find(b"\r\n" + REQUEST_ID + b":")
    if at >= 0:
        start = at + len(REQUEST_ID) + 3
        attrs["http.request.header.x-request-id"] = [
            head[start : head.find(b"\r\n", start)].strip().decode("latin-1")
        ]
    return attrs
