"""Every route devstack serves, called with a token whose policy grants nothing: each must refuse
(403), show nothing (filtered to empty), or be one of the few routes Consul serves without an ACL
check. The table names every route and method, so a route added without an entry, or an entry
whose handler forgot its check, fails here.

The state each read could leak (a service with a check, a KV key, a session, an intention, a
config entry, a policy) is created first with the management token."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.config import DevConfig
from devstack.server import build_router
from tests.conftest import Http

ROOT = "5d1f0c7e-8a0b-4c5e-9d7f-2b6a1e3c4d55"

DENIED = "denied"  # 403 with Consul's "Permission denied" text
FILTERED = "filtered"  # 200 with nothing in it, or the 404 a missing object gets
PUBLIC = "public"  # Consul serves it without an ACL check (the reason is in the table)

# (method, route) -> (probe path, body, outcome). The probe path fills a prefix route's tail.
# {session}, {intention}, {policy} and {token} are filled with IDs created in setup.
TABLE: dict[tuple[str, str], tuple[str, Any, str]] = {
    # No ACL rule applies, but once bootstrapped Consul answers "Permission denied: ACL bootstrap
    # no longer allowed", and logout refuses any token a login did not create.
    ("PUT", "/v1/acl/bootstrap"): ("/v1/acl/bootstrap", None, DENIED),
    ("POST", "/v1/acl/login"): ("/v1/acl/login", {"AuthMethod": "m", "BearerToken": "x"}, PUBLIC),
    ("POST", "/v1/acl/logout"): ("/v1/acl/logout", None, DENIED),
    ("GET", "/v1/acl/policies"): ("/v1/acl/policies", None, DENIED),
    ("PUT", "/v1/acl/policy"): ("/v1/acl/policy", {"Name": "n", "Rules": ""}, DENIED),
    ("GET", "/v1/acl/tokens"): ("/v1/acl/tokens", None, DENIED),
    ("PUT", "/v1/acl/token"): ("/v1/acl/token", {}, DENIED),
    ("GET", "/v1/acl/token/self"): ("/v1/acl/token/self", None, PUBLIC),  # a token reads itself
    ("GET", "/v1/agent/self"): ("/v1/agent/self", None, DENIED),
    ("GET", "/v1/agent/version"): ("/v1/agent/version", None, PUBLIC),
    ("GET", "/v1/agent/host"): ("/v1/agent/host", None, DENIED),
    ("GET", "/v1/agent/members"): ("/v1/agent/members", None, FILTERED),
    ("GET", "/v1/agent/metrics"): ("/v1/agent/metrics", None, DENIED),
    ("GET", "/v1/agent/monitor"): ("/v1/agent/monitor", None, DENIED),
    ("PUT", "/v1/agent/reload"): ("/v1/agent/reload", None, DENIED),
    ("PUT", "/v1/agent/leave"): ("/v1/agent/leave", None, DENIED),
    ("PUT", "/v1/agent/maintenance"): ("/v1/agent/maintenance?enable=true", None, DENIED),
    ("GET", "/v1/agent/services"): ("/v1/agent/services", None, FILTERED),
    ("PUT", "/v1/agent/service/register"): ("/v1/agent/service/register", {"Name": "x"}, DENIED),
    ("GET", "/v1/agent/checks"): ("/v1/agent/checks", None, FILTERED),
    ("PUT", "/v1/agent/check/register"): (
        "/v1/agent/check/register",
        {"Name": "c2", "TTL": "10s"},
        DENIED,
    ),
    ("PUT", "/v1/catalog/register"): (
        "/v1/catalog/register",
        {"Node": "n2", "Address": "127.0.0.2"},
        DENIED,
    ),
    ("PUT", "/v1/catalog/deregister"): ("/v1/catalog/deregister", {"Node": "n2"}, DENIED),
    ("GET", "/v1/catalog/datacenters"): ("/v1/catalog/datacenters", None, PUBLIC),
    ("GET", "/v1/catalog/nodes"): ("/v1/catalog/nodes", None, FILTERED),
    ("GET", "/v1/catalog/services"): ("/v1/catalog/services", None, FILTERED),
    ("PUT", "/v1/config"): (
        "/v1/config",
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        DENIED,
    ),
    ("GET", "/v1/connect/intentions"): ("/v1/connect/intentions", None, FILTERED),
    ("POST", "/v1/connect/intentions"): (
        "/v1/connect/intentions",
        {"SourceName": "a", "DestinationName": "b", "Action": "allow"},
        DENIED,
    ),
    ("GET", "/v1/connect/intentions/exact"): (
        "/v1/connect/intentions/exact?source=web&destination=api",
        None,
        DENIED,
    ),
    ("PUT", "/v1/connect/intentions/exact"): (
        "/v1/connect/intentions/exact?source=web&destination=api",
        {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
        DENIED,
    ),
    ("DELETE", "/v1/connect/intentions/exact"): (
        "/v1/connect/intentions/exact?source=web&destination=api",
        None,
        DENIED,
    ),
    ("GET", "/v1/connect/intentions/match"): (
        "/v1/connect/intentions/match?by=destination&name=api",
        None,
        DENIED,
    ),
    ("GET", "/v1/connect/intentions/check"): (
        "/v1/connect/intentions/check?source=web&destination=api",
        None,
        DENIED,
    ),
    ("PUT", "/v1/session/create"): ("/v1/session/create", {}, DENIED),
    ("GET", "/v1/session/list"): ("/v1/session/list", None, FILTERED),
    ("GET", "/v1/status/leader"): ("/v1/status/leader", None, PUBLIC),
    ("GET", "/v1/status/peers"): ("/v1/status/peers", None, PUBLIC),
    ("GET", "/v1/connect/ca/roots"): ("/v1/connect/ca/roots", None, PUBLIC),  # public keys
    ("GET", "/v1/agent/connect/ca/roots"): ("/v1/agent/connect/ca/roots", None, PUBLIC),
    ("GET", "/v1/connect/ca/configuration"): ("/v1/connect/ca/configuration", None, DENIED),
    ("PUT", "/v1/connect/ca/configuration"): (
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {}},
        DENIED,
    ),
    ("POST", "/v1/agent/connect/authorize"): (
        "/v1/agent/connect/authorize",
        {"Target": "api", "ClientCertURI": "spiffe://x.consul/ns/default/dc/dc1/svc/web"},
        DENIED,
    ),
    # Reads in a transaction are filtered on the way out, as Consul's Txn.Read does.
    ("PUT", "/v1/txn"): ("/v1/txn", [{"KV": {"Verb": "get", "Key": "k"}}], FILTERED),
    ("PUT", "/v1/agent/service/maintenance/"): (
        "/v1/agent/service/maintenance/web?enable=true",
        None,
        DENIED,
    ),
    ("GET", "/v1/agent/health/service/name/"): (
        "/v1/agent/health/service/name/web",
        None,
        DENIED,
    ),
    ("PUT", "/v1/agent/service/deregister/"): ("/v1/agent/service/deregister/web", None, DENIED),
    ("GET", "/v1/catalog/gateway-services/"): ("/v1/catalog/gateway-services/gw", None, DENIED),
    ("GET", "/v1/agent/health/service/id/"): ("/v1/agent/health/service/id/web", None, DENIED),
    ("PUT", "/v1/agent/check/deregister/"): ("/v1/agent/check/deregister/chk", None, DENIED),
    ("GET", "/v1/catalog/node-services/"): ("/v1/catalog/node-services/{node}", None, FILTERED),
    ("GET", "/v1/agent/connect/ca/leaf/"): ("/v1/agent/connect/ca/leaf/web", None, DENIED),
    ("PUT", "/v1/agent/check/update/"): (
        "/v1/agent/check/update/chk",
        {"Status": "passing"},
        DENIED,
    ),
    ("PUT", "/v1/agent/check/pass/"): ("/v1/agent/check/pass/chk", None, DENIED),
    ("PUT", "/v1/agent/check/warn/"): ("/v1/agent/check/warn/chk", None, DENIED),
    ("PUT", "/v1/agent/check/fail/"): ("/v1/agent/check/fail/chk", None, DENIED),
    ("GET", "/v1/connect/intentions/"): ("/v1/connect/intentions/{intention}", None, DENIED),
    ("PUT", "/v1/connect/intentions/"): (
        "/v1/connect/intentions/{intention}",
        {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
        DENIED,
    ),
    ("DELETE", "/v1/connect/intentions/"): ("/v1/connect/intentions/{intention}", None, DENIED),
    ("PUT", "/v1/agent/force-leave/"): ("/v1/agent/force-leave/other", None, DENIED),
    ("GET", "/v1/acl/policy/name/"): ("/v1/acl/policy/name/reader", None, DENIED),
    ("GET", "/v1/catalog/service/"): ("/v1/catalog/service/web", None, FILTERED),
    ("GET", "/v1/catalog/connect/"): ("/v1/catalog/connect/web", None, FILTERED),
    ("GET", "/v1/discovery-chain/"): ("/v1/discovery-chain/web", None, DENIED),
    ("POST", "/v1/discovery-chain/"): ("/v1/discovery-chain/web", {}, DENIED),
    ("PUT", "/v1/session/destroy/"): ("/v1/session/destroy/{session}", None, DENIED),
    ("GET", "/v1/health/service/"): ("/v1/health/service/web", None, FILTERED),
    ("GET", "/v1/health/connect/"): ("/v1/health/connect/web", None, FILTERED),
    ("GET", "/v1/health/ingress/"): ("/v1/health/ingress/web", None, FILTERED),
    ("GET", "/v1/agent/service/"): ("/v1/agent/service/web", None, DENIED),
    ("GET", "/v1/health/checks/"): ("/v1/health/checks/web", None, FILTERED),
    ("PUT", "/v1/session/renew/"): ("/v1/session/renew/{session}", None, DENIED),
    ("GET", "/v1/catalog/node/"): ("/v1/catalog/node/{node}", None, FILTERED),
    ("GET", "/v1/health/state/"): ("/v1/health/state/any", None, FILTERED),
    ("GET", "/v1/session/info/"): ("/v1/session/info/{session}", None, FILTERED),
    ("GET", "/v1/session/node/"): ("/v1/session/node/{node}", None, FILTERED),
    ("PUT", "/v1/agent/token/"): ("/v1/agent/token/default", {"Token": "x"}, DENIED),
    ("GET", "/v1/health/node/"): ("/v1/health/node/{node}", None, FILTERED),
    ("GET", "/v1/acl/policy/"): ("/v1/acl/policy/{policy}", None, DENIED),
    ("PUT", "/v1/acl/policy/"): ("/v1/acl/policy/{policy}", {"Name": "r", "Rules": ""}, DENIED),
    ("DELETE", "/v1/acl/policy/"): ("/v1/acl/policy/{policy}", None, DENIED),
    ("PUT", "/v1/agent/join/"): ("/v1/agent/join/127.0.0.9", None, DENIED),
    ("GET", "/v1/acl/token/"): ("/v1/acl/token/{token}", None, DENIED),
    ("PUT", "/v1/acl/token/"): ("/v1/acl/token/{token}", {}, DENIED),
    ("DELETE", "/v1/acl/token/"): ("/v1/acl/token/{token}", None, DENIED),
    ("GET", "/v1/config/"): ("/v1/config/service-defaults/web", None, DENIED),
    ("DELETE", "/v1/config/"): ("/v1/config/service-defaults/web", None, DENIED),
    ("GET", "/v1/kv/"): ("/v1/kv/k", None, DENIED),
    ("PUT", "/v1/kv/"): ("/v1/kv/k", None, DENIED),
    ("DELETE", "/v1/kv/"): ("/v1/kv/k", None, DENIED),
}

# Reads that filter a list show nothing; these also refuse a listing (recurse, kind lists).
EXTRA_FILTERED = [
    "/v1/kv/?recurse",
    "/v1/kv/?keys",
    "/v1/config/service-defaults",
]


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig(acl_initial_management_token=ROOT, default_policy="deny")


def _routes() -> set[tuple[str, str]]:
    routes = build_router().routes()
    return {(method, route.path) for route in routes for method in route.methods}


def test_the_table_names_every_route_devstack_serves() -> None:
    served = _routes()
    assert served - TABLE.keys() == set(), "routes with no ACL entry in this table"
    assert TABLE.keys() - served == set(), "entries for routes devstack no longer serves"


async def _state(http: Http, dev: Any) -> dict[str, str]:
    root = {"X-Consul-Token": ROOT}

    async def ok(method: str, path: str, body: Any = None) -> Any:
        status, answer, _ = await http.call(method, path, json=body, headers=root)
        assert status == 200, (path, answer)
        return answer

    await ok(
        "PUT",
        "/v1/agent/service/register",
        {"Name": "web", "ID": "web", "Port": 80, "Check": {"CheckID": "chk", "TTL": "60s"}},
    )
    await ok("PUT", "/v1/kv/k", "v")
    await ok("PUT", "/v1/config", {"Kind": "service-defaults", "Name": "web", "Protocol": "http"})
    await ok("PUT", "/v1/connect/intentions/exact?source=web&destination=api", {"Action": "allow"})
    # Only intentions made through the legacy ID-based API have an ID.
    legacy = {"SourceName": "db", "DestinationName": "cache", "Action": "deny"}
    intention = (await ok("POST", "/v1/connect/intentions", legacy))["ID"]
    session = (await ok("PUT", "/v1/session/create", {}))["ID"]
    policy = (await ok("PUT", "/v1/acl/policy", {"Name": "reader", "Rules": ""}))["ID"]
    nothing = await ok("PUT", "/v1/acl/token", {"Policies": [{"Name": "reader"}]})
    return {
        "node": dev.config.node_name,
        "session": session,
        "intention": intention,
        "policy": policy,
        "token": nothing["AccessorID"],
        "secret": nothing["SecretID"],
    }


def _empty(body: Any) -> bool:
    if body in (None, [], {}, ""):
        return True
    if isinstance(body, dict):  # /v1/catalog/node-services: {"Node": null, "Services": []}
        return all(_empty(value) for value in body.values())
    return False


async def test_a_token_granting_nothing_gets_nothing_anywhere(http: Http, dev: Any) -> None:
    ids = await _state(http, dev)
    headers = {"X-Consul-Token": ids["secret"]}
    wrong: list[str] = []
    for (method, _route), (path, body, outcome) in sorted(TABLE.items()):
        if path == "/v1/agent/monitor":
            continue  # streams until the client goes: checked on its own below
        status, answer, _ = await http.call(method, path.format(**ids), json=body, headers=headers)
        denied = status == 403 and "Permission denied" in str(answer)
        if outcome == DENIED and not denied:
            wrong.append(f"{method} {path}: expected 403, got {status} {str(answer)[:120]}")
        elif outcome == FILTERED and not (status == 404 or (status == 200 and _empty(answer))):
            wrong.append(f"{method} {path}: expected nothing, got {status} {str(answer)[:120]}")
        elif outcome == PUBLIC and denied:
            wrong.append(f"{method} {path}: public in Consul, got 403")
    for path in EXTRA_FILTERED:
        status, answer, _ = await http.get(path, headers=headers)
        if not (status in (403, 404) or (status == 200 and _empty(answer))):
            wrong.append(f"GET {path}: expected nothing, got {status} {str(answer)[:120]}")
    assert wrong == [], "\n".join(wrong)


async def test_monitor_refuses_a_token_without_agent_read(http: Http, dev: Any) -> None:
    ids = await _state(http, dev)
    status, answer, _ = await http.get(
        "/v1/agent/monitor", headers={"X-Consul-Token": ids["secret"]}
    )
    assert status == 403 and "Permission denied" in str(answer)
