"""agent/routing.py against the real devstack over HTTP: the locally compiled chain equals the
one devstack serves at /v1/discovery-chain, the caller's UpstreamConfig reaches the clusters,
and a chain that cannot be applied is rejected whole with the previous snapshot kept."""

from __future__ import annotations

import asyncio
from typing import Any

from agent.consul import CheckDefinition, ConsulClient, ProxyConfig, ServiceRegistration
from agent.routing import (
    ChainWatch,
    compile_upstream,
    decode_entries,
    hold_routing_after_reset,
    upstream_config,
)
from agent.watches import WatchSettings
from connect.chain_routes import RoutingSnapshot
from connect.cluster import Limits
from connect.latest import Latest
from traffic.chain import CompileRequest, compile_chain

SETTINGS = WatchSettings(wait=1.0, retry_initial=0.05, retry_max=0.2)
KINDS = ("service-router", "service-splitter", "service-resolver", "service-defaults")


async def _put(consul: ConsulClient, *entries: dict[str, Any]) -> None:
    for entry in entries:
        assert await consul.config_entries.put(entry)


async def _bodies(consul: ConsulClient) -> dict[str, Any]:
    out = {}
    for kind in (*KINDS, "proxy-defaults"):
        out[kind] = (await consul.config_entries.list(kind)).value
    return out


CANARY = (
    {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
    {
        "Kind": "service-defaults",
        "Name": "web",
        "UpstreamConfig": {
            "Defaults": {"ConnectTimeoutMs": 1500, "Limits": {"MaxConnections": 9}},
            "Overrides": [{"Name": "api", "Limits": {"MaxPendingRequests": 4}}],
        },
    },
    {
        "Kind": "service-resolver",
        "Name": "api",
        "Subsets": {
            "v1": {"Filter": 'Service.Meta.version == "v1"'},
            "v2": {"Filter": 'Service.Meta.version == "v2"'},
        },
    },
    {
        "Kind": "service-splitter",
        "Name": "api",
        "Splits": [
            {"Weight": 90, "ServiceSubset": "v1"},
            {"Weight": 10, "ServiceSubset": "v2"},
        ],
    },
)


async def test_local_compile_equals_the_chain_devstack_serves(consul: ConsulClient) -> None:
    await _put(consul, *CANARY)
    entries = decode_entries(await _bodies(consul))
    served = (await consul.discovery_chain.get("api")).value
    roots = (await consul.connect.ca_roots()).value
    local = compile_chain(CompileRequest("api", roots.trust_domain), entries).to_json()
    assert dict(served) == local
    routing, default = compile_upstream(
        entries, "web", "api", trust_domain=roots.trust_domain, datacenter="dc1"
    )
    assert not default and routing.protocol == "http"
    v1 = routing.targets["v1.api.default.default.dc1"]
    # Override merged over Defaults; ConnectTimeoutMs from Defaults as a compile override.
    assert v1.limits == Limits(max_connections=9, max_pending_requests=4)
    assert v1.connect_timeout == 1.5
    cfg = upstream_config(entries, "web", "api")
    assert cfg is not None and cfg.connect_timeout_ms == 1500


async def _next(latest: Latest[RoutingSnapshot | None], version: int) -> RoutingSnapshot:
    _, value = await asyncio.wait_for(latest.changed(version), 10)
    assert value is not None
    return value


async def test_chain_watch_publishes_and_rejects_whole(consul: ConsulClient) -> None:
    await _put(consul, *CANARY)
    chains = ChainWatch(consul, "web", lambda: SETTINGS)
    latest = chains.upstream("api")
    task = asyncio.create_task(chains.run())
    try:
        first = await _next(latest, 0)
        assert {d.cluster for d in first.routing.table.default.destinations} == {
            "v1.api.default.default.dc1",
            "v2.api.default.default.dc1",
        }
        assert set(first.endpoints) == {"v1.api.default.default.dc1", "v2.api.default.default.dc1"}
        assert chains.protocol("api") == "http"
        version = latest.version
        # Consul accepts any Meta; meshlet's proxy refuses a malformed meshlet.io route key
        # (a fault it cannot apply) rather than route without it.
        await _put(
            consul,
            {
                "Kind": "service-router",
                "Name": "api",
                "Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}}],
                "Meta": {"meshlet.io/route.0.fault.abort-status": "99"},
            },
        )
        for _ in range(200):
            if chains.upstreams["api"].error:
                break
            await asyncio.sleep(0.02)
        state = chains.status()["upstreams"]["api"]
        assert "fault.abort-status" in state["error"] and state["rejected"] == 1
        assert chains.rejected_total == 1
        assert latest.version == version and latest.get() is first  # the old one stands
        # A good chain again replaces it.
        assert await consul.config_entries.delete("service-router", "api")
        again = await _next(latest, version)
        assert again.routing.table == first.routing.table
        assert chains.status()["upstreams"]["api"]["error"] == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _proxy(service: str, i: int, version: str) -> dict[str, Any]:
    return {
        "Node": f"node-{i}",
        "Address": f"10.0.0.{i}",
        "Service": {
            "ID": f"{service}-{i}-sidecar-proxy",
            "Service": f"{service}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Meta": {"version": version},
            "Proxy": {"DestinationServiceName": service},
        },
    }


async def test_a_target_whose_instances_change_republishes_only_its_upstreams(
    consul: ConsulClient,
) -> None:
    db = {"Kind": "service-resolver", "Name": "db", "ConnectTimeout": "3s"}
    await _put(consul, *CANARY, db)
    await consul.catalog.register(_proxy("api", 1, "v1"))
    await consul.catalog.register(_proxy("db", 2, "v1"))
    chains = ChainWatch(consul, "web", lambda: SETTINGS)
    api, other = chains.upstream("api"), chains.upstream("db")
    task = asyncio.create_task(chains.run())
    try:
        await _next(api, 0)
        for _ in range(500):  # both upstreams routed, api's v1 instance in (bounded wait)
            snap = api.get()
            if other.get() is not None and snap and snap.endpoints["v1.api.default.default.dc1"]:
                break
            await asyncio.sleep(0.02)
        first, db_first, db_version = api.get(), other.get(), other.version
        assert first is not None and db_first is not None
        await consul.catalog.register(_proxy("api", 3, "v2"))
        again = await _next(api, api.version)
        v1, v2 = "v1.api.default.default.dc1", "v2.api.default.default.dc1"
        assert [t.host for t in again.endpoints[v2]] == ["10.0.0.3"]
        # The chain was not compiled again, the unchanged target kept its very endpoints, and
        # the upstream that does not route to the changed target was not republished.
        assert again.routing is first.routing
        assert again.endpoints[v1] is first.endpoints[v1]
        assert other.version == db_version and other.get() is db_first
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _instance(i: int, version: str) -> ServiceRegistration:
    return ServiceRegistration(
        name="api-sidecar-proxy",
        id=f"api-{i}-sidecar-proxy",
        port=21000 + i,
        kind="connect-proxy",
        meta={"version": version},
        proxy=ProxyConfig(destination_service_name="api", local_service_port=8000 + i),
        checks=(CheckDefinition(check_id=f"api-{i}-ready", ttl="10m", status="passing"),),
    )


async def test_only_passing_false_uses_warning_instances_never_critical(
    consul: ConsulClient,
) -> None:
    """Consul's rule (service-resolver reference, `OnlyPassing`; xds endpoints.go
    calculateEndpointHealthAndWeight): with OnlyPassing false (the default) passing and
    warning instances are healthy, with true only passing ones; critical never."""
    await _put(
        consul,
        CANARY[0],
        {
            "Kind": "service-resolver",
            "Name": "api",
            "Subsets": {
                "v1": {"Filter": 'Service.Meta.version == "v1"'},
                "v2": {"Filter": 'Service.Meta.version == "v2"', "OnlyPassing": True},
            },
        },
        CANARY[3],
    )
    for i, version in enumerate(("v1", "v1", "v1", "v2", "v2")):
        await consul.agent.register_service(_instance(i, version))
    await consul.agent.warn_check("api-1-ready")
    await consul.agent.fail_check("api-2-ready")
    await consul.agent.warn_check("api-4-ready")
    chains = ChainWatch(consul, "web", lambda: SETTINGS)
    latest = chains.upstream("api")
    task = asyncio.create_task(chains.run())
    try:
        snap = await _next(latest, 0)
        keys = {tid: {t.key.split("/")[1] for t in ts} for tid, ts in snap.endpoints.items()}
        assert keys == {
            "v1.api.default.default.dc1": {"api-0-sidecar-proxy", "api-1-sidecar-proxy"},
            "v2.api.default.default.dc1": {"api-3-sidecar-proxy"},
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for i in range(5):
            await consul.agent.deregister_service(f"api-{i}-sidecar-proxy")


async def test_a_changed_chain_waits_for_its_new_targets_first_answer(
    consul: ConsulClient,
) -> None:
    """A chain change that brings a target not watched before (here v1's filter narrowed)
    keeps the previous snapshot until that target's watch has answered, as Envoy keeps a
    new cluster warming until its first endpoints: published at once, the new target has no
    endpoints yet and every request routed to it is answered 503 `no healthy upstream`
    (found by the routing fault suite, tests/integration/faults/test_routing_faults.py)."""
    await _put(consul, *CANARY)
    await consul.catalog.register(_proxy("api", 1, "v1"))
    await consul.catalog.register(_proxy("api", 2, "v1"))
    await consul.catalog.register(_proxy("api", 3, "v2"))
    chains = ChainWatch(consul, "web", lambda: SETTINGS)
    latest = chains.upstream("api")
    task = asyncio.create_task(chains.run())
    v1 = "v1.api.default.default.dc1"
    try:
        await _next(latest, 0)
        for _ in range(500):  # every target's instances in (bounded wait)
            snap = latest.get()
            if snap is not None and all(len(e) for e in snap.endpoints.values()):
                break
            await asyncio.sleep(0.02)
        version = latest.version
        only_1 = 'Service.Meta.version == "v1" and Service.ID == "api-1-sidecar-proxy"'
        narrow = {
            **CANARY[2],
            "Subsets": {"v1": {"Filter": only_1}, "v2": {"Filter": 'Service.Meta.version == "v2"'}},
        }
        await _put(consul, narrow)
        published: list[RoutingSnapshot] = []
        while True:  # every snapshot until the narrowed one (bounded by _next's wait)
            version, snap = await asyncio.wait_for(latest.changed(version), 10)
            assert snap is not None
            published.append(snap)
            if "api-1-sidecar-proxy" in snap.routing.targets[v1].filter:
                break
        assert [[t.host for t in s.endpoints[v1]] for s in published][-1] == ["10.0.0.1"]
        empty = [s.index for s in published if not all(s.endpoints.values())]
        assert empty == [], f"snapshots published with a target still empty: {empty}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_after_a_reset_a_default_chain_keeps_the_last_routing_for_the_grace() -> None:
    """A restarted, empty Consul answers no entries: the routed upstream keeps its splits and
    retries while they are written again (the routing fault suite's control-plane test lost
    36 GETs to `no healthy upstream` when the default chain's new target applied at once)."""
    assert hold_routing_after_reset(True, True, reset_at=100.0, now=100.0, grace=60.0)
    assert hold_routing_after_reset(True, True, reset_at=100.0, now=159.9, grace=60.0)
    # The grace over, or none: Consul's answer applies.
    assert not hold_routing_after_reset(True, True, reset_at=100.0, now=160.0, grace=60.0)
    assert not hold_routing_after_reset(True, True, reset_at=100.0, now=100.0, grace=0.0)
    # Entries deleted without a reset take effect; a real chain is never held; nothing to
    # keep for an upstream that was not routed.
    assert not hold_routing_after_reset(True, True, reset_at=None, now=100.0, grace=60.0)
    assert not hold_routing_after_reset(False, True, reset_at=100.0, now=100.0, grace=60.0)
    assert not hold_routing_after_reset(True, False, reset_at=100.0, now=100.0, grace=60.0)
