"""Blocking queries: index-based on server state, hash-based on the agent's services."""

from __future__ import annotations

import asyncio
import time

from devstack.server import DevServer
from tests.conftest import Http


async def _index(http: Http, path: str) -> int:
    _, _, headers = await http.get(path)
    return int(headers["X-Consul-Index"])


async def test_blocking_query_wakes_on_change(http: Http, dev: DevServer) -> None:
    index = await _index(http, "/v1/health/service/web")
    waiter = asyncio.create_task(
        http.get("/v1/health/service/web", params={"index": str(index), "wait": "30s"})
    )
    await dev.store.until_blocked()
    assert not waiter.done()
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    status, body, headers = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert [e["Service"]["ID"] for e in body] == ["web"]
    assert int(headers["X-Consul-Index"]) > index


async def test_blocking_query_returns_same_index_when_wait_runs_out(http: Http) -> None:
    index = await _index(http, "/v1/catalog/services")
    started = time.monotonic()
    status, body, headers = await http.get(
        "/v1/catalog/services", params={"index": str(index), "wait": "300ms"}
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert body == {"consul": []}
    assert int(headers["X-Consul-Index"]) == index
    # The server held the query for its wait (Consul adds up to wait/16 of jitter on top).
    assert elapsed >= 0.3


async def test_unrelated_writes_do_not_move_a_service_index(http: Http) -> None:
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    index = await _index(http, "/v1/health/service/web")
    await http.put("/v1/agent/service/register", json={"Name": "db", "Port": 5432})
    await http.put("/v1/kv/some/key", data=b"v")
    assert await _index(http, "/v1/health/service/web") == index


async def test_rewound_index_releases_blocked_queries(http: Http, dev: DevServer) -> None:
    index = await _index(http, "/v1/kv/a?recurse")
    waiter = asyncio.create_task(
        http.get("/v1/kv/a", params={"recurse": "", "index": str(index), "wait": "30s"})
    )
    await dev.store.until_blocked()
    dev.store.rewind_index(1)
    status, _, headers = await asyncio.wait_for(waiter, 10)
    assert status == 404
    assert int(headers["X-Consul-Index"]) <= index


async def test_missing_kv_key_blocks_until_it_appears(http: Http, dev: DevServer) -> None:
    status, _, headers = await http.get("/v1/kv/cfg/flag")
    assert status == 404
    index = int(headers["X-Consul-Index"])
    waiter = asyncio.create_task(
        http.get("/v1/kv/cfg/flag", params={"index": str(index), "wait": "30s"})
    )
    await dev.store.until_blocked()
    await http.put("/v1/kv/cfg/flag", data=b"on")
    status, body, _ = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert body[0]["Key"] == "cfg/flag"


async def test_hash_blocking_on_agent_service(http: Http, dev: DevServer) -> None:
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    status, body, headers = await http.get("/v1/agent/service/web")
    assert status == 200
    digest = headers["X-Consul-ContentHash"]
    assert body["ContentHash"] == digest
    # An unrelated write does not change the hash: the query keeps waiting, then times out.
    waiter = asyncio.create_task(
        http.get("/v1/agent/service/web", params={"hash": digest, "wait": "30s"})
    )
    await dev.store.until_blocked()
    await http.put("/v1/kv/x", data=b"1")
    # Woken by the write, the query sees the same hash and parks again.
    await dev.store.until_blocked()
    assert not waiter.done()
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80, "Tags": ["v2"]})
    status, body, headers = await asyncio.wait_for(waiter, 10)
    assert body["Tags"] == ["v2"]
    assert headers["X-Consul-ContentHash"] != digest


async def test_hash_blocking_times_out_with_same_hash(http: Http) -> None:
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    _, _, headers = await http.get("/v1/agent/service/web")
    digest = headers["X-Consul-ContentHash"]
    _, _, headers = await http.get(
        "/v1/agent/service/web", params={"hash": digest, "wait": "200ms"}
    )
    assert headers["X-Consul-ContentHash"] == digest


async def test_unknown_agent_service_is_404(http: Http) -> None:
    status, text, _ = await http.get("/v1/agent/service/nope")
    assert (status, text) == (404, "unknown service ID: nope")


async def test_hash_blocked_service_deregistered_is_404(http: Http, dev: DevServer) -> None:
    """Consul's blocking function looks the service up again on each wake: a service removed
    while a read waits on its hash ends that read with the 404 of an unknown ID."""
    await http.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
    _, _, headers = await http.get("/v1/agent/service/web")
    waiter = asyncio.create_task(
        http.get(
            "/v1/agent/service/web", params={"hash": headers["X-Consul-ContentHash"], "wait": "1m"}
        )
    )
    await dev.store.until_blocked()
    await http.put("/v1/agent/service/deregister/web")
    status, text, _ = await asyncio.wait_for(waiter, 10)
    assert (status, text) == (404, "unknown service ID: web")


async def test_agent_service_is_only_the_agent_s(http: Http) -> None:
    """A service registered through the catalog is not the local agent's: 404 here, as on a
    Consul agent that never registered it."""
    body = {"Node": "other", "Address": "10.0.0.9", "Service": {"ID": "far", "Service": "far"}}
    assert (await http.put("/v1/catalog/register", json=body))[0] == 200
    status, text, _ = await http.get("/v1/agent/service/far")
    assert (status, text) == (404, "unknown service ID: far")


async def test_close_answers_parked_queries_at_once(http: Http, dev: DevServer) -> None:
    index = await _index(http, "/v1/catalog/services")
    waiter = asyncio.create_task(
        http.get("/v1/catalog/services", params={"index": str(index), "wait": "10m"})
    )
    await dev.store.until_blocked()
    # Closing must not wait out the 10 minutes: the parked query is answered first.
    await asyncio.wait_for(dev.close(), 10)
    status, _, headers = await asyncio.wait_for(waiter, 10)
    assert status == 200
    assert int(headers["X-Consul-Index"]) == index
