"""The routing remainder through the real HTTP sidecar pair (OutboundHTTP -> mTLS ->
InboundHTTP -> app), each route table compiled from Consul entries by chain_routing as the
agent does: fault injection and mirroring from the router's meshlet.io Meta keys, split legs
with their own header edits, the route's IdleTimeout, generated affinity cookies, and a
request that finds MaxConnections reached waiting for a connection."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.routing import mirror_chain
from connect.balancer import compile_balancer
from connect.chain_routes import ChainRouting, chain_routing
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.http1.origin import MeshOrigin
from connect.seams import PeerCache
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_chain_routes import SUBSETS, TD, V1, V2, _entries, _http, _router
from tests.connect.test_http_routes import _sidecar
from traffic.chain import CompileRequest, compile_chain

API = "api.default.default.dc1"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """An app that records what reached it; /gate answers once `gate` is set, /drip sends
    its body in pieces `drip` seconds apart; with `stall` nothing is ever answered."""

    name: str
    runner: web.AppRunner | None = None
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    drip: float = 0.1
    stall: bool = False
    unstall: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        async def any_path(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.seen.append(Seen(request.method, request.path, headers, body))
            if request.path == "/gate":
                await self.gate.wait()
            if self.stall:
                await self.unstall.wait()
            elif request.path == "/drip":
                resp = web.StreamResponse()
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for _ in range(6):
                    await asyncio.sleep(self.drip)
                    await resp.write(b"drop ")
                await resp.write_eof()
                return resp
            return web.Response(text=f"from {self.name}")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass
class Mesh:
    apps: dict[str, Recorder]
    inbounds: list[InboundHTTP]
    outbound: OutboundHTTP
    routing: ChainRouting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.outbound.port}"

    @property
    def origin(self) -> MeshOrigin:
        origin = self.outbound.origin
        assert isinstance(origin, MeshOrigin)
        return origin

    def upstream(self, target: str) -> Upstream:
        ((up, _),) = self.origin.named[target]
        return up

    async def close(self) -> None:
        await self.outbound.close(grace=0)
        for inbound in self.inbounds:
            await inbound.close(grace=0)
        for a in self.apps.values():
            a.unstall.set()
            a.gate.set()
            assert a.runner is not None
            await a.runner.cleanup()


def routing_of(*bodies: dict[str, Any], caller: str = "web") -> ChainRouting:
    """The upstream `api` as the agent compiles it (agent.routing.compile_upstream's steps)."""
    entries = _entries(*bodies)
    chain = compile_chain(CompileRequest("api", TD), entries)
    router = entries.routers.get("api")
    meta: Mapping[str, str] = router.meta if router is not None else {}
    mirrors = {
        m: mirror_chain(entries, m, trust_domain=TD, datacenter="dc1")
        for m in {v for k, v in meta.items() if k.endswith(".mirror")}
    }
    cfg = None
    defaults = entries.services.get(caller)
    if defaults is not None and defaults.upstream_config is not None:
        cfg = defaults.upstream_config.defaults
    return chain_routing(chain, upstream_config=cfg, router_meta=meta, mirrors=mirrors)


async def mesh(ca: ProxyTestCA, routing: ChainRouting, instances: Mapping[str, str]) -> Mesh:
    """One app and inbound sidecar per instance name; each chain target's cluster holds the
    instances `instances` assigns it (name -> target id), with the target's settings."""
    apps = {name: Recorder(name) for name in instances}
    for a in apps.values():
        await a.start()
    inbounds = {name: await _sidecar(ca, a.port) for name, a in apps.items()}
    client_ctx = ca.client_context(ca.leaf("web"))
    clusters: dict[str, Upstream] = {}
    for tid, settings in routing.targets.items():
        targets = [_target(name, inbounds[name].port) for name, t in instances.items() if t == tid]
        clusters[tid] = Upstream(
            name=tid,
            endpoints=fixed_endpoints(compile_balancer(targets, settings.balancer)),
            client_ssl=lambda: client_ctx,
            verify_peer=PeerCache(ca.verifier()),
            expected_service="api",
            rng=random.Random(5),
            limits=settings.limits,
            ejection=settings.ejection,
        )
    table = routing.table
    outbound = OutboundHTTP(clusters[routing.start], routes=lambda: table, clusters={**clusters})
    await outbound.start()
    return Mesh(apps, list(inbounds.values()), outbound, routing)


def _target(name: str, port: int) -> Any:
    from connect.balancer import Target

    return Target(f"{name}/api-sidecar", "127.0.0.1", port)


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def until(condition: Any, what: str) -> None:
    """Wait for `condition()` (a bound, not a measurement)."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


def _route(prefix: str, **meta: str) -> dict[str, Any]:
    """A router whose route 0 (`prefix` -> subset v1) carries these meshlet.io keys."""
    return _router(
        {"Match": {"HTTP": {"PathPrefix": prefix}}, "Destination": {"ServiceSubset": "v1"}},
        meta={f"meshlet.io/route.0.{_KEYS[k]}": v for k, v in meta.items()},
    )


_KEYS = {
    "fault_abort_status": "fault.abort-status",
    "fault_abort_percent": "fault.abort-percent",
    "fault_delay": "fault.delay",
    "mirror": "mirror",
}


TWO = {"v1": V1, "v2": V2, "any": API}
"""An instance per subset, and one the routes' catch-all (the plain `api` target) reaches."""


async def test_fault_abort_answers_without_reaching_the_app(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    routing = routing_of(
        _http("api"), SUBSETS, _route("/f", fault_abort_status="418", fault_abort_percent="100")
    )
    m = await mesh(ca, routing, TWO)
    try:
        async with session.get(m.url + "/f/x") as resp:
            assert resp.status == 418
            assert await resp.text() == "fault filter abort"
        async with session.get(m.url + "/f/x") as resp:  # the connection is kept
            assert resp.status == 418
        async with session.get(m.url + "/other") as resp:  # another route: no fault
            assert resp.status == 200
        assert m.apps["v1"].seen == []  # the aborted ones never arrived
        assert [s.path for s in m.apps["any"].seen] == ["/other"]
    finally:
        await m.close()


async def test_fault_delay_holds_the_request_then_forwards_it(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    routing = routing_of(_http("api"), SUBSETS, _route("/slow", fault_delay="2s"))
    m = await mesh(ca, routing, TWO)
    try:
        slow = asyncio.create_task(session.get(m.url + "/slow/x"))
        await until(lambda: len(m.outbound.connections) == 1, "the delayed request arrived")
        # A request sent after it (another connection, not delayed) is answered while the
        # delayed one has still not reached its app.
        async with session.get(m.url + "/fast") as resp:
            assert resp.status == 200
        assert m.apps["v1"].seen == []
        resp = await slow
        assert resp.status == 200 and await resp.text() == "from v1"
        assert [s.path for s in m.apps["v1"].seen] == ["/slow/x"]
    finally:
        await m.close()


async def test_mirror_sends_a_shadow_copy_and_the_answer_is_the_primarys(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    routing = routing_of(_http("api"), SUBSETS, _route("/m", mirror="api/v2"))
    m = await mesh(ca, routing, TWO)
    try:
        headers = {"host": "api", "x-trace": "t1"}
        async with session.post(m.url + "/m/orders", data=b"payload", headers=headers) as resp:
            assert resp.status == 200 and await resp.text() == "from v1"
        async with session.get(m.url + "/m/list", headers=headers) as resp:
            assert await resp.text() == "from v1"
        await until(lambda: len(m.apps["v2"].seen) == 2, "both copies reached v2")
        copies = {s.path: s for s in m.apps["v2"].seen}
        assert copies["/m/orders"].body == b"payload" and copies["/m/orders"].method == "POST"
        assert copies["/m/orders"].headers["host"] == "api-shadow"
        assert copies["/m/orders"].headers["x-trace"] == "t1"
        assert copies["/m/list"].method == "GET"
        assert [s.headers["host"] for s in m.apps["v1"].seen] == ["api", "api"]
        assert m.origin.mirrors.sent == 2
        async with session.get(m.url + "/elsewhere") as resp:  # not a mirrored route
            assert resp.status == 200
        assert m.origin.mirrors.sent == 2
    finally:
        await m.close()


async def test_a_stalled_or_dead_mirror_never_holds_the_request_and_is_capped(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    routing = routing_of(_http("api"), SUBSETS, _route("/m", mirror="api/v2"))
    m = await mesh(ca, routing, TWO)
    try:
        m.apps["v2"].stall = True  # the mirror's app never answers
        m.origin.mirrors.cap = 1
        for _ in range(3):
            async with session.get(m.url + "/m/x", headers={"host": "api"}) as resp:
                assert resp.status == 200 and await resp.text() == "from v1"
        await until(lambda: len(m.apps["v2"].seen) == 1, "the first copy reached v2")
        # The first copy is still in flight at the stalled app: the cap dropped the others.
        counts = m.origin.mirrors.counts()
        assert counts == {
            "sent": 0,
            "failed": 0,
            "dropped_over_limit": 2,
            "skipped": 0,
            "inflight": 1,
        }
    finally:
        await m.close()
    dead = await mesh(ca, routing, {"v1": V1, "any": API})  # v2 has no instance at all
    try:
        async with session.get(dead.url + "/m/x", headers={"host": "api"}) as resp:
            assert resp.status == 200 and await resp.text() == "from v1"
        await until(lambda: dead.origin.mirrors.failed == 1, "the copy failed")
        assert dead.origin.mirrors.counts() == {
            "sent": 0,
            "failed": 1,
            "dropped_over_limit": 0,
            "skipped": 0,
            "inflight": 0,
        }
    finally:
        await dead.close()


async def test_split_legs_apply_their_own_header_edits(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    legs = {
        "Kind": "service-splitter",
        "Name": "api",
        "Splits": [
            {
                "Weight": 50,
                "ServiceSubset": "v1",
                "RequestHeaders": {"Set": {"x-leg": "v1"}},
                "ResponseHeaders": {"Set": {"x-served": "v1-leg"}},
            },
            {"Weight": 50, "ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-leg": "v2"}}},
        ],
    }
    m = await mesh(ca, routing_of(_http("api"), SUBSETS, legs), TWO)
    try:
        served = set()
        for _ in range(30):
            async with session.get(m.url + "/s", headers={"x-leg": "forged"}) as resp:
                text = await resp.text()
                served.add((text, resp.headers.get("x-served")))
        assert served == {("from v1", "v1-leg"), ("from v2", None)}
        assert {s.headers["x-leg"] for s in m.apps["v1"].seen} == {"v1"}
        assert {s.headers["x-leg"] for s in m.apps["v2"].seen} == {"v2"}
    finally:
        await m.close()


async def test_route_idle_timeout_408_on_silence_but_a_dripping_answer_lives(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    idle = _router(
        {
            "Match": {"HTTP": {"PathPrefix": "/"}},
            "Destination": {"ServiceSubset": "v1", "IdleTimeout": "500ms"},
        }
    )
    m = await mesh(ca, routing_of(_http("api"), SUBSETS, idle), TWO)
    try:
        m.apps["v1"].drip = 0.1  # a byte every 0.1 s for 0.6 s: more than the idle timeout
        async with session.get(m.url + "/drip") as resp:
            assert resp.status == 200 and await resp.text() == "drop " * 6
        m.apps["v1"].stall = True
        async with session.get(m.url + "/silent") as resp:
            assert resp.status == 408  # Envoy's stream idle timeout before the response head
            assert await resp.text() == "stream timeout"
            assert resp.headers["connection"] == "close"
        assert m.upstream(V1).cluster.active == 0  # the try was ended and recorded
    finally:
        await m.close()


async def test_cookie_config_sets_a_cookie_and_later_requests_stick(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    resolver = {
        "Kind": "service-resolver",
        "Name": "api",
        "LoadBalancer": {
            "Policy": "ring_hash",
            "HashPolicies": [
                {"Field": "cookie", "FieldValue": "route", "CookieConfig": {"TTL": "60s"}}
            ],
        },
    }
    instances = {f"i{n}": API for n in range(4)}
    m = await mesh(ca, routing_of(_http("api"), resolver), instances)
    try:
        jar_free = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        async with jar_free as s:
            async with s.get(m.url + "/first") as resp:
                first = await resp.text()
                set_cookie = resp.headers["set-cookie"]
            assert set_cookie.startswith('route="') and "Max-Age=60" in set_cookie
            cookie = set_cookie.split(";")[0]
            answers = set()
            for _ in range(40):
                async with s.get(m.url + "/again", headers={"cookie": cookie}) as resp:
                    answers.add(await resp.text())
                    assert "set-cookie" not in resp.headers  # it has one: none generated
            assert answers == {first}  # every request with the cookie on one instance
    finally:
        await m.close()


async def test_a_request_at_max_connections_waits_for_one_instead_of_a_503(
    ca: ProxyTestCA,
) -> None:
    limited = {
        "Kind": "service-defaults",
        "Name": "web",
        "UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": 1, "MaxPendingRequests": 1}}},
    }
    m = await mesh(ca, routing_of(_http("api"), limited), {"a": API})
    cluster = m.upstream(API).cluster
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        w1.write(b"GET /gate HTTP/1.1\r\nhost: api\r\n\r\n")  # holds the one connection
        await until(lambda: len(m.apps["a"].seen) == 1, "the first request reached the app")
        r2, w2 = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        w2.write(b"GET /second HTTP/1.1\r\nhost: api\r\n\r\n")
        await until(lambda: cluster.pending == 1, "the second request is pending")
        # Pending is full: a third is refused at once, counted as before.
        r3, w3 = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        w3.write(b"GET /third HTTP/1.1\r\nhost: api\r\n\r\n")
        head = await asyncio.wait_for(r3.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 503")
        assert b"circuit breaker: max_pending_requests" in head
        m.apps["a"].gate.set()  # the first is answered; its connection goes to the second
        assert (await asyncio.wait_for(r1.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        assert (await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        assert [s.path for s in m.apps["a"].seen] == ["/gate", "/second"]
        assert cluster.overflows == {"max_pending_requests": 1}
        assert (cluster.connections, cluster.pending, cluster.active) == (1, 0, 0)
        for w in (w1, w2, w3):
            w.close()
    finally:
        await m.close()


async def test_a_pending_request_dials_when_the_busy_connection_closes(ca: ProxyTestCA) -> None:
    limited = {
        "Kind": "service-defaults",
        "Name": "web",
        "UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": 1}}},
    }
    m = await mesh(ca, routing_of(_http("api"), limited), {"a": API})
    cluster = m.upstream(API).cluster
    try:
        _, w1 = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        w1.write(b"GET /gate HTTP/1.1\r\nhost: api\r\n\r\n")
        await until(lambda: len(m.apps["a"].seen) == 1, "the first request reached the app")
        r2, w2 = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        w2.write(b"GET /second HTTP/1.1\r\nhost: api\r\n\r\n")
        await until(lambda: cluster.pending == 1, "the second request is pending")
        w1.close()  # the first client leaves: its upstream connection closes, a slot frees
        head = await asyncio.wait_for(r2.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert cluster.overflows == {}
        w2.close()
    finally:
        await m.close()


async def test_an_aborted_request_is_not_mirrored_even_after_its_delay(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    route = _route(
        "/m", mirror="api/v2", fault_abort_status="503", fault_delay="100ms"
    )  # delay, then abort: both at 100 %
    m = await mesh(ca, routing_of(_http("api"), SUBSETS, route), TWO)
    try:
        async with session.get(m.url + "/m/x") as resp:
            assert resp.status == 503 and await resp.text() == "fault filter abort"
        mirrors = m.origin.mirrors
        # A copy is counted when it is started (at the request's end): none was.
        assert set(mirrors.counts().values()) == {0} and not mirrors.used
        assert m.apps["v1"].seen == [] and m.apps["v2"].seen == []
    finally:
        await m.close()
