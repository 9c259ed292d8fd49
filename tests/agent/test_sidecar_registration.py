"""The sidecar reads its own registration (Proxy.Config: tracing, local_*_timeout_ms) from the
local agent, `GET /v1/agent/service/<proxy id>`, with a token that may read that service and
nothing else, against devstack with ACLs on and deny by default, over real HTTP.

On the original code (a watch of /v1/catalog/service/api-sidecar-proxy) the first test failed:
the catalog filters each instance by node:read too, so the token's answer was empty and the
registration's settings never applied (local_app stayed at its defaults)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent.config import parse
from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.sidecar import Sidecar
from agent.watch import WatchSettings
from agent.watches import AnswerRejected
from connect.local_app import DEFAULT_LOCAL_APP
from devstack.config import DevConfig
from devstack.server import DevServer

ROOT = "5d0c8a1e-3f7b-4c2a-9e61-0b8d2f4a7c33"
ONLY_ITS_PROXY = 'service "api-sidecar-proxy" { policy = "read" }'


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig(acl_initial_management_token=ROOT, default_policy="deny")


@pytest.fixture
async def root(dev: DevServer) -> AsyncIterator[ConsulClient]:
    async with ConsulClient(ConsulConfig(address=dev.http_addr, token=ROOT)) as client:
        yield client


async def register_proxy(root: ConsulClient, config: dict[str, Any]) -> None:
    await root.agent.register_service(
        {
            "Name": "api-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "api", "Config": config},
        }
    )


def sidecar() -> Sidecar:
    cfg = parse({"service": {"name": "api", "port": 8080}, "sidecar": {"port": 21000}}, {})
    return Sidecar(cfg, {}, WatchSettings, rng=random.Random(1))


async def test_registration_read_with_service_read_only(dev: DevServer, root: ConsulClient) -> None:
    await register_proxy(
        root,
        {
            "local_request_timeout_ms": 7000,
            "tracing": {"otlp_endpoint": "http://127.0.0.1:9/v1/traces", "sampling_percent": 25},
        },
    )
    secret = await make_token(dev, ONLY_ITS_PROXY)
    async with ConsulClient(ConsulConfig(address=dev.http_addr, token=secret)) as consul:
        side = sidecar()
        side._consul = consul
        await side.registration_watch.step(0, 5.0)
        await side._apply_tracing()
        await side._apply_local_app()
    assert side.local_app.request_timeout == 7.0
    assert side.tracing is not None and side.tracing.sampling_percent == 25.0


async def test_absent_then_refused_keeps_what_is_in_force(
    dev: DevServer, root: ConsulClient
) -> None:
    side = sidecar()
    side._consul = root
    index = await side.registration_watch.step(0, 5.0)  # not registered: no service settings
    await side._apply_local_app()
    assert side.local_app == DEFAULT_LOCAL_APP
    await register_proxy(root, {"local_request_timeout_ms": 3000})
    index = await side.registration_watch.step(0, 5.0)
    await side._apply_local_app()
    assert side.local_app.request_timeout == 3.0
    await register_proxy(root, {"local_request_timeout_ms": "soon"})
    with pytest.raises(AnswerRejected, match="local_request_timeout_ms"):
        await side.registration_watch.step(index, 5.0)
    await side._apply_local_app()
    assert side.local_app.request_timeout == 3.0


async def make_token(dev: DevServer, rules: str) -> str:
    """`consul acl policy create` + `consul acl token create`, over devstack's HTTP API."""
    headers = {"X-Consul-Token": ROOT}
    base = dev.http_url
    async with aiohttp.ClientSession() as session:
        async with session.put(
            f"{base}/v1/acl/policy", json={"Name": "p", "Rules": rules}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
        async with session.put(
            f"{base}/v1/acl/token", json={"Policies": [{"Name": "p"}]}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            token: dict[str, Any] = await resp.json()
    return str(token["SecretID"])
