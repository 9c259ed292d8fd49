"""Consul's cross-cutting HTTP behaviour: routing, methods, decoding, headers, ACLs."""

from __future__ import annotations

import pytest

from devstack.config import DevConfig
from tests.conftest import Http


async def test_unknown_paths_get_consuls_texts(http: Http) -> None:
    status, body, _ = await http.get("/v1/nope")
    assert (status, body) == (404, "Invalid URL path: not a recognized HTTP API endpoint")
    status, body, _ = await http.get("/ui")
    assert status == 404
    assert body.startswith("Invalid URL path: if attempting to use the HTTP API")


async def test_wrong_method_is_405_with_allow(http: Http) -> None:
    status, body, headers = await http.call("POST", "/v1/agent/service/register")
    assert (status, body) == (405, "method POST not allowed")
    assert headers["Allow"] == "OPTIONS,PUT"
    status, body, headers = await http.call("OPTIONS", "/v1/kv/a")
    assert status == 200
    assert headers["Allow"] == "OPTIONS,GET,PUT,DELETE"


async def test_bodies_are_case_insensitive_with_snake_aliases(http: Http) -> None:
    body = {
        "name": "web",
        "PORT": 8080,
        "enable_tag_override": True,
        "checks": [{"ttl": "10s", "status": "passing"}],
    }
    status, _, _ = await http.put("/v1/agent/service/register", json=body)
    assert status == 200
    _, services, _ = await http.get("/v1/agent/services")
    assert services["web"]["Port"] == 8080
    assert services["web"]["EnableTagOverride"] is True
    _, checks, _ = await http.get("/v1/agent/checks")
    assert checks["service:web"]["Status"] == "passing"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Name": "web", "Foo": 1}, 'Request decode failed: json: unknown field "Foo"'),
        ({"Name": "web", "Port": "80"}, "Request decode failed: json: cannot unmarshal string"),
        ({"Name": "web", "Check": {"TTL": "ten"}}, "Request decode failed: time: invalid"),
        ({"Port": 80}, "Missing service name"),
        ({"Name": "web", "Address": "0.0.0.0"}, "Invalid service address"),
        ({"Name": "web", "Weights": {"Passing": 0}}, "Invalid Weights: Passing must be greater"),
        ({"Name": "web", "Check": {"HTTP": "http://x"}}, "Interval must be > 0"),
        (
            {"Name": "p", "Kind": "connect-proxy", "Port": 1},
            "Validation failed: 1 error occurred:\n\t* Proxy.DestinationServiceName must be",
        ),
    ],
)
async def test_bad_registrations_are_refused_and_change_nothing(
    http: Http, body: object, message: str
) -> None:
    _, before, headers_before = await http.get("/v1/catalog/services")
    status, text, _ = await http.put("/v1/agent/service/register", json=body)
    assert status == 400
    assert text.startswith(message)
    _, after, headers_after = await http.get("/v1/catalog/services")
    assert after == before
    assert headers_after["X-Consul-Index"] == headers_before["X-Consul-Index"]


async def test_malformed_json_is_400(http: Http) -> None:
    status, text, _ = await http.put("/v1/agent/service/register", data=b'{"Name": ')
    assert status == 400
    assert text == "Request decode failed: unexpected EOF"


async def test_read_endpoints_carry_index_headers(http: Http) -> None:
    status, _, headers = await http.get("/v1/catalog/nodes")
    assert status == 200
    assert int(headers["X-Consul-Index"]) >= 1
    assert headers["X-Consul-KnownLeader"] == "true"
    assert headers["X-Consul-LastContact"] == "0"
    assert headers["X-Consul-Default-ACL-Policy"] == "allow"
    # Agent-local endpoints carry none.
    _, _, headers = await http.get("/v1/agent/services")
    assert "X-Consul-Index" not in headers


async def test_index_header_is_never_zero(http: Http) -> None:
    # No session was ever written: the table index is 0, which Consul sends as 1.
    _, body, headers = await http.get("/v1/session/list")
    assert body == []
    assert headers["X-Consul-Index"] == "1"


@pytest.mark.parametrize(
    ("params", "status", "text"),
    [
        ({"dc": "dc2"}, 500, "No path to datacenter"),
        ({"wait": "soon", "index": "1"}, 400, "Invalid wait time"),
        ({"index": "x"}, 400, "Invalid index"),
        ({"stale": "", "consistent": ""}, 400, "Cannot specify ?stale with ?consistent"),
    ],
)
async def test_bad_query_parameters(
    http: Http, params: dict[str, str], status: int, text: str
) -> None:
    got, body, _ = await http.get("/v1/catalog/services", params=params)
    assert got == status
    assert body.startswith(text)


async def test_gzip_when_asked(http: Http) -> None:
    async with http.session.get(
        http.base + "/v1/agent/self", headers={"Accept-Encoding": "gzip"}
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert (await resp.json())["Config"]["Datacenter"] == "dc1"


# ---- ACLs -----------------------------------------------------------------------------------

TOKEN = "b1gs3cr3t"


@pytest.fixture
def acl_deny() -> DevConfig:
    return DevConfig(acl_initial_management_token=TOKEN, default_policy="deny")


@pytest.mark.parametrize(
    "dev_config", [DevConfig(acl_initial_management_token=TOKEN, default_policy="deny")]
)
async def test_acl_anonymous_denied_writes_and_filtered_reads(http: Http) -> None:
    status, text, headers = await http.put("/v1/agent/service/register", json={"Name": "web"})
    assert status == 403
    assert text.startswith("Permission denied: anonymous token lacks permission 'service:write'")
    assert headers["X-Consul-Default-ACL-Policy"] == "deny"
    # The management token may, in either header form.
    status, _, _ = await http.put(
        "/v1/agent/service/register", json={"Name": "web"}, headers={"X-Consul-Token": TOKEN}
    )
    assert status == 200
    status, services, _ = await http.get(
        "/v1/catalog/services", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert set(services) == {"consul", "web"}
    # Anonymous reads are filtered, not refused.
    status, services, _ = await http.get("/v1/catalog/services")
    assert (status, services) == (200, {})


@pytest.mark.parametrize("dev_config", [DevConfig(acl_initial_management_token=TOKEN)])
async def test_acl_unknown_token_is_acl_not_found(http: Http) -> None:
    status, text, _ = await http.get("/v1/catalog/services", headers={"X-Consul-Token": "nope"})
    assert (status, text) == (403, "ACL not found")


async def test_agent_token_endpoint_without_acls_is_401(http: Http) -> None:
    status, text, _ = await http.put("/v1/agent/token/default", json={"Token": "x"})
    assert (status, text) == (401, "ACL support disabled")


async def test_effective_consistency_header(http: Http) -> None:
    for params, mode in (
        ({}, "leader"),
        ({"stale": ""}, "stale"),
        ({"consistent": ""}, "consistent"),
    ):
        _, _, headers = await http.get("/v1/catalog/services", params=params)
        assert headers["X-Consul-Effective-Consistency"] == mode
