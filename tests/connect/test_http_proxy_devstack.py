"""The HTTP and L4 sidecar pairs with the real certificate path: leaves from devstack's
Connect CA over Consul's HTTP API, contexts from connect.tls, peers checked by
connect.identity, intentions from the engine. (The other proxy tests use a local test CA.)"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.authz import intentions_authorizers
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4
from connect.leaf import Material
from connect.peers import service_peers
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from devstack.server import DevServer
from intentions.engine import Identity
from tests.connect.proxy_test_servers import start_app as start_tcp_app
from tests.connect.test_http_proxy import INTENTIONS, start_app


@dataclass
class Mesh:
    api: DynamicTLS
    web: DynamicTLS


@pytest.fixture
async def mesh_tls(dev: DevServer) -> AsyncIterator[Mesh]:
    async with ConsulClient(ConsulConfig(address=dev.http_addr, timeout=5.0)) as consul:
        bundle = await consul_roots_source(consul).roots(0)
        tls = {}
        for service in ("api", "web"):
            leaf = await consul_leaf_source(consul, service).fetch(None, bundle)
            tls[service] = DynamicTLS(Material(leaf, bundle, 1))
        yield Mesh(tls["api"], tls["web"])


async def test_http_pair_with_devstack_leaves(mesh_tls: Mesh) -> None:
    app = await start_app("api-0")
    trust_domain = mesh_tls.api.trust_domain
    _, request = intentions_authorizers(lambda: INTENTIONS, Identity("api"))
    gate = InboundGate(
        mesh_tls.api.listener_context(), service_peers(lambda: trust_domain), ProxyStats()
    )
    api_uri = mesh_tls.api.material.leaf.service_uri
    inbound = InboundHTTP(gate, "127.0.0.1", app.port, authorize=request, local_uri=api_uri)
    await inbound.start()
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n1/api", "127.0.0.1", inbound.port)], BalancerConfig())
        ),
        client_ssl=mesh_tls.web.client,
        verify_peer=service_peers(lambda: trust_domain),
        expected_service="api",
        rng=random.Random(3),
    )
    outbound = OutboundHTTP(upstream)
    await outbound.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{outbound.port}"
            async with session.get(url + "/public/ok") as resp:
                assert resp.status == 200
            async with session.get(url + "/private/no") as resp:
                assert resp.status == 403
                assert await resp.text() == "RBAC: access denied"
        seen = app.seen[-1]
        web_der = next(iter(gate.peers._cache))
        web_uri = mesh_tls.web.material.leaf.service_uri
        assert seen["x-forwarded-client-cert"] == (
            f"By={api_uri};Hash={hashlib.sha256(web_der).hexdigest()};URI={web_uri}"
        )
    finally:
        await outbound.close(grace=0)
        await inbound.close(grace=0)
        await app.runner.cleanup()


async def test_l4_pair_with_devstack_leaves_and_a_wrong_identity(mesh_tls: Mesh) -> None:
    server, app_port, app = await start_tcp_app()
    trust_domain = mesh_tls.api.trust_domain
    gate = InboundGate(
        mesh_tls.api.listener_context(), service_peers(lambda: trust_domain), ProxyStats()
    )
    inbound = InboundL4(gate, "127.0.0.1", app_port)
    await inbound.start()
    outbounds = []
    for expected in ("api", "db"):
        upstream = Upstream(
            name=expected,
            endpoints=fixed_endpoints(
                compile_balancer([Target("n1/x", "127.0.0.1", inbound.port)], BalancerConfig())
            ),
            client_ssl=mesh_tls.web.client,
            verify_peer=service_peers(lambda: trust_domain),
            expected_service=expected,
        )
        outbound = OutboundL4(upstream)
        await outbound.start()
        outbounds.append(outbound)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", outbounds[0].port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        # Dialing "db" reaches api's sidecar: the client sidecar refuses the server.
        reader, writer = await asyncio.open_connection("127.0.0.1", outbounds[1].port)
        writer.write(b"secret")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        assert outbounds[1].stats.no_endpoint == 1
        assert bytes(app.received) == b"hello"
    finally:
        for o in outbounds:
            await o.close(grace=0)
        await inbound.close(grace=0)
        server.close()
        await server.wait_closed()
