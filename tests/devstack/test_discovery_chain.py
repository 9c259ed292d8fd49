"""GET|POST /v1/discovery-chain/:service over real HTTP against devstack.

Shapes are Consul's (agent/structs/discovery_chain.go, agent/connect/sni.go), overrides and
their errors as agent/discovery_chain_endpoint.go decodes them; before this change the path
answered 404.
"""

from __future__ import annotations

import asyncio

from devstack.config_entries import load
from devstack.server import DevServer
from tests.conftest import Http
from tests.devstack.test_routing_entries import SPLITTER, put_entry, write_canary


async def test_discovery_chain_endpoint(http: Http, dev: DevServer) -> None:
    trust_domain = dev.identity.ca.trust_domain
    status, body, headers = await http.get("/v1/discovery-chain/web")
    assert status == 200
    assert int(headers["X-Consul-Index"]) >= 1
    chain = body["Chain"]
    assert (chain["Default"], chain["Protocol"], chain["StartNode"]) == (
        True,
        "tcp",
        "resolver:web.default.default.dc1",
    )
    assert chain["Targets"]["web.default.default.dc1"]["SNI"] == (
        f"web.default.dc1.internal.{trust_domain}"
    )
    await write_canary(http)
    _, body, _ = await http.get("/v1/discovery-chain/web")
    chain = body["Chain"]
    assert chain["StartNode"] == "router:web.default.default"
    assert sorted(chain["Targets"]) == ["v1.web.default.default.dc1", "v2.web.default.default.dc1"]
    assert chain["Targets"]["v2.web.default.default.dc1"]["Subset"] == {
        "Filter": "Service.Meta.version == v2",
        "OnlyPassing": True,
    }
    assert chain["Targets"]["v2.web.default.default.dc1"]["SNI"] == (
        f"v2.web.default.dc1.internal.{trust_domain}"
    )
    splits = chain["Nodes"]["splitter:web.default.default"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (90, "resolver:v1.web.default.default.dc1"),
        (10, "resolver:v2.web.default.default.dc1"),
    ]

    # compile-dc, and the overrides an upstream sends.
    _, body, _ = await http.get("/v1/discovery-chain/web", params={"compile-dc": "dc2"})
    assert body["Chain"]["Datacenter"] == "dc2"
    assert "v1.web.default.default.dc2" in body["Chain"]["Targets"]
    status, body, _ = await http.call(
        "POST",
        "/v1/discovery-chain/web",
        json={"override_protocol": "tcp", "OverrideConnectTimeout": "1s"},
    )
    assert status == 200
    chain = body["Chain"]
    assert (chain["Protocol"], chain["StartNode"]) == ("tcp", "resolver:v1.web.default.default.dc1")
    assert len(chain["CustomizationHash"]) == 8
    assert chain["Targets"]["v1.web.default.default.dc1"]["ConnectTimeout"] == "1s"
    status, text, _ = await http.call(
        "POST", "/v1/discovery-chain/web", json={"OverrideMeshGateway": {"Mode": "sideways"}}
    )
    assert (status, text) == (400, "Invalid OverrideMeshGateway.Mode parameter")
    status, text, _ = await http.call(
        "POST", "/v1/discovery-chain/web", json={"OverrideConnectTimeout": "soon"}
    )
    assert (status, text) == (400, 'Request decoding failed: time: invalid duration "soon"')
    status, text, _ = await http.get("/v1/discovery-chain/")
    assert (status, text) == (400, "Missing chain name")


async def test_discovery_chain_blocks_until_an_entry_changes(http: Http, dev: DevServer) -> None:
    await write_canary(http)
    _, _, headers = await http.get("/v1/discovery-chain/web")
    index = headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        http.get("/v1/discovery-chain/web", params={"index": index, "wait": "30s"})
    )
    await dev.store.until_blocked()
    assert await put_entry(
        http, {**SPLITTER, "Splits": [{"Weight": 100, "ServiceSubset": "v2"}]}
    ) == (
        200,
        True,
    )
    _, body, after = await asyncio.wait_for(waiter, 10)
    assert int(after["X-Consul-Index"]) > int(index)
    splits = body["Chain"]["Nodes"]["splitter:web.default.default"]["Splits"]
    assert [s["NextNode"] for s in splits] == ["resolver:v2.web.default.default.dc1"]


async def test_splitters_nested_too_deep_answer_a_clear_error(http: Http, dev: DevServer) -> None:
    """Attack: splitters nested past Python's stack. The store is filled directly (each link
    is a valid entry on its own); then one more write and a chain read must answer Consul-style
    500s naming the problem, and leave the state as it was."""
    depth = 1200
    for i in range(depth + 1):
        dev.store.config_set(
            load({"Kind": "service-defaults", "Name": f"s{i}", "Protocol": "http"})
        )
    for i in range(1, depth):
        dev.store.config_set(
            load(
                {
                    "Kind": "service-splitter",
                    "Name": f"s{i}",
                    "Splits": [{"Weight": 100, "Service": f"s{i + 1}"}],
                }
            )
        )
    text = 'discovery chain "s0" nests splitters too deeply for this server'
    _, _, before = await http.get("/v1/config/service-splitter")
    status, answer = await put_entry(
        http,
        {"Kind": "service-splitter", "Name": "s0", "Splits": [{"Weight": 100, "Service": "s1"}]},
    )
    assert (status, answer) == (500, text)
    _, _, after = await http.get("/v1/config/service-splitter")
    assert after["X-Consul-Index"] == before["X-Consul-Index"]
    status, answer, _ = await http.get("/v1/discovery-chain/s1")
    assert (status, answer) == (
        500,
        'discovery chain "s1" nests splitters too deeply for this server',
    )
