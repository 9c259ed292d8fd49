"""Attacks on the HTTP sidecar path, written as an attacker would send them: raw bytes on real
sockets, real mTLS (tests/connect/proxy_test_ca.py), the real intentions engine, and an app
that records every byte it receives (asserts are on what the app really got).

The caller reaches api's InboundHTTP three ways: through web's http upstream listener
(OutboundHTTP), through web's tcp upstream listener (OutboundL4, a byte relay), or straight
to the inbound port with web's mesh leaf.

* Request smuggling through Upgrade: bytes after an upgrade request's head go nowhere until
  the app has answered 101; on any other answer they never reach the app.
* XFCC forgery: whatever the caller sends as X-Forwarded-Client-Cert or x-meshlet-*, the app
  sees exactly one XFCC element, the inbound sidecar's.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httptools
import pytest
import uvloop

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import HTTPLimits, InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.l4 import OutboundL4
from connect.seams import PeerCache
from connect.stats import ProxyStats
from intentions.engine import Identity
from tests.connect.proxy_test_ca import Leaf, ProxyTestCA, spiffe
from tests.connect.test_http_proxy import INTENTIONS, read_response

WAIT = 10.0
"""Bound on any single wait (a hang is a failure, never a pass)."""

VIAS = ["http-upstream", "tcp-upstream", "direct"]

# ---- an app that records what it receives ------------------------------------------------


@dataclass
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


@dataclass
class Recorder:
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)
    switch: bool = False
    """Answer an upgrade request 101 and echo what follows (a WebSocket-like tunnel); else
    answer it 200 and go on parsing what follows as HTTP, as a server that ignores Upgrade
    does (RFC 9110 §7.8)."""
    hold: asyncio.Event | None = None
    """When set: an upgrade request is answered only once this event is."""
    connections: int = 0
    open: int = 0
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


class NaiveApp(asyncio.Protocol):
    """HTTP/1.1 keep-alive on a raw socket (httptools), answering each request itself."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.tunnel = False
        self.backlog: bytearray | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.rec.connections += 1
        self.rec.open += 1
        self.rec.all_closed.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.rec.open -= 1
        if self.rec.open == 0:
            self.rec.all_closed.set()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.rec.raw += data
        if self.tunnel:
            self.transport.write(data)
        elif self.backlog is not None:
            self.backlog += data
        else:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            hold = self.rec.hold
            if hold is not None and not hold.is_set():
                self.backlog = bytearray(rest)
                asyncio.get_running_loop().create_task(self._answer_later(hold))
                return
            self._answer_upgrade(rest)
        except httptools.HttpParserError:
            self.transport.close()

    async def _answer_later(self, hold: asyncio.Event) -> None:
        await hold.wait()
        rest, self.backlog = bytes(self.backlog or b""), None
        if self.transport is not None and not self.transport.is_closing():
            self._answer_upgrade(rest)

    def _answer_upgrade(self, rest: bytes) -> None:
        assert self.transport is not None
        if self.rec.switch:
            self.tunnel = True
            self.transport.write(SWITCH + rest)
            return
        self.transport.write(OK)
        if rest:
            self._feed(rest)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.rec.requests.append(Request(self.parser.get_method(), self.url, self.headers))
        self.rec.got_request.set()

    def on_message_complete(self) -> None:
        if not self.parser.should_upgrade() and self.transport is not None:
            self.transport.write(OK)


# ---- the sidecars --------------------------------------------------------------------------


@dataclass
class Net:
    ca: ProxyTestCA
    web: Leaf
    rec: Recorder
    app: asyncio.Server
    inbound: InboundHTTP
    outbound_http: OutboundHTTP
    outbound_tcp: OutboundL4

    @property
    def xfcc(self) -> bytes:
        """The one element api's sidecar writes for web's leaf."""
        digest = hashlib.sha256(self.web.der).hexdigest()
        return f"By={spiffe('api')};Hash={digest};URI={spiffe('web')}".encode()

    async def open(self, via: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if via == "direct":
            ctx = self.ca.client_context(self.web)
            return await asyncio.open_connection("127.0.0.1", self.inbound.port, ssl=ctx)
        port = self.outbound_http.port if via == "http-upstream" else self.outbound_tcp.port
        return await asyncio.open_connection("127.0.0.1", port)

    async def send(self, via: str, data: bytes) -> bytes:
        """Write `data` in one write and return everything until the sidecar closes."""
        reader, writer = await self.open(via)
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(-1), WAIT)
        finally:
            writer.close()

    async def app_quiet(self) -> None:
        """Every connection to the app is closed (the idle pooled ones closed here): it has
        read all it will ever get."""
        self.inbound.origin.pool.close()
        if self.rec.connections:
            await asyncio.wait_for(self.rec.all_closed.wait(), WAIT)


async def build_net(ca: ProxyTestCA, limits: HTTPLimits | None = None) -> Net:
    rec = Recorder()
    app = await asyncio.get_running_loop().create_server(lambda: NaiveApp(rec), "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    _, request = intentions_authorizers(lambda: INTENTIONS, Identity("api"))
    gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats())
    inbound = InboundHTTP(
        gate, "127.0.0.1", app_port, authorize=request, local_uri=spiffe("api"), limits=limits
    )
    await inbound.start()
    web = ca.leaf("web")
    client_ctx = ca.client_context(web)

    def upstream() -> Upstream:
        target = Target("n0/api-sidecar", "127.0.0.1", inbound.port)
        return Upstream(
            name="api",
            endpoints=fixed_endpoints(compile_balancer([target], BalancerConfig())),
            client_ssl=lambda: client_ctx,
            verify_peer=PeerCache(ca.verifier()),
            expected_service="api",
            rng=random.Random(7),
        )

    outbound_http = OutboundHTTP(upstream(), limits)
    await outbound_http.start()
    outbound_tcp = OutboundL4(upstream())
    await outbound_tcp.start()
    return Net(ca, web, rec, app, inbound, outbound_http, outbound_tcp)


async def close_net(n: Net) -> None:
    await n.outbound_http.close(grace=0)
    await n.outbound_tcp.close(grace=0)
    await n.inbound.close(grace=0)
    n.app.close()


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    n = await build_net(ProxyTestCA(tmp_path))
    yield n
    await close_net(n)


def assert_every_request_went_through_the_sidecar(net: Net) -> None:
    """What a smuggled request lacks: it is on an allowed path, carries exactly one XFCC
    element (the sidecar's), and a request id the sidecar wrote or kept."""
    for req in net.rec.requests:
        assert not req.target.startswith(b"/private"), net.rec.raw
        assert req.values(b"x-forwarded-client-cert") == [net.xfcc], net.rec.raw
        assert len(req.values(b"x-request-id")) == 1, net.rec.raw
    assert b"/private" not in net.rec.raw
    assert b"forged" not in net.rec.raw


# ---- 1. request smuggling through Upgrade ------------------------------------------------

WEBSOCKET = (
    b"GET /public/ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)
H2C = (
    b"GET /public/h2 HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)
WITH_BODY = (
    b"POST /public/up HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)
CHUNKED = (
    b"POST /public/up HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
)
UPGRADES = {"websocket": WEBSOCKET, "h2c": H2C}
FORGED_XFCC = b"X-Forwarded-Client-Cert: By=forged;URI=spiffe://forged/ns/default/dc/dc1/svc/x\r\n"
SMUGGLED = {
    # to a path the L7 intention denies, with a forged identity for good measure
    "denied": b"GET /private/admin HTTP/1.1\r\nHost: api\r\n" + FORGED_XFCC,
    # to an allowed path: it may arrive, but only as a request the sidecar wrote
    "allowed": b"GET /public/second HTTP/1.1\r\nHost: api\r\n" + FORGED_XFCC,
}
CLOSE = b"Connection: close\r\n\r\n"


def statuses(answer: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)


@pytest.mark.parametrize("smuggled", sorted(SMUGGLED))
@pytest.mark.parametrize("upgrade", sorted(UPGRADES))
@pytest.mark.parametrize("via", VIAS)
async def test_a_request_after_an_upgrade_the_app_declines_is_authorized_on_its_own(
    net: Net, via: str, upgrade: str, smuggled: str
) -> None:
    """The app answers the upgrade request 200: the connection stays HTTP/1.1 and the second
    request, written in the same packet, goes through authorization and rewriting."""
    answer = await net.send(via, UPGRADES[upgrade] + SMUGGLED[smuggled] + CLOSE)
    await net.app_quiet()
    first = UPGRADES[upgrade].split(b" ")[1]
    if smuggled == "denied":
        assert statuses(answer) == [b"200", b"403"], answer
        assert net.rec.targets() == [first]
    else:
        assert statuses(answer) == [b"200", b"200"], answer
        assert net.rec.targets() == [first, b"/public/second"]
    assert_every_request_went_through_the_sidecar(net)


@pytest.mark.parametrize("upgrade", [WITH_BODY, CHUNKED], ids=["length", "chunked"])
@pytest.mark.parametrize("via", VIAS)
async def test_an_upgrade_request_with_a_body_is_refused_before_the_app_sees_it(
    net: Net, via: str, upgrade: bytes
) -> None:
    """llhttp stops at the head of an upgrade request and would take its body as the new
    protocol's, so the body could not be told from a smuggled request: such a request (which
    RFC 6455 §4.1 excludes for WebSocket) is refused with 400."""
    answer = await net.send(via, upgrade + SMUGGLED["allowed"] + CLOSE)
    await net.app_quiet()
    assert statuses(answer) == [b"400"], answer
    assert net.rec.raw == b""


@pytest.mark.parametrize("upgrade", sorted(UPGRADES))
@pytest.mark.parametrize("via", VIAS)
async def test_a_request_after_a_denied_upgrade_never_reaches_the_app(
    net: Net, via: str, upgrade: str
) -> None:
    denied = UPGRADES[upgrade].replace(b"/public/", b"/private/", 1)
    answer = await net.send(via, denied + SMUGGLED["allowed"] + CLOSE)
    await net.app_quiet()
    assert statuses(answer) == [b"403"], answer  # one answer, then the close
    assert net.inbound.stats.bad_requests == 0
    assert net.rec.requests == []
    assert net.rec.raw == b""


@pytest.mark.parametrize("via", VIAS)
async def test_a_request_sent_while_the_upgrade_is_unanswered_waits_for_the_answer(
    net: Net, via: str
) -> None:
    """The second and third requests come in their own packet, after the app has the upgrade
    request and before it answers."""
    net.rec.hold = asyncio.Event()
    reader, writer = await net.open(via)
    writer.write(WEBSOCKET)
    await asyncio.wait_for(net.rec.got_request.wait(), WAIT)
    writer.write(SMUGGLED["denied"] + b"\r\n" + SMUGGLED["allowed"] + CLOSE)
    await writer.drain()
    await asyncio.sleep(0.05)  # a chance for the sidecars to read it (not asserted on)
    net.rec.hold.set()
    answer = await asyncio.wait_for(reader.read(-1), WAIT)
    writer.close()
    await net.app_quiet()
    assert statuses(answer) == [b"200", b"403", b"200"], answer
    assert net.rec.targets() == [b"/public/ws", b"/public/second"]
    assert_every_request_went_through_the_sidecar(net)


async def test_more_than_a_high_water_mark_before_the_answer_is_refused(tmp_path: Path) -> None:
    """What is held after an upgrade request is bounded: beyond it the client gets a 400."""
    n = await build_net(ProxyTestCA(tmp_path), HTTPLimits(high_water=1024))
    try:
        answer = await n.send("direct", WEBSOCKET + b"x" * 4096)
        assert statuses(answer) == [b"400"], answer
        assert n.inbound.stats.bad_requests == 1
    finally:
        await close_net(n)


@pytest.mark.parametrize("via", VIAS)
async def test_bytes_sent_with_the_upgrade_head_reach_the_app_once_it_switches(
    net: Net, via: str
) -> None:
    """The legitimate case: a tunnel, and what the client wrote right after the upgrade head
    (same packet) arrives first in it."""
    net.rec.switch = True
    reader, writer = await net.open(via)
    writer.write(WEBSOCKET + b"early-bytes|")
    status, headers, _ = await asyncio.wait_for(read_response(reader), WAIT)
    assert status == b"HTTP/1.1 101 Switching Protocols"
    assert headers[b"upgrade"] == b"websocket"
    assert await asyncio.wait_for(reader.readexactly(12), WAIT) == b"early-bytes|"
    writer.write(b"GET /private/x HTTP/1.1\r\n\r\n")  # in a tunnel this is just data
    assert await asyncio.wait_for(reader.readexactly(27), WAIT) == (
        b"GET /private/x HTTP/1.1\r\n\r\n"
    )
    writer.close()
    assert net.rec.targets() == [b"/public/ws"]
    assert net.rec.requests[0].values(b"x-forwarded-client-cert") == [net.xfcc]


# ---- 4. XFCC and x-meshlet-* forgery ------------------------------------------------------

FORGED_HEADERS = (
    b"X-Forwarded-Client-Cert: By=spiffe://forged;URI=spiffe://forged/ns/default/dc/dc1/svc/admin\r\n"
    b"X-FORWARDED-CLIENT-CERT: By=forged-upper\r\n"
    b"x-forwarded-client-cert: By=forged-lower\r\n"
    b"X-Meshlet-Retriable: any\r\n"
    b"X-Meshlet-Reason: forged\r\n"
    b"x-MESHLET-anything: forged\r\n"
)


@pytest.mark.parametrize("via", VIAS)
async def test_the_app_sees_only_the_sidecars_xfcc_and_no_x_meshlet_header(
    net: Net, via: str
) -> None:
    answer = await net.send(
        via,
        b"GET /public/a HTTP/1.1\r\nHost: api\r\n" + FORGED_HEADERS + b"\r\n"
        # the same on a second request of the connection (the name cache is warm)
        b"GET /public/b HTTP/1.1\r\nHost: api\r\n" + FORGED_HEADERS + b"Connection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2, answer
    assert net.rec.targets() == [b"/public/a", b"/public/b"]
    for req in net.rec.requests:
        assert req.values(b"x-forwarded-client-cert") == [net.xfcc]
        assert [n for n, _ in req.headers if n.lower().startswith(b"x-meshlet-")] == []
    assert_every_request_went_through_the_sidecar(net)


async def test_a_connection_header_naming_xfcc_does_not_remove_the_sidecars(net: Net) -> None:
    answer = await net.send(
        "direct",
        b"GET /public/a HTTP/1.1\r\nHost: api\r\nConnection: close, X-Forwarded-Client-Cert\r\n"
        b"X-Forwarded-Client-Cert: By=forged\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert [r.values(b"x-forwarded-client-cert") for r in net.rec.requests] == [[net.xfcc]]


# ---- again on uvloop, the loop the sidecar runs on (its TLS transport is its own) -----------

ON_UVLOOP: list[tuple[Callable[..., Awaitable[None]], tuple[str, ...]]] = [
    (test_a_request_after_an_upgrade_the_app_declines_is_authorized_on_its_own, (via, up, kind))
    for via in VIAS
    for up, kind in (("websocket", "denied"), ("h2c", "allowed"))
] + [
    (test_a_request_sent_while_the_upgrade_is_unanswered_waits_for_the_answer, ("direct",)),
    (test_bytes_sent_with_the_upgrade_head_reach_the_app_once_it_switches, ("http-upstream",)),
    (test_bytes_sent_with_the_upgrade_head_reach_the_app_once_it_switches, ("direct",)),
    (test_the_app_sees_only_the_sidecars_xfcc_and_no_x_meshlet_header, ("tcp-upstream",)),
]


@pytest.mark.parametrize(
    ("scenario", "args"), ON_UVLOOP, ids=lambda v: v.__name__[5:40] if callable(v) else "-".join(v)
)
def test_on_uvloop(
    scenario: Callable[..., Awaitable[None]], args: tuple[str, ...], tmp_path: Path
) -> None:
    async def main() -> None:
        n = await build_net(ProxyTestCA(tmp_path))
        try:
            await scenario(n, *args)
        finally:
            await close_net(n)

    uvloop.run(main())
