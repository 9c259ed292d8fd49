"""MutualTLSMode permissive on the inbound listeners, attacked over real sockets: devstack's
Connect CA gives api's and web's leaves, the real intentions engine decides, and the apps
behind the listeners record every byte they receive (asserts are on what they got).

In permissive mode the first byte decides: 0x16 (a TLS handshake record) is mTLS as in strict
mode, anything else is plaintext with no identity. Plaintext is authorized as a source that
only intentions whose source is `*` match (stricter than Consul's Envoy, which skips
intentions for it); strict mode refuses it before any byte reaches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from connect.access_log import http_record, tcp_record
from connect.authz import intentions_authorizers
from connect.balancer import Target
from connect.http1 import HTTPLimits, InboundHTTP
from connect.http1.exchange import Exchange
from connect.inbound import InboundGate
from connect.l4 import InboundL4
from connect.listener import ConnectionLimits
from connect.observe import Side, Telemetry
from connect.peers import service_peers
from connect.seams import Peer
from connect.sidecar import InboundSpec, Sidecar, SidecarSpec, plan
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from intentions.engine import Identity, Snapshot, compile_snapshot
from intentions.entries import load_entry
from tests.connect.devstack_tls import LOOPS, dev_mesh, run
from tests.connect.proxy_test_servers import AppStats, start_app
from tests.connect.recording_app import RecordingApp, start_recording_app

WAIT = 10.0
"""Bound on any single wait (a hang is a failure, never a pass)."""

ALLOW_ANY = {"Name": "*", "Action": "allow"}
ALLOW_WEB = {"Name": "web", "Action": "allow"}
DENY_WEB = {"Name": "web", "Action": "deny"}


def intentions(*sources: Mapping[str, Any], default_allow: bool = False) -> Snapshot:
    """api's entry with `sources`; no other intention; the default deny (ACLs default deny)
    unless `default_allow`."""
    entry = load_entry({"Kind": "service-intentions", "Name": "api", "Sources": list(sources)})
    return compile_snapshot([entry], default_allow=default_allow)


@dataclass
class Site:
    api: DynamicTLS
    web: DynamicTLS
    gate: InboundGate
    listener: InboundHTTP | InboundL4
    telemetry: Telemetry
    holder: list[Snapshot]
    http_app: RecordingApp | None = None
    tcp_app: AppStats | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def stats(self) -> ProxyStats:
        return self.gate.stats

    def web_context(self) -> ssl.SSLContext:
        return self.web.client()


@contextlib.asynccontextmanager
async def site(
    kind: str,
    *sources: Mapping[str, Any],
    permissive: bool = True,
    handshake_timeout: float = 10.0,
    limits: HTTPLimits | None = None,
    default_allow: bool = False,
    connection_limits: ConnectionLimits | None = None,
) -> AsyncIterator[Site]:
    """devstack; api's inbound listener (http or l4) in front of a recording app, with
    MutualTLSMode `permissive` or strict; web's leaf for the mTLS caller."""
    async with dev_mesh() as mesh:
        api = await mesh.tls("api")
        web = await mesh.tls("web")
        holder = [intentions(*sources, default_allow=default_allow)]
        connection, request = intentions_authorizers(lambda: holder[0], Identity("api"))
        gate = InboundGate(
            api.listener_context(),
            service_peers(lambda: api.trust_domain),
            ProxyStats(),
            authorize=connection if kind == "l4" else None,
            handshake_timeout=handshake_timeout,
            current_ssl=api.server,
        )
        gate.permissive = permissive
        telemetry = Telemetry("api", api.material.leaf.service_uri)
        http_app: RecordingApp | None = None
        tcp_app: AppStats | None = None
        server: asyncio.Server
        listener: InboundHTTP | InboundL4
        if kind == "http":
            http_app = await start_recording_app()
            server = http_app.server
            listener = InboundHTTP(
                gate,
                "127.0.0.1",
                http_app.port,
                authorize=request,
                local_uri=api.material.leaf.service_uri,
                limits=limits,
            )
            listener.observer = telemetry.http(telemetry.inbound("http"))
        else:
            server, port, tcp_app = await start_app()
            listener = InboundL4(gate, "127.0.0.1", port)
            listener.observer = telemetry.tcp(telemetry.inbound("tcp"))
        await listener.start(limits=connection_limits)
        try:
            yield Site(api, web, gate, listener, telemetry, holder, http_app, tcp_app)
        finally:
            await listener.close(grace=0)
            server.close()
            await server.wait_closed()


async def exchange(port: int, data: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    """Connect (mTLS with `ctx`, else plaintext), send `data`, read until the peer closes
    (requests say `Connection: close`) or WAIT passes; b"" when refused."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="" if ctx else None
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    got = b""
    try:
        writer.write(data)
        with contextlib.suppress(TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
                got += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()
    return got


def get(path: bytes = b"/", extra: Sequence[bytes] = (), host: bytes = b"api") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: " + host, *extra, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


# ---- HTTP ------------------------------------------------------------------------------------


async def test_strict_mode_refuses_plaintext_even_with_a_wildcard_allow() -> None:
    async with site("http", ALLOW_ANY, permissive=False) as s:
        assert await exchange(s.port, get()) == b""
        assert s.http_app is not None and s.http_app.received == []
        assert s.stats.handshake_failures.plaintext == 1
        # mTLS from web still goes through.
        assert status(await exchange(s.port, get(), s.web_context())) == 200


async def test_permissive_plaintext_is_allowed_by_a_wildcard_source_intention() -> None:
    async with site("http", ALLOW_ANY) as s:
        answer = await exchange(s.port, get(b"/hello"))
        assert status(answer) == 200, answer
        assert s.http_app is not None
        [got] = s.http_app.received
        assert got.target == b"/hello"
        # No identity: no X-Forwarded-Client-Cert for the app to believe.
        assert got.header(b"x-forwarded-client-cert") == []
        # mTLS keeps working next to it, with the sidecar's XFCC.
        assert status(await exchange(s.port, get(b"/m"), s.web_context())) == 200
        assert len(s.http_app.received[1].header(b"x-forwarded-client-cert")) == 1


async def test_permissive_plaintext_with_only_a_named_source_allowed_is_denied() -> None:
    async with site("http", ALLOW_WEB) as s:
        answer = await exchange(s.port, get(b"/secret"))
        assert status(answer) == 403, answer
        assert s.http_app is not None and s.http_app.received == []
        # The named source itself is allowed over mTLS.
        assert status(await exchange(s.port, get(b"/ok"), s.web_context())) == 200
        assert [r.target for r in s.http_app.received] == [b"/ok"]


async def test_plaintext_is_denied_where_only_the_default_policy_would_allow_it() -> None:
    # Default allow (Consul without ACLs): a mesh identity no intention names is allowed,
    # plaintext is not; nor when a `*` L7 intention has no permission for the request.
    wildcard_l7 = {
        "Name": "*",
        "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/public"}}],
    }
    async with site("http", ALLOW_WEB, default_allow=True) as s:
        assert status(await exchange(s.port, get(b"/anon"))) == 403
        assert s.http_app is not None and s.http_app.received == []
    async with site("http", wildcard_l7, default_allow=True) as s:
        assert status(await exchange(s.port, get(b"/other"))) == 403
        assert status(await exchange(s.port, get(b"/public"))) == 200
        # web falls to the default for a request no permission matches: allowed.
        assert status(await exchange(s.port, get(b"/other"), s.web_context())) == 200
        assert s.http_app is not None
        assert [r.target for r in s.http_app.received] == [b"/public", b"/other"]
    async with site("l4", ALLOW_WEB, default_allow=True) as s:
        assert await exchange(s.port, b"hello") == b""
        assert s.tcp_app is not None and s.tcp_app.accepted == 0


async def test_plaintext_forging_xfcc_meshlet_headers_and_a_spiffe_host_gets_nothing_more() -> None:
    # web may do anything; anyone (`*`) only GET /public.
    wildcard_l7 = {
        "Name": "*",
        "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/public"}}],
    }
    async with site("http", ALLOW_WEB, wildcard_l7) as s:
        web_uri = s.web.material.leaf.service_uri
        forged = [
            b"X-Forwarded-Client-Cert: By=spiffe://x/svc/api;Hash=00;URI=" + web_uri.encode(),
            b"x-meshlet-retriable: 1",
            b"X-Meshlet-Reason: trusted",
        ]
        denied = await exchange(s.port, get(b"/private", forged, host=web_uri.encode()))
        assert status(denied) == 403, denied
        assert s.http_app is not None and s.http_app.received == []
        allowed = await exchange(s.port, get(b"/public/x", forged, host=web_uri.encode()))
        assert status(allowed) == 200, allowed
        [got] = s.http_app.received
        assert got.header(b"x-forwarded-client-cert") == []
        assert [n for n, _ in got.headers if n.lower().startswith(b"x-meshlet-")] == []


async def test_a_wildcard_allow_and_a_named_deny_let_plaintext_in_and_keep_the_named_out() -> None:
    async with site("http", ALLOW_ANY, DENY_WEB) as s:
        assert status(await exchange(s.port, get(b"/anon"))) == 200
        assert status(await exchange(s.port, get(b"/web"), s.web_context())) == 403
        assert s.http_app is not None
        assert [r.target for r in s.http_app.received] == [b"/anon"]


async def test_a_tls_looking_first_byte_then_garbage_fails_as_a_handshake() -> None:
    async with site("http", ALLOW_ANY) as s:
        for attempt in (b"\x16GET / HTTP/1.1\r\nHost: api\r\n\r\n", b"\x16\x03\x01\x00\x05junk"):
            assert await exchange(s.port, attempt) == b""
        assert s.http_app is not None and s.http_app.received == []
        assert s.stats.handshakes_failed == 2
        assert s.stats.plaintext_connections == 0


async def test_a_silent_connection_is_closed_at_the_handshake_timeout_in_permissive_mode() -> None:
    async with site(
        "http", ALLOW_ANY, handshake_timeout=0.3, limits=HTTPLimits(header_timeout=0.3)
    ) as s:
        # Nothing at all: the handshake timeout applies as in strict mode.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        assert s.stats.handshake_failures.timeout == 1
        # One plaintext byte, then nothing: the request-head timeout takes over.
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"G")
        answer = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert status(answer) in (0, 408), answer
        assert s.http_app is not None and s.http_app.received == []


class _Records:
    """An AccessSink keeping the records the access log would write (connect.access_log)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def http(self, side: Side, ex: Exchange, peer: Peer | None, duration: float) -> None:
        self.records.append(http_record(side, ex, peer, duration, time.time()))

    def tcp(self, side: Side, peer: Peer | None, **kw: Any) -> None:
        self.records.append(tcp_record(side, peer, now=time.time(), **kw))


async def test_plaintext_is_labelled_in_metrics_stats_and_the_access_log() -> None:
    async with site("http", ALLOW_ANY) as s:
        records = _Records()
        s.telemetry.access_log = records
        assert status(await exchange(s.port, get())) == 200
        assert status(await exchange(s.port, get(), s.web_context())) == 200
        series = s.telemetry.metrics.export()["http"]
        plain = [k for k in series if k.endswith("none")]
        assert len(plain) == 1 and "unknown" in plain[0]
        assert len([k for k in series if k.endswith("mutual_tls")]) == 1
        assert s.stats.plaintext_connections == 1
        assert [r["peer"] for r in records.records] == [
            "plaintext",
            s.web.material.leaf.service_uri,
        ]


# ---- L4 --------------------------------------------------------------------------------------


async def test_l4_permissive_relays_plaintext_only_under_a_wildcard_allow() -> None:
    async with site("l4", ALLOW_WEB) as s:
        assert await exchange(s.port, b"hello") == b""
        assert s.tcp_app is not None and s.tcp_app.accepted == 0
        assert s.stats.connections_denied == 1
    async with site("l4", ALLOW_ANY) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"hello"
        writer.close()
        series = s.telemetry.metrics.export()["tcp"]
        assert any(k.endswith("none") for k in series), series


async def test_l4_plaintext_is_cut_when_the_wildcard_allow_goes_or_the_mode_turns_strict() -> None:
    async with site("l4", ALLOW_ANY, ALLOW_WEB) as s:
        assert isinstance(s.listener, InboundL4)
        plain = await asyncio.open_connection("127.0.0.1", s.port)
        plain[1].write(b"one")
        assert await asyncio.wait_for(plain[0].readexactly(3), WAIT) == b"one"
        mtls = await asyncio.open_connection(
            "127.0.0.1", s.port, ssl=s.web_context(), server_hostname=""
        )
        mtls[1].write(b"two")
        assert await asyncio.wait_for(mtls[0].readexactly(3), WAIT) == b"two"
        # Strict again: the open plaintext connection is closed, web's mTLS one stays.
        s.gate.permissive = False
        assert s.listener.recheck() == 1
        assert await asyncio.wait_for(plain[0].read(), WAIT) == b""
        mtls[1].write(b"three")
        assert await asyncio.wait_for(mtls[0].readexactly(5), WAIT) == b"three"
        assert await exchange(s.port, b"again") == b""
        # Permissive again, then the `*` allow removed: a new plaintext relay is cut too.
        s.gate.permissive = True
        plain[1].close()
        plain = await asyncio.open_connection("127.0.0.1", s.port)
        plain[1].write(b"four")
        assert await asyncio.wait_for(plain[0].readexactly(4), WAIT) == b"four"
        s.holder[0] = intentions(ALLOW_WEB)
        assert s.listener.recheck() == 1
        assert await asyncio.wait_for(plain[0].read(), WAIT) == b""
        for _, writer in (plain, mtls):
            writer.close()


# ---- uvloop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_the_first_byte_decides_on_both_loops(loop: str) -> None:
    async def main() -> None:
        async with site("http", ALLOW_ANY) as s:
            assert status(await exchange(s.port, get(b"/p"))) == 200
            assert status(await exchange(s.port, get(b"/m"), s.web_context())) == 200
            assert await exchange(s.port, b"\x16\x03\x01\x00\x05junk") == b""
            assert s.http_app is not None
            assert [r.target for r in s.http_app.received] == [b"/p", b"/m"]

    run(loop, main)


# ---- the sidecar switches the mode in place --------------------------------------------------


def test_a_mode_change_alone_is_applied_in_place_not_by_replacing_the_listener() -> None:
    strict = InboundSpec("http", "127.0.0.1", 21000, "127.0.0.1", 8080, "spiffe://td/svc/api")
    permissive = dataclasses.replace(strict, mutual_tls_mode="permissive")
    changes = plan(SidecarSpec(strict), SidecarSpec(permissive))
    assert (changes.start, changes.stop, changes.replace, changes.modes) == (
        (),
        (),
        (),
        (permissive,),
    )
    assert not changes.empty
    assert changes.describe() == "inbound :21000: MutualTLSMode permissive"
    # With another change too, the listener is replaced (and starts in the new mode).
    other = dataclasses.replace(permissive, app_port=8081)
    assert plan(SidecarSpec(strict), SidecarSpec(other)).replace == ((strict, other),)


async def _keep_alive_get(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: bytes
) -> bytes:
    reader, writer = conn
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: api\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    return head + await asyncio.wait_for(reader.readexactly(2), WAIT)


def _api_sidecar(api_tls: DynamicTLS, snapshot: Snapshot) -> Sidecar[tuple[Target, ...]]:
    """api's sidecar deciding on `snapshot`, with no upstreams."""
    return Sidecar[tuple[Target, ...]](
        api_tls,
        intentions_authorizers(lambda: snapshot, Identity("api")),
        endpoints=lambda up: None,
        targets=lambda t: t,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("protocol", ["http", "tcp"])
async def test_the_sidecar_turns_strict_again_without_dropping_mtls_connections(
    protocol: str,
) -> None:
    async with dev_mesh() as mesh:
        app = await start_recording_app()
        api_tls = await mesh.tls("api")
        web_tls = await mesh.tls("web")
        api = _api_sidecar(api_tls, intentions(ALLOW_ANY, ALLOW_WEB))
        port = _free_port()
        strict = InboundSpec(
            protocol, "127.0.0.1", port, "127.0.0.1", app.port, api_tls.material.leaf.service_uri
        )
        permissive = dataclasses.replace(strict, mutual_tls_mode="permissive")
        writers: list[asyncio.StreamWriter] = []
        try:
            await api.apply(SidecarSpec(permissive))
            running = api.listener(permissive)
            assert running is not None
            plain = await asyncio.open_connection("127.0.0.1", port)
            mtls = await asyncio.open_connection(
                "127.0.0.1", port, ssl=web_tls.client(), server_hostname=""
            )
            writers += [plain[1], mtls[1]]
            assert status(await _keep_alive_get(plain, b"/p1")) == 200
            assert status(await _keep_alive_get(mtls, b"/m1")) == 200

            changes = await api.apply(SidecarSpec(strict))
            assert changes.modes == (strict,) and changes.replace == ()
            again = api.listener(strict)
            assert again is not None and again.listener is running.listener
            # The open plaintext connection is closed; web's mTLS one goes on.
            assert await asyncio.wait_for(plain[0].read(), WAIT) == b""
            assert status(await _keep_alive_get(mtls, b"/m2")) == 200
            assert await exchange(port, get(b"/p2")) == b""

            await api.apply(SidecarSpec(permissive))
            assert status(await exchange(port, get(b"/p3"))) == 200
            assert [r.target for r in app.received] == [b"/p1", b"/m1", b"/m2", b"/p3"]
        finally:
            for writer in writers:
                writer.close()
            await api.close(grace=0)
            await app.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_plaintext_connections_cannot_crowd_out_mesh_peers(loop: str) -> None:
    """A stranger opens plaintext connections that each send one byte and then wait: past
    half of `max_connections` they are refused (counted), and web's mTLS request is still
    served. On the code before this cap, 8 such connections filled the listener and web's
    connection was reset (found by the red-team pass)."""

    async def body() -> None:
        limits = ConnectionLimits(max_connections=8, max_pending_handshakes=4)
        async with site("http", ALLOW_ANY, connection_limits=limits) as s:
            held: list[asyncio.StreamWriter] = []
            refused = 0
            for _ in range(8):
                reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
                writer.write(b"G")
                await writer.drain()
                held.append(writer)
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        refused += 1
            assert refused == 4
            assert s.stats.connections_refused_limit.max_plaintext_connections == 4
            answer = await exchange(s.port, get(), s.web_context())
            assert status(answer) == 200, answer[:200]
            for writer in held:
                writer.close()
            # Once they are gone, plaintext is admitted again.
            await asyncio.sleep(0.2)
            assert status(await exchange(s.port, get())) == 200

    run(loop, body)


# ---- the sidecar's own identity changes in place ----------------------------------------------


def test_an_identity_change_is_applied_in_place_not_by_replacing_the_listener() -> None:
    # A CA replaced without cross-signing gives the sidecar a leaf in another trust domain:
    # only the SPIFFE ID the app is told it was reached as changes.
    old = InboundSpec("tcp", "127.0.0.1", 21000, "127.0.0.1", 8080, "spiffe://a.consul/svc/api")
    new = dataclasses.replace(old, local_uri="spiffe://b.consul/svc/api")
    changes = plan(SidecarSpec(old), SidecarSpec(new))
    assert (changes.start, changes.stop, changes.replace, changes.modes) == ((), (), (), (new,))
    assert changes.describe() == "inbound :21000: identity spiffe://b.consul/svc/api"
    both = dataclasses.replace(new, mutual_tls_mode="permissive")
    assert plan(SidecarSpec(old), SidecarSpec(both)).modes == (both,)


@pytest.mark.parametrize("protocol", ["http", "tcp"])
async def test_a_new_trust_domain_keeps_open_connections_past_the_drain_grace(
    protocol: str,
) -> None:
    """CI saw every long-lived TCP stream through the mesh closed once a control plane
    restarted empty: the new CA's leaf changed the inbound spec's SPIFFE ID, which replaced
    the listener, and the replaced one's connections were closed after the drain grace."""
    async with dev_mesh() as mesh:
        app = await start_recording_app()
        api_tls = await mesh.tls("api")
        web_tls = await mesh.tls("web")
        api = _api_sidecar(api_tls, intentions(ALLOW_WEB))
        port = _free_port()
        uri = api_tls.material.leaf.service_uri
        before = InboundSpec(protocol, "127.0.0.1", port, "127.0.0.1", app.port, uri)
        moved = uri.replace(uri.split("/")[2], "0000-new-ca.consul", 1)
        after = dataclasses.replace(before, local_uri=moved)
        writers: list[asyncio.StreamWriter] = []
        try:
            await api.apply(SidecarSpec(before, drain_grace=0.05))
            running = api.listener(before)
            assert running is not None
            conn = await asyncio.open_connection(
                "127.0.0.1", port, ssl=web_tls.client(), server_hostname=""
            )
            writers.append(conn[1])
            assert status(await _keep_alive_get(conn, b"/1")) == 200

            changes = await api.apply(SidecarSpec(after, drain_grace=0.05))
            assert changes.replace == () and changes.modes == (after,)
            again = api.listener(after)
            assert again is not None and again.listener is running.listener
            await asyncio.sleep(0.3)  # past the drain grace a replaced listener would have had
            assert status(await _keep_alive_get(conn, b"/2")) == 200
            assert [r.target for r in app.received] == [b"/1", b"/2"]
            if protocol == "http":
                # The connection accepted before keeps the identity it was accepted under; a
                # new one is told the new ID (XFCC By=).
                fresh = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=web_tls.client(), server_hostname=""
                )
                writers.append(fresh[1])
                assert status(await _keep_alive_get(fresh, b"/3")) == 200
                by = [r.header(b"x-forwarded-client-cert")[0].split(b";")[0] for r in app.received]
                assert by == [f"By={uri}".encode()] * 2 + [f"By={moved}".encode()], by
        finally:
            for writer in writers:
                writer.close()
            await api.close(grace=0)
            await app.close()
