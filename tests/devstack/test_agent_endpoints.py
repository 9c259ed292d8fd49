"""Agent endpoints: registration (with sidecars), checks that really run, local health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from devstack.server import DevServer
from tests.conftest import Http


async def _wait_check(
    http: Http, dev: DevServer, check_id: str, status: str, timeout: float = 10
) -> dict[str, Any]:
    """Wait for a check's status through the API, parking on the store between looks."""

    async def poll() -> dict[str, Any]:
        while True:
            _, checks, _ = await http.get("/v1/agent/checks")
            if check_id in checks and checks[check_id]["Status"] == status:
                return dict(checks[check_id])
            await dev.store.wait_for_change(timeout)

    return await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A real HTTP server whose /health answer the test controls."""
    state = {"status": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["status"], text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/health", state
    await runner.cleanup()


async def test_sidecar_registration_follows_consul_defaults(http: Http) -> None:
    status, _, _ = await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}},
    )
    assert status == 200
    _, services, _ = await http.get("/v1/agent/services")
    side = services["web-sidecar-proxy"]
    assert side["Kind"] == "connect-proxy"
    assert side["Port"] == 21000
    assert side["Proxy"]["DestinationServiceName"] == "web"
    assert side["Proxy"]["LocalServicePort"] == 8080
    _, checks, _ = await http.get("/v1/agent/checks")
    assert checks["service:web-sidecar-proxy:1"]["Name"] == "Connect Sidecar Listening"
    assert checks["service:web-sidecar-proxy:2"]["Name"] == "Connect Sidecar Aliasing web"
    # The sidecar is what /connect/ finds for the service.
    _, entries, _ = await http.get("/v1/health/connect/web")
    assert [e["Service"]["ID"] for e in entries] == ["web-sidecar-proxy"]
    # Re-registering keeps the sidecar's port; deregistering the parent removes the sidecar.
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}},
    )
    _, services, _ = await http.get("/v1/agent/services")
    assert services["web-sidecar-proxy"]["Port"] == 21000
    await http.put("/v1/agent/service/deregister/web")
    _, services, _ = await http.get("/v1/agent/services")
    assert services == {}


async def test_proxy_with_upstreams(http: Http) -> None:
    body = {
        "Kind": "connect-proxy",
        "Name": "api-proxy",
        "Port": 21001,
        "Proxy": {
            "DestinationServiceName": "api",
            "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
        },
    }
    assert (await http.put("/v1/agent/service/register", json=body))[0] == 200
    _, svc, _ = await http.get("/v1/agent/service/api-proxy")
    upstream = svc["Proxy"]["Upstreams"][0]
    assert upstream["DestinationType"] == "service"
    assert upstream["DestinationName"] == "db"
    assert upstream["LocalBindPort"] == 9191
    body["Proxy"]["Upstreams"].append({"DestinationName": "db", "LocalBindPort": 9192})
    status, text, _ = await http.put("/v1/agent/service/register", json=body)
    assert status == 400
    assert "upstreams cannot contain duplicates of [type=service, name=db" in text


async def test_ttl_check_expires(http: Http, dev: DevServer) -> None:
    await http.put("/v1/agent/check/register", json={"Name": "beat", "TTL": "150ms"})
    assert (await http.put("/v1/agent/check/pass/beat", params={"note": "alive"}))[0] == 200
    passing = await _wait_check(http, dev, "beat", "passing")
    assert passing["Output"] == "alive"
    expired = await _wait_check(http, dev, "beat", "critical")
    assert expired["Output"] == "TTL expired (last output before timeout follows): alive"


async def test_http_check_runs_against_a_real_server(
    http: Http, dev: DevServer, upstream: tuple[str, dict[str, int]]
) -> None:
    url, state = upstream
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 1, "Check": {"HTTP": url, "Interval": "1s"}},
    )
    passing = await _wait_check(http, dev, "service:web", "passing")
    assert passing["Output"].startswith(f"HTTP GET {url}: 200 OK")
    state["status"] = 429
    await _wait_check(http, dev, "service:web", "warning")
    state["status"] = 500
    await _wait_check(http, dev, "service:web", "critical")
    _, entries, _ = await http.get("/v1/health/service/web", params={"passing": "1"})
    assert entries == []


async def test_tcp_check(http: Http, dev: DevServer, upstream: tuple[str, dict[str, int]]) -> None:
    port = upstream[0].split(":")[2].split("/")[0]
    await http.put(
        "/v1/agent/check/register",
        json={"Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "1s"},
    )
    checked = await _wait_check(http, dev, "tcp", "passing")
    assert checked["Output"] == f"TCP connect 127.0.0.1:{port}: Success"


async def test_check_updates_and_errors(http: Http) -> None:
    await http.put("/v1/agent/service/register", json={"Name": "web", "Check": {"TTL": "1m"}})
    status, _, _ = await http.put(
        "/v1/agent/check/update/service:web", json={"Status": "warning", "Output": "slow"}
    )
    assert status == 200
    _, checks, _ = await http.get("/v1/agent/checks")
    assert (checks["service:web"]["Status"], checks["service:web"]["Output"]) == (
        "warning",
        "slow",
    )
    status, text, _ = await http.put("/v1/agent/check/update/service:web", json={"Status": "great"})
    assert (status, text) == (400, "Invalid check status: 'great'")
    status, text, _ = await http.put("/v1/agent/check/pass/nope")
    assert status == 404
    assert text.startswith('Unknown check ID "nope"')
    await http.put(
        "/v1/agent/check/register",
        json={"Name": "tcp", "TCP": "127.0.0.1:1", "Interval": "10s"},
    )
    status, text, _ = await http.put("/v1/agent/check/pass/tcp")
    assert (status, text) == (500, 'CheckID "tcp" does not have associated TTL')
    status, text, _ = await http.put(
        "/v1/agent/check/register", json={"Name": "x", "TTL": "1s", "ServiceID": "ghost"}
    )
    assert (status, text) == (404, 'ServiceID "ghost" does not exist')


async def test_maintenance_and_local_health_codes(http: Http) -> None:
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Check": {"TTL": "1m", "Status": "passing"}},
    )
    status, body, _ = await http.get("/v1/agent/health/service/id/web")
    assert (status, body["AggregatedStatus"]) == (200, "passing")
    await http.put("/v1/agent/check/warn/service:web")
    status, _, _ = await http.get("/v1/agent/health/service/name/web")
    assert status == 429
    status, text, _ = await http.put("/v1/agent/service/maintenance/web")
    assert (status, text) == (400, "Missing value for enable")
    await http.put(
        "/v1/agent/service/maintenance/web", params={"enable": "true", "reason": "deploy"}
    )
    status, body, _ = await http.get("/v1/agent/health/service/id/web")
    assert (status, body["AggregatedStatus"]) == (503, "maintenance")
    status, text, _ = await http.get("/v1/agent/health/service/id/web", params={"format": "text"})
    assert (status, text) == (503, "maintenance")
    await http.put("/v1/agent/service/maintenance/web", params={"enable": "false"})
    status, _, _ = await http.get("/v1/agent/health/service/id/web")
    assert status == 429
    status, _, _ = await http.get("/v1/agent/health/service/id/ghost")
    assert status == 404


async def test_deregister_unknown_service_is_404(http: Http) -> None:
    status, text, _ = await http.put("/v1/agent/service/deregister/ghost")
    assert status == 404
    assert text.startswith('Unknown service ID "ghost"')


async def test_script_checks_need_the_flag(http: Http) -> None:
    status, text, _ = await http.put(
        "/v1/agent/check/register",
        json={"Name": "s", "Args": ["/bin/true"], "Interval": "10s"},
    )
    assert status == 500
    assert text.startswith("Scripts are disabled on this agent")
    _, checks, _ = await http.get("/v1/agent/checks")
    assert checks == {}


async def test_leave_requests_shutdown(http: Http, dev: DevServer) -> None:
    assert (await http.put("/v1/agent/leave"))[0] == 200
    await asyncio.wait_for(dev.shutdown_requested.wait(), 5)


async def test_self_and_members(http: Http) -> None:
    _, me, _ = await http.get("/v1/agent/self")
    assert set(me) == {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta", "xDS"}
    assert me["Config"]["Version"] == "1.22.0"
    _, members, _ = await http.get("/v1/agent/members")
    assert members == [me["Member"]]
