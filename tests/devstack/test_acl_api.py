"""devstack's ACL system over real HTTP: policies and tokens made through /v1/acl/*, then
tokens trying what their policy does not allow, malformed rules, and list filtering.

Before this work devstack had no /v1/acl/* (404) and every non-management token was
"ACL not found", so each test here failed on the original code at its first ACL call."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.config import DevConfig
from tests.conftest import Http

ROOT = "3b2c7e6a-0d55-4f0f-9f6e-7a2e8f0c1d11"


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig(acl_initial_management_token=ROOT, default_policy="deny")


def root() -> dict[str, str]:
    return {"X-Consul-Token": ROOT}


async def make_token(http: Http, rules: str, name: str = "p", **extra: Any) -> dict[str, Any]:
    status, policy, _ = await http.put(
        "/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=root()
    )
    assert status == 200, policy
    status, token, _ = await http.put(
        "/v1/acl/token", json={"Policies": [{"Name": name}], **extra}, headers=root()
    )
    assert status == 200, token
    return dict(token)


async def test_policy_crud_and_read_by_name(http: Http) -> None:
    status, created, _ = await http.put(
        "/v1/acl/policy",
        json={"Name": "web", "Description": "d", "Rules": 'service "web" { policy = "write" }'},
        headers=root(),
    )
    assert status == 200
    assert created["Name"] == "web" and created["Rules"].startswith("service")
    pid = created["ID"]
    status, by_name, _ = await http.get("/v1/acl/policy/name/web", headers=root())
    assert (status, by_name["ID"]) == (200, pid)
    status, updated, _ = await http.put(
        f"/v1/acl/policy/{pid}", json={"Name": "web2", "Rules": ""}, headers=root()
    )
    assert (status, updated["Name"], updated["CreateIndex"]) == (
        200,
        "web2",
        created["CreateIndex"],
    )
    assert updated["ModifyIndex"] > created["ModifyIndex"]
    status, listed, _ = await http.get("/v1/acl/policies", headers=root())
    assert {p["Name"] for p in listed} == {"global-management", "web2"}
    assert all("Rules" not in p for p in listed)
    status, ok, _ = await http.call("DELETE", f"/v1/acl/policy/{pid}", headers=root())
    assert (status, ok) == (200, True)
    status, text, _ = await http.get(f"/v1/acl/policy/{pid}", headers=root())
    assert (status, text) == (404, "Requested policy does not exist: ACL not found")
    status, text, _ = await http.get("/v1/acl/policy/not-a-uuid", headers=root())
    assert (status, text) == (500, "failed acl policy lookup: UUID must be 36 characters")


async def test_token_crud_self_and_hidden_secrets(http: Http) -> None:
    token = await make_token(http, 'acl = "read"', description="reader")
    accessor, secret = token["AccessorID"], token["SecretID"]
    assert token["Policies"][0]["Name"] == "p"
    status, me, _ = await http.get("/v1/acl/token/self", headers={"X-Consul-Token": secret})
    assert (status, me["AccessorID"], me["SecretID"]) == (200, accessor, secret)
    # An acl:read token lists tokens, but never sees a secret.
    status, listed, _ = await http.get("/v1/acl/tokens", headers={"X-Consul-Token": secret})
    assert status == 200
    assert {t["SecretID"] for t in listed} == {"<hidden>"}
    assert ROOT not in str(listed) and secret not in str(listed)
    status, text, _ = await http.put(
        "/v1/acl/token", json={"Description": "more"}, headers={"X-Consul-Token": secret}
    )
    assert status == 403
    assert text == (
        f"Permission denied: token with AccessorID '{accessor}' lacks permission 'acl:write'"
    )
    status, updated, _ = await http.put(
        f"/v1/acl/token/{accessor}",
        json={"Description": "renamed", "ServiceIdentities": [{"ServiceName": "web"}]},
        headers=root(),
    )
    assert (status, updated["SecretID"], updated["Description"]) == (200, secret, "renamed")
    assert updated["ServiceIdentities"] == [{"ServiceName": "web"}]
    status, ok, _ = await http.call("DELETE", f"/v1/acl/token/{accessor}", headers=root())
    assert (status, ok) == (200, True)
    status, text, _ = await http.get("/v1/acl/token/self", headers={"X-Consul-Token": secret})
    assert (status, text) == (403, "ACL not found")


async def test_token_may_only_do_what_its_policy_allows(http: Http) -> None:
    rules = """
    service "web" { policy = "write" }
    service_prefix "" { policy = "read" }
    service "secret" { policy = "deny" }
    key_prefix "app/" { policy = "write" }
    key "app/locked" { policy = "read" }
    """
    token = await make_token(http, rules)
    me = {"X-Consul-Token": token["SecretID"]}
    accessor = token["AccessorID"]
    for name in ("web", "api", "secret"):
        status, _, _ = await http.put(
            "/v1/catalog/register",
            json={"Node": "n1", "Address": "10.0.0.1", "Service": {"Service": name}},
            headers=root(),
        )
        assert status == 200
    # Writes outside the policy are refused with Consul's text, and change nothing.
    status, text, _ = await http.put("/v1/agent/service/register", json={"Name": "api"}, headers=me)
    assert (status, text) == (
        403,
        f"Permission denied: token with AccessorID '{accessor}' lacks permission "
        "'service:write' on \"api\"",
    )
    status, services, _ = await http.get("/v1/agent/services", headers=root())
    assert "api" not in services
    # The exact rule beats the prefix: web is writable, but a sidecar of web is not.
    status, text, _ = await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 80, "Connect": {"SidecarService": {}}},
        headers=me,
    )
    assert status == 403 and "'service:write' on \"web-sidecar-proxy\"" in text
    status, _, _ = await http.put("/v1/agent/service/register", json={"Name": "web"}, headers=me)
    assert status == 200
    # Reads: exact deny beats the "" prefix; the list is filtered and says so.
    status, services, headers = await http.get("/v1/catalog/services", headers=me)
    assert status == 200
    assert set(services) == {"consul", "web", "api"}
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    status, nodes, _ = await http.get("/v1/catalog/service/secret", headers=me)
    assert (status, nodes) == (200, [])
    # node:read is not granted: health entries are filtered away.
    status, entries, headers = await http.get("/v1/health/service/api", headers=me)
    assert (status, entries) == (200, [])
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    # KV: longest prefix and exact rules.
    status, ok, _ = await http.put("/v1/kv/app/x", data=b"1", headers=me)
    assert (status, ok) == (200, True)
    status, text, _ = await http.put("/v1/kv/app/locked", data=b"1", headers=me)
    assert status == 403 and "'key:write' on \"app/locked\"" in text
    status, text, _ = await http.put("/v1/kv/other", data=b"1", headers=me)
    assert status == 403 and "'key:write' on \"other\"" in text
    # Not management: ACL endpoints and operator endpoints are refused.
    status, text, _ = await http.get("/v1/acl/policies", headers=me)
    assert status == 403 and "lacks permission 'acl:read'" in text
    status, text, _ = await http.get("/v1/connect/ca/configuration", headers=me)
    assert status == 403 and "lacks permission 'operator:write'" in text


async def test_intentions_follow_service_rules(http: Http) -> None:
    token = await make_token(
        http,
        'service "api" { policy = "read" intentions = "write" }\nservice "db" { policy = "write" }',
    )
    me = {"X-Consul-Token": token["SecretID"]}
    entry = {"Kind": "service-intentions", "Sources": [{"Name": "web", "Action": "allow"}]}
    status, ok, _ = await http.put("/v1/config", json={**entry, "Name": "api"}, headers=me)
    assert (status, ok) == (200, True)
    # service write implies intentions read only.
    status, text, _ = await http.put("/v1/config", json={**entry, "Name": "db"}, headers=me)
    assert status == 403 and "'intentions:write' on \"db\"" in text
    status, got, _ = await http.get("/v1/config/service-intentions/api", headers=me)
    assert status == 200 and got["Name"] == "api"
    # mesh falls back to operator, which the token lacks.
    status, text, _ = await http.put(
        "/v1/config", json={"Kind": "proxy-defaults", "Name": "global"}, headers=me
    )
    assert status == 403 and "lacks permission 'mesh:write'" in text


async def test_service_identity_grants_what_consul_documents(http: Http) -> None:
    status, token, _ = await http.put(
        "/v1/acl/token", json={"ServiceIdentities": [{"ServiceName": "web"}]}, headers=root()
    )
    assert status == 200
    me = {"X-Consul-Token": token["SecretID"]}
    status, _, _ = await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 80, "Connect": {"SidecarService": {}}},
        headers=me,
    )
    assert status == 200
    status, _, _ = await http.get("/v1/agent/connect/ca/leaf/web", headers=me)
    assert status == 200
    status, text, _ = await http.get("/v1/agent/connect/ca/leaf/api", headers=me)
    assert status == 403 and "'service:write' on \"api\"" in text
    status, services, _ = await http.get("/v1/catalog/services", headers=me)
    assert set(services) >= {"web", "web-sidecar-proxy", "consul"}


@pytest.mark.parametrize(
    ("rules", "error"),
    [
        ('service "web" { policy = "wrte" }', 'Invalid service policy: "web" {policy="wrte"}'),
        ('service "web" { policy = "read" intentions = "list" }', "Invalid service intentions"),
        ('operator = "list"', 'Invalid operator policy: "list"'),
        ('servic "web" { policy = "read" }', "Failed to parse ACL rules: invalid key 'servic'"),
        ('service "web" { policy = ', "Failed to parse ACL rules: unexpected end of rules"),
        ('{"service": {"web": {"policy": 1}}}', "Invalid service policy"),
        ('{"service": ', "Failed to parse ACL rules"),
        ('node "n" { policy = "write" sentinel = "x" }', "unknown field 'sentinel'"),
    ],
)
async def test_malformed_rules_are_refused_and_change_nothing(
    http: Http, rules: str, error: str
) -> None:
    status, text, _ = await http.put(
        "/v1/acl/policy", json={"Name": "bad", "Rules": rules}, headers=root()
    )
    assert status == 500
    assert error in text
    status, listed, _ = await http.get("/v1/acl/policies", headers=root())
    assert [p["Name"] for p in listed] == ["global-management"]


async def test_token_refusals_name_the_problem(http: Http) -> None:
    cases = [
        ({"Policies": [{"Name": "nope"}]}, 'No such ACL policy with name "nope"'),
        ({"ServiceIdentities": [{"ServiceName": ""}]}, "missing the service name"),
        ({"ServiceIdentities": [{"ServiceName": "Web!"}]}, 'Service identity "Web!" has an'),
        ({"Rules": 'acl = "write"'}, "Rules cannot be specified for this token"),
        ({"SecretID": ROOT}, "SecretID is already in use"),
    ]
    for body, error in cases:
        status, text, _ = await http.put("/v1/acl/token", json=body, headers=root())
        assert (status, error in text) == (500, True), (body, text)
    status, text, _ = await http.put("/v1/acl/token", json={"Bogus": 1}, headers=root())
    assert status == 400 and text.startswith("Token decoding failed:")
    status, tokens, _ = await http.get("/v1/acl/tokens", headers=root())
    assert len(tokens) == 2  # management and anonymous only


async def test_anonymous_token_gets_policies_too(http: Http) -> None:
    status, policy, _ = await http.put(
        "/v1/acl/policy",
        json={"Name": "anon", "Rules": 'key_prefix "pub/" { policy = "read" }'},
        headers=root(),
    )
    anonymous = "00000000-0000-0000-0000-000000000002"
    status, _, _ = await http.put(
        f"/v1/acl/token/{anonymous}", json={"Policies": [{"ID": policy["ID"]}]}, headers=root()
    )
    assert status == 200
    await http.put("/v1/kv/pub/a", data=b"1", headers=root())
    await http.put("/v1/kv/priv/b", data=b"1", headers=root())
    status, entries, _ = await http.get("/v1/kv/pub/a")
    assert status == 200 and entries[0]["Key"] == "pub/a"
    status, keys, headers = await http.get("/v1/kv/", params={"keys": ""})
    assert (status, keys) == (200, ["pub/a"])
    assert "X-Consul-Results-Filtered-By-ACLs" not in headers  # no token was named
    status, text, _ = await http.get("/v1/kv/priv/b")
    assert status == 403 and text.startswith("Permission denied: anonymous token lacks")
    status, text, _ = await http.call("DELETE", f"/v1/acl/token/{anonymous}", headers=root())
    assert (status, text) == (500, "Delete operation not permitted on the anonymous token")


@pytest.mark.parametrize("dev_config", [DevConfig()])
async def test_acl_endpoints_without_acls_are_401(http: Http) -> None:
    for path in ("/v1/acl/policies", "/v1/acl/tokens", "/v1/acl/token/self"):
        status, text, _ = await http.get(path)
        assert (status, text) == (401, "ACL support disabled")


async def test_sessions_checks_and_members_are_filtered(http: Http) -> None:
    token = await make_token(http, 'service "web" { policy = "read" }')
    me = {"X-Consul-Token": token["SecretID"]}
    status, created, _ = await http.put("/v1/session/create", json={}, headers=root())
    assert status == 200
    for name in ("web", "api"):
        await http.put(
            "/v1/agent/service/register",
            json={"Name": name, "Check": {"TTL": "60s"}},
            headers=root(),
        )
    status, sessions, headers = await http.get("/v1/session/list", headers=me)
    assert (status, sessions) == (200, [])
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    status, text, _ = await http.put(f"/v1/session/renew/{created['ID']}", headers=me)
    assert status == 403 and "lacks permission 'session:write' on \"meshlet-dev\"" in text
    status, checks, _ = await http.get("/v1/agent/checks", headers=me)
    assert [c["ServiceName"] for c in checks.values()] == ["web"]
    status, members, headers = await http.get("/v1/agent/members", headers=me)
    assert (status, members) == (200, [])
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"


async def test_clone_and_expiration(http: Http) -> None:
    token = await make_token(http, 'node_prefix "" { policy = "read" }', description="orig")
    anonymous = {"X-Consul-Token": "anonymous"}
    path = f"/v1/acl/token/{token['AccessorID']}/clone"
    status, text, _ = await http.put(path, json={}, headers=anonymous)
    assert status == 403 and "lacks permission 'acl:write'" in text
    status, clone, _ = await http.put(path, json={"Description": "copy"}, headers=root())
    assert status == 200
    assert clone["AccessorID"] != token["AccessorID"] and clone["SecretID"] != token["SecretID"]
    assert (clone["Description"], clone["Policies"]) == ("copy", token["Policies"])
    status, made, _ = await http.put("/v1/acl/token", json={"ExpirationTTL": "10m"}, headers=root())
    assert status == 200 and made["ExpirationTime"].endswith("Z")
    status, text, _ = await http.put("/v1/acl/token", json={"ExpirationTTL": "1s"}, headers=root())
    assert status == 500 and "should be between 1m0s and 24h0m0s" in text


async def test_agent_service_needs_service_read_only(http: Http) -> None:
    """A sidecar reads its own registration with service:read on its name and nothing else
    (Consul's AgentService checks ServiceReadAllowed only); the catalog, filtered by node:read
    on the instance's node as well, answers the same token with nothing."""
    body = {
        "Name": "web-sidecar-proxy",
        "Kind": "connect-proxy",
        "Port": 21000,
        "Proxy": {"DestinationServiceName": "web", "Config": {"local_request_timeout_ms": 5}},
    }
    assert (await http.put("/v1/agent/service/register", json=body, headers=root()))[0] == 200
    mine = {"X-Consul-Token": (await make_token(http, SIDECAR_READ))["SecretID"]}
    status, svc, headers = await http.get("/v1/agent/service/web-sidecar-proxy", headers=mine)
    assert status == 200
    assert svc["Proxy"]["Config"] == {"local_request_timeout_ms": 5}
    assert svc["ContentHash"] == headers["X-Consul-ContentHash"]
    status, catalog, _ = await http.get("/v1/catalog/service/web-sidecar-proxy", headers=mine)
    assert (status, catalog) == (200, [])

    nodes = {"X-Consul-Token": (await make_token(http, NODE_READ, name="n"))["SecretID"]}
    status, text, _ = await http.get("/v1/agent/service/web-sidecar-proxy", headers=nodes)
    assert status == 403
    assert "lacks permission 'service:read' on \"web-sidecar-proxy\"" in text
    # A hash-blocking read is refused the same way, at once.
    status, text, _ = await http.get(
        "/v1/agent/service/web-sidecar-proxy",
        params={"hash": svc["ContentHash"], "wait": "10m"},
        headers=nodes,
    )
    assert status == 403


SIDECAR_READ = 'service "web-sidecar-proxy" { policy = "read" }'
NODE_READ = 'node_prefix "" { policy = "read" }'
