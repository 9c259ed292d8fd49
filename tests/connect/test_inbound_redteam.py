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
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from connect.authz import intentions_authorizers
from connect.http1 import InboundHTTP
from connect.inbound import InboundGate
from connect.peers import service_peers
from connect.stats import ProxyStats
from intentions.engine import Identity
from tests.connect.devstack_tls import dev_mesh
from tests.connect.test_permissive import (
    WAIT,
    exchange,
    get,
    intentions,
    status,
)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# ---- an app that records raw bytes per connection ------------------------------------------


@dataclass
class RawApp:
    """Records every byte per connection and answers `200 ok` each time a received message
    ends (`marker` seen again); counts the connections it accepted."""

    server: asyncio.Server
    port: int
    marker: bytes
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
        while self.buf.count(self.app.marker) > self.answered:
            self.answered += 1
            self.transport.write(OK)


async def start_raw_app(marker: bytes = b"\r\n\r\n") -> RawApp:
    holder: list[RawApp] = []
    server = await asyncio.get_running_loop().create_server(
        lambda: _RawConn(holder[0]), "127.0.0.1", 0
    )
    app = RawApp(server, server.sockets[0].getsockname()[1], marker)
    holder.append(app)
    return app


@contextlib.asynccontextmanager
async def raw_site(
    *sources: Mapping[str, Any],
    marker: bytes = b"\r\n\r\n",
    trust_domain: str | None = None,
    permissive: bool = True,
) -> AsyncIterator[tuple[InboundHTTP, RawApp, ssl.SSLContext, str]]:
    """api's inbound HTTP listener in front of a RawApp; yields (listener, app, web's client
    context, the XFCC value web's requests must carry). `trust_domain` overrides the one peers
    are checked against (every mesh peer is then refused)."""
    async with dev_mesh() as mesh:
        api = await mesh.tls("api")
        web = await mesh.tls("web")
        holder = [intentions(*sources)]
        _, request = intentions_authorizers(lambda: holder[0], Identity("api"))
        domain = trust_domain
        gate = InboundGate(
            api.listener_context(),
            service_peers(lambda: domain or api.trust_domain),
            ProxyStats(),
            current_ssl=api.server,
        )
        gate.permissive = permissive
        app = await start_raw_app(marker)
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
        with contextlib.suppress(TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
                incoming.write(chunk)
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    while plain := tls.read(65536):
                        got += plain
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
