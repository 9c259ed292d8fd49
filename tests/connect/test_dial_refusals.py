"""Failed dials counted per upstream and kind (issue 10, item 8), on the L4 proxy classes over
real sockets and real mTLS: the upstream refuses our leaf (the reported case: our leaf is from
roots it no longer trusts), we refuse the upstream's, or the upstream is another service."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4
from connect.seams import PeerCache
from connect.stats import ProxyStats
from tests.connect.proxy_test_ca import CAPeerVerifier, Leaf, ProxyTestCA, spiffe
from tests.connect.proxy_test_servers import AppStats, start_app


@dataclass
class Dialer:
    upstream: Upstream
    outbound: OutboundL4
    inbound_stats: ProxyStats
    app: AppStats

    async def exchange(self) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.outbound.port)
        writer.write(b"hello")
        try:
            # The app echoes; a refused dial closes the connection with nothing.
            return await reader.read(5)
        except ConnectionResetError:
            return b""
        finally:
            writer.close()


def _client(trusted: ProxyTestCA, leaf: Leaf) -> ssl.SSLContext:
    ctx = trusted.client_context(None)
    ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
    return ctx


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[object]:
    closers: list[object] = []

    async def build(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, td: str) -> Dialer:
        app_server, app_port, app_stats = await start_app()
        stats = ProxyStats()
        gate = InboundGate(server_ctx, PeerCache(CAPeerVerifier(td)), stats)
        inbound = InboundL4(gate, "127.0.0.1", app_port)
        await inbound.start()
        upstream = Upstream(
            name="api",
            endpoints=fixed_endpoints(
                compile_balancer([Target("n1/api", "127.0.0.1", inbound.port)], BalancerConfig())
            ),
            client_ssl=lambda: client_ctx,
            verify_peer=PeerCache(CAPeerVerifier(td)),
            expected_service="api",
            rng=random.Random(1),
        )
        outbound = OutboundL4(upstream)
        await outbound.start()
        closers.extend([outbound, inbound, app_server])
        return Dialer(upstream, outbound, stats, app_stats)

    yield build
    for c in closers:
        if isinstance(c, asyncio.Server):
            c.close()
        else:
            await c.close(grace=0)  # type: ignore[attr-defined]


async def test_an_upstream_that_refuses_our_leaf_is_counted_as_peer_refused(
    tmp_path: Path, make: object
) -> None:
    """Our leaf is from the old roots; the upstream trusts only the new ones. Under TLS 1.3
    our handshake completes before it checks our certificate, so its refusal is a close."""
    old, new = ProxyTestCA(tmp_path, "old"), ProxyTestCA(tmp_path, "new")
    dialer: Dialer = await make(  # type: ignore[operator]
        new.server_context(new.leaf("api")), _client(new, old.leaf("web")), new.trust_domain
    )
    assert await dialer.exchange() == b""
    assert dialer.upstream.refusal_counts() == {"peer_refused": 1}
    assert dialer.inbound_stats.handshake_failures.unknown_ca == 1
    assert dialer.app.accepted == 0


async def test_an_upstream_whose_leaf_we_do_not_trust_is_counted(
    tmp_path: Path, make: object
) -> None:
    old, new = ProxyTestCA(tmp_path, "old"), ProxyTestCA(tmp_path, "new")
    server = old.server_context(old.leaf("api"))
    server.load_verify_locations(new.ca_path)
    dialer: Dialer = await make(  # type: ignore[operator]
        server, _client(new, new.leaf("web")), new.trust_domain
    )
    assert await dialer.exchange() == b""
    assert dialer.upstream.refusal_counts() == {"server_unknown_ca": 1}
    assert dialer.app.accepted == 0


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        (spiffe("web"), "identity_mismatch"),
        (spiffe("api", "old-domain.consul"), "identity_refused"),
    ],
)
async def test_an_upstream_with_another_identity_is_counted(
    tmp_path: Path, make: object, uri: str, kind: str
) -> None:
    ca = ProxyTestCA(tmp_path)
    dialer: Dialer = await make(  # type: ignore[operator]
        ca.server_context(ca.leaf("api", uri=uri)), _client(ca, ca.leaf("web")), ca.trust_domain
    )
    assert await dialer.exchange() == b""
    assert dialer.upstream.refusal_counts() == {kind: 1}
    assert dialer.app.accepted == 0


async def test_accepted_dials_count_nothing(tmp_path: Path, make: object) -> None:
    ca = ProxyTestCA(tmp_path)
    dialer: Dialer = await make(  # type: ignore[operator]
        ca.server_context(ca.leaf("api")), _client(ca, ca.leaf("web")), ca.trust_domain
    )
    for _ in range(3):
        assert await dialer.exchange() == b"hello"
    assert dialer.upstream.refusal_counts() == {}
