"""The inbound gate's per-certificate identity cache (connect.peers.service_peers) never serves
an answer made for another trust domain: once the mesh's trust domain changes, a client leaf of
the old one is refused on its next connection, as a fresh check would, over real mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from connect.inbound import InboundGate
from connect.l4 import InboundL4
from connect.peers import service_peers
from connect.seams import Peer
from connect.stats import ProxyStats
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.proxy_test_servers import start_app


@dataclass(frozen=True)
class _Allow:
    allowed: bool = True
    reason: str = "test"


async def _echo(port: int, client: ssl.SSLContext, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    try:
        writer.write(payload)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        return b""
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def test_a_trust_domain_change_is_not_served_from_the_identity_cache(
    tmp_path: Path,
) -> None:
    ca = ProxyTestCA(tmp_path)
    domain = [ca.trust_domain]
    seen: list[Peer] = []

    def authorize(peer: Peer) -> _Allow:
        seen.append(peer)
        return _Allow()

    stats = ProxyStats()
    gate = InboundGate(
        ca.server_context(ca.leaf("api")),
        service_peers(lambda: domain[0]),
        stats,
        authorize=authorize,
    )
    app_server, app_port, app = await start_app()
    inbound = InboundL4(gate, "127.0.0.1", app_port)
    await inbound.start()
    client = ca.client_context(ca.leaf("web"))  # one leaf: one DER, one cache entry
    try:
        assert await _echo(inbound.port, client, b"one") == b"one"
        assert len(seen) == 1 and stats.peers_refused == 0
        domain[0] = "another-mesh.consul"  # the mesh's roots now name another trust domain
        assert await _echo(inbound.port, client, b"two") == b""
        assert stats.peers_refused == 1
        assert len(seen) == 1
        assert bytes(app.received) == b"one"
        domain[0] = ca.trust_domain  # and back: accepted again
        assert await _echo(inbound.port, client, b"three") == b"three"
    finally:
        await inbound.close(grace=0)
        app_server.close()
        await app_server.wait_closed()
