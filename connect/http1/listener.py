"""The HTTP listeners: `OutboundHTTP` (plain HTTP from the local app to one upstream
service over pooled mTLS) and `InboundHTTP` (mTLS from mesh peers, and plaintext in
MutualTLSMode permissive, authorized per request, to the local app). The inbound side removes
every X-Forwarded-Client-Cert and x-meshlet-* field a caller sent and writes its own
X-Forwarded-Client-Cert (Envoy's SANITIZE_SET; none for a plaintext caller, which has no
certificate), whatever listener the caller used; the outbound side removes any
X-Forwarded-Client-Cert the app sent."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence

from connect.dial import Upstream
from connect.http1.downstream import Downstream
from connect.http1.limits import HTTPLimits
from connect.http1.origin import AppOrigin, MeshOrigin, Origin
from connect.http1_headers import MESHLET_PREFIX, XFCC, HeadRewriter
from connect.http_target import TargetParser
from connect.identity import IdentityError, parse_service
from connect.inbound import InboundGate
from connect.listener import ListeningSocket, TLSTerminator
from connect.local_app import LocalAppTimeouts
from connect.observe import ExchangeObserver
from connect.routes import RouteAction, RouteTable, WeightedCluster, default_table
from connect.seams import RequestAuthorizer
from connect.stats import ProxyStats
from intentions.path_normalization import PathNormalization

__all__ = ["HTTPListener", "InboundHTTP", "OutboundHTTP"]

log = logging.getLogger("meshlet.proxy.http")

LOCAL_APP = ""
"""The inbound route's one cluster, the app: unnamed (AppOrigin has one destination), so
the access log, metrics and spans still name the local service for the inbound side."""


class HTTPListener(ListeningSocket):
    targets: TargetParser | None = None
    """Inbound: parses and normalizes each request target; outbound forwards it as sent."""
    default_host = b""
    """Outbound: the Host given to an HTTP/1.0 request that has none (the upstream's name)."""
    routes: Callable[[], RouteTable] | None = None
    """Outbound: the current route table (connect.routes), consulted once per request head."""
    fixed_routes: RouteTable | None = None
    """Outbound without `routes`: the one table it ever has (read without a call)."""
    rng: random.Random = random.Random()
    """Outbound: for the routes' weighted splits."""
    observer: ExchangeObserver | None = None
    """Told about each exchange when it is over (connect.observe); None costs one test."""

    def __init__(
        self,
        origin: Origin,
        limits: HTTPLimits,
        stats: ProxyStats,
        *,
        authorize: RequestAuthorizer | None,
        by_uri: str,
        drop: frozenset[bytes],
        drop_prefixes: tuple[bytes, ...] = (),
        is_tls: bool,
    ) -> None:
        super().__init__()
        self.origin = origin
        self.limits = limits
        self.stats = stats
        self.authorize = authorize
        self.by_uri = by_uri
        self.drop = drop
        self.is_tls = is_tls
        self.connections: set[Downstream] = set()
        self.gate: InboundGate | None = None
        self.request_heads = HeadRewriter(drop, drop_prefixes=drop_prefixes)
        self.response_heads = HeadRewriter()
        self.may_redo = not is_tls
        """Outbound only: an inbound sidecar's app answers are never a peer's refusal."""

    def _live(self) -> int:
        return len(self.connections)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones get `grace`."""
        await self._stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            busy = [c for c in self.connections if c.queue or c.tunnel is not None]
            for conn in list(self.connections):
                if conn not in busy and conn.transport is not None:
                    conn.transport.close()
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self.origin.close()
        await self._closed()


class OutboundHTTP(HTTPListener):
    """Plain HTTP from the local app to an upstream service over pooled mTLS.

    `routes` returns the current route table (an immutable connect.routes.RouteTable, e.g.
    `Latest[RouteTable].get`); each request head is routed by the table current when it
    arrives. Its clusters are named: `upstream` is the cluster named `upstream.name` (with
    `failover` after it, in order), `clusters` adds others by name, each an upstream or a
    failover chain of them. Without `routes`, one route to `upstream`
    (`default_table`), which is what this listener has always done.
    """

    def __init__(
        self,
        upstream: Upstream,
        limits: HTTPLimits | None = None,
        stats: ProxyStats | None = None,
        *,
        routes: Callable[[], RouteTable] | None = None,
        clusters: Mapping[str, Upstream | Sequence[Upstream]] | None = None,
        failover: Sequence[Upstream] = (),
    ) -> None:
        limits = limits or HTTPLimits()
        stats = stats or ProxyStats()
        own: Upstream | Sequence[Upstream] = (upstream, *failover) if failover else upstream
        named = {upstream.name: own, **(clusters or {})}
        super().__init__(
            MeshOrigin(upstream, limits, stats, named),
            limits,
            stats,
            authorize=None,
            by_uri="",
            # The app cannot forge client-certificate details for the next hop.
            drop=frozenset({XFCC}),
            is_tls=False,
        )
        self.default_host = upstream.name.encode()
        if routes is None:
            self.fixed_routes = default_table(upstream.name)
        self.routes = routes
        self.rng = upstream.rng

    def _protocol(self) -> asyncio.Protocol:
        return Downstream(self, None)


class InboundHTTP(HTTPListener):
    """mTLS from mesh peers, authorized per request, to the local app over pooled TCP."""

    def __init__(
        self,
        gate: InboundGate,
        app_host: str,
        app_port: int,
        *,
        authorize: RequestAuthorizer,
        local_uri: str,
        limits: HTTPLimits | None = None,
        path_normalization: PathNormalization = "base",
    ) -> None:
        limits = limits or HTTPLimits()
        self.app_origin = AppOrigin(app_host, app_port, limits)
        super().__init__(
            self.app_origin,
            limits,
            gate.stats,
            authorize=authorize,
            by_uri=local_uri,
            # What a caller says about its certificate or speaks as a sidecar is not believed,
            # whichever listener it came through (a tcp upstream relays bytes as they are, and
            # any mesh leaf can connect here directly): the app sees this sidecar's word only.
            drop=frozenset({XFCC}),
            drop_prefixes=(MESHLET_PREFIX,),
            is_tls=True,
        )
        self.gate = gate
        self.inbound_gate = gate
        self.targets = TargetParser(path_normalization)
        self.set_local_uri(local_uri)
        self.set_local_app(LocalAppTimeouts(connect_timeout=limits.connect_timeout))

    def set_local_uri(self, local_uri: str) -> None:
        """This sidecar's SPIFFE ID, in place (a leaf of a new trust domain): the XFCC `By`
        the app is told from the next request on."""
        self.by_uri = local_uri
        # An HTTP/1.0 caller may omit Host; the app gets HTTP/1.1, which must carry one: the
        # name this sidecar serves is the host the caller reached.
        try:
            self.default_host = parse_service(local_uri).service.encode()
        except IdentityError:
            self.default_host = b""  # no service name to give: forwarded without Host

    def set_local_app(self, timeouts: LocalAppTimeouts) -> None:
        """The local app's timeouts (connect.local_app), in place: each request is timed by
        those current when its head arrives, each dial by those current when it starts. The
        request and idle timeouts ride on the one route to the app (Envoy's local_app
        route), so the outbound side's timers apply them (connect.http1.downstream)."""
        action = RouteAction(
            (WeightedCluster(LOCAL_APP),),
            request_timeout=timeouts.request_timeout,
            idle_timeout=timeouts.idle_timeout,
        )
        self.fixed_routes = RouteTable((), action)
        self.app_origin.connect_timeout = timeouts.connect_timeout

    def _protocol(self) -> asyncio.Protocol:
        return Downstream(self, None)

    def _tls(self) -> TLSTerminator:
        return self.inbound_gate

    def recheck(self) -> int:
        """Close the open connections that may no longer stay open: plaintext ones once the
        mode is strict again, and tunnels whose upgrade request the intentions now deny (a
        request is authorized when it arrives, but a tunnel is one request that goes on
        carrying bytes, like a tcp connection, so it is decided again as tcp ones are).
        Returns how many."""
        open_now = {
            conn.transport: conn.peer
            for conn in self.connections
            if conn.peer is not None and conn.peer.plaintext and conn.transport is not None
        }
        closed = self.inbound_gate.revoke(open_now)
        authorize = self.authorize
        if authorize is None:
            return closed
        denied: dict[tuple[str, str], int] = {}
        for conn in list(self.connections):
            transport, peer, upgraded = conn.transport, conn.peer, conn.upgraded
            if conn.tunnel is None or transport is None or transport.is_closing():
                continue
            if peer is None or upgraded is None:
                continue
            verdict = authorize(peer, *upgraded)
            if not verdict.allowed:
                transport.abort()
                key = (peer.uri or "plaintext", verdict.reason)
                denied[key] = denied.get(key, 0) + 1
        for (who, reason), n in denied.items():
            self.stats.connections_revoked += n
            closed += n
            log.warning("inbound: closed %d tunnel(s) from %s: now denied: %s", n, who, reason)
        return closed
