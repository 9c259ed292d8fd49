"""Routes applied by the real HTTP sidecar pair (OutboundHTTP -> mTLS -> InboundHTTP -> app):
the table is consulted once per request head, before it is serialized, so its cluster,
rewrite, header edits, retry policy and timeouts reach the wire."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Policy, Target, compile_balancer
from connect.cluster import Limits, fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.http1.limits import HTTPLimits
from connect.inbound import InboundGate
from connect.routes import (
    HeaderEdits,
    HeaderMatch,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    WeightedCluster,
)
from connect.seams import PeerCache
from connect.stats import ProxyStats
from intentions.engine import Identity
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe
from tests.connect.test_chain_routes import _http, _routing
from tests.connect.test_http_proxy import INTENTIONS, App, start_app


class Stall(asyncio.Protocol):
    """An app that reads requests and never answers."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass


@dataclass
class Routed:
    ca: ProxyTestCA
    apps: dict[str, App]
    inbounds: list[InboundHTTP]
    outbound: OutboundHTTP
    table: list[RouteTable]
    stalls: list[asyncio.Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.outbound.port}"

    async def close(self) -> None:
        await self.outbound.close(grace=0)
        for inbound in self.inbounds:
            await inbound.close(grace=0)
        for a in self.apps.values():
            await a.runner.cleanup()
        for s in self.stalls:
            s.close()


async def _sidecar(ca: ProxyTestCA, port: int) -> InboundHTTP:
    _, request = intentions_authorizers(lambda: INTENTIONS, Identity("api"))
    gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats())
    inbound = InboundHTTP(gate, "127.0.0.1", port, authorize=request, local_uri=spiffe("api"))
    await inbound.start()
    return inbound


async def build(
    ca: ProxyTestCA,
    table: RouteTable,
    *,
    stall_in: tuple[str, ...] = (),
    stalled_as: tuple[str, ...] = (),
) -> Routed:
    """Clusters `v1`, `v2` (one instance each), `stalled` (the stalling instances asked for;
    also named each of `stalled_as`) and `both` (those plus v1's instance); the upstream's own
    cluster is `api` (= v1's)."""
    apps = {name: await start_app(name) for name in ("v1", "v2")}
    inbounds = {name: await _sidecar(ca, a.port) for name, a in apps.items()}
    stalls = []
    extra = []
    for name in stall_in:
        server = await asyncio.get_running_loop().create_server(Stall, "127.0.0.1", 0)
        stalls.append(server)
        inbound = await _sidecar(ca, server.sockets[0].getsockname()[1])
        inbounds[name] = inbound
        extra.append(Target(f"{name}/api-sidecar", "127.0.0.1", inbound.port))
    client_ctx = ca.client_context(ca.leaf("web"))

    def upstream(name: str, targets: list[Target]) -> Upstream:
        return Upstream(
            name=name,
            endpoints=fixed_endpoints(
                compile_balancer(targets, BalancerConfig(policy=Policy.ROUND_ROBIN))
            ),
            client_ssl=lambda: client_ctx,
            verify_peer=PeerCache(ca.verifier()),
            expected_service="api",
            rng=random.Random(5),
        )

    def target(name: str) -> Target:
        return Target(f"{name}/api-sidecar", "127.0.0.1", inbounds[name].port)

    current = [table]
    outbound = OutboundHTTP(
        upstream("api", [target("v1")]),
        routes=lambda: current[0],
        clusters={
            "v1": upstream("v1", [target("v1")]),
            "v2": upstream("v2", [target("v2")]),
            "both": upstream("both", [*extra, target("v1")]),
            "stalled": upstream("stalled", extra),
            **{name: upstream(name, extra) for name in stalled_as},
        },
    )
    await outbound.start()
    return Routed(ca, apps, list(inbounds.values()), outbound, current, stalls)


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def to(cluster: str, **kwargs: object) -> RouteAction:
    return RouteAction((WeightedCluster(cluster),), **kwargs)  # type: ignore[arg-type]


CANARY = RouteTable(
    (
        Route(
            RouteMatch(path_prefix=b"/old/", headers=(HeaderMatch(b"x-canary", exact=b"true"),)),
            to(
                "v2",
                prefix_rewrite=b"/public/",
                request_headers=HeaderEdits(
                    set=((b"x-route", b"canary"),), remove=frozenset({b"x-drop-me"})
                ),
                response_headers=HeaderEdits(add=((b"x-served-by", b"canary"),)),
            ),
        ),
    ),
    to("v1"),
)


async def test_header_route_picks_the_cluster_rewrites_and_edits_headers(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, CANARY)
    try:
        headers = {"x-canary": "true", "x-drop-me": "1", "x-route": "forged"}
        async with session.get(m.url + "/old/thing?q=1", headers=headers) as resp:
            assert resp.status == 200
            assert await resp.text() == "hello from v2"
            assert resp.headers["x-served-by"] == "canary"
        seen = m.apps["v2"].seen[-1]
        assert seen[":path"] == "/public/thing"  # /old/ -> /public/, by the route
        assert seen["x-route"] == "canary"
        assert "x-drop-me" not in seen
        async with session.get(m.url + "/hello", headers={"x-drop-me": "1"}) as resp:
            assert await resp.text() == "hello from v1"
            assert "x-served-by" not in resp.headers
        assert m.apps["v1"].seen[-1]["x-drop-me"] == "1"  # the default route edits nothing
        assert len(m.apps["v2"].seen) == 1
    finally:
        await m.close()


async def test_a_new_table_applies_to_the_next_request_head(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, RouteTable((), to("v1")))
    try:
        async with session.get(m.url + "/hello") as resp:
            assert await resp.text() == "hello from v1"
        m.table[0] = RouteTable((), to("v2"))  # published whole, as Latest does
        async with session.get(m.url + "/hello") as resp:  # same client connection
            assert await resp.text() == "hello from v2"
    finally:
        await m.close()


async def test_a_cluster_the_proxy_does_not_have_is_a_503(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, RouteTable((), to("nowhere")))
    try:
        async with session.get(m.url + "/hello") as resp:
            assert resp.status == 503
            assert resp.headers["x-meshlet-reason"] == "no cluster 'nowhere'"
    finally:
        await m.close()


async def test_request_timeout_answers_504_and_closes(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, RouteTable((), to("stalled", request_timeout=0.3)), stall_in=("s0",))
    try:
        async with session.get(m.url + "/hello") as resp:
            assert resp.status == 504
            assert await resp.text() == "upstream request timeout"
            assert resp.headers["connection"] == "close"
    finally:
        await m.close()


async def test_an_upstream_without_routes_times_out_at_envoys_default_15_s(
    ca: ProxyTestCA,
) -> None:
    # The one test that waits the real default: an upstream without routes (a filter,
    # datacenter or peer upstream; default_table) to an instance whose app never answers.
    # Before, nothing but the 300 s idle limit ended the request (the client gave up first).
    m = await build(ca, RouteTable((), to("stalled")), stall_in=("s0",))
    ((stalled, _),) = m.outbound.origin.named["stalled"]  # type: ignore[attr-defined]
    plain = OutboundHTTP(stalled)
    await plain.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", plain.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 40)
        assert head.startswith(b"HTTP/1.1 504 ")
        assert b"upstream request timeout" in await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert stalled.cluster.inflight("s0/api-sidecar") == 0  # its connection released
    finally:
        await plain.close(grace=0)
        await m.close()


async def test_a_resolver_request_timeout_of_a_compiled_chain_reaches_the_wire(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    resolver = {"Kind": "service-resolver", "Name": "api", "RequestTimeout": "300ms"}
    routing = _routing("api", _http("api"), resolver)
    (target,) = routing.clusters
    m = await build(ca, routing.table, stall_in=("s0",), stalled_as=(target,))
    try:
        async with session.get(m.url + "/hello") as resp:
            assert resp.status == 504
            assert await resp.text() == "upstream request timeout"
    finally:
        await m.close()


async def test_the_request_timeout_runs_from_the_end_of_the_request(ca: ProxyTestCA) -> None:
    # Envoy's route timeout spans from the end of the downstream request to the end of the
    # response: a body that takes longer than the timeout to arrive is not cut. (Before, the
    # timer ran from the head: 504 mid-upload.)
    m = await build(ca, RouteTable((), to("v1", request_timeout=0.3)))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.sleep(0.6)  # past the request timeout, the request not yet whole
        writer.write(b"world")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await reader.readexactly(2) == b"10"
        writer.close()
    finally:
        await m.close()


async def test_an_upgrade_request_is_timed_until_its_101(ca: ProxyTestCA) -> None:
    # Envoy times an upgrade request until the upgrade response (envoy#41075); the tunnel
    # after a 101 is not timed (test_an_upgraded_connection_outlives_the_request_timeout).
    m = await build(ca, RouteTable((), to("stalled", request_timeout=0.3)), stall_in=("s0",))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 504 "), head
        writer.close()
    finally:
        await m.close()


async def test_per_try_timeout_retries_on_another_endpoint(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    retry = RetryPolicy(num_retries=2, on_timeout=True)
    table = RouteTable((), to("both", try_timeout=0.3, retry=retry))
    m = await build(ca, table, stall_in=("s0",))
    try:
        for _ in range(4):  # round robin: two of these go to the stalled instance first
            async with session.get(m.url + "/hello") as resp:
                assert resp.status == 200
                assert await resp.text() == "hello from v1"
        cluster = m.outbound.origin.named["both"][0][0].cluster  # type: ignore[attr-defined]
        assert cluster.inflight("s0/api-sidecar") == 0
        assert cluster.inflight("v1/api-sidecar") == 0
    finally:
        await m.close()


async def test_retry_after_a_jittered_backoff(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    retry = RetryPolicy(num_retries=1, on_timeout=True, backoff=0.05)
    table = RouteTable((), to("both", try_timeout=0.3, retry=retry))
    m = await build(ca, table, stall_in=("s0",))
    try:
        for _ in range(2):  # round robin: one goes to the stalled instance first
            async with session.get(m.url + "/hello") as resp:
                assert resp.status == 200
                assert await resp.text() == "hello from v1"
    finally:
        await m.close()


async def test_per_try_timeout_without_retry_is_a_504(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    retry = RetryPolicy(num_retries=2, on_timeout=False)
    table = RouteTable((), to("both", try_timeout=0.3, retry=retry))
    m = await build(ca, table, stall_in=("s0",))
    try:
        statuses = []
        for _ in range(2):
            async with session.get(m.url + "/hello") as resp:
                statuses.append(resp.status)
        assert sorted(statuses) == [200, 504]
    finally:
        await m.close()


async def test_an_upgraded_connection_outlives_the_request_timeout(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, RouteTable((), to("v1", request_timeout=0.2)))
    try:
        async with session.ws_connect(m.url.replace("http", "ws") + "/ws") as ws:
            await asyncio.sleep(0.4)  # past the request timeout: the tunnel has none
            await ws.send_str("ping")
            assert (await ws.receive_str()) == "echo:ping"
    finally:
        await m.close()


async def test_failover_chain_of_a_route_cluster(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build(ca, RouteTable((), to("v1")))
    try:
        origin = m.outbound.origin
        ((v2, _),) = origin.named["v2"]  # type: ignore[attr-defined]
        dead = Upstream(
            name="dead",
            endpoints=fixed_endpoints(
                compile_balancer([Target("n9/dead", "127.0.0.1", _free_port())], BalancerConfig())
            ),
            client_ssl=v2.client_ssl,
            verify_peer=v2.verify_peer,
            expected_service="api",
        )
        failing = OutboundHTTP(dead, routes=lambda: RouteTable((), to("dead")), failover=[v2])
        await failing.start()
        try:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{failing.port}/hello") as resp:
                    assert resp.status == 200
                    assert await resp.text() == "hello from v2"
            assert "n9/dead" in dead.cluster.ejected
            assert sum(dead.refusal_counts().values()) == 1  # ejected: skipped, not redialed
        finally:
            await failing.close(grace=0)
    finally:
        await m.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_circuit_breaker_answers_overflow_503_at_once(ca: ProxyTestCA) -> None:
    m = await build(ca, RouteTable((), to("v1")), stall_in=("s0",))
    try:
        ((stalled, _),) = m.outbound.origin.named["stalled"]  # type: ignore[attr-defined]
        limited = Upstream(
            name="stalled",
            endpoints=stalled.endpoints,
            client_ssl=stalled.client_ssl,
            verify_peer=stalled.verify_peer,
            expected_service="api",
            limits=Limits(max_concurrent_requests=1),
        )
        outbound = OutboundHTTP(limited)
        await outbound.start()
        try:
            _, w1 = await asyncio.open_connection("127.0.0.1", outbound.port)
            w1.write(b"GET /hello HTTP/1.1\r\nhost: api\r\n\r\n")  # hangs at the stalled app
            for _ in range(200):
                if limited.cluster.active:
                    break
                await asyncio.sleep(0.01)
            r2, w2 = await asyncio.open_connection("127.0.0.1", outbound.port)
            w2.write(b"GET /hello HTTP/1.1\r\nhost: api\r\n\r\n")
            head = await r2.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            assert b"x-meshlet-reason: circuit breaker: max_concurrent_requests" in head
            assert limited.cluster.overflows == {"max_concurrent_requests": 1}
            for w in (w1, w2):
                w.close()
        finally:
            await outbound.close(grace=0)
    finally:
        await m.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_small_post_body_is_kept_and_sent_again_on_retry(
    ca: ProxyTestCA, session: aiohttp.ClientSession, chunked: bool
) -> None:
    retry = RetryPolicy(num_retries=2, on_timeout=True)
    table = RouteTable((), to("both", try_timeout=0.3, retry=retry))
    m = await build(ca, table, stall_in=("s0",))
    body = b"x" * 5000

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:2000]
        yield body[2000:]

    try:
        for _ in range(2):  # round robin: one goes to the stalled instance first
            data = chunks() if chunked else body
            async with session.post(m.url + "/upload", data=data) as resp:
                assert resp.status == 200
                assert await resp.text() == "5000"  # the whole body reached v1's app
    finally:
        await m.close()


async def test_a_body_over_the_replay_bound_is_not_retried(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    retry = RetryPolicy(num_retries=2, on_timeout=True)
    table = RouteTable((), to("both", try_timeout=0.3, retry=retry))
    m = await build(ca, table, stall_in=("s0",))
    big = b"x" * (HTTPLimits().retry_body_bytes + 1)
    try:
        statuses = []
        for _ in range(2):
            async with session.post(m.url + "/upload", data=big) as resp:
                statuses.append(resp.status)
        assert sorted(statuses) == [200, 504]  # the stalled try is not sent again
    finally:
        await m.close()
