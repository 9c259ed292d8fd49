"""What the listeners tell an observer about each exchange, and the mesh metrics kept from it.

The HTTP listeners call an `ExchangeObserver` at three points of each request: its routed
head, the response head, and when it is over (the downstream protocol keeps the start time
and the byte counts on the exchange only while an observer is set: a listener without one
pays an attribute test per request). The L4
listeners call a `ConnectionObserver` when a relayed connection opens and when it closes.

`MeshMetrics` is the observer behind `/metrics`: per label tuple, plain int counters and
fixed-bucket histograms kept as lists (`bisect` picks the bucket). The labels are Istio's
standard ones, every one of them low-cardinality: the peer's and the destination's service
and SPIFFE identity, status code, response flags, never a path or a request id. Nothing here
imports prometheus_client: agent/metrics.py renders `MeshMetrics.export()` at scrape time, and
a worker group adds the exports of its processes together (agent.supervisor.sum_counters)
before rendering, so the shape is nested dicts of numbers keyed by strings.

Response flags are Envoy's short codes (Envoy access-log docs, "%RESPONSE_FLAGS%"): UH no
healthy upstream, UF upstream connection failure, UO upstream overflow (circuit breaking),
URX retry limit exceeded, UT upstream request timeout, UC upstream connection termination,
DC downstream connection termination, DPE downstream protocol error; `-` when none.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from connect.http1.exchange import Exchange
    from connect.seams import Peer, Verdict
    from connect.tracing import Tracing
    from connect.tracing_settings import TracingSettings

__all__ = [
    "BYTES_BUCKETS",
    "DURATION_BUCKETS_MS",
    "HTTP_LABELS",
    "TCP_LABELS",
    "AccessSink",
    "ConnectionObserver",
    "ExchangeObserver",
    "HTTPSide",
    "MeshMetrics",
    "Side",
    "TCPSide",
    "Telemetry",
    "status_of",
    "verdict_rule",
]

DURATION_BUCKETS_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
"""Istio's default buckets for istio_request_duration_milliseconds."""
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)
"""Istio's buckets for istio_request_bytes / istio_response_bytes (exponential, 1 to 1e9)."""

HTTP_LABELS = (
    "reporter",
    "source_workload",
    "source_principal",
    "destination_service",
    "destination_service_name",
    "destination_workload",
    "destination_principal",
    "request_protocol",
    "response_code",
    "response_flags",
    "grpc_response_status",
    "connection_security_policy",
)
TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_principal",
    "destination_service",
    "destination_service_name",
    "destination_workload",
    "destination_principal",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
_log = logging.getLogger("meshlet.observe")

SEP = "\x1f"
"""Joins label values into one export key (no label value holds it)."""


def status_of(response: bytes) -> int:
    """The status code of a whole HTTP/1.1 response the proxy wrote itself."""
    try:
        return int(response[9:12])
    except ValueError:
        return 0


class ExchangeObserver(Protocol):
    """Three calls per exchange: its head (routed: `ex.cluster` and `ex.route` are set,
    `ex.head` is what goes upstream), the response head it gets (`ex.status`), and done."""

    def request(self, ex: Exchange, peer: Peer | None) -> None: ...

    def response(self, ex: Exchange) -> None: ...

    def done(self, ex: Exchange, peer: Peer | None, duration: float) -> None:
        """`ex` is over, `duration` seconds after its head arrived: answered with
        `ex.status` (0: none could be sent), `ex.flags` (Envoy's short codes, "-" for none);
        `ex.rx`/`ex.tx` hold the body bytes read from the client and sent back."""


class ConnectionObserver(Protocol):
    def opened(self, peer: Peer | None) -> None: ...

    def closed(
        self,
        peer: Peer | None,
        *,
        received: int,
        sent: int,
        flags: str,
        start: float,
        upstream: str,
    ) -> None:
        """`received`: bytes from the downstream client; `sent`: bytes back to it; `start`:
        wall-clock time it opened; `upstream` the host:port it was relayed to ("" none)."""


@dataclass(frozen=True, slots=True)
class Side:
    """The fixed half of a listener's labels: who reports, and the identities known
    without the peer (the local service's; the upstream's on the caller's side)."""

    reporter: str
    """`source` (an upstream listener, the caller's sidecar) or `destination` (inbound)."""
    local_service: str
    local_principal: str
    remote_service: str = ""
    """The upstream's service (source side); the peer's comes from its certificate."""
    remote_principal: str = "unknown"
    protocol: str = "http"
    security: str = "mutual_tls"


class _Series:
    """One label tuple's HTTP counters and histograms."""

    __slots__ = ("count", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum")

    def __init__(self) -> None:
        self.count = 0
        self.dur = [0] * (len(DURATION_BUCKETS_MS) + 1)
        self.dur_sum = 0.0
        self.req = [0] * (len(BYTES_BUCKETS) + 1)
        self.req_sum = 0
        self.resp = [0] * (len(BYTES_BUCKETS) + 1)
        self.resp_sum = 0


def _histogram(counts: list[int], total: float) -> dict[str, float]:
    out: dict[str, float] = {str(i): n for i, n in enumerate(counts) if n}
    out["sum"] = total
    return out


class MeshMetrics:
    """Every listener's observations in one process. The `*_total` dicts are meshlet's own
    counters (reason or name -> count); `_http` and `_tcp` are the Istio series."""

    def __init__(self) -> None:
        self._http: dict[tuple[str, ...], _Series] = {}
        self._tcp: dict[tuple[str, ...], list[int]] = {}
        """labels -> [opened, closed, received, sent]."""
        self.denials: dict[str, int] = {}
        """Intention denials by reason: `intention` (a deny intention or permission decided)
        or `default` (no intention matched; the default policy denied)."""
        self.retries: dict[str, int] = {}
        """Retries made, by upstream cluster."""

    def series(self, labels: tuple[str, ...]) -> _Series:
        s = self._http.get(labels)
        if s is None:
            s = self._http[labels] = _Series()
        return s

    def tcp_series(self, labels: tuple[str, ...]) -> list[int]:
        s = self._tcp.get(labels)
        if s is None:
            s = self._tcp[labels] = [0, 0, 0, 0]
        return s

    def export(self) -> dict[str, Any]:
        """Nested dicts of numbers: what agent/metrics.py renders and workers add up."""
        http: dict[str, Any] = {}
        for labels, s in self._http.items():
            http[SEP.join(labels)] = {
                "count": s.count,
                "duration_ms": _histogram(s.dur, s.dur_sum),
                "request_bytes": _histogram(s.req, s.req_sum),
                "response_bytes": _histogram(s.resp, s.resp_sum),
            }
        tcp = {
            SEP.join(labels): {"opened": v[0], "closed": v[1], "received": v[2], "sent": v[3]}
            for labels, v in self._tcp.items()
        }
        return {
            "http": http,
            "tcp": tcp,
            "denials": dict(self.denials),
            "retries": dict(self.retries),
        }


def _service_of(uri: str) -> str:
    """The service name of a SPIFFE service URI (.../svc/NAME), else "unknown"."""
    _, sep, name = uri.rpartition("/svc/")
    return name if sep and name else "unknown"


def _principal_of(local_principal: str, service: str) -> str:
    """The SPIFFE URI `service` has in the local principal's trust domain, namespace and
    datacenter (what a caller's sidecar expects of it); "unknown" without a local one."""
    base, sep, _ = local_principal.rpartition("/svc/")
    return f"{base}/svc/{service}" if sep else "unknown"


class AccessSink(Protocol):
    """Where access-log records go (connect.access_log.AccessLog): never blocks."""

    def listener(self, side: Side, address: str, reason: str) -> None:
        """A connection the listener refused before it carried anything (Consul's listener
        logs: a failed TLS handshake, a peer that is not a service of the trust domain)."""

    def http(self, side: Side, ex: Exchange, peer: Peer | None, duration: float) -> None: ...

    def tcp(
        self,
        side: Side,
        peer: Peer | None,
        *,
        received: int,
        sent: int,
        flags: str,
        start: float,
        upstream: str,
    ) -> None: ...


class Telemetry:
    """One process's observers: the metrics every listener feeds, and the access log and the
    tracer while they are configured (`access_log` and `set_tracing` can change at any time:
    a proxy-defaults change applies without touching the listeners)."""

    def __init__(self, service: str, principal: str = "", metrics: MeshMetrics | None = None):
        self.service = service
        self.principal = principal or "unknown"
        self.metrics = metrics if metrics is not None else MeshMetrics()
        self.access_log: AccessSink | None = None
        self.tracing: Tracing | None = None
        """While tracing is on (connect.tracing); None: the SDK is not even imported."""
        self._tracing_counters: dict[str, int] = {}
        """Of tracers turned off since (counters only grow)."""

    def set_tracing(self, settings: TracingSettings | None) -> None:
        """Trace with `settings` from the next request on (None or no endpoint: stop)."""
        tracing = self.tracing
        if settings is None or not settings.enabled:
            if tracing is not None:
                self.tracing = None
                for k, v in tracing.counters().items():
                    self._tracing_counters[k] = self._tracing_counters.get(k, 0) + v
                tracing.close()
            return
        if tracing is None:
            # The SDK and the OTLP exporter load here, the first time tracing is on.
            from connect.tracing import Tracing

            self.tracing = Tracing(self.service, settings)
        elif tracing.settings != settings:
            tracing.update(settings)

    def tracing_counters(self) -> dict[str, int]:
        """Spans exported, failed, dropped (queue full) since start; queued now."""
        out = dict(self._tracing_counters)
        out["queued"] = 0
        if self.tracing is not None:
            for k, v in self.tracing.counters().items():
                out[k] = out.get(k, 0) + v if k != "queued" else v
        return out

    def inbound(self, protocol: str) -> Side:
        return Side("destination", self.service, self.principal, protocol=protocol)

    def listener_refused(self, address: str, reason: str) -> None:
        """An inbound listener refused a connection (connect.inbound.InboundGate.on_refused)."""
        log = self.access_log
        if log is not None:
            log.listener(self.inbound("tcp"), address, reason)

    def upstream(self, name: str, protocol: str) -> Side:
        return Side(
            "source",
            self.service,
            self.principal,
            remote_service=name,
            remote_principal=_principal_of(self.principal, name),
            protocol=protocol,
        )

    def http(self, side: Side) -> HTTPSide:
        return HTTPSide(self, side)

    def tcp(self, side: Side) -> TCPSide:
        return TCPSide(self, side)


class HTTPSide:
    """The `ExchangeObserver` of one HTTP listener: metrics, then the access log if on."""

    def __init__(self, telemetry: Telemetry, side: Side) -> None:
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        self.side = side
        self._inbound = side.reporter == "destination"
        self._keys: dict[tuple[str, int, str, str], _Series] = {}
        """(peer URI or cluster, status, flags, grpc status) -> its series: one dict look-up
        per request once the combination has been seen."""
        self.services: dict[str, str] = {}
        """Caller's side: a routed cluster's name (a discovery-chain target ID such as
        `v1.api.default.default.dc1`) -> the Consul service it reaches, which is what
        `destination_service*` carry. Set by whoever applies the routing."""

    def _labels(self, remote: str, status: int, flags: str, grpc: str) -> tuple[str, ...]:
        s = self.side
        # Inbound, only a plaintext caller has no URI (MutualTLSMode permissive).
        security = "none" if self._inbound and not remote else s.security
        if self._inbound:
            src_wl, src_p = _service_of(remote), remote or "unknown"
            dst, dst_p = s.local_service, s.local_principal
        else:
            src_wl, src_p = s.local_service, s.local_principal
            dst = self.services.get(remote, remote) if remote else s.remote_service
            dst_p = _principal_of(s.local_principal, dst) if remote else s.remote_principal
        return (
            s.reporter,
            src_wl,
            src_p,
            dst,
            dst,
            dst,
            dst_p,
            s.protocol,
            str(status),
            flags,
            grpc,
            security,
        )

    def request(self, ex: Exchange, peer: Peer | None) -> None:
        # Metrics are taken when it is done; tracing (when on) decides and rewrites the head.
        tracing = self.telemetry.tracing
        if tracing is not None:
            try:
                tracing.request(self.side, ex, peer)
            except Exception:
                # Tracing must never break the exchange it traces (the head goes on as is).
                ex.span = None
                _log.exception("tracing a request failed")

    def response(self, ex: Exchange) -> None:
        headers = ex.response_headers
        if headers is not None:
            ex.grpc_status = grpc_status_of(headers)

    def done(self, ex: Exchange, peer: Peer | None, duration: float) -> None:
        status, flags = ex.status, ex.flags
        remote = (peer.uri if peer is not None else "") if self._inbound else ex.cluster
        grpc = ex.grpc_status
        key = (remote, status, flags, grpc)
        s = self._keys.get(key)
        if s is None:
            s = self._keys[key] = self.metrics.series(self._labels(remote, status, flags, grpc))
        s.count += 1
        ms = duration * 1000.0
        s.dur[bisect_left(DURATION_BUCKETS_MS, ms)] += 1
        s.dur_sum += ms
        s.req[bisect_left(BYTES_BUCKETS, ex.rx)] += 1
        s.req_sum += ex.rx
        s.resp[bisect_left(BYTES_BUCKETS, ex.tx)] += 1
        s.resp_sum += ex.tx
        if ex.denied:
            why = "intention" if getattr(ex.verdict, "intention", None) else "default"
            self.metrics.denials[why] = self.metrics.denials.get(why, 0) + 1
        if ex.tries > 1:
            # By upstream, as documented: a routed upstream's tries go to its chain's target
            # clusters, whose ids name no upstream.
            name = self.side.remote_service or ex.cluster
            self.metrics.retries[name] = self.metrics.retries.get(name, 0) + ex.tries - 1
        span = ex.span
        if span is not None:
            ex.span = None
            dest = self.services.get(ex.cluster, ex.cluster) if ex.cluster else ""
            span.finish(self.side, ex, peer, duration, dest or self.side.remote_service)
        log = self.telemetry.access_log
        if log is not None:
            log.http(self.side, ex, peer, duration)


class TCPSide:
    """The `ConnectionObserver` of one L4 listener: metrics, then the access log if on."""

    def __init__(self, telemetry: Telemetry, side: Side) -> None:
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        self.side = side

    def _series(self, peer: Peer | None, flags: str) -> list[int]:
        s = self.side
        if s.reporter == "destination":
            remote = peer.uri if peer is not None else ""
            src_wl, src_p = _service_of(remote), remote or "unknown"
            dst, dst_p = s.local_service, s.local_principal
        else:
            src_wl, src_p = s.local_service, s.local_principal
            dst, dst_p = s.remote_service, s.remote_principal
        security = "none" if peer is not None and peer.plaintext else s.security
        labels = (s.reporter, src_wl, src_p, dst, dst, dst, dst_p, "tcp", flags, security)
        return self.metrics.tcp_series(labels)

    def opened(self, peer: Peer | None) -> None:
        self._series(peer, "-")[0] += 1

    def closed(
        self,
        peer: Peer | None,
        *,
        received: int,
        sent: int,
        flags: str,
        start: float,
        upstream: str,
    ) -> None:
        # Opened is counted without flags (none are known yet); the close and the bytes on
        # the series of the flags it ended with.
        s = self._series(peer, flags)
        s[1] += 1
        s[2] += received
        s[3] += sent
        log = self.telemetry.access_log
        if log is not None:
            log.tcp(
                self.side,
                peer,
                received=received,
                sent=sent,
                flags=flags,
                start=start,
                upstream=upstream,
            )


_GRPC_STATUSES = {str(n): str(n) for n in range(17)}
"""gRPC's status codes (0 OK to 16 UNAUTHENTICATED): the label takes nothing else, so its
cardinality stays bounded whatever an upstream writes."""


def grpc_status_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The grpc-status of a gRPC response head (content-type application/grpc...), "-" for
    anything else. Over HTTP/1 only a trailers-only answer (an error, or a proxy's) carries it
    in its head; a status sent as a trailer after a body is not read (see
    docs/observability.md)."""
    grpc = False
    status = b""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            grpc = value[:16].lower() == b"application/grpc"
        elif len(name) == 11 and name.lower() == b"grpc-status":
            status = value.strip()
    if not grpc or not status:
        return "-"
    return _GRPC_STATUSES.get(status.decode("latin-1"), "other")


def verdict_rule(verdict: Verdict | None) -> str:
    """The rule that decided, as the engine says it (intention and permission index)."""
    intention = getattr(verdict, "intention", None)
    if not intention:
        return "default"
    permission = getattr(verdict, "permission", None)
    return str(intention) if permission is None else f"{intention} permission {permission}"
