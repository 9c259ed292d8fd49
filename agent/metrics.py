"""`/metrics`: the mesh metrics in Prometheus's text format, read at scrape time.

The proxy keeps plain counters (connect.observe.MeshMetrics, connect.stats.ProxyStats); this
module is the only one that imports prometheus_client, and it renders a snapshot of them
through a custom collector on a private registry (no global state, nothing on the hot path).
With `--workers N` the snapshot's counters are already the sum over the processes (the
supervisor adds the workers' reports), so one scrape of any process's admin port sees them all.

Names and labels: Istio's standard metrics (istio.io/latest/docs/reference/config/metrics)
and meshlet's own, `meshlet_`-prefixed; docs/observability.md lists them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.admin_http import HTTPServer, Limits, Query, Reply, Route
from connect.observe import BYTES_BUCKETS, DURATION_BUCKETS_MS, HTTP_LABELS, SEP, TCP_LABELS

__all__ = ["MeshCollector", "MetricsServer", "metrics_route", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _buckets(hist: Mapping[str, Any], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0.0
    for i, bound in enumerate(bounds):
        total += hist.get(str(i), 0)
        out.append((repr(float(bound)) if bound != int(bound) else str(int(bound)), total))
    total += hist.get(str(len(bounds)), 0)
    out.append(("+Inf", total))
    return out


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class MeshCollector(Collector):
    """Turns one snapshot (see `AgentRuntime.metrics_snapshot`) into metric families."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from _istio(snap.get("mesh") or {})
        yield from _meshlet(snap)
        yield from _mirrors(snap.get("counters") or {})


MIRROR_OUTCOMES = ("sent", "failed", "dropped_over_limit", "skipped")
"""How a mirrored copy ended (connect.http1.mirror.Mirrors): the `outcome` label's values."""


def _mirrors(counters: Mapping[str, Any]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "meshlet_mirror_requests",
        "Copies of mirrored requests by upstream and how they ended: sent, failed (no endpoint, "
        "dial failed, no end in time), dropped_over_limit (64 in flight), skipped (not copyable).",
        labels=["upstream", "outcome"],
    )
    inflight = GaugeMetricFamily(
        "meshlet_mirror_requests_in_flight",
        "Copies of mirrored requests in flight now, by upstream.",
        labels=["upstream"],
    )
    for name, counts in sorted((counters.get("mirrors") or {}).items()):
        if isinstance(counts, Mapping):
            for outcome in MIRROR_OUTCOMES:
                requests.add_metric([name, outcome], _num(counts.get(outcome)))
            inflight.add_metric([name], _num(counts.get("inflight")))
    yield from (requests, inflight)


def _istio(mesh: Mapping[str, Any]) -> Iterator[Metric]:
    labels = list(HTTP_LABELS)
    requests = CounterMetricFamily(
        "istio_requests", "Requests handled by the sidecar.", labels=labels
    )
    duration = HistogramMetricFamily(
        "istio_request_duration_milliseconds",
        "Duration of requests, from the head's arrival to the response's end.",
        labels=labels,
    )
    req_bytes = HistogramMetricFamily(
        "istio_request_bytes", "HTTP request body sizes.", labels=labels
    )
    resp_bytes = HistogramMetricFamily(
        "istio_response_bytes", "HTTP response body sizes.", labels=labels
    )
    for key, series in sorted((mesh.get("http") or {}).items()):
        values = key.split(SEP)
        if len(values) != len(labels):
            continue
        requests.add_metric(values, _num(series.get("count")))
        for hist_family, field, bounds in (
            (duration, "duration_ms", DURATION_BUCKETS_MS),
            (req_bytes, "request_bytes", BYTES_BUCKETS),
            (resp_bytes, "response_bytes", BYTES_BUCKETS),
        ):
            hist = series.get(field) or {}
            hist_family.add_metric(values, _buckets(hist, bounds), _num(hist.get("sum")))
    yield from (requests, duration, req_bytes, resp_bytes)

    tcp_labels = list(TCP_LABELS)
    families = {
        "opened": CounterMetricFamily(
            "istio_tcp_connections_opened", "TCP connections opened.", labels=tcp_labels
        ),
        "closed": CounterMetricFamily(
            "istio_tcp_connections_closed", "TCP connections closed.", labels=tcp_labels
        ),
        "sent": CounterMetricFamily(
            "istio_tcp_sent_bytes",
            "Bytes sent back to the client on TCP connections.",
            labels=tcp_labels,
        ),
        "received": CounterMetricFamily(
            "istio_tcp_received_bytes",
            "Bytes received from the client on TCP connections.",
            labels=tcp_labels,
        ),
    }
    for key, series in sorted((mesh.get("tcp") or {}).items()):
        values = key.split(SEP)
        if len(values) != len(tcp_labels):
            continue
        for name, family in families.items():
            family.add_metric(values, _num(series.get(name)))
    yield from families.values()


def _counter(name: str, doc: str, label: str, values: Mapping[str, Any]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], _num(value))
    return family


def _meshlet(snap: Mapping[str, Any]) -> Iterator[Metric]:
    counters: Mapping[str, Any] = snap.get("counters") or {}
    mesh: Mapping[str, Any] = snap.get("mesh") or {}
    yield _counter(
        "meshlet_intention_denials",
        "Requests denied by intentions, by what decided (a deny intention, or the default).",
        "reason",
        mesh.get("denials") or {},
    )
    handshakes = CounterMetricFamily(
        "meshlet_tls_handshake_failures",
        "Failed mTLS handshakes: side=server (inbound, by reason) or client (dials, by kind).",
        labels=["side", "reason"],
    )
    for reason, n in sorted((counters.get("handshake_failures") or {}).items()):
        handshakes.add_metric(["server", reason], _num(n))
    client: dict[str, float] = {}
    for kinds in (counters.get("upstream_refusals") or {}).values():
        if isinstance(kinds, Mapping):
            for kind, n in kinds.items():
                client[kind] = client.get(kind, 0.0) + _num(n)
    for kind, n in sorted(client.items()):
        handshakes.add_metric(["client", kind], n)
    yield handshakes
    refused = CounterMetricFamily(
        "meshlet_connections_refused",
        "Connections reset at accept because a listener's cap was reached.",
        labels=["limit"],
    )
    for limit, n in sorted((counters.get("connections_refused_limit") or {}).items()):
        refused.add_metric([limit], _num(n))
    yield refused
    requests_refused = CounterMetricFamily(
        "meshlet_requests_refused",
        "HTTP requests answered 431 because a head limit was reached.",
        labels=["limit"],
    )
    for limit, n in sorted((counters.get("requests_refused_limit") or {}).items()):
        requests_refused.add_metric([limit], _num(n))
    yield requests_refused
    yield CounterMetricFamily(
        "meshlet_retry_buffer_overflows",
        "Requests a route would retry whose body outgrew the retry buffer (not retried).",
        value=_num(counters.get("retry_buffer_overflows")),
    )
    yield _counter(
        "meshlet_retries",
        "Requests sent again, by upstream.",
        "upstream",
        mesh.get("retries") or {},
    )
    overflows = CounterMetricFamily(
        "meshlet_circuit_breaker_overflows",
        "Requests or connections refused by a circuit-breaking limit.",
        labels=["upstream", "limit"],
    )
    ejections = CounterMetricFamily(
        "meshlet_outlier_ejections", "Endpoints ejected by outlier detection.", labels=["upstream"]
    )
    ejected = GaugeMetricFamily(
        "meshlet_outlier_ejected_endpoints", "Endpoints ejected now.", labels=["upstream"]
    )
    for name, cluster in sorted((counters.get("clusters") or {}).items()):
        for limit, n in sorted((cluster.get("overflows") or {}).items()):
            overflows.add_metric([name, limit], _num(n))
        ejections.add_metric([name], _num(cluster.get("ejections")))
        ejected.add_metric([name], _num(cluster.get("ejected")))
    yield from (overflows, ejections, ejected)

    endpoints = GaugeMetricFamily(
        "meshlet_upstream_endpoints", "Healthy endpoints per upstream.", labels=["upstream"]
    )
    for upstream, n in sorted((snap.get("endpoints") or {}).items()):
        endpoints.add_metric([upstream], _num(n))
    yield endpoints
    errors = GaugeMetricFamily(
        "meshlet_consul_watch_errors",
        "Failed Consul reads since the watch's last good answer.",
        labels=["watch"],
    )
    since = GaugeMetricFamily(
        "meshlet_consul_watch_seconds_since_success",
        "Seconds since the watch's last good answer from Consul (absent before the first).",
        labels=["watch"],
    )
    now = time.time()
    for name, st in sorted((snap.get("watches") or {}).items()):
        errors.add_metric([name], _num(st.get("failures")))
        last = st.get("last_success")
        if isinstance(last, int | float):
            since.add_metric([name], max(0.0, now - last))
    yield from (errors, since)
    yield CounterMetricFamily(
        "meshlet_config_snapshots_rejected",
        "Answers from Consul refused as unusable (the last good snapshot stays in force).",
        value=_num(snap.get("snapshots_rejected")),
    )
    expiry = snap.get("leaf_expires_at")
    leaf = GaugeMetricFamily(
        "meshlet_leaf_expiry_timestamp_seconds", "When the leaf certificate expires (Unix time)."
    )
    if isinstance(expiry, int | float):
        leaf.add_metric([], float(expiry))
    yield leaf
    yield GaugeMetricFamily(
        "meshlet_roots_generation",
        "Leaf material generation (it grows with each leaf or roots change).",
        value=_num(snap.get("roots_generation")),
    )
    access: Mapping[str, Any] = counters.get("access_log") or {}
    yield CounterMetricFamily(
        "meshlet_access_log_dropped",
        "Access-log lines dropped because the writer fell behind (the proxy never waits).",
        value=_num(access.get("dropped")),
    )
    yield CounterMetricFamily(
        "meshlet_access_log_write_failed",
        "Access-log lines lost because writing them failed (disk full, ...); the proxy never "
        "waits, and writing resumes once a write succeeds.",
        value=_num(access.get("write_failed")),
    )
    tracing: Mapping[str, Any] = counters.get("tracing") or {}
    yield CounterMetricFamily(
        "meshlet_tracing_spans_dropped",
        "Spans dropped because the export queue was full (the proxy never waits).",
        value=_num(tracing.get("dropped")),
    )
    yield CounterMetricFamily(
        "meshlet_tracing_spans_exported",
        "Spans the OTLP collector accepted.",
        value=_num(tracing.get("exported")),
    )
    yield CounterMetricFamily(
        "meshlet_tracing_spans_export_failed",
        "Spans whose export failed (collector unreachable or refusing).",
        value=_num(tracing.get("failed")),
    )
    process: Mapping[str, Any] = counters.get("process") or {}
    yield GaugeMetricFamily(
        "meshlet_process_resident_memory_bytes",
        "Resident memory, summed over the sidecar's processes.",
        value=_num(process.get("rss_bytes")),
    )
    yield GaugeMetricFamily(
        "meshlet_process_open_fds",
        "Open file descriptors, summed over the sidecar's processes.",
        value=_num(process.get("open_fds")),
    )


def render(snapshot: Callable[[], Mapping[str, Any]]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(snapshot))
    return generate_latest(registry)


def metrics_route(snapshot: Callable[[], Mapping[str, Any]]) -> Route:
    """GET /metrics, for the admin server's `extra_routes` or a metrics-only listener."""

    def handler(query: Query) -> Reply:
        return Reply(200, render(snapshot), CONTENT_TYPE)

    return Route("/metrics", handler)


class MetricsServer:
    """The metrics-only listener (`telemetry.metrics_address`): GET /metrics and nothing
    else, so it can face other hosts while the admin API stays on loopback."""

    def __init__(
        self,
        snapshot: Callable[[], Mapping[str, Any]],
        address: str,
        *,
        limits: Limits | None = None,
    ) -> None:
        host, _, port = address.rpartition(":")
        self._http = HTTPServer(
            [metrics_route(snapshot)], host.strip("[]"), int(port), limits=limits
        )

    @property
    def address(self) -> str:
        return self._http.address

    async def start(self) -> None:
        await self._http.start()

    async def close(self) -> None:
        await self._http.close()
