"""/v1/connect/intentions*: views and edits over service-intentions entries."""

from __future__ import annotations

import pytest

from devstack.config import DevConfig
from tests.conftest import Http


async def test_exact_upsert_read_list_match_check_delete(http: Http) -> None:
    q = {"source": "web", "destination": "db"}
    status, ok, _ = await http.put(
        "/v1/connect/intentions/exact", params=q, json={"Action": "allow", "Description": "d"}
    )
    assert (status, ok) == (200, True)
    _, got, _ = await http.get("/v1/connect/intentions/exact", params=q)
    assert (got["SourceName"], got["DestinationName"], got["Action"]) == ("web", "db", "allow")
    assert (got["SourceNS"], got["Precedence"], got["Description"]) == ("default", 9, "d")
    # The write is a config entry.
    _, entry, _ = await http.get("/v1/config/service-intentions/db")
    assert entry["Sources"][0]["Name"] == "web"
    await http.put(
        "/v1/connect/intentions/exact",
        params={"source": "*", "destination": "db"},
        json={"Action": "deny"},
    )
    _, listed, headers = await http.get("/v1/connect/intentions")
    assert [(i["SourceName"], i["Precedence"]) for i in listed] == [("web", 9), ("*", 8)]
    assert "X-Consul-Index" in headers
    _, matched, _ = await http.get(
        "/v1/connect/intentions/match", params={"by": "destination", "name": "db"}
    )
    assert [i["SourceName"] for i in matched["db"]] == ["web", "*"]
    _, allowed, _ = await http.get("/v1/connect/intentions/check", params=q)
    assert allowed == {"Allowed": True}
    _, denied, _ = await http.get(
        "/v1/connect/intentions/check", params={"source": "api", "destination": "db"}
    )
    assert denied == {"Allowed": False}
    assert (await http.call("DELETE", "/v1/connect/intentions/exact", params=q))[1] is True
    status, text, _ = await http.get("/v1/connect/intentions/exact", params=q)
    assert (status, text) == (404, "Intention not found")
    await http.call(
        "DELETE", "/v1/connect/intentions/exact", params={"source": "*", "destination": "db"}
    )
    # The last source gone, the entry is gone.
    status, _, _ = await http.get("/v1/config/service-intentions/db")
    assert status == 404


@pytest.mark.parametrize(
    ("path", "params", "text"),
    [
        (
            "/v1/connect/intentions/exact",
            {"destination": "db"},
            "required query parameter 'source' not set",
        ),
        ("/v1/connect/intentions/match", {"name": "db"}, "required query parameter 'by' not set"),
        (
            "/v1/connect/intentions/match",
            {"by": "x", "name": "db"},
            "'by' parameter must be one of 'source' or 'destination'",
        ),
        (
            "/v1/connect/intentions/exact",
            {"source": "a/b/c/d", "destination": "db"},
            "source \"a/b/c/d\" is invalid: input can contain at most two '/'",
        ),
    ],
)
async def test_parameter_errors_are_500_plain(
    http: Http, path: str, params: dict[str, str], text: str
) -> None:
    status, body, _ = await http.get(path, params=params)
    assert (status, body) == (500, text)


async def test_l7_intention_checks_as_denied_and_needs_http(http: Http) -> None:
    q = {"source": "web", "destination": "api"}
    perms = {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    status, text, _ = await http.put("/v1/connect/intentions/exact", params=q, json=perms)
    assert status == 500
    assert "incompatible with L7 intentions permissions" in text
    await http.put(
        "/v1/config", json={"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    )
    assert (await http.put("/v1/connect/intentions/exact", params=q, json=perms))[0] == 200
    # The check API is L4: an L7 intention does not allow a connection there.
    _, result, _ = await http.get("/v1/connect/intentions/check", params=q)
    assert result == {"Allowed": False}


async def test_legacy_id_api(http: Http) -> None:
    status, created, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "allow", "Meta": {"k": "v"}},
    )
    assert status == 200
    ident = created["ID"]
    _, got, _ = await http.get(f"/v1/connect/intentions/{ident}")
    assert (got["ID"], got["Meta"], got["Action"]) == (ident, {"k": "v"}, "allow")
    status, text, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert status == 500
    assert "duplicate intention found" in text
    await http.put(f"/v1/connect/intentions/{ident}", json={"Action": "deny"})
    _, got, _ = await http.get(f"/v1/connect/intentions/{ident}")
    assert got["Action"] == "deny"
    assert (await http.call("DELETE", f"/v1/connect/intentions/{ident}"))[1] is True
    status, text, _ = await http.get(f"/v1/connect/intentions/{ident}")
    assert (status, text) == (404, "Intention not found")


@pytest.mark.parametrize("dev_config", [DevConfig(default_intention_policy="deny")])
async def test_default_intention_policy_decides_unmatched(http: Http) -> None:
    _, result, _ = await http.get(
        "/v1/connect/intentions/check", params={"source": "web", "destination": "db"}
    )
    assert result == {"Allowed": False}


async def test_agent_authorize_uses_the_same_engine(http: Http) -> None:
    await http.put(
        "/v1/connect/intentions/exact",
        params={"source": "web", "destination": "db"},
        json={"Action": "deny"},
    )
    _, roots, _ = await http.get("/v1/connect/ca/roots")
    uri = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web"
    status, body, _ = await http.call(
        "POST", "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": uri}
    )
    assert status == 200
    assert body == {"Authorized": False, "Reason": "Matched L4 intention: web => db (deny)"}
    other = uri.replace("/svc/web", "/svc/api")
    _, body, _ = await http.call(
        "POST", "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": other}
    )
    assert body == {"Authorized": True, "Reason": "Default behavior configured by ACLs"}


async def test_list_filter(http: Http) -> None:
    for source, action in (("web", "allow"), ("api", "deny")):
        await http.put(
            "/v1/connect/intentions/exact",
            params={"source": source, "destination": "db"},
            json={"Action": action},
        )
    _, listed, _ = await http.get("/v1/connect/intentions", params={"filter": 'Action == "deny"'})
    assert [i["SourceName"] for i in listed] == ["api"]
    status, text, _ = await http.get("/v1/connect/intentions", params={"filter": "Nope == 1"})
    assert status == 500
    assert text.startswith('Failed to create boolean expression evaluator: Selector "Nope"')


async def test_legacy_create_stores_the_shape_consul_reads_back(http: Http) -> None:
    """A legacy create is stored as Consul's `LegacyNormalize` leaves it (consul
    agent/structs/config_entry_intentions.go): Precedence and Type computed, LegacyID and both
    timestamps set, LegacyMeta only when non-empty (`omitempty`)."""
    for body in (
        {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
        {"SourceName": "ops", "DestinationName": "api", "Action": "allow", "Meta": {"k": "v"}},
    ):
        status, _, _ = await http.call("POST", "/v1/connect/intentions", json=body)
        assert status == 200
    _, entry, _ = await http.get("/v1/config/service-intentions/api")
    assert set(entry) == {"Kind", "Name", "Sources", "CreateIndex", "ModifyIndex"}
    web, ops = sorted(entry["Sources"], key=lambda s: s["Name"] != "web")
    legacy_keys = {"LegacyID", "LegacyCreateTime", "LegacyUpdateTime"}
    assert set(web) == {"Name", "Action", "Precedence", "Type"} | legacy_keys
    assert set(ops) == {"Name", "Action", "Precedence", "Type", "LegacyMeta"} | legacy_keys
    assert (web["Precedence"], web["Type"], ops["LegacyMeta"]) == (9, "consul", {"k": "v"})
    assert web["LegacyCreateTime"].endswith("Z")


async def test_legacy_api_refuses_a_destination_edited_through_config_entries(
    http: Http,
) -> None:
    entry = {
        "Kind": "service-intentions",
        "Name": "api",
        "Sources": [{"Name": "web", "Action": "allow"}],
    }
    assert (await http.put("/v1/config", json=entry))[0] == 200
    _, before, _ = await http.get("/v1/config/service-intentions/api")
    status, text, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={"SourceName": "ops", "DestinationName": "api", "Action": "allow"},
    )
    # Consul's checkLegacyIntentionApplyAllowed (agent/consul/intention_endpoint.go).
    assert status == 500
    assert text == (
        'cannot use legacy intention API to edit intentions with a destination of "api" after '
        "editing them via a service-intentions config entry"
    )
    assert (await http.get("/v1/config/service-intentions/api"))[1] == before


async def test_config_entry_writes_drop_what_only_the_legacy_api_sets(http: Http) -> None:
    """Consul's non-legacy `Normalize` clears LegacyID and the timestamps and `Validate` then
    refuses only a non-empty LegacyMeta: an entry read back from a legacy create can be written
    again (`consul config read | consul config write`), and the exact API can edit it."""
    status, created, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "api", "Action": "deny"},
    )
    assert status == 200
    _, read_back, _ = await http.get("/v1/config/service-intentions/api")
    assert read_back["Sources"][0]["LegacyID"] == created["ID"]
    status, ok, _ = await http.put("/v1/config", json=read_back)
    assert (status, ok) == (200, True)
    _, rewritten, _ = await http.get("/v1/config/service-intentions/api")
    assert set(rewritten["Sources"][0]) == {"Name", "Action", "Precedence", "Type"}
    assert (await http.get(f"/v1/connect/intentions/{created['ID']}"))[0] == 404

    status, created, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    status, ok, _ = await http.put(
        "/v1/connect/intentions/exact",
        params={"source": "ops", "destination": "db"},
        json={"Action": "allow"},
    )
    assert (status, ok) == (200, True)
    _, db, _ = await http.get("/v1/config/service-intentions/db")
    assert [set(s) for s in db["Sources"]] == [{"Name", "Action", "Precedence", "Type"}] * 2

    status, _, _ = await http.call(
        "POST",
        "/v1/connect/intentions",
        json={
            "SourceName": "web",
            "DestinationName": "cache",
            "Action": "deny",
            "Meta": {"k": "v"},
        },
    )
    _, with_meta, _ = await http.get("/v1/config/service-intentions/cache")
    status, text, _ = await http.put("/v1/config", json=with_meta)
    assert (status, text) == (500, "Sources[0].LegacyMeta must be omitted")
