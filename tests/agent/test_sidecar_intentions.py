"""The sidecar enforces what Consul stores, and fails closed on what it cannot compile.

A real devstack (Consul's HTTP API on 127.0.0.1), the agent's runtime running api's sidecar
(`meshlet sidecar`, in process), api's app behind it, and web's side of the mesh: its leaf from
devstack's Connect CA and an outbound HTTP listener dialing api's sidecar over mTLS. Intentions
are written the way operators write them (`consul intention create -deny web api` is a POST to
the legacy API; `consul config write` a PUT to /v1/config) or injected straight into devstack's
store to stand for an entry meshlet cannot read. Assertions are on what the app received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import parse
from agent.consul import ConsulClient
from agent.consul_connect import consul_leaf_source, consul_roots_source
from agent.runtime import AgentRuntime
from agent.sidecar import Sidecar
from agent.status_cli import render
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import OutboundHTTP
from connect.l4 import OutboundL4
from connect.leaf import Material
from connect.peers import service_peers
from connect.tls import DynamicTLS
from devstack.config_entries import Entry
from devstack.server import DevServer
from intentions.entries import KIND
from tests.agent.test_agent_runtime import running
from tests.connect.proxy_test_servers import start_app as start_tcp_app
from tests.connect.test_http_proxy import App, start_app
from tests.connect.test_l4_relay import free_port

DEADLINE = 30.0


def _api_config(consul_addr: str, app_port: int, sidecar_port: int, protocol: str = "http") -> Any:
    return parse(
        {
            "consul": {"address": consul_addr},
            "service": {
                "name": "api",
                "port": app_port,
                "address": "127.0.0.1",
                "check": {"ttl": "60s"},
            },
            # In-process (workers 0): these tests reach into the proxy's objects.
            "sidecar": {
                "port": sidecar_port,
                "protocol": protocol,
                "check_ttl": "3s",
                "workers": 0,
            },
            "admin": {"address": "127.0.0.1:0"},
            "watch": {"retry_initial": "50ms", "retry_max": "500ms"},
            "shutdown": {"drain_period": "0s"},
        },
        {},
    )


@contextlib.asynccontextmanager
async def _client(
    consul: ConsulClient, source: str, sidecar_port: int, protocol: str = "http"
) -> AsyncIterator[str]:
    """`source`'s side of the mesh: its leaf, and an upstream listener to api's sidecar
    (HTTP, or L4 for `protocol` tcp). Yields the base URL an app of `source` would call."""
    bundle = await consul_roots_source(consul).roots(0)
    leaf = await consul_leaf_source(consul, source).fetch(None, bundle)
    tls = DynamicTLS(Material(leaf, bundle, 1))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n1/api", "127.0.0.1", sidecar_port)], BalancerConfig())
        ),
        client_ssl=tls.client,
        verify_peer=service_peers(lambda: tls.trust_domain),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream) if protocol == "http" else OutboundL4(upstream)
    await outbound.start()
    try:
        yield f"http://127.0.0.1:{outbound.port}"
    finally:
        await outbound.close(grace=0)


async def _status_code(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def _seen_by(side: Sidecar, index: int) -> None:
    """Wait until the sidecar has published the intentions at Consul's `index` or later.
    Bounded, and not itself an assertion: the original code published nothing for an entry it
    refused, and the assertions that follow then show what traffic got through."""

    async def applied() -> None:
        while side.intentions_index < index:
            await side.intentions.changed(side.intentions.version)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(applied(), DEADLINE)


@dataclass
class _Mesh:
    dev: DevServer
    runtime: AgentRuntime
    side: Sidecar
    app: App
    session: aiohttp.ClientSession
    web: str
    """Base URL of web's upstream listener to api (what web's app calls)."""
    ops: str

    async def call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        return await _call(self.session, self.dev, method, path, body)

    async def get(self, base: str, path: str = "/hello") -> int:
        return await _status_code(self.session, base + path)

    async def applied(self) -> None:
        await _seen_by(self.side, self.dev.store.index)


@pytest.fixture
async def mesh(dev: DevServer, consul: ConsulClient) -> AsyncIterator[_Mesh]:
    """api's sidecar (the agent runtime, in process) in front of api's app, api speaking
    http (service-defaults), and the upstream listeners of two callers, web and ops."""
    app: App = await start_app("api")
    port = free_port()
    runtime = AgentRuntime(_api_config(dev.http_addr, app.port, port), sidecar=True)
    side = runtime.sidecar
    assert side is not None
    try:
        async with (
            running(runtime),
            _client(consul, "web", port) as web,
            _client(consul, "ops", port) as ops,
            aiohttp.ClientSession() as session,
        ):
            await asyncio.wait_for(side.started.wait(), DEADLINE)
            m = _Mesh(dev, runtime, side, app, session, web, ops)
            defaults = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
            assert (await m.call("PUT", "/v1/config", defaults))[0] == 200
            await m.applied()
            # ACLs off, no default intention policy: allow.
            assert await m.get(web) == 200
            yield m
    finally:
        await app.runner.cleanup()


async def test_a_deny_created_through_the_legacy_api_is_enforced(mesh: _Mesh) -> None:
    # What `consul intention create -deny web api` sends.
    status, created = await mesh.call(
        "POST",
        "/v1/connect/intentions",
        {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
    )
    assert status == 200, created
    stored = await _read_entry(mesh.session, mesh.dev, "api")
    assert stored["Sources"][0]["LegacyID"] == created["ID"]
    await mesh.applied()
    before = len(mesh.app.seen)
    # Original code: 200 (the entry was refused for its Legacy* fields, the previous
    # allow-all snapshot kept, and status said ready).
    assert await mesh.get(mesh.web) == 403
    assert await mesh.get(mesh.ops) == 200
    assert len(mesh.app.seen) == before + 1
    assert mesh.side.intentions_error == ""
    assert mesh.runtime.status(None)["degraded"] is False


async def test_an_entry_that_cannot_be_compiled_denies_everything_to_api_until_fixed(
    mesh: _Mesh,
) -> None:
    side, runtime = mesh.side, mesh.runtime
    ok = {
        "Kind": KIND,
        "Name": "api",
        "Sources": [{"Name": "web", "Action": "deny"}, {"Name": "ops", "Action": "allow"}],
    }
    assert (await mesh.call("PUT", "/v1/config", ok))[0] == 200
    await mesh.applied()
    assert (await mesh.get(mesh.web), await mesh.get(mesh.ops)) == (403, 200)

    # A permission field meshlet does not know, injected into the store the way a newer
    # Consul (or a corrupt write) would hold it.
    broken_body = {
        "Kind": KIND,
        "Name": "api",
        "Sources": [
            {"Name": "ops", "Action": "allow", "Precedence": 9, "Type": "consul"},
            {
                "Name": "web",
                "Precedence": 9,
                "Type": "consul",
                "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}, "Sentinel": "x"}],
            },
        ],
    }
    counted = side.status()["intentions"].get("broken_total", 0)
    mesh.dev.store.config_set(Entry(KIND, "api", broken_body))
    await mesh.applied()
    before = len(mesh.app.seen)
    # Original code: ops still got 200 (the previous snapshot was kept).
    for base in (mesh.ops, mesh.web):
        for path in ("/hello", "/public/x", "/private/y"):
            assert await mesh.get(base, path) == 403
    assert len(mesh.app.seen) == before, "a request reached the app"
    st = runtime.status(None)
    assert st["degraded"] is True
    reason = next(r for r in st["degraded_reasons"] if "api" in r and "Sentinel" in r)
    assert "denying every request" in reason
    assert "Sentinel" in st["proxy"]["intentions"]["broken"]["api"]
    assert st["proxy"]["intentions"]["broken_total"] == counted + 1
    table = render(st, time.time())
    assert "ready, degraded" in table
    assert reason in table
    # The same through the command an operator types.
    assert mesh.runtime.admin is not None
    shown = await asyncio.to_thread(_meshlet, "status", "--admin-addr", mesh.runtime.admin.address)
    assert "ready, degraded" in shown.stdout, shown.stderr
    assert "intentions for api cannot be enforced" in shown.stdout
    assert "Sentinel" in shown.stdout
    # Degraded is its own exit code (agent/status_cli.py), and the table counts the refusal.
    assert shown.returncode == 4, shown.stdout
    rejected = next(line for line in shown.stdout.splitlines() if "rejected snapshots" in line)
    assert rejected.split()[-1] == str(counted + 1)
    assert "watch errors" in shown.stdout
    assert "refused handshakes" in shown.stdout

    # Valid for Consul (it does not compile regexes on write) but not for meshlet.
    regex = {
        "Kind": KIND,
        "Name": "api",
        "Sources": [
            {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(/x"}}]},
            {"Name": "ops", "Action": "allow"},
        ],
    }
    assert (await mesh.call("PUT", "/v1/config", regex))[0] == 200
    await mesh.applied()
    assert await mesh.get(mesh.ops) == 403
    st = runtime.status(None)
    assert any("regular expression" in r for r in st["degraded_reasons"])
    assert st["proxy"]["intentions"]["broken_total"] == counted + 2

    # Fixed: enforced again, no longer degraded.
    assert (await mesh.call("PUT", "/v1/config", ok))[0] == 200
    await mesh.applied()
    assert (await mesh.get(mesh.web), await mesh.get(mesh.ops)) == (403, 200)
    st = runtime.status(None)
    assert st["degraded"] is False
    assert st["proxy"]["intentions"]["broken"] == {}
    assert "denying" not in render(st, time.time())


async def test_on_a_tcp_service_a_broken_entry_refuses_every_connection(
    dev: DevServer, consul: ConsulClient
) -> None:
    server, app_port, app = await start_tcp_app()
    port = free_port()
    runtime = AgentRuntime(_api_config(dev.http_addr, app_port, port, "tcp"), sidecar=True)
    side = runtime.sidecar
    assert side is not None

    async def echo(base: str, data: bytes) -> bytes:
        host, _, p = base.removeprefix("http://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(p))
        try:
            writer.write(data)
            got = b""
            with contextlib.suppress(ConnectionError):
                while len(got) < len(data) and (chunk := await reader.read(64)):
                    got += chunk
            return got
        finally:
            writer.close()

    try:
        async with (
            running(runtime),
            _client(consul, "web", port, "tcp") as web,
            _client(consul, "ops", port, "tcp") as ops,
            aiohttp.ClientSession() as session,
        ):
            await asyncio.wait_for(side.started.wait(), DEADLINE)
            assert await echo(web, b"one") == b"one"
            status, _ = await _call(
                session,
                dev,
                "POST",
                "/v1/connect/intentions",
                {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
            )
            assert status == 200
            await _seen_by(side, dev.store.index)
            # Original code: the connection was relayed (b"two" echoed).
            assert await echo(web, b"two") == b""
            assert await echo(ops, b"three") == b"three"
            broken = {"Kind": KIND, "Name": "api", "Sources": [{"Name": "ops", "Action": "ok"}]}
            dev.store.config_set(Entry(KIND, "api", broken))
            await _seen_by(side, dev.store.index)
            assert await echo(ops, b"four") == b""
            assert await echo(web, b"five") == b""
            assert bytes(app.received) == b"onethree"
            st = runtime.status(None)
            assert any(
                "Action must be set to 'allow' or 'deny'" in r for r in st["degraded_reasons"]
            )
    finally:
        server.close()
        await server.wait_closed()


def _meshlet(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    meshlet = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"
    return subprocess.run(
        [meshlet, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


async def _call(
    session: aiohttp.ClientSession, dev: DevServer, method: str, path: str, body: Any
) -> tuple[int, Any]:
    async with session.request(method, dev.http_url + path, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def _read_entry(session: aiohttp.ClientSession, dev: DevServer, name: str) -> Any:
    async with session.get(f"{dev.http_url}/v1/config/{KIND}/{name}") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_meshlet_intentions_check_reads_entries_written_by_the_legacy_api(
    dev: DevServer, tmp_path: Path
) -> None:
    """`consul config read`-style entries, Legacy* fields included, through the real CLI."""
    async with aiohttp.ClientSession() as session:
        for source, action in (("web", "deny"), ("ops", "allow")):
            body = {"SourceName": source, "DestinationName": "api", "Action": action}
            status, _ = await _call(session, dev, "POST", "/v1/connect/intentions", body)
            assert status == 200
        async with session.get(f"{dev.http_url}/v1/config/{KIND}") as resp:
            listed = await resp.json()
    assert "LegacyID" in listed[0]["Sources"][0]
    entries = tmp_path / "entries.json"
    entries.write_text(json.dumps(listed))
    lines = "".join(
        json.dumps({"source": {"name": s}, "method": "GET", "path": "/"}) + "\n"
        for s in ("web", "ops", "other")
    )
    done = await asyncio.to_thread(
        _meshlet,
        *("intentions", "check", "--entries", str(entries), "--reason"),
        *("--destination", '{"name": "api", "protocol": "http"}', "--default-policy", "deny"),
        stdin=lines,
    )
    # Original code: exit 2, "entries[0]: Sources[0].LegacyCreateTime must be omitted".
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "deny\tMatched L4 intention: web => api (deny)",
        "allow\tMatched L4 intention: ops => api (allow)",
        "deny\tDefault intention policy",
    ]
