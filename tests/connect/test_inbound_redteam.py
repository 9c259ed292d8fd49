"""The inbound data plane attacked by a caller who can reach the sidecar's inbound port, with
or without a mesh certificate (MutualTLSMode permissive and strict): raw bytes on real sockets
against the real listeners, devstack's Connect CA for the leaves, the real intentions engine,
and apps that record every byte they receive. Each test asserts what the app behind the
sidecar received (or that it was never dialed).

Each test says what it attacks. Those marked "hole" failed on the code before the fix that
came with them; the others pin a property no other test held.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from connect.authz import intentions_authorizers
from connect.balancer import Target
from connect.http1 import InboundHTTP
from connect.inbound import InboundGate
from connect.peers import service_peers
from connect.sidecar import InboundSpec, Sidecar, SidecarSpec
from connect.stats import ProxyStats
from intentions.engine import Identity, Snapshot
from tests.connect.devstack_tls import dev_mesh, run
from tests.connect.proxy_test_servers import start_app
from tests.connect.test_permissive import (
    ALLOW_ANY,
    ALLOW_WEB,
    WAIT,
    exchange,
    get,
    intentions,
    status,
)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"


# ---- an app that records raw bytes per connection ------------------------------------------


@dataclass
class RawApp:
    """Records every byte per connection and answers `200 ok` each time a received message
    ends (`marker` seen again); counts the connections it accepted."""

    server: asyncio.Server
    port: int
    marker: bytes
    switch: bool = False
    """Answer `101` to a first request that asks for an upgrade, and take every later byte
    as the new protocol's."""
    connections: list[bytearray] = field(default_factory=list)

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c) for c in self.connections)

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class _RawConn(asyncio.Protocol):
    def __init__(self, app: RawApp) -> None:
        self.app = app
        self.buf = bytearray()
        self.answered = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.app.connections.append(self.buf)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        assert self.transport is not None
        if self.app.switch and not self.answered and b"\r\n\r\n" in self.buf:
            head = bytes(self.buf).split(b"\r\n\r\n", 1)[0].lower()
            if b"\r\nupgrade: " in head:
                self.answered = -1  # switched: the rest is the new protocol's
                self.transport.write(SWITCHED)
        if self.answered < 0:
            return
        while self.buf.count(self.app.marker) > self.answered:
            self.answered += 1
            self.transport.write(OK)


async def start_raw_app(marker: bytes = b"\r\n\r\n", switch: bool = False) -> RawApp:
    holder: list[RawApp] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _RawConn(holder[0]), "127.0.0.1", 0
    )
    app = RawApp(server, server.sockets[0].getsockname()[1], marker, switch)
    holder.append(app)
    return app


@contextlib.asynccontextmanager
async def raw_site(
    *sources: Mapping[str, Any],
    marker: bytes = b"\r\n\r\n",
    trust_domain: str | None = None,
    permissive: bool = True,
    snapshot: list[Snapshot] | None = None,
    switch: bool = False,
) -> AsyncIterator[tuple[InboundHTTP, RawApp, ssl.SSLContext, str]]:
    """api's inbound HTTP listener in front of a RawApp; yields (listener, app, web's client
    context, the XFCC value web's requests must carry). `trust_domain` overrides the one peers
    are checked against (every mesh peer is then refused). `snapshot`: the caller's holder of
    the intentions (replace its item to change them); `switch`: the app answers 101."""
    async with dev_mesh() as mesh:
        api = await mesh.tls("api")
        web = await mesh.tls("web")
        holder = snapshot if snapshot is not None else [intentions(*sources)]
        _, request = intentions_authorizers(lambda: holder[0], Identity("api"))
        domain = trust_domain
        gate = InboundGate(
            api.listener_context(),
            service_peers(lambda: domain or api.trust_domain),
            ProxyStats(),
            current_ssl=api.server,
        )
        gate.permissive = permissive
        app = await start_raw_app(marker, switch)
        listener = InboundHTTP(
            gate,
            "127.0.0.1",
            app.port,
            authorize=request,
            local_uri=api.material.leaf.service_uri,
        )
        await listener.start()
        web_uri = web.material.leaf.service_uri
        der = ssl.PEM_cert_to_DER_cert(web.material.leaf.chain_pem[0])
        digest = hashlib.sha256(der).hexdigest()
        xfcc = f"By={api.material.leaf.service_uri};Hash={digest};URI={web_uri}"
        try:
            yield listener, app, web.client(), xfcc
        finally:
            await listener.close(grace=0)
            await app.close()


def xfcc_lines(raw: bytes) -> list[bytes]:
    """The X-Forwarded-Client-Cert values in raw request heads (any case)."""
    return [
        line.split(b":", 1)[1].strip()
        for line in raw.split(b"\r\n")
        if line.lower().startswith(b"x-forwarded-client-cert:")
    ]


async def tls_client(
    port: int,
    ctx: ssl.SSLContext,
    data: bytes,
    *,
    piece: int = 0,
) -> bytes:
    """mTLS by hand over a plain socket: the ClientHello goes `piece` bytes per segment (0:
    whole), and `data` goes in the same write as the client's last handshake flight (so it
    arrives with the handshake). Reads the answer until the server closes; b"" if refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    got = b""
    try:
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            out = outgoing.read()
            if first and piece:
                for i in range(0, len(out), piece):
                    writer.write(out[i : i + piece])
                    await writer.drain()
                    await asyncio.sleep(0.002)  # pacing only: each piece its own segment
            else:
                writer.write(out)
            first = False
            chunk = await asyncio.wait_for(reader.read(65536), WAIT)
            if not chunk:
                return b""
            incoming.write(chunk)
        tls.write(data)
        writer.write(outgoing.read())
        closed = False
        while not closed and (chunk := await asyncio.wait_for(reader.read(65536), WAIT)):
            incoming.write(chunk)
            try:
                while plain := tls.read(65536):
                    got += plain
                closed = True  # b"": the server's close_notify, the answer is complete
            except ssl.SSLWantReadError:
                pass
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return got


# ---- 1. what the authorizer decides on is what the app receives ----------------------------


def _header_rule(name: str, **match: object) -> dict[str, Any]:
    return {
        "Name": "web",
        "Permissions": [
            {
                "Action": "allow",
                "HTTP": {"PathPrefix": "/admin", "Header": [{"Name": name, **match}]},
            }
        ],
    }


@pytest.mark.parametrize(
    ("rule", "sent"),
    [
        # Named in Connection: hop-by-hop, so removed before the app.
        (_header_rule("X-Role", Exact="admin"), [b"X-Role: admin", b"Connection: x-role"]),
        # x-meshlet-*: only sidecars write those; removed from every caller.
        (_header_rule("X-Meshlet-Tier", Exact="gold"), [b"X-Meshlet-Tier: gold"]),
        # A hop-by-hop field.
        (_header_rule("Keep-Alive", Present=True), [b"Keep-Alive: timeout=5"]),
    ],
    ids=["connection-named", "x-meshlet", "hop-by-hop"],
)
async def test_a_field_the_sidecar_removes_cannot_satisfy_a_header_permission(
    rule: dict[str, Any], sent: list[bytes]
) -> None:
    """Hole: the authorizer saw the caller's fields, the app got them without the ones the
    sidecar removes, so a request the intentions allow only with a field reached the app
    without it (200 before the fix)."""
    async with raw_site(rule) as (listener, app, web, _):
        head = b"GET /admin/users HTTP/1.1\r\nHost: api\r\n" + b"\r\n".join(sent)
        answer = await tls_client(listener.port, web, head + b"\r\nConnection: close\r\n\r\n")
        assert status(answer) == 403, (answer, app.received)
        assert app.received == b""
        if b"Connection" in sent[-1]:
            # Control: the field sent as an end-to-end one reaches the app, and is allowed.
            ok = get(b"/admin/users", sent[:1])
            assert status(await tls_client(listener.port, web, ok)) == 200
            assert sent[0] in app.received


async def test_a_forged_xfcc_cannot_satisfy_a_header_permission_on_it() -> None:
    """Hole: a permission on X-Forwarded-Client-Cert (say, anyone whose certificate is web's)
    was decided on what the caller wrote there, while the app gets the sidecar's value (or
    none, for plaintext): plaintext forging web's XFCC got 200 before the fix. Decided on the
    sidecar's own value, as Envoy's RBAC filter sees it (after the connection manager's
    SANITIZE_SET), it means what it says."""
    rule = {
        "Name": "*",
        "Permissions": [
            {
                "Action": "allow",
                "HTTP": {
                    "PathPrefix": "/",
                    "Header": [{"Name": "X-Forwarded-Client-Cert", "Suffix": "/svc/web"}],
                },
            }
        ],
    }
    async with raw_site(rule) as (listener, app, web, xfcc):
        web_uri = xfcc.rsplit("URI=", 1)[1].encode()
        forged = [b"X-Forwarded-Client-Cert: By=x;Hash=00;URI=" + web_uri]
        answer = await exchange(listener.port, get(b"/plain", forged))
        assert status(answer) == 403, (answer, app.received)
        assert app.received == b""
        # web over mTLS: the sidecar's XFCC names web, so the permission allows it.
        assert status(await tls_client(listener.port, web, get(b"/mtls"))) == 200
        assert xfcc_lines(app.received) == [xfcc.encode()]


# ---- 2. one caller's identity never rides on another's request -----------------------------


async def test_an_app_connection_reused_across_callers_carries_only_each_callers_identity() -> None:
    """Pins: the pooled app connection goes from web (mTLS) to a plaintext caller to web
    again; each request carries its own caller's XFCC (none for plaintext), never the
    previous one's."""
    async with raw_site(ALLOW_ANY, ALLOW_WEB) as (listener, app, web, xfcc):
        assert status(await tls_client(listener.port, web, get(b"/m1"))) == 200
        assert status(await exchange(listener.port, get(b"/p1"))) == 200
        assert status(await tls_client(listener.port, web, get(b"/m2"))) == 200
        assert len(app.connections) == 1  # one app connection served all three
        heads = bytes(app.connections[0]).split(b"\r\n\r\n")[:3]
        assert [h.split(b" ")[1] for h in heads] == [b"/m1", b"/p1", b"/m2"]
        assert [xfcc_lines(h) for h in heads] == [[xfcc.encode()], [], [xfcc.encode()]]


# ---- 3. forged XFCC in every shape the parser might let through ----------------------------

_FORGED_SHAPES = {
    "obs-fold": b"X-Other: a\r\n X-Forwarded-Client-Cert: Evil-Value",
    "space-before-colon": b"X-Forwarded-Client-Cert : Evil-Value",
    "tab-in-name": b"X-Forwarded-Client-Cert\t: Evil-Value",
    "bare-lf": b"X-Other: a\nX-Forwarded-Client-Cert: Evil-Value",
    "bare-cr": b"X-Other: a\rX-Forwarded-Client-Cert: Evil-Value",
    "nul-in-value": b"X-Other: a\x00\r\nX-Forwarded-Client-Cert: Evil-Value",
    "trailing-space-value": b"X-Forwarded-Client-Cert: Evil-Value   ",
    "empty-then-another": b"X-Forwarded-Client-Cert:\r\nx-forwarded-client-cert: Evil-Value",
    "underscore": b"X_Forwarded_Client_Cert: Evil-Value",
    "underscore-meshlet": b"X_Meshlet_Retriable: Evil-Value",
}


async def test_forged_xfcc_in_any_shape_is_refused_or_replaced() -> None:
    """Whatever shape a forged XFCC takes, the request is either a 400 the app never sees or
    reaches it with exactly the sidecar's XFCC (none for plaintext), mTLS and plaintext.

    Hole (the `underscore` shape): `X_Forwarded_Client_Cert` is another field name for HTTP,
    and was passed on; but CGI-style servers (WSGI and others) fold `-` and `_` alike into
    `HTTP_X_FORWARDED_CLIENT_CERT`, so the app could read the caller's value for the
    sidecar's. Envoy can drop every underscored field (headers_with_underscores_action); the
    sidecar drops those that spell a field it owns."""
    async with raw_site(ALLOW_ANY, ALLOW_WEB) as (listener, app, web, xfcc):
        for shape, line in _FORGED_SHAPES.items():
            for mtls in (True, False):
                before = len(app.received)
                data = get(b"/" + shape.encode(), [line])
                if mtls:
                    answer = await tls_client(listener.port, web, data)
                else:
                    answer = await exchange(listener.port, data)
                got = app.received[before:]
                assert status(answer) in (200, 400), (shape, answer)
                if status(answer) == 400:
                    assert got == b"", shape
                    continue
                want = [xfcc.encode()] if mtls else []
                assert xfcc_lines(got) == want, (shape, mtls, got)
                assert b"evil-value" not in got.lower(), (shape, mtls, got)


async def test_trailers_of_a_chunked_body_never_reach_the_app() -> None:
    """Pins: llhttp parses trailer fields; the sidecar writes its own last chunk, so a forged
    XFCC or x-meshlet-* field in a trailer reaches the app in no form."""
    async with raw_site(ALLOW_ANY, ALLOW_WEB, marker=b"0\r\n\r\n") as (listener, app, web, xfcc):
        body = (
            b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-Forwarded-Client-Cert\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Forwarded-Client-Cert: By=forged;URI=spiffe://x/svc/admin\r\n"
            b"X-Meshlet-Retriable: any\r\n\r\n"
        )
        assert status(await tls_client(listener.port, web, body)) == 200
        assert status(await exchange(listener.port, body)) == 200
        got = app.received
        assert got.count(b"hello") == 2
        assert b"forged" not in got and b"meshlet" not in got.lower()
        assert xfcc_lines(got) == [xfcc.encode()]


# ---- 4. plaintext (permissive): pipelining, HTTP/2, CONNECT, half-close ---------------------

_PUBLIC_ONLY = {
    "Name": "*",
    "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/public"}}],
}


async def test_plaintext_pipelined_and_other_protocol_requests_are_each_decided() -> None:
    """Pins: plaintext pipelined requests are each decided (a denied one's body, itself a
    request, is discarded), and an HTTP/2 preface, CONNECT and an h2c upgrade to a denied
    path never reach the app."""
    async with raw_site(_PUBLIC_ONLY) as (listener, app, _, _):
        smuggled = b"GET /private/smuggled HTTP/1.1\r\nHost: api\r\n\r\n"
        pipelined = (
            b"GET /public/1 HTTP/1.1\r\nHost: api\r\n\r\n"
            b"POST /private HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n"
            % len(smuggled)
            + smuggled
            + b"GET /public/2 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
        )
        answer = await exchange(listener.port, pipelined)
        assert [status(b"HTTP/1.1 " + a) for a in answer.split(b"HTTP/1.1 ")[1:]] == [
            200,
            403,
            200,
        ], answer
        assert [h.split(b" ")[1] for h in app.received.split(b"\r\n\r\n")[:-1]] == [
            b"/public/1",
            b"/public/2",
        ]
        before = app.received
        for attack in (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            b"CONNECT api:80 HTTP/1.1\r\nHost: api:80\r\n\r\nGET /public HTTP/1.1\r\n\r\n",
            b"GET /private HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ):
            answer = await exchange(listener.port, attack)
            assert status(answer) in (400, 403), (attack, answer)
        assert app.received == before


async def test_a_plaintext_client_that_half_closes_after_connection_close_gets_its_answer() -> None:
    """Hole (availability, permissive): the inbound HTTP listener treated every connection as
    TLS on EOF, so a plaintext client that sent `Connection: close` and shut its side (as
    HTTP/1.0 clients and `nc -N` do) had its transport closed and its request cancelled:
    no answer. mTLS callers cannot half-close at all (asyncio's TLS transport)."""
    async with raw_site(ALLOW_ANY) as (listener, app, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(get(b"/half"))
            writer.write_eof()
            answer = b""
            with contextlib.suppress(TimeoutError, ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
                    answer += chunk
        finally:
            writer.close()
        assert status(answer) == 200, (answer, app.received)
        assert b"GET /half " in app.received


# ---- 5. the TLS side of the first-byte rule --------------------------------------------------


async def test_a_client_hello_in_one_byte_segments_is_mtls_in_permissive_mode() -> None:
    """Pins: the first segment of a ClientHello may be its 0x16 alone; the rest arrives a
    byte at a time. The connection is mTLS (web's XFCC), not plaintext."""
    async with raw_site(ALLOW_WEB) as (listener, app, web, xfcc):
        answer = await tls_client(listener.port, web, get(b"/pieces"), piece=1)
        assert status(answer) == 200, answer
        assert xfcc_lines(app.received) == [xfcc.encode()]
        assert listener.stats.plaintext_connections == 0


async def test_bytes_arriving_with_the_handshake_of_a_refused_peer_are_never_parsed() -> None:
    """Hole (fail-closed): a request that arrives in the same read as the client's last
    handshake flight is held until the handshake ends, then handed to the new connection.
    For a peer the gate refuses (here: its trust domain is not ours), the handover came
    after the refusal: the request was parsed with no peer (so not authorized), counted, and
    made the sidecar dial the app; nothing was written only because the transport was gone."""
    async with raw_site(ALLOW_ANY, ALLOW_WEB, trust_domain="elsewhere.consul") as (
        listener,
        app,
        web,
        _,
    ):
        for _ in range(3):
            assert await tls_client(listener.port, web, get(b"/refused")) == b""
        await asyncio.sleep(0.2)  # a dial the replayed request set off would land by now
        assert listener.stats.peers_refused == 3
        assert app.connections == []
        assert listener.stats.requests == 0


# ---- 6. a tunnel outlives no revocation ------------------------------------------------------


async def test_a_websocket_tunnel_is_closed_once_the_intentions_deny_its_request() -> None:
    """Hole: an upgrade the app accepted became a byte tunnel that no later decision reached:
    after web's intention turned to deny (the sidecar rechecks open connections on every new
    snapshot, as it closes tcp ones), web's tunnel stayed open and the app kept receiving its
    bytes. A tunnel is one request that goes on: it is decided again like a tcp connection."""
    holder = [intentions(ALLOW_WEB)]
    async with raw_site(snapshot=holder, switch=True) as (listener, app, web, _):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", listener.port, ssl=web, server_hostname=""
        )
        try:
            writer.write(
                b"GET /chat HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert status(head) == 101, head
            writer.write(b"frame-while-allowed")
            await writer.drain()
            for _ in range(200):
                if b"frame-while-allowed" in app.received:
                    break
                await asyncio.sleep(0.01)
            assert b"frame-while-allowed" in app.received

            holder[0] = intentions({"Name": "web", "Action": "deny"})
            assert listener.recheck() == 1
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                writer.write(b"frame-after-deny")
                await writer.drain()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            assert b"frame-after-deny" not in app.received
            assert listener.stats.connections_revoked == 1
        finally:
            writer.close()


# ---- 7. strict again, while the listener is replaced -----------------------------------------


async def test_plaintext_on_a_replaced_listener_ends_when_the_mode_turns_strict() -> None:
    """Hole: a reload that turns MutualTLSMode strict and changes the inbound otherwise too
    (here the app port) replaces the listener; the old one drained its connections for
    `drain_grace` in the mode it had, so an open plaintext connection kept reaching the app
    after strict was applied (its bytes were relayed). Every inbound listener still holding
    connections follows the service's mode now."""
    async with dev_mesh() as mesh:
        server, app_port, app = await start_app()
        api_tls = await mesh.tls("api")
        snapshot = intentions(ALLOW_ANY)
        api = Sidecar[tuple[Target, ...]](
            api_tls,
            intentions_authorizers(lambda: snapshot, Identity("api")),
            endpoints=lambda up: None,
            targets=lambda t: t,
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        permissive = InboundSpec(
            "tcp",
            "127.0.0.1",
            port,
            "127.0.0.1",
            app_port,
            api_tls.material.leaf.service_uri,
            mutual_tls_mode="permissive",
        )
        writer: asyncio.StreamWriter | None = None
        try:
            await api.apply(SidecarSpec(permissive, drain_grace=30.0))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), WAIT) == b"before"

            # Strict, and another app address: the listener is replaced, not changed in place.
            moved = dataclasses.replace(permissive, mutual_tls_mode="strict", app_host="127.0.0.2")
            changes = await api.apply(SidecarSpec(moved, drain_grace=30.0))
            assert changes.replace == ((permissive, moved),)
            with contextlib.suppress(ConnectionError):
                writer.write(b"after")
                await writer.drain()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            assert b"after" not in app.received
        finally:
            if writer is not None:
                writer.close()
            await api.close(grace=0)
            server.close()


async def test_a_plaintext_request_cut_by_strict_leaves_no_app_connection_half_used() -> None:
    """Pins: a plaintext POST whose head and part of its body reached the app when the mode
    turns strict is cut, and its app connection is closed, not pooled: the next caller's
    request starts on a fresh connection instead of completing the cut body (where the app
    would read it under the plaintext request, or parse what follows as a request of its
    own)."""
    # The app answers only requests carrying an XFCC: the plaintext POST stays in flight.
    marker = b"x-forwarded-client-cert"
    async with raw_site(ALLOW_ANY, ALLOW_WEB, marker=marker) as (listener, app, web, xfcc):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 100\r\n\r\n0123456789"
            )
            for _ in range(500):
                if b"0123456789" in app.received:
                    break
                await asyncio.sleep(0.01)
            assert b"0123456789" in app.received
            gate = listener.inbound_gate
            gate.permissive = False
            assert listener.recheck() == 1
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
        finally:
            writer.close()
        assert status(await tls_client(listener.port, web, get(b"/next"))) == 200
        assert len(app.connections) == 2
        assert bytes(app.connections[1]).startswith(b"GET /next HTTP/1.1\r\n")
        assert xfcc_lines(bytes(app.connections[1])) == [xfcc.encode()]


# ---- 8. pipelining as a memory amplifier -----------------------------------------------------


async def test_pipelined_requests_ahead_of_their_answers_are_bounded() -> None:
    """Hole (resource exhaustion, no certificate needed in permissive mode): a read full of
    tiny pipelined requests was parsed whole while the first waited on the app, each one
    authorized and queued with its rewritten head: 62 KB of requests held 2,300 exchanges
    (about 1.1 MB of heap, 18 times the bytes sent) per connection. At most
    `max_pipelined` are now taken ahead of their answers; the connection closes after the
    last one taken (RFC 9112 §9.3.2: a client retries unanswered pipelined requests)."""
    async with raw_site(ALLOW_ANY) as (listener, app, _, _):
        limit = listener.limits.max_pipelined
        n = 2300
        answer = await exchange(listener.port, b"GET /p HTTP/1.1\r\nHost: api\r\n\r\n" * n)
        answered = answer.count(b"HTTP/1.1 200 OK\r\n")
        assert listener.stats.requests <= limit + 1
        assert 1 <= answered <= limit + 1, answered
        assert answer.count(b"connection: close\r\n") == 1
        assert app.received.count(b"GET /p HTTP/1.1\r\n") == answered


# ---- 9. Connection naming the fields the sidecar itself relies on -----------------------------


async def test_connection_cannot_remove_host_or_the_request_id() -> None:
    """Hole: `Connection: host` removed the Host field from what was forwarded after the
    sidecar had decided on it, so the app got an HTTP/1.1 request with no Host at all (and
    `Connection: x-request-id` one without the X-Request-Id the docs promise). RFC 9110
    §7.6.1 has Connection name hop-by-hop options; Host is end-to-end, so is the request id
    the sidecar vouches for: both stay."""
    async with raw_site(ALLOW_WEB) as (listener, app, web, _):
        head = get(b"/c", [b"X-Request-Id: abc", b"Connection: host, x-request-id, keep-alive"])
        assert status(await tls_client(listener.port, web, head)) == 200
        got = app.received
        hosts = [line for line in got.split(b"\r\n") if line.lower().startswith(b"host:")]
        ids = [line for line in got.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        assert hosts == [b"Host: api"], got
        assert ids == [b"X-Request-Id: abc"], got


# ---- 10. h2c: HTTP/2 requests inside a tunnel ------------------------------------------------


async def test_an_h2c_upgrade_cannot_open_a_tunnel_for_unauthorized_http2_requests() -> None:
    """Hole: an h2c upgrade on an allowed path was forwarded like a WebSocket one, and an app
    that speaks h2c answered 101: from then on the client's HTTP/2 requests (any path) went
    through the tunnel, none of them authorized. Envoy drops `Upgrade: h2c` and answers the
    request as HTTP/1.1 (envoyproxy/envoy#7981); so does the sidecar now, and what the client
    sends next is parsed and authorized as HTTP/1.1 (the preface is a 400)."""
    async with raw_site(_PUBLIC_ONLY, switch=True) as (listener, app, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(
                b"GET /public HTTP/1.1\r\nHost: api\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            with contextlib.suppress(ConnectionError):
                # What an h2c client sends after the 101: the preface, then a request (its
                # HPACK-literal path spelled out here so the app's bytes can be searched).
                writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"HEADERS :path /private/x")
                await writer.drain()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(), WAIT)
        finally:
            writer.close()
        assert b"/private" not in app.received
        assert status(head) == 200, head
        assert b"upgrade:" not in app.received.lower()
        assert listener.stats.requests == 1


# ---- again on uvloop, the loop the sidecar runs on (its transports are its own) --------------

ON_UVLOOP = [
    test_bytes_arriving_with_the_handshake_of_a_refused_peer_are_never_parsed,
    test_a_plaintext_client_that_half_closes_after_connection_close_gets_its_answer,
    test_a_client_hello_in_one_byte_segments_is_mtls_in_permissive_mode,
    test_a_websocket_tunnel_is_closed_once_the_intentions_deny_its_request,
    test_pipelined_requests_ahead_of_their_answers_are_bounded,
    test_forged_xfcc_in_any_shape_is_refused_or_replaced,
    test_an_h2c_upgrade_cannot_open_a_tunnel_for_unauthorized_http2_requests,
    test_a_forged_xfcc_cannot_satisfy_a_header_permission_on_it,
]


@pytest.mark.parametrize("scenario", ON_UVLOOP, ids=lambda f: f.__name__[5:45])
def test_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    run("uvloop", scenario)
