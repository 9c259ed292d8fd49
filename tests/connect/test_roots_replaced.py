"""The CA's roots replaced under running rotators (issue 10, item 8): a new trust domain, the
old root dropped, nothing cross-signed, and a shorter LeafCertTTL. devstack's agent keeps serving
the old leaves for `DELAY` seconds (Consul's re-signing jitter, fixed), as Consul's agent does.

Before the fix a rotator published the new bundle with its old leaf, then ignored the re-signed
leaf because it expires earlier ("returned an older leaf; ignored") and kept the old one for
good: every peer refused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.identity import parse_service
from connect.leaf import Material
from connect.leaf_chain import chain_problem
from connect.leaf_rotation import LeafRotator
from connect.tls import DynamicTLS
from devstack.config import DevConfig
from devstack.server import DevServer
from tests.conftest import Http
from tests.connect.identity_support import Conn, EchoService, Running

DELAY = 3.0
NEW_CLUSTER = "0b5e0e1e-aaaa-bbbb-cccc-123456789abc"
NEW_TD = f"{NEW_CLUSTER}.consul"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
async def replace_dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevConfig(ca_change_delay=DELAY)) as server:
        yield server


@pytest.fixture
async def replace_http(replace_dev: DevServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, replace_dev.http_url)


@pytest.fixture
async def rotators(replace_dev: DevServer) -> AsyncIterator[dict[str, Running]]:
    async with ConsulClient(ConsulConfig(address=replace_dev.http_addr, timeout=5.0)) as consul:
        running: dict[str, Running] = {}
        for service in ("api", "web"):
            rotator = LeafRotator(consul_leaf_source(consul, service), consul_roots_source(consul))
            task = asyncio.create_task(rotator.run())
            first = await asyncio.wait_for(rotator.ready(), 20)
            tls = DynamicTLS(first)
            generations = [first]

            async def follow(rotator: LeafRotator, tls: DynamicTLS, gens: list[Material]) -> None:
                while True:
                    material = await rotator.changed(tls.material.generation)
                    tls.update(material)
                    gens.append(material)

            follower = asyncio.create_task(follow(rotator, tls, generations))
            running[service] = Running(rotator, tls, task, follower, generations)
        yield running
        for run in running.values():
            for t in (run.follower, run.task):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


async def replace_roots(http: Http) -> None:
    status, body, _ = await http.put(
        "/v1/connect/ca/configuration",
        json={
            "Provider": "consul",
            "ClusterID": NEW_CLUSTER,
            "ForceWithoutCrossSigning": True,
            "Config": {"LeafCertTTL": "1h"},
        },
    )
    assert status == 200, body


async def _until_chaining(run: Running) -> Material:
    while True:
        material = run.tls.material
        if (
            parse_service(material.leaf.service_uri).trust_domain == NEW_TD
            and material.bundle.trust_domain == NEW_TD
            and not chain_problem(material.leaf, material.bundle, _now())
        ):
            return material
        await run.rotator.changed(material.generation)


async def test_devstack_replaces_the_roots_with_a_new_trust_domain(
    replace_http: Http, replace_dev: DevServer
) -> None:
    _, before, _ = await replace_http.get("/v1/agent/connect/ca/leaf/web")
    await replace_roots(replace_http)
    _, roots, _ = await replace_http.get("/v1/agent/connect/ca/roots")
    assert roots["TrustDomain"] == NEW_TD
    [root] = roots["Roots"]  # the old root is gone, nothing cross-signed
    assert root["Active"] and root["IntermediateCerts"] is None
    # The agent keeps the old leaf until its re-signing delay is over, even when asked
    # without an index; a query parked on the old leaf returns the re-signed one.
    _, same, _ = await replace_http.get("/v1/agent/connect/ca/leaf/web")
    assert same["SerialNumber"] == before["SerialNumber"]
    _, fresh, _ = await replace_http.get(
        "/v1/agent/connect/ca/leaf/web",
        params={"index": str(before["ModifyIndex"]), "wait": "30s"},
    )
    assert fresh["ServiceURI"].startswith(f"spiffe://{NEW_TD}/")
    assert fresh["ModifyIndex"] > before["ModifyIndex"]


async def test_devstack_rotates_without_cross_signing_when_forced(replace_http: Http) -> None:
    _, before, _ = await replace_http.get("/v1/agent/connect/ca/roots")
    status, body, _ = await replace_http.put(
        "/v1/connect/ca/configuration",
        json={
            "Provider": "consul",
            "ForceWithoutCrossSigning": True,
            "Config": {"PrivateKeyBits": 384},
        },
    )
    assert status == 200, body
    _, roots, _ = await replace_http.get("/v1/agent/connect/ca/roots")
    assert roots["TrustDomain"] == before["TrustDomain"]
    old, new = roots["Roots"]  # Consul keeps the old root listed, inactive
    assert old["ID"] == before["ActiveRootID"] and not old["Active"]
    assert new["Active"] and new["IntermediateCerts"] is None


async def test_a_leaf_that_no_longer_chains_is_replaced(
    replace_http: Http, rotators: dict[str, Running]
) -> None:
    api, web = rotators["api"], rotators["web"]
    old_leaf = web.tls.material.leaf
    async with EchoService(api.tls) as svc:
        conn = await Conn.open(svc.port, web.tls.client())
        await conn.request()
        await conn.close()

        await replace_roots(replace_http)
        for run in (api, web):
            final = await asyncio.wait_for(_until_chaining(run), 60)
            assert final.leaf.serial != old_leaf.serial
            assert not run.rotator.problem()
            # Nothing cross-signed: the new bundle was published with the old leaf first, and
            # the old roots and trust domain still trusted for a grace (connect.ca_switch), so
            # peers that switch later are not refused; the old leaf chained throughout.
            kept = [
                m
                for m in run.generations
                if m.bundle.trust_domain == NEW_TD and m.leaf.service_uri.find(NEW_TD) < 0
            ]
            assert kept, [m.leaf.service_uri for m in run.generations]
            assert all(not chain_problem(m.leaf, m.bundle, _now()) for m in kept)
            assert all(m.bundle.grace_until > 0 for m in kept)
            assert run.rotator.chain_breaks == 0
            assert run.rotator.ca_switches == 1

        # Traffic flows again with the new leaves on both sides.
        conn = await Conn.open(svc.port, web.tls.client())
        try:
            await conn.request()
        finally:
            await conn.close()
    assert parse_service(svc.peers[-1].uri).trust_domain == NEW_TD
