"""Catalog, health and KV endpoints: shapes, semantics and the errors Consul gives."""

from __future__ import annotations

import base64

from tests.conftest import Http


async def test_fresh_dev_server_looks_like_consul_dev(http: Http) -> None:
    _, services, _ = await http.get("/v1/catalog/services")
    assert services == {"consul": []}
    _, nodes, _ = await http.get("/v1/catalog/nodes")
    assert [n["Node"] for n in nodes] == ["meshlet-dev"]
    _, checks, _ = await http.get("/v1/health/state/any")
    assert [(c["CheckID"], c["ServiceID"]) for c in checks] == [("serfHealth", "")]
    _, dcs, _ = await http.get("/v1/catalog/datacenters")
    assert dcs == ["dc1"]
    _, leader, _ = await http.get("/v1/status/leader")
    assert leader


async def test_catalog_register_and_deregister(http: Http) -> None:
    body = {
        "Node": "n1",
        "Address": "10.0.0.1",
        "TaggedAddresses": {"lan": "10.0.0.1"},
        "Service": {"Service": "db", "ID": "db1", "Port": 5432, "Tags": ["primary"]},
        "Check": {"CheckID": "db-alive", "Name": "alive", "ServiceID": "db1", "Status": "passing"},
    }
    status, ok, _ = await http.put("/v1/catalog/register", json=body)
    assert (status, ok) == (200, True)
    _, entries, _ = await http.get("/v1/catalog/service/db", params={"tag": "primary"})
    (entry,) = entries
    assert (entry["Node"], entry["Address"], entry["ServiceAddress"]) == ("n1", "10.0.0.1", "")
    assert entry["ServiceTags"] == ["primary"]
    assert entry["ServiceProxy"] == {"Mode": "", "MeshGateway": {}, "Expose": {}}
    _, entries, _ = await http.get("/v1/catalog/service/db", params={"tag": "replica"})
    assert entries == []
    _, node, _ = await http.get("/v1/catalog/node/n1")
    assert set(node["Services"]) == {"db1"}
    _, missing, _ = await http.get("/v1/catalog/node/n9")
    assert missing is None
    _, healthy, _ = await http.get("/v1/health/service/db", params={"passing": ""})
    assert [c["CheckID"] for c in healthy[0]["Checks"]] == ["db-alive"]
    await http.put("/v1/catalog/deregister", json={"Node": "n1", "ServiceID": "db1"})
    _, entries, _ = await http.get("/v1/catalog/service/db")
    assert entries == []
    await http.put("/v1/catalog/deregister", json={"Node": "n1"})
    _, nodes, _ = await http.get("/v1/catalog/nodes")
    assert [n["Node"] for n in nodes] == ["meshlet-dev"]


async def test_catalog_register_errors(http: Http) -> None:
    status, text, _ = await http.put("/v1/catalog/register", json={"Address": "10.0.0.1"})
    assert (status, text) == (500, "Must provide node")
    status, text, _ = await http.put(
        "/v1/catalog/register",
        json={"Node": "n1", "Address": "10.0.0.1", "Check": {"Node": "n2", "CheckID": "c"}},
    )
    assert status == 500
    assert text.startswith("Node 'n2' for check 'c' doesn't match register request node 'n1'")
    status, _, _ = await http.get("/v1/catalog/service/")
    assert status == 400


async def test_health_passing_hides_instances_with_any_failing_check(http: Http) -> None:
    for n in (1, 2):
        await http.put(
            "/v1/agent/service/register",
            json={"Name": "foo", "ID": f"foo:{n}", "Check": {"TTL": "1m"}},
        )
    await http.put("/v1/agent/check/pass/service:foo:1")
    _, all_entries, _ = await http.get("/v1/health/service/foo")
    assert [e["Service"]["ID"] for e in all_entries] == ["foo:1", "foo:2"]
    _, passing, _ = await http.get("/v1/health/service/foo", params={"passing": "true"})
    assert [e["Service"]["ID"] for e in passing] == ["foo:1"]
    status, text, _ = await http.get("/v1/health/service/foo", params={"passing": "maybe"})
    assert (status, text) == (400, "Invalid value for ?passing")
    _, critical, _ = await http.get("/v1/health/state/critical")
    assert [c["CheckID"] for c in critical] == ["service:foo:2"]
    _, checks, _ = await http.get("/v1/health/checks/foo")
    assert [c["CheckID"] for c in checks] == ["service:foo:1", "service:foo:2"]


async def test_kv_roundtrip_cas_flags_and_keys(http: Http) -> None:
    status, ok, _ = await http.put("/v1/kv/app/a", data=b"1", params={"flags": "42"})
    assert (status, ok) == (200, True)
    _, entries, headers = await http.get("/v1/kv/app/a")
    (entry,) = entries
    assert base64.b64decode(entry["Value"]) == b"1"
    assert entry["Flags"] == 42
    assert int(headers["X-Consul-Index"]) == entry["ModifyIndex"]
    # CAS with a stale index fails and leaves the value alone.
    _, ok, _ = await http.put("/v1/kv/app/a", data=b"2", params={"cas": "1"})
    assert ok is False
    _, ok, _ = await http.put("/v1/kv/app/a", data=b"2", params={"cas": str(entry["ModifyIndex"])})
    assert ok is True
    _, ok, _ = await http.put("/v1/kv/app/new", data=b"x", params={"cas": "0"})
    assert ok is True
    _, ok, _ = await http.put("/v1/kv/app/new", data=b"y", params={"cas": "0"})
    assert ok is False
    await http.put("/v1/kv/app/sub/b", data=b"")
    _, keys, _ = await http.get("/v1/kv/app/", params={"keys": "", "separator": "/"})
    assert keys == ["app/a", "app/new", "app/sub/"]
    _, raw, _ = await http.get("/v1/kv/app/a", params={"raw": ""})
    assert raw == "2"
    _, entries, _ = await http.get("/v1/kv/app/sub/b")
    assert entries[0]["Value"] is None
    await http.call("DELETE", "/v1/kv/app/", params={"recurse": ""})
    status, _, headers = await http.get("/v1/kv/app/a")
    assert status == 404
    assert int(headers["X-Consul-Index"]) > 1


async def test_kv_errors(http: Http) -> None:
    status, text, _ = await http.put("/v1/kv/")
    assert (status, text) == (400, "Missing key name")
    status, text, _ = await http.put("/v1/kv/a", params={"cas": "1", "acquire": "s"})
    assert status == 400
    status, text, _ = await http.put("/v1/kv/a", data=b"x" * (512 * 1024 + 1))
    assert status == 413
    status, _, _ = await http.get("/v1/kv/a")
    assert status == 404


async def test_kv_locks_with_sessions(http: Http) -> None:
    _, s1, _ = await http.put("/v1/session/create")
    _, s2, _ = await http.put("/v1/session/create")
    s1, s2 = s1["ID"], s2["ID"]
    assert (await http.put("/v1/kv/lock", params={"acquire": s1}))[1] is True
    assert (await http.put("/v1/kv/lock", params={"acquire": s2}))[1] is False
    _, entries, _ = await http.get("/v1/kv/lock")
    assert entries[0]["Session"] == s1
    assert entries[0]["LockIndex"] == 1
    await http.put(f"/v1/session/destroy/{s1}")
    _, entries, _ = await http.get("/v1/kv/lock")
    assert "Session" not in entries[0]
    status, text, _ = await http.put("/v1/kv/lock", params={"acquire": "ghost"})
    assert (status, text) == (500, 'invalid session "ghost"')
