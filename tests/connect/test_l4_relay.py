"""The L4 sidecar pair over real sockets and real mTLS: app client -> outbound sidecar ->
mTLS -> inbound sidecar -> app, with refusals, failover, half-close and bounded buffers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Policy, Target, compile_balancer
from connect.cluster import Limits, fixed_endpoints
from connect.dial import Upstream
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4, RelayLimits
from connect.seams import Peer, PeerCache, Verdict
from connect.stats import ProxyStats
from intentions.engine import Identity, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe
from tests.connect.proxy_test_servers import AppStats, Source, start_app


@dataclass(frozen=True)
class _V:
    allowed: bool
    reason: str = "test"


@dataclass
class Pair:
    ca: ProxyTestCA
    app: AppStats
    inbound: InboundL4
    outbound: OutboundL4
    decisions: list[str]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.outbound.port)


def free_port() -> int:
    # A port nobody listens on: bind, read it, close (connects are then refused).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


async def build_pair(
    ca: ProxyTestCA,
    *,
    allow: Callable[[Peer], bool] = lambda peer: True,
    server_service: str = "api",
    limits: RelayLimits | None = None,
    app_factory: Callable[[AppStats], asyncio.Protocol] | None = None,
    extra_targets: tuple[Target, ...] = (),
    policy: Policy = Policy.ROUND_ROBIN,
) -> tuple[Pair, list[asyncio.Server]]:
    servers: list[asyncio.Server] = []
    if app_factory is None:
        app_server, app_port, app_stats = await start_app()
    else:
        app_server, app_port, app_stats = await start_app(app_factory)
    servers.append(app_server)
    decisions: list[str] = []

    def authorize(peer: Peer) -> Verdict:
        decisions.append(peer.uri)
        return _V(allow(peer))

    gate = InboundGate(
        ca.server_context(ca.leaf(server_service)),
        PeerCache(ca.verifier()),
        ProxyStats(),
        authorize=authorize,
    )
    inbound = InboundL4(gate, "127.0.0.1", app_port, limits)
    await inbound.start()
    client_ctx = ca.client_context(ca.leaf("web"))
    targets = (Target("n1/api-sidecar", "127.0.0.1", inbound.port), *extra_targets)
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(compile_balancer(targets, BalancerConfig(policy=policy))),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundL4(upstream, limits)
    await outbound.start()
    return Pair(ca, app_stats, inbound, outbound, decisions), servers


@pytest.fixture
async def pair(ca: ProxyTestCA) -> AsyncIterator[Pair]:
    p, servers = await build_pair(ca)
    yield p
    await close_all(p, servers)


async def close_all(p: Pair, servers: list[asyncio.Server]) -> None:
    await p.outbound.close(grace=0)
    await p.inbound.close(grace=0)
    for s in servers:
        s.close()
        await s.wait_closed()


async def test_bytes_cross_the_mesh_both_ways(pair: Pair) -> None:
    reader, writer = await pair.connect()
    for i in range(20):
        msg = f"ping {i} ".encode() * 100
        writer.write(msg)
        assert await reader.readexactly(len(msg)) == msg
    assert pair.decisions == [spiffe("web")]  # one decision per connection, not per chunk
    writer.close()
    await writer.wait_closed()


async def test_denied_peer_is_closed_before_the_app_sees_a_byte(ca: ProxyTestCA) -> None:
    p, servers = await build_pair(ca, allow=lambda peer: False)
    try:
        reader, writer = await p.connect()
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""  # closed by the mesh
        assert p.inbound.stats.connections_denied == 1
        assert p.app.accepted == 0
        assert bytes(p.app.received) == b""
        writer.close()
    finally:
        await close_all(p, servers)


async def handshake_failures_reach(pair: Pair, count: int) -> None:
    # The server's side of a failed handshake may end after the client has seen it fail:
    # yield until it is counted.
    for _ in range(200):
        if pair.inbound.stats.handshakes_failed >= count:
            break
        await asyncio.sleep(0.005)
    assert pair.inbound.stats.handshakes_failed == count


async def _handshake_refused(pair: Pair, ctx: ssl.SSLContext) -> None:
    before = pair.inbound.stats.handshakes_failed
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", pair.inbound.port, ssl=ctx, server_hostname=""
        )
        # TLS 1.3: the client may finish before the server checks its certificate; the
        # refusal then shows up as the connection closing without a byte.
        writer.write(b"hello")
        try:
            assert await reader.read() == b""
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionResetError):
        pass
    await handshake_failures_reach(pair, before + 1)
    assert pair.app.accepted == 0


async def test_client_without_certificate_is_refused(pair: Pair) -> None:
    await _handshake_refused(pair, pair.ca.client_context(None))


async def test_client_from_another_ca_is_refused(pair: Pair, tmp_path: Path) -> None:
    other = ProxyTestCA(tmp_path, name="other")
    ctx = other.client_context(other.leaf("web"))
    ctx.load_verify_locations(pair.ca.ca_path)  # it trusts us; we must not trust it
    await _handshake_refused(pair, ctx)


async def test_expired_client_certificate_is_refused(pair: Pair) -> None:
    await _handshake_refused(pair, pair.ca.client_context(pair.ca.leaf("web", expired=True)))


async def test_client_from_another_trust_domain_is_refused(pair: Pair) -> None:
    leaf = pair.ca.leaf("web", uri=spiffe("web", "other.consul"))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", pair.inbound.port, ssl=pair.ca.client_context(leaf), server_hostname=""
    )
    writer.write(b"hello")
    assert await reader.read() == b""
    writer.close()
    assert pair.inbound.stats.peers_refused == 1
    assert pair.app.accepted == 0


async def test_plaintext_to_the_tls_port_is_refused(pair: Pair) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.inbound.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
    assert await reader.read() == b""
    writer.close()
    await handshake_failures_reach(pair, 1)
    assert pair.app.accepted == 0


async def test_server_with_the_wrong_identity_is_refused(ca: ProxyTestCA) -> None:
    p, servers = await build_pair(ca, server_service="db")
    try:
        reader, writer = await p.connect()
        writer.write(b"secret")
        with pytest.raises(ConnectionResetError):  # aborted: the dial failed
            await reader.read()
        writer.close()
        assert p.outbound.stats.no_endpoint == 1
        assert bytes(p.app.received) == b""  # that sidecar let it in; our bytes never left
    finally:
        await close_all(p, servers)


async def test_refused_endpoint_fails_over_and_is_marked(ca: ProxyTestCA) -> None:
    dead = Target("n0/api-sidecar", "127.0.0.1", free_port())
    p, servers = await build_pair(ca, extra_targets=(dead,))
    try:
        for _ in range(6):
            reader, writer = await p.connect()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
        assert p.app.accepted == 6
        assert "n0/api-sidecar" in p.outbound.upstream.cluster.ejected
    finally:
        await close_all(p, servers)


async def test_a_client_close_reaches_the_app_and_releases_both_relays(pair: Pair) -> None:
    """A client's FIN (it closed, or half-closed) ends the relay at both sidecars once its
    bytes are flushed: the app gets every byte, then its EOF, and neither sidecar holds the
    connection. The loop's TLS transports cannot half-close (no write_eof; a close_notify
    closes the receiving side), so unlike Envoy nothing the app sends after the client's EOF
    reaches the client (docs/proxy.md)."""
    reader, writer = await pair.connect()
    writer.write(b"request")
    assert await reader.readexactly(7) == b"request"
    writer.write(b"last words")
    writer.write_eof()
    await asyncio.wait_for(pair.app.eof_seen.wait(), 10)
    assert bytes(pair.app.received) == b"requestlast words"
    assert b"last words".startswith(await asyncio.wait_for(reader.read(), 10))
    for _ in range(500):
        if not pair.outbound.relays and not pair.inbound.relays:
            break
        await asyncio.sleep(0.01)
    assert not pair.outbound.relays and not pair.inbound.relays
    writer.close()


async def test_app_half_close_reaches_the_client_after_its_data(ca: ProxyTestCA) -> None:
    class Greeter(asyncio.Protocol):
        def __init__(self, stats: AppStats) -> None:
            self.stats = stats

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport = cast("asyncio.Transport", transport)
            self.stats.accepted += 1
            transport.write(b"hello and goodbye")
            transport.write_eof()

        def eof_received(self) -> bool:
            self.stats.eof_seen.set()
            return False

    p, servers = await build_pair(ca, app_factory=Greeter)
    try:
        reader, writer = await p.connect()
        assert await reader.read() == b"hello and goodbye"
        writer.close()
    finally:
        await close_all(p, servers)


async def test_idle_connections_are_cut(ca: ProxyTestCA) -> None:
    p, servers = await build_pair(ca, limits=RelayLimits(idle_timeout=0.1))
    try:
        reader, writer = await p.connect()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert await reader.read() == b""  # nothing more: the idle timer ends it
        writer.close()
    finally:
        await close_all(p, servers)


def _buffered(p: Pair) -> int:
    total = 0
    for listener in (p.inbound, p.outbound):
        for relay in listener.relays:
            for leg in (relay.a, relay.b):
                if leg.transport is not None:
                    total += leg.transport.get_write_buffer_size()
    return total


async def test_stalled_reader_bounds_sidecar_buffers(ca: ProxyTestCA) -> None:
    high = 64 * 1024
    sources: list[Source] = []
    started = asyncio.Event()

    def source(stats: AppStats) -> asyncio.Protocol:
        s = Source(total=1 << 40)  # never ends by itself
        sources.append(s)
        started.set()
        return s

    p, servers = await build_pair(ca, limits=RelayLimits(high_water=high), app_factory=source)
    try:
        sock = socket.create_connection(("127.0.0.1", p.outbound.port))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # The client never reads: backpressure must reach the app, and meanwhile the
        # sidecars may hold only about a high-water mark per transport.
        await started.wait()  # the sidecar, not this test, opens the app connection
        await asyncio.wait_for(sources[0].paused.wait(), 30)
        assert _buffered(p) <= 4 * high + 2 * 65536
        sock.close()
    finally:
        await close_all(p, servers)


async def test_100_mb_stream_with_bounded_buffers(ca: ProxyTestCA) -> None:
    total = int(os.environ.get("MESHLET_TEST_STREAM_MB", "100")) * 1024 * 1024
    high = 256 * 1024

    def source(stats: AppStats) -> asyncio.Protocol:
        return Source(total=total)

    p, servers = await build_pair(ca, limits=RelayLimits(high_water=high), app_factory=source)
    try:
        reader, writer = await p.connect()
        received = 0
        peak = 0
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
            peak = max(peak, _buffered(p))
        assert received == total
        # Two sidecars, two legs each, at most a high-water mark plus one read in flight.
        assert peak <= 4 * (high + 256 * 1024)
        writer.close()
    finally:
        await close_all(p, servers)


async def test_close_drains_and_stops_accepting(pair: Pair) -> None:
    reader, writer = await pair.connect()
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    await pair.outbound.close(grace=0)
    assert await reader.read() == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", pair.outbound.port)


async def test_l4_intentions_from_the_engine_allow_and_deny(ca: ProxyTestCA) -> None:
    def snapshot_for(action: str) -> Callable[[Peer], Verdict]:
        entry = load_entry(
            {
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [{"Name": "web", "Action": action}],
            }
        )
        snap = compile_snapshot([entry], default_allow=action == "deny")
        return intentions_authorizers(lambda: snap, Identity("api"))[0]

    for action in ("allow", "deny"):
        decide = snapshot_for(action)
        p, servers = await build_pair(ca, allow=lambda peer, d=decide: d(peer).allowed)
        try:
            reader, writer = await p.connect()
            writer.write(b"ping")
            if action == "allow":
                assert await reader.readexactly(4) == b"ping"
            else:
                assert await reader.read() == b""
                assert p.app.accepted == 0
            writer.close()
        finally:
            await close_all(p, servers)


async def test_a_relayed_connection_is_in_flight_in_the_cluster_until_it_ends(
    ca: ProxyTestCA,
) -> None:
    p, servers = await build_pair(ca, policy=Policy.LEAST_REQUEST)
    try:
        cluster = p.outbound.upstream.cluster
        reader, writer = await p.connect()
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        assert cluster.inflight("n1/api-sidecar") == 1
        # (a reset ends the relay at once, as a close does once flushed)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        for _ in range(200):
            if cluster.inflight("n1/api-sidecar") == 0:
                break
            await asyncio.sleep(0.01)
        assert cluster.inflight("n1/api-sidecar") == 0
    finally:
        await close_all(p, servers)


async def test_failover_upstream_takes_over_when_the_primary_has_no_endpoint_left(
    ca: ProxyTestCA,
) -> None:
    p, servers = await build_pair(ca)
    dead = Upstream(
        name="api-primary",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n0/dead", "127.0.0.1", free_port())], BalancerConfig())
        ),
        client_ssl=p.outbound.upstream.client_ssl,
        verify_peer=p.outbound.upstream.verify_peer,
        expected_service="api",
    )
    outbound = OutboundL4(dead, failover=[p.outbound.upstream])
    await outbound.start()
    try:
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            assert p.outbound.upstream.cluster.inflight("n1/api-sidecar") >= 1
            writer.close()
            await writer.wait_closed()
        assert p.app.accepted == 3
        # The primary's endpoint failed once, then it was ejected: no dial to it after that.
        assert "n0/dead" in dead.cluster.ejected
        assert sum(dead.refusal_counts().values()) == 1
    finally:
        await outbound.close(grace=0)
        await close_all(p, servers)


async def test_max_connections_refuses_the_connection_over_the_limit(ca: ProxyTestCA) -> None:
    p, servers = await build_pair(ca)
    up = p.outbound.upstream
    limited = Upstream(
        name="api",
        endpoints=up.endpoints,
        client_ssl=up.client_ssl,
        verify_peer=up.verify_peer,
        expected_service="api",
        limits=Limits(max_connections=1),
    )
    outbound = OutboundL4(limited)
    await outbound.start()
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", outbound.port)
        w1.write(b"x")
        assert await r1.readexactly(1) == b"x"
        r2, w2 = await asyncio.open_connection("127.0.0.1", outbound.port)
        w2.write(b"y")
        with contextlib.suppress(ConnectionResetError):  # aborted: closed or reset
            assert await r2.read() == b""  # without a byte relayed
        assert limited.cluster.overflows == {"max_connections": 1}
        assert p.app.accepted == 1
        w1.write(b"z")  # the first one still works
        assert await r1.readexactly(1) == b"z"
        for w in (w1, w2):
            w.close()
    finally:
        await outbound.close(grace=0)
        await close_all(p, servers)


async def test_revoking_the_allow_closes_open_connections_on_recheck(ca: ProxyTestCA) -> None:
    allowed = [True]
    p, servers = await build_pair(ca, allow=lambda peer: allowed[0])
    try:
        conns = [await p.connect() for _ in range(3)]
        for reader, writer in conns:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        assert p.inbound.recheck() == 0  # still allowed: nothing closed
        for reader, writer in conns:
            writer.write(b"pong")
            assert await reader.readexactly(4) == b"pong"
        decided = len(p.decisions)
        allowed[0] = False
        assert p.inbound.recheck() == 3
        # One decision per distinct peer, not per connection.
        assert len(p.decisions) == decided + 1
        for reader, writer in conns:
            assert await reader.read() == b""  # closed through both sidecars
            writer.close()
        assert p.inbound.stats.connections_revoked == 3
        assert p.inbound.peers == {} and p.inbound.relays == set()
        assert p.inbound.recheck() == 0
    finally:
        await close_all(p, servers)
