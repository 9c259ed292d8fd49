"""service-router/-splitter/-resolver and the discovery chain over real HTTP against devstack.

Texts are Consul's (agent/structs/config_entry_discoverychain.go, agent/consul/discoverychain/
compile.go, agent/discovery_chain_endpoint.go); on the code before this change every routing
write answered 500 `devstack does not hold "service-router" config entries yet`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devstack.server import DevServer
from tests.conftest import Http

HTTP_WEB = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
RESOLVER = {
    "Kind": "service-resolver",
    "Name": "web",
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2", "OnlyPassing": True},
    },
}
SPLITTER = {
    "Kind": "service-splitter",
    "Name": "web",
    "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}],
}
ROUTER = {
    "Kind": "service-router",
    "Name": "web",
    "Routes": [
        {
            "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "true"}]}},
            "Destination": {"ServiceSubset": "v2", "RequestTimeout": "10s", "NumRetries": 3},
        }
    ],
}


async def put_entry(http: Http, body: dict[str, Any], **params: str) -> tuple[int, Any]:
    status, answer, _ = await http.put("/v1/config", json=body, params=params or None)
    return status, answer


async def write_canary(http: Http) -> None:
    for body in (HTTP_WEB, RESOLVER, SPLITTER, ROUTER):
        assert await put_entry(http, body) == (200, True), body["Kind"]


async def _index(http: Http) -> str:
    _, _, headers = await http.get("/v1/config/service-router")
    return str(headers["X-Consul-Index"])


async def test_routing_entries_write_and_read_back_as_consul_marshals_them(http: Http) -> None:
    snake = {
        "kind": "service-resolver",
        "name": "web",
        "default_subset": "v1",
        "subsets": {"v1": {"filter": "Service.Meta.version == v1", "only_passing": True}},
        "connect_timeout": "15s",
        "load_balancer": {"policy": "ring_hash", "hash_policies": [{"source_ip": True}]},
    }
    assert await put_entry(http, snake) == (200, True)
    status, entry, headers = await http.get("/v1/config/service-resolver/web")
    assert status == 200
    assert entry == {
        "Kind": "service-resolver",
        "Name": "web",
        "ConnectTimeout": "15s",
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1", "OnlyPassing": True}},
        "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"SourceIP": True}]},
        "CreateIndex": entry["CreateIndex"],
        "ModifyIndex": entry["ModifyIndex"],
    }
    assert int(headers["X-Consul-Index"]) == entry["ModifyIndex"]
    await put_entry(http, HTTP_WEB)
    # A split to a subset the resolver does not define is refused by the graph check.
    assert await put_entry(http, SPLITTER) == (
        500,
        'service "web" does not have a subset named "v2"',
    )
    await put_entry(http, RESOLVER)
    assert await put_entry(http, SPLITTER) == (200, True)
    _, listed, _ = await http.get("/v1/config/service-splitter")
    assert [(s["Weight"], s["ServiceSubset"]) for s in listed[0]["Splits"]] == [
        (90, "v1"),
        (10, "v2"),
    ]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (
            {"Kind": "service-router", "Name": "web", "Routes": "x"},
            400,
            "Request decoding failed: 1 error(s) decoding:\n\n* 'Routes[0]' expected a map, "
            "got 'string'",
        ),
        (
            {"Kind": "service-router", "Name": "web", "Routes": [{"Nope": 1}]},
            400,
            'Request decoding failed: 1 error occurred:\n\t* invalid config key "Routes[0].Nope"'
            "\n\n",
        ),
        (
            {"Kind": 3, "Name": "web"},
            400,
            "Request decoding failed: Kind value in payload is not a string",
        ),
        (
            {
                "Kind": "service-router",
                "Name": "web",
                "Routes": [{"Match": {"HTTP": {"PathPrefix": "admin"}}}],
            },
            500,
            "Route[0] PathPrefix doesn't start with '/': \"admin\"",
        ),
        (
            {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 99.99}]},
            500,
            "the sum of all split weights must be 100, not 99.989998",
        ),
        (
            {
                "Kind": "service-resolver",
                "Name": "web",
                "Subsets": {"v1": {"Filter": "Service.Meta.version =="}},
            },
            500,
            'Filter for subset "v1" is not a valid expression: ',
        ),
        (
            {
                "Kind": "service-resolver",
                "Name": "web",
                "Redirect": {"Service": "api", "ServiceSubset": "v9"},
            },
            500,
            'service "api" does not have a subset named "v9"',
        ),
        # Routing a tcp service: the graph check of every write.
        (
            ROUTER,
            500,
            'service "web" does not have a subset named "v2"',
        ),
        (
            {
                "Kind": "service-splitter",
                "Name": "web",
                "Splits": [{"Weight": 100, "Service": "x"}],
            },
            500,
            'discovery chain "web" uses a protocol "tcp" that does not permit advanced routing '
            "or splitting behavior",
        ),
        (
            {
                "Kind": "service-defaults",
                "Name": "web",
                "UpstreamConfig": {
                    "Overrides": [{"Name": "db", "Limits": {"MaxConnections": -1}}],
                    "Defaults": {"PassiveHealthCheck": {"MaxEjectionPercent": 101}},
                },
            },
            500,
            "2 errors occurred:\n\t* error in upstream override for db: 1 error occurred:\n\t* "
            "max connections cannot be negative\n\n\n\t* error in upstream defaults: 1 error "
            "occurred:\n\t* passive health check max_ejection_percent must be a percentage "
            "between 0 and 100\n\n\n\n",
        ),
    ],
)
async def test_malformed_entries_are_refused_with_consul_texts_and_change_nothing(
    http: Http, body: dict[str, Any], status: int, text: str
) -> None:
    before = await _index(http)
    got, answer = await put_entry(http, body)
    assert got == status
    assert answer.startswith(text), answer
    assert await _index(http) == before


async def test_non_json_numbers_are_a_decoding_error(http: Http) -> None:
    """Go's JSON decoder has no NaN or Infinity; Python's accepts them unless told not to."""
    raw = b'{"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": NaN}]}'
    before = await _index(http)
    status, text, _ = await http.put("/v1/config", data=raw)
    assert status == 400
    assert text.startswith("Request decoding failed: ")
    assert await _index(http) == before


async def test_graph_checks_on_write_and_delete(http: Http) -> None:
    await write_canary(http)
    # Taking the http protocol away, by write or by delete, would break the router.
    tcp = 'discovery chain "web" uses a protocol "tcp" that does not permit advanced routing'
    status, text = await put_entry(http, {**HTTP_WEB, "Protocol": "tcp"})
    assert (status, text.startswith(tcp)) == (500, True)
    status, text, _ = await http.call("DELETE", "/v1/config/service-defaults/web")
    assert (status, text.startswith(tcp)) == (500, True)
    # Removing the subset a route and a split use is refused too.
    status, text = await put_entry(http, {**RESOLVER, "Subsets": {"v1": {}}})
    assert (status, text) == (500, 'service "web" does not have a subset named "v2"')
    status, text, _ = await http.call("DELETE", "/v1/config/service-resolver/web")
    assert (status, text) == (500, 'service "web" does not have a subset named "v2"')
    # Two resolvers redirecting to each other.
    assert await put_entry(
        http, {"Kind": "service-resolver", "Name": "old", "Redirect": {"Service": "new"}}
    ) == (200, True)
    status, text = await put_entry(
        http, {"Kind": "service-resolver", "Name": "new", "Redirect": {"Service": "old"}}
    )
    assert (status, text) == (
        500,
        "detected circular resolver redirect: [new.default.default.dc1 -> "
        "old.default.default.dc1 -> new.default.default.dc1]",
    )
    # A proxy-defaults that would make another routed service's protocol inconsistent.
    await put_entry(http, {"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"})
    status, text = await put_entry(
        http,
        {**ROUTER, "Routes": [*ROUTER["Routes"], {"Destination": {"Service": "api"}}]},
    )
    assert (status, text) == (
        500,
        'discovery chain "web" uses inconsistent protocols; service "api" has "grpc" which is '
        'not "http"',
    )
    # Circular splits between two services.
    await put_entry(http, {"Kind": "service-defaults", "Name": "a", "Protocol": "http"})
    await put_entry(http, {"Kind": "service-defaults", "Name": "b", "Protocol": "http"})
    assert await put_entry(
        http, {"Kind": "service-splitter", "Name": "a", "Splits": [{"Weight": 100, "Service": "b"}]}
    ) == (200, True)
    status, text = await put_entry(
        http, {"Kind": "service-splitter", "Name": "b", "Splits": [{"Weight": 100, "Service": "a"}]}
    )
    assert status == 500
    assert text.startswith("detected circular reference: [splitter:")
    # In the right order, everything comes down.
    for kind in ("service-router", "service-splitter", "service-resolver", "service-defaults"):
        status, body, _ = await http.call("DELETE", f"/v1/config/{kind}/web")
        assert (status, body) == (200, {}), kind


async def test_cas_on_routing_entries(http: Http) -> None:
    await put_entry(http, HTTP_WEB)
    assert await put_entry(http, SPLITTER | {"Splits": [{"Weight": 100}]}, cas="0") == (200, True)
    assert await put_entry(http, SPLITTER | {"Splits": [{"Weight": 100}]}, cas="0") == (200, False)
    _, entry, _ = await http.get("/v1/config/service-splitter/web")
    stale = str(entry["ModifyIndex"] - 1)
    assert await put_entry(http, SPLITTER | {"Splits": [{"Weight": 100}]}, cas=stale) == (
        200,
        False,
    )
    status, answer, _ = await http.call(
        "DELETE", "/v1/config/service-splitter/web", params={"cas": stale}
    )
    assert (status, answer) == (200, False)
    status, answer, _ = await http.call(
        "DELETE", "/v1/config/service-splitter/web", params={"cas": str(entry["ModifyIndex"])}
    )
    assert (status, answer) == (200, True)


async def test_blocking_read_of_a_router_wakes_on_write(http: Http, dev: DevServer) -> None:
    await write_canary(http)
    _, _, headers = await http.get("/v1/config/service-router/web")
    index = headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        http.get("/v1/config/service-router/web", params={"index": index, "wait": "30s"})
    )
    await dev.store.until_blocked()
    changed = {**ROUTER, "Routes": [{"Match": {"HTTP": {"PathPrefix": "/v2"}}}]}
    assert await put_entry(http, changed) == (200, True)
    _, entry, _ = await asyncio.wait_for(waiter, 10)
    assert entry["Routes"] == [{"Match": {"HTTP": {"PathPrefix": "/v2"}}}]
