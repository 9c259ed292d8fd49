"""The local app's timeouts on real sockets: the inbound sidecar (real mTLS from the test CA)
in front of an app that never answers, or whose port never completes a connect, and the
per-try timeout against a slow upload through the real sidecar pair.

Consul's Envoy gives the local_app route Envoy's 15 s route timeout and the local_app cluster
a 5 s connect timeout unless `local_request_timeout_ms` / `local_connect_timeout_ms` say
otherwise (connect/local_app.py); before, meshlet's inbound side had no request timeout at
all and a fixed connect timeout."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from connect.authz import allow_all
from connect.balancer import Target
from connect.http1 import InboundHTTP
from connect.http1.exchange import Exchange
from connect.inbound import InboundGate
from connect.l4 import InboundL4
from connect.local_app import LocalAppTimeouts
from connect.routes import RetryPolicy, RouteTable
from connect.seams import Peer, PeerCache
from connect.sidecar import InboundSpec, Sidecar, SidecarSpec
from connect.stats import ProxyStats
from tests.connect.devstack_tls import dev_mesh
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_http_routes import Stall, build, to
from tests.connect.test_http_routes import _sidecar as _inbound


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


class Flags:
    """An `ExchangeObserver` recording each exchange's status and Envoy response flags."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def request(self, ex: Exchange, peer: Peer | None) -> None:
        pass

    def response(self, ex: Exchange) -> None:
        pass

    def done(self, ex: Exchange, peer: Peer | None, duration: float) -> None:
        self.seen.append((ex.status, ex.flags))


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A loopback port whose connects never complete: a listen(0) socket never accepted
    from, its backlog filled, so the kernel drops further SYNs (the dialer waits)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        yield port
    finally:
        for s in fillers:
            s.close()
        server.close()


@pytest.fixture
async def stall() -> AsyncIterator[int]:
    server = await asyncio.get_running_loop().create_server(Stall, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _mtls(ca: ProxyTestCA, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=ca.client_context(ca.leaf("web")), server_hostname="api"
    )


async def test_an_app_that_never_answers_gets_504_after_local_request_timeout(
    ca: ProxyTestCA, stall: int
) -> None:
    # Before: no inbound request timeout at all; the caller waited on (only the 300 s idle
    # limit would have ended it).
    inbound = await _inbound(ca, stall)
    flags = Flags()
    inbound.observer = flags
    inbound.set_local_app(LocalAppTimeouts(request_timeout=0.3))
    try:
        reader, writer = await _mtls(ca, inbound.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 504 "), head
        assert b"connection: close" in head.lower()
        assert await asyncio.wait_for(reader.read(), 5) == b"upstream request timeout"
        writer.close()
        assert flags.seen == [(504, "UT")]
    finally:
        await inbound.close(grace=0)


async def test_the_inbound_request_timeout_runs_from_the_end_of_the_request(
    ca: ProxyTestCA,
) -> None:
    # An upload slower than the timeout reaches the app whole and is answered.
    from tests.connect.test_http_proxy import start_app

    app = await start_app("api")
    inbound = await _inbound(ca, app.port)
    inbound.set_local_app(LocalAppTimeouts(request_timeout=0.3))
    try:
        reader, writer = await _mtls(ca, inbound.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.6)
        writer.write(b"world")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        writer.close()
    finally:
        await inbound.close(grace=0)
        await app.runner.cleanup()


async def test_local_idle_timeout_ends_a_silent_stream_with_408(
    ca: ProxyTestCA, stall: int
) -> None:
    # local_idle_timeout_ms is the local_app route's idle_timeout (Consul PR #14418): with no
    # request timeout, a silent app is ended by it, not by the listener's 300 s idle limit.
    inbound = await _inbound(ca, stall)
    flags = Flags()
    inbound.observer = flags
    inbound.set_local_app(LocalAppTimeouts(request_timeout=None, idle_timeout=0.3))
    try:
        reader, writer = await _mtls(ca, inbound.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408 "), head
        writer.close()
        assert flags.seen == [(408, "SI")]
    finally:
        await inbound.close(grace=0)


async def test_local_request_timeout_0_turns_the_timeout_off(ca: ProxyTestCA) -> None:
    inbound = await _inbound(ca, 1)
    inbound.set_local_app(LocalAppTimeouts(request_timeout=None))
    try:
        assert inbound.fixed_routes is not None
        assert inbound.fixed_routes.default.request_timeout is None
    finally:
        await inbound.close(grace=0)


def test_the_inbound_default_is_envoys_15_s_route_timeout_and_5_s_connect() -> None:
    # The default, unit-tested: no test waits 15 s for it.
    t = LocalAppTimeouts()
    assert (t.request_timeout, t.connect_timeout, t.idle_timeout) == (15.0, 5.0, None)


async def test_a_new_inbound_listener_times_its_app_out_at_15_s_by_default(
    ca: ProxyTestCA,
) -> None:
    inbound = await _inbound(ca, 1)
    try:
        table = inbound.fixed_routes
        assert isinstance(table, RouteTable)
        assert table.default.request_timeout == 15.0
        assert inbound.origin.connect_timeout == 5.0  # type: ignore[attr-defined]
    finally:
        await inbound.close(grace=0)


async def test_an_upgrade_is_timed_until_its_101_only(ca: ProxyTestCA, stall: int) -> None:
    inbound = await _inbound(ca, stall)
    inbound.set_local_app(LocalAppTimeouts(request_timeout=0.3))
    try:
        reader, writer = await _mtls(ca, inbound.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 504 "), head
        writer.close()
    finally:
        await inbound.close(grace=0)


async def test_an_app_port_that_never_accepts_fails_after_local_connect_timeout(
    ca: ProxyTestCA,
) -> None:
    # Before: the connect timeout was fixed at 5 s; the local_connect_timeout_ms given here
    # (300 ms) answers well before that, as Envoy's local_app cluster would.
    with blackhole() as port:
        inbound = await _inbound(ca, port)
        flags = Flags()
        inbound.observer = flags
        inbound.set_local_app(LocalAppTimeouts(connect_timeout=0.3))
        try:
            reader, writer = await _mtls(ca, inbound.port)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
            assert head.startswith(b"HTTP/1.1 502 "), head
            assert b"x-meshlet-reason: local app: TimeoutError" in head
            writer.close()
            assert flags.seen == [(502, "UF")]
        finally:
            await inbound.close(grace=0)


async def test_an_l4_app_port_that_never_accepts_is_closed_after_local_connect_timeout(
    ca: ProxyTestCA,
) -> None:
    with blackhole() as port:
        stats = ProxyStats()
        # No connection authorizer: every verified peer is admitted (the dial is what's tested).
        gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), stats)
        inbound = InboundL4(gate, "127.0.0.1", port)
        inbound.set_local_app(LocalAppTimeouts(connect_timeout=0.3))
        await inbound.start()
        try:
            reader, writer = await _mtls(ca, inbound.port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert stats.upstream_failures == 1
        finally:
            await inbound.close(grace=0)


async def test_a_per_try_timeout_does_not_cut_a_slow_upload(ca: ProxyTestCA) -> None:
    # Envoy starts the per-try timer when the downstream request is complete (envoy#6643):
    # an upload slower than it reaches the app whole. Before: the timer ran from the head
    # written upstream and cut the upload mid-body (504).
    retry = RetryPolicy(num_retries=1, on_timeout=True)
    m = await build(ca, RouteTable((), to("v1", try_timeout=0.3, retry=retry)))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.6)  # past the per-try timeout, the request not yet whole
        writer.write(b"world")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await reader.readexactly(2) == b"10"
        writer.close()
    finally:
        await m.close()


async def test_a_per_try_timeout_still_times_a_stalled_try_after_the_upload(
    ca: ProxyTestCA,
) -> None:
    m = await build(
        ca, RouteTable((), to("stalled", try_timeout=0.3, retry=RetryPolicy())), stall_in=("s0",)
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"world")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 504 "), head
        writer.close()
    finally:
        await m.close()


async def test_a_new_spec_applies_the_timeouts_to_the_running_inbound_in_place(
    stall: int,
) -> None:
    # Through Sidecar.apply with devstack's mesh TLS: the listener is not replaced (its open
    # connections stay), and the next request is timed by the new local_request_timeout_ms.
    async with dev_mesh() as dm:
        api = Sidecar[tuple[Target, ...]](
            await dm.tls("api"), allow_all(), endpoints=lambda up: None, targets=lambda t: t
        )
        web_tls = await dm.tls("web")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uri = "spiffe://x/ns/default/dc/dc1/svc/api"
        inbound = InboundSpec("http", "127.0.0.1", port, "127.0.0.1", stall, uri)
        try:
            await api.apply(SidecarSpec(inbound))
            listener = api.running[inbound.bind].listener
            assert isinstance(listener, InboundHTTP)
            assert listener.fixed_routes is not None
            assert listener.fixed_routes.default.request_timeout == 15.0
            changed = await api.apply(
                SidecarSpec(inbound, local_app=LocalAppTimeouts(request_timeout=0.3))
            )
            assert changed.empty and api.running[inbound.bind].listener is listener
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=web_tls.client(), server_hostname="api"
            )
            writer.write(b"GET /hello HTTP/1.1\r\nHost: api\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 504 "), head
            writer.close()
        finally:
            await api.close(grace=0)
