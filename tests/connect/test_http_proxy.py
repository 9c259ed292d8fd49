"""The HTTP/1.1 sidecar pair over real sockets and mTLS, with a real aiohttp app behind it:
app client -> OutboundHTTP -> mTLS -> InboundHTTP (intentions per request) -> aiohttp app."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Policy, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import HTTPLimits, InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.seams import PeerCache
from connect.stats import ProxyStats
from intentions.engine import Identity, compile_snapshot
from intentions.entries import load_entry
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe
from tests.connect.test_l4_relay import free_port

MB = 1024 * 1024


@dataclass
class App:
    port: int
    runner: web.AppRunner
    seen: list[dict[str, str]] = field(default_factory=list)
    peak_buffered: int = 0
    probe: Callable[[], int] = lambda: 0
    name: str = "app"
    held: int = 0
    """GETs of /held received: answered only once their connection has gone."""
    released: int = 0
    """GETs of /held whose connection went away."""


async def start_app(name: str = "app") -> App:
    app_state: dict[str, App] = {}

    async def hello(request: web.Request) -> web.Response:
        seen = {k.lower(): v for k, v in request.headers.items()}
        seen[":path"] = request.path
        app_state["a"].seen.append(seen)
        return web.Response(text=f"hello from {name}")

    async def upload(request: web.Request) -> web.Response:
        a = app_state["a"]
        total = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            total += len(chunk)
            a.peak_buffered = max(a.peak_buffered, a.probe())
        return web.Response(text=str(total))

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["bytes"])
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"y" * 65536
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            await resp.write(block[:n])
            sent += n
        await resp.write_eof()
        return resp

    async def held(request: web.Request) -> web.Response:
        a = app_state["a"]
        a.held += 1
        deadline = asyncio.get_running_loop().time() + 10
        while request.transport is not None and not request.transport.is_closing():
            if asyncio.get_running_loop().time() > deadline:
                return web.Response(text="never released")
            await asyncio.sleep(0.01)
        a.released += 1
        return web.Response(text="too late")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    webapp = web.Application()
    webapp.router.add_route("*", "/hello", hello)
    webapp.router.add_route("*", "/public/{tail:.*}", hello)
    webapp.router.add_route("*", "/private/{tail:.*}", hello)
    webapp.router.add_post("/upload", upload)
    webapp.router.add_get("/download", download)
    webapp.router.add_get("/empty", empty)
    webapp.router.add_get("/held", held)
    webapp.router.add_get("/ws", ws)
    runner = web.AppRunner(webapp, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    a = App(port, runner, name=name)
    app_state["a"] = a
    return a


def entry(name: str, *sources: dict[str, Any]) -> Any:
    return load_entry({"Kind": "service-intentions", "Name": name, "Sources": list(sources)})


# web may reach /hello, /upload, /download, /empty, /ws and /public/*, never /private/*.
INTENTIONS = compile_snapshot(
    [
        entry(
            "api",
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/private"}},
                    {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                ],
            },
        )
    ],
    default_allow=False,
)


@dataclass
class Mesh:
    ca: ProxyTestCA
    apps: list[App]
    inbounds: list[InboundHTTP]
    outbound: OutboundHTTP

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.outbound.port}"

    def buffered(self) -> int:
        total = 0
        for listener in (*self.inbounds, self.outbound):
            for down in listener.connections:
                if down.transport is not None:
                    total += down.transport.get_write_buffer_size()
                for ex in down.queue:
                    if ex.conn is not None and ex.conn.transport is not None:
                        total += ex.conn.transport.get_write_buffer_size()
                    total += sum(len(c) for c in ex.pending or ())
        return total

    async def close(self) -> None:
        await self.outbound.close(grace=0)
        for inbound in self.inbounds:
            await inbound.close(grace=0)
        for a in self.apps:
            await a.runner.cleanup()


async def build_mesh(
    ca: ProxyTestCA,
    *,
    instances: int = 1,
    limits: HTTPLimits | None = None,
    inbound_limits: HTTPLimits | None = None,
    extra_targets: tuple[Target, ...] = (),
    no_targets: bool = False,
) -> Mesh:
    """`limits` for every listener; `inbound_limits` (when given) for the inbound ones."""
    apps, inbounds, targets = [], [], []
    _, request = intentions_authorizers(lambda: INTENTIONS, Identity("api"))
    for i in range(instances):
        a = await start_app(f"api-{i}")
        gate = InboundGate(
            ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats()
        )
        inbound = InboundHTTP(
            gate,
            "127.0.0.1",
            a.port,
            authorize=request,
            local_uri=spiffe("api"),
            limits=inbound_limits or limits,
        )
        await inbound.start()
        apps.append(a)
        inbounds.append(inbound)
        targets.append(Target(f"n{i}/api-sidecar", "127.0.0.1", inbound.port))
    client_ctx = ca.client_context(ca.leaf("web"))
    all_targets = [] if no_targets else [*targets, *extra_targets]
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer(all_targets, BalancerConfig(policy=Policy.ROUND_ROBIN))
        ),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(5),
    )
    outbound = OutboundHTTP(upstream, limits)
    await outbound.start()
    mesh = Mesh(ca, apps, inbounds, outbound)
    for a in apps:
        a.probe = mesh.buffered
    return mesh


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


@pytest.fixture
async def mesh(ca: ProxyTestCA) -> AsyncIterator[Mesh]:
    m = await build_mesh(ca)
    yield m
    await m.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


async def raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    return lines[0], headers, body


# ---- behaviour ----------------------------------------------------------------------------


async def test_request_crosses_the_mesh_with_xfcc_and_request_id(
    mesh: Mesh, session: aiohttp.ClientSession
) -> None:
    headers = {
        "X-Forwarded-Client-Cert": "By=forged;URI=spiffe://evil",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "must not pass",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Request-Id": "",
    }
    del headers["X-Request-Id"]
    async with session.get(mesh.url + "/hello", headers=headers) as resp:
        assert resp.status == 200
        assert await resp.text() == "hello from api-0"
    seen = mesh.apps[0].seen[-1]
    web_der = next(iter(mesh.inbounds[0].gate.peers._cache))
    assert seen["x-forwarded-client-cert"] == (
        f"By={spiffe('api')};Hash={hashlib.sha256(web_der).hexdigest()};URI={spiffe('web')}"
    )
    assert len(seen["x-request-id"]) == 36
    for hop in ("x-secret-hop", "keep-alive", "te"):
        assert hop not in seen


async def test_request_id_is_kept_when_present(mesh: Mesh, session: aiohttp.ClientSession) -> None:
    async with session.get(mesh.url + "/hello", headers={"X-Request-Id": "abc"}) as resp:
        assert resp.status == 200
    assert mesh.apps[0].seen[-1]["x-request-id"] == "abc"


async def test_keep_alive_reuses_one_mesh_connection(
    mesh: Mesh, session: aiohttp.ClientSession
) -> None:
    for _ in range(50):
        async with session.get(mesh.url + "/hello") as resp:
            assert await resp.text() == "hello from api-0"
    assert mesh.inbounds[0].stats.connections == 1
    assert mesh.outbound.stats.requests == 50


async def test_l7_intention_denies_with_403_and_keeps_the_connection(mesh: Mesh) -> None:
    reader, writer = await raw(
        mesh.outbound.port,
        b"GET /private/x HTTP/1.1\r\nHost: api\r\n\r\nGET /public/x HTTP/1.1\r\nHost: api\r\n\r\n",
    )
    status, _, body = await read_response(reader)
    assert status == b"HTTP/1.1 403 Forbidden"
    assert body == b"RBAC: access denied"
    status, _, body = await read_response(reader)  # same connection, next request
    assert status == b"HTTP/1.1 200 OK"
    assert body == b"hello from api-0"
    assert mesh.inbounds[0].stats.requests_denied == 1
    assert [s[":path"] for s in mesh.apps[0].seen] == ["/public/x"]
    writer.close()


async def test_denied_request_body_is_discarded_not_forwarded(mesh: Mesh) -> None:
    body = b"z" * 100_000
    reader, writer = await raw(
        mesh.outbound.port,
        b"POST /private/upload HTTP/1.1\r\nHost: api\r\nContent-Length: 100000\r\n\r\n"
        + body
        + b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n",
    )
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 403 Forbidden"
    status, _, text = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK"
    assert text == b"hello from api-0"
    assert [s[":path"] for s in mesh.apps[0].seen] == ["/hello"]
    writer.close()


async def test_pipelined_requests_are_answered_in_order(mesh: Mesh) -> None:
    reader, writer = await raw(
        mesh.outbound.port,
        b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n" * 3
        + b"GET /public/last HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n",
    )
    for _ in range(4):
        status, _, body = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert body == b"hello from api-0"
    assert await reader.read() == b""  # Connection: close honoured
    writer.close()


async def test_head_and_204_do_not_hang(mesh: Mesh, session: aiohttp.ClientSession) -> None:
    for _ in range(3):
        async with session.head(mesh.url + "/hello") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len("hello from api-0"))
        async with session.get(mesh.url + "/empty") as resp:
            assert resp.status == 204
    assert mesh.inbounds[0].stats.connections == 1


async def test_100_mb_upload_streams_with_bounded_buffers(
    mesh: Mesh, session: aiohttp.ClientSession
) -> None:
    total = 100 * MB

    async def body() -> AsyncIterator[bytes]:
        block = b"u" * (256 * 1024)
        for _ in range(total // len(block)):
            yield block

    async with session.post(mesh.url + "/upload", data=body()) as resp:
        assert resp.status == 200
        assert await resp.text() == str(total)
    # Four legs, each may hold about a high-water mark (256 KiB) plus one read in flight.
    assert mesh.apps[0].peak_buffered <= 4 * 512 * 1024


async def test_100_mb_download_streams_with_bounded_buffers(
    mesh: Mesh, session: aiohttp.ClientSession
) -> None:
    received = 0
    peak = 0
    async with session.get(mesh.url + f"/download?bytes={100 * MB}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(1 << 20):
            received += len(chunk)
            peak = max(peak, mesh.buffered())
    assert received == 100 * MB
    assert peak <= 4 * 512 * 1024


async def test_expect_100_continue(mesh: Mesh) -> None:
    reader, writer = await raw(
        mesh.outbound.port,
        b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"abcde")
    status, _, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK"
    assert body == b"5"
    writer.close()


async def test_websocket_echo_through_the_mesh(mesh: Mesh, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(mesh.url + "/ws") as ws:
        for i in range(5):
            await ws.send_str(f"m{i}")
            assert await ws.receive_str() == f"echo:m{i}"
        await ws.send_bytes(b"\x00" * 200_000)
        assert await ws.receive_bytes() == b"\x00" * 200_000


async def test_websocket_to_a_denied_path_is_refused(mesh: Mesh) -> None:
    reader, writer = await raw(
        mesh.outbound.port,
        b"GET /private/ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 403 Forbidden"
    assert await reader.read() == b""
    writer.close()


# ---- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"get / HTTP/1.1\r\nHost: api\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"400",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_malformed_requests_get_an_answer_and_a_close(
    mesh: Mesh, request_bytes: bytes, status: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    reader, writer = await raw(mesh.outbound.port, request_bytes)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.split(b" ")[1] == status
    assert b"connection: close" in head.lower()
    await reader.read()
    writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert mesh.apps[0].seen == []


async def test_slowloris_is_cut_by_the_header_timeout(ca: ProxyTestCA) -> None:
    m = await build_mesh(ca, limits=HTTPLimits(header_timeout=0.1))
    try:
        reader, writer = await raw(m.outbound.port, b"GET /hello HTTP/1.1\r\nHost: a")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert await reader.read() == b"Request Timeout"  # and then the close
        writer.close()
    finally:
        await m.close()


async def test_idle_keep_alive_connections_are_closed(ca: ProxyTestCA) -> None:
    m = await build_mesh(ca, limits=HTTPLimits(header_timeout=0.05, idle_timeout=0.1))
    try:
        reader, writer = await raw(m.outbound.port, b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert await reader.read() == b""
        writer.close()
    finally:
        await m.close()


# ---- endpoints and failover ---------------------------------------------------------------


async def test_no_endpoint_is_503_with_a_reason_at_once(ca: ProxyTestCA) -> None:
    m = await build_mesh(ca, no_targets=True)
    try:
        reader, writer = await raw(m.outbound.port, b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert headers[b"x-meshlet-reason"] == b"no healthy endpoint"
        writer.close()
    finally:
        await m.close()


async def test_refused_endpoint_fails_over(ca: ProxyTestCA, session: aiohttp.ClientSession) -> None:
    dead = Target("n9/api-sidecar", "127.0.0.1", free_port())
    m = await build_mesh(ca, extra_targets=(dead,))
    try:
        for _ in range(10):
            async with session.get(m.url + "/hello", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        assert "n9/api-sidecar" in m.outbound.origin.upstream.cluster.ejected  # type: ignore[attr-defined]
    finally:
        await m.close()


async def test_killed_instance_fails_no_idempotent_request(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    m = await build_mesh(ca, instances=2)
    try:
        ok = 0
        for i in range(200):
            if i == 50:
                # Kill instance 0's sidecar with pooled connections to it still open.
                await m.inbounds[0].close(grace=0)
            async with session.get(m.url + "/hello") as resp:
                assert resp.status == 200
                ok += 1
        assert ok == 200
        assert m.apps[1].seen  # the survivor took over
        # Every request chosen was recorded: nothing is left counted in flight.
        cluster = m.outbound.origin.upstream.cluster  # type: ignore[attr-defined]
        assert [cluster.inflight(f"n{i}/api-sidecar") for i in range(2)] == [0, 0]
    finally:
        await m.close()


async def test_instance_whose_app_is_down_fails_over_even_for_post(
    ca: ProxyTestCA, session: aiohttp.ClientSession
) -> None:
    """The peer sidecar is up but cannot connect to its app: its 502 says the request never
    reached an app, so any bodiless request (POST too) goes to another instance."""
    m = await build_mesh(ca, instances=2)
    try:
        await m.apps[0].runner.cleanup()  # instance 0's app is gone, its sidecar is not
        for i in range(20):
            method = "POST" if i % 2 else "GET"
            async with session.request(method, m.url + "/hello") as resp:
                assert resp.status == 200, await resp.text()
                assert "x-meshlet-retriable" not in resp.headers
        upstream = m.outbound.origin.upstream  # type: ignore[attr-defined]
        assert "n0/api-sidecar" in upstream.cluster.ejected
        assert len(m.apps[1].seen) == 20
    finally:
        m.apps.pop(0)
        await m.close()


async def test_app_down_with_a_body_sent_is_a_502_with_its_reason(ca: ProxyTestCA) -> None:
    """A streamed body is gone once sent: no second instance, the 502 reaches the client."""
    m = await build_mesh(ca, instances=1)
    try:
        await m.apps[0].runner.cleanup()
        reader, writer = await raw(
            m.outbound.port,
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        )
        status, headers, _ = await read_response(reader)
        assert status == b"HTTP/1.1 502 Bad Gateway"
        assert headers[b"x-meshlet-reason"].startswith(b"local app: ")
        assert b"x-meshlet-retriable" not in headers
        writer.close()
    finally:
        m.apps.clear()
        await m.close()


async def test_an_app_cannot_make_the_caller_repeat_a_request(ca: ProxyTestCA) -> None:
    """The marker from an app (not its sidecar) is removed: the request is not repeated."""
    calls: list[str] = []

    async def lying(request: web.Request) -> web.Response:
        calls.append(request.method)
        return web.Response(status=502, headers={"X-Meshlet-Retriable": "any"})

    m = await build_mesh(ca, instances=2)
    try:
        for a in m.apps:
            await a.runner.cleanup()
        m.apps.clear()
        for inbound in m.inbounds:
            webapp = web.Application()
            webapp.router.add_post("/hello", lying)
            runner = web.AppRunner(webapp, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", inbound.origin.port).start()  # type: ignore[attr-defined]
            m.apps.append(App(inbound.origin.port, runner))  # type: ignore[attr-defined]
        reader, writer = await raw(m.outbound.port, b"POST /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == b"HTTP/1.1 502 Bad Gateway"
        assert b"x-meshlet-retriable" not in headers
        assert calls == ["POST"]
        writer.close()
    finally:
        await m.close()


async def test_an_app_that_drops_requests_unanswered_fails_over_idempotent_ones_only(
    ca: ProxyTestCA,
) -> None:
    """Instance 0's app accepts and reads each request, then closes without a word. Its
    sidecar tries once more on a new connection, then says `idempotent`: the caller's
    sidecar sends a GET to instance 1, but gives a bodiless POST (which the app may have
    acted on) the 502."""
    seen: list[bytes] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    m = await build_mesh(ca, instances=2)
    dropper = None
    try:
        port = m.apps[0].port
        await m.apps.pop(0).runner.cleanup()
        dropper = await asyncio.start_server(drop, "127.0.0.1", port)
        for _ in range(4):  # round robin: every other GET lands on instance 0 first
            reader, writer = await raw(m.outbound.port, b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK", (status, headers)
            assert body == b"hello from api-1"
            writer.close()
        upstream = m.outbound.origin.upstream  # type: ignore[attr-defined]
        assert "n0/api-sidecar" in upstream.cluster.ejected
        assert len(seen) == 2  # the GET that reached instance 0, and its one retry there
        upstream.cluster.ejected.clear()
        seen.clear()
        statuses = []
        for _ in range(2):
            reader, writer = await raw(m.outbound.port, b"POST /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, _ = await read_response(reader)
            statuses.append(status)
            assert b"x-meshlet-retriable" not in headers
            writer.close()
        assert sorted(statuses) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 502 Bad Gateway"]
        assert len(seen) == 1  # the POST reached instance 0 once and was not repeated
    finally:
        if dropper is not None:
            dropper.close()
        await m.close()


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_client_giving_up_on_a_waiting_request_releases_every_connection(
    mesh: Mesh,
) -> None:
    """A keep-alive client closes while its GET waits for the app: the mesh lets the upstream
    mTLS connection and api's connection to its app go (the app sees its client leave)."""
    _, writer = await raw(mesh.outbound.port, b"GET /held HTTP/1.1\r\nHost: api\r\n\r\n")
    app = mesh.apps[0]
    await _until(lambda: app.held == 1, "the GET reached the app")
    writer.close()
    await _until(lambda: app.released == 1, "api's connection to its app released")
    await _until(lambda: not mesh.outbound.connections, "web's client connection released")
    await _until(lambda: not mesh.inbounds[0].connections, "the mTLS connection released")
    assert mesh.outbound.origin.pool.idle.get("n0/api-sidecar", []) == []


async def test_a_client_that_half_closes_after_a_connection_close_request_gets_its_answer(
    mesh: Mesh,
) -> None:
    request = b"GET /hello HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    reader, writer = await raw(mesh.outbound.port, request)
    writer.write_eof()
    status, _, body = await asyncio.wait_for(read_response(reader), 10)
    assert status.startswith(b"HTTP/1.1 200") and body == b"hello from api-0"
    writer.close()
