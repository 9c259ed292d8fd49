"""/v1/config: decode and validation texts, CAS, blocking reads, service-graph validation."""

from __future__ import annotations

import asyncio

import pytest

from devstack.server import DevServer
from tests.conftest import Http

L7_INTENTIONS = {
    "Kind": "service-intentions",
    "Name": "api",
    "Sources": [
        {
            "Name": "web",
            "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/v1", "Methods": ["GET"]}}],
        }
    ],
}


async def test_service_defaults_roundtrip_with_snake_case(http: Http) -> None:
    status, ok, _ = await http.put(
        "/v1/config", json={"kind": "service-defaults", "name": "api", "protocol": "HTTP"}
    )
    assert (status, ok) == (200, True)
    status, entry, headers = await http.get("/v1/config/service-defaults/api")
    assert status == 200
    assert entry["Kind"] == "service-defaults"
    assert entry["Protocol"] == "http"
    # Non-pointer structs always come back, as Consul marshals them.
    assert (entry["TransparentProxy"], entry["MeshGateway"], entry["Expose"]) == ({}, {}, {})
    assert int(headers["X-Consul-Index"]) == entry["ModifyIndex"]
    _, listed, _ = await http.get("/v1/config/service-defaults")
    assert [e["Name"] for e in listed] == ["api"]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        # consul agent/config_endpoint_test.go TestConfig_Apply_Decoding "No Kind".
        (
            {"Name": "x"},
            400,
            "Request decoding failed: Payload does not contain a kind/Kind key at the top level",
        ),
        ({"Kind": "nope", "Name": "x"}, 400, "Request decoding failed: invalid config entry kind"),
        (
            {"Kind": "service-defaults", "Name": "x", "Foo": 1},
            400,
            'Request decoding failed: 1 error occurred:\n\t* invalid config key "Foo"\n\n',
        ),
        ({"Kind": "service-defaults"}, 500, "Name is required"),
        ({"Kind": "proxy-defaults", "Name": "x"}, 500, 'invalid name ("x"), only "global"'),
        (
            {"Kind": "service-defaults", "Name": "x", "MutualTLSMode": "loose"},
            500,
            'Invalid MutualTLSMode "loose"',
        ),
        ({"Kind": "service-intentions", "Name": "api"}, 500, "At least one source is required"),
    ],
)
async def test_bad_entries_are_refused_and_change_nothing(
    http: Http, body: object, status: int, text: str
) -> None:
    _, _, before = await http.get("/v1/config/service-defaults")
    got, message, _ = await http.put("/v1/config", json=body)
    assert got == status
    assert message.startswith(text)
    _, _, after = await http.get("/v1/config/service-defaults")
    assert after["X-Consul-Index"] == before["X-Consul-Index"]


async def test_cas_create_and_update(http: Http) -> None:
    body = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    assert (await http.put("/v1/config", json=body, params={"cas": "0"}))[1] is True
    assert (await http.put("/v1/config", json=body, params={"cas": "0"}))[1] is False
    _, entry, _ = await http.get("/v1/config/service-defaults/api")
    index = str(entry["ModifyIndex"])
    assert (await http.put("/v1/config", json=body, params={"cas": index}))[1] is True
    assert (await http.put("/v1/config", json=body, params={"cas": index}))[1] is False


async def test_missing_entry_and_delete(http: Http) -> None:
    status, text, _ = await http.get("/v1/config/service-defaults/ghost")
    assert (status, text) == (404, 'Config entry not found for "service-defaults" / "ghost"')
    status, body, _ = await http.call("DELETE", "/v1/config/service-defaults/ghost")
    assert (status, body) == (200, {})
    status, text, _ = await http.get("/v1/config/nope")
    assert (status, text) == (500, "invalid config entry kind: nope")


async def test_l7_intentions_need_an_http_protocol_both_ways(http: Http) -> None:
    status, text, _ = await http.put("/v1/config", json=L7_INTENTIONS)
    assert status == 500
    assert text == (
        'service "api" has protocol "tcp", which is incompatible with L7 intentions permissions'
    )
    await http.put(
        "/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    )
    assert (await http.put("/v1/config", json=L7_INTENTIONS))[0] == 200
    # Taking the protocol away again is refused, by write and by delete.
    status, text, _ = await http.put(
        "/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "tcp"}
    )
    assert status == 500
    status, text, _ = await http.call("DELETE", "/v1/config/service-defaults/api")
    assert status == 500
    assert "incompatible with L7 intentions permissions" in text
    # The mesh-wide default counts too.
    await http.call("DELETE", "/v1/config/service-intentions/api")
    await http.call("DELETE", "/v1/config/service-defaults/api")
    await http.put(
        "/v1/config",
        json={"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}},
    )
    assert (await http.put("/v1/config", json=L7_INTENTIONS))[0] == 200


async def test_blocking_list_wakes_on_write(http: Http, dev: DevServer) -> None:
    _, _, headers = await http.get("/v1/config/service-intentions")
    index = headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        http.get("/v1/config/service-intentions", params={"index": index, "wait": "30s"})
    )
    await dev.store.until_blocked()
    body = {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [{"Name": "web", "Action": "allow"}],
    }
    await http.put("/v1/config", json=body)
    _, listed, _ = await asyncio.wait_for(waiter, 10)
    assert [(e["Name"], e["Sources"][0]["Action"]) for e in listed] == [("db", "allow")]


async def test_ingress_gateway_links_services(http: Http) -> None:
    body = {
        "Kind": "ingress-gateway",
        "Name": "ig",
        "Listeners": [{"Port": 8080, "Protocol": "tcp", "Services": [{"Name": "web"}]}],
    }
    assert (await http.put("/v1/config", json=body))[1] is True
    _, linked, _ = await http.get("/v1/catalog/gateway-services/ig")
    assert [(g["Service"]["Name"], g["GatewayKind"], g["Port"]) for g in linked] == [
        ("web", "ingress-gateway", 8080)
    ]
    # The graph is checked both ways: a protocol change that breaks the listener is refused...
    status, text, _ = await http.put(
        "/v1/config", json={"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
    )
    assert status == 500
    assert text == (
        'service "web" has protocol "http", which does not match defined listener protocol "tcp"'
    )
    # ...and so is a gateway whose listener does not match the service.
    body["Name"] = "ig2"
    body["Listeners"][0]["Protocol"] = "http"
    status, text, _ = await http.put("/v1/config", json=body)
    assert status == 500
    assert text == (
        'service "web" has protocol "tcp", which does not match defined listener protocol "http"'
    )
