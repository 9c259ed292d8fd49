"""The pure side of `meshlet intentions check`/`explain`, the legacy view, rendering, plans."""

from __future__ import annotations

from typing import Any

import pytest

from intentions.check import (
    CheckInputError,
    EntryChecker,
    PolicyChecker,
    format_decision,
    parse_destination,
    parse_request,
    parse_workload,
)
from intentions.entries import SourceIntention, load_entry
from intentions.legacy import exact, legacy_intentions, match, remove_source, upsert_source
from intentions.policy import load_policies
from intentions.render import entries_hcl, entries_json
from intentions.translate import translate

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/foo/sa/web"]}}]}]
"""
WORKLOAD = {
    "namespace": "foo",
    "labels": {"app": "httpbin"},
    "consul_service": "httpbin",
    "protocol": "http",
}


def req(principal: str | None, path: str = "/", **extra: Any) -> Any:
    return parse_request({"source_principal": principal, "method": "GET", "path": path, **extra})


def test_policy_checker_explains_which_rule_decided() -> None:
    checker = PolicyChecker.build(load_policies(POLICIES), parse_workload(WORKLOAD))
    web = "spiffe://cluster.local/ns/foo/sa/web"
    decision, origin = checker.explain(req(web, "/admin/x"))
    assert (decision.action, origin) == ("deny", "DENY foo/deny-admin rules[0]")
    decision, origin = checker.explain(req(web, "/ok"))
    assert (decision.action, origin) == ("allow", "ALLOW foo/web-only rules[0]")
    decision, origin = checker.explain(req("spiffe://cluster.local/ns/foo/sa/other"))
    assert decision.action == "deny"
    assert origin.startswith("catch-all deny: ALLOW policies apply (foo/web-only)")
    decision, origin = checker.explain(req(None))
    assert decision.action == "deny" and "no intention matched" in origin
    assert format_decision(decision) == "deny"
    assert format_decision(decision, with_reason=True).startswith("deny\tno trusted mTLS")


def test_identity_mapping() -> None:
    checker = PolicyChecker.build((), parse_workload(WORKLOAD))
    assert checker.identity(req("spiffe://cluster.local/ns/bar/sa/x")) is not None
    assert checker.identity(req("spiffe://other.td/ns/bar/sa/x")) is None  # foreign trust domain
    consul = checker.identity(req("spiffe://abc.consul/ns/bar/dc/dc1/svc/x"))
    assert consul is not None and (consul.namespace, consul.name) == ("bar", "x")


def test_entry_checker_uses_consul_semantics() -> None:
    destination, protocol = parse_destination({"name": "api", "protocol": "http"})
    checker = EntryChecker.build(
        [
            {
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [
                    {
                        "Name": "web",
                        "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}],
                    }
                ],
            }
        ],
        destination,
        protocol,
        default_allow=False,
    )
    web = {"name": "web", "namespace": "default"}
    assert checker.check(parse_request({"source": web, "method": "GET", "path": "/v1/x"})).allowed
    assert not checker.check(parse_request({"source": web, "method": "GET", "path": "/v2"})).allowed


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"headers": {"x": 1}}, r"request.headers\[x\] must be a string or a list of strings"),
        ({"port": "80"}, "request.port must be an integer"),
        ({"source": {"namespace": "x"}}, "request.source.name is required"),
        ({"method": 1}, "request.method must be a string"),
    ],
)
def test_bad_request_lines_name_the_field(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckInputError, match=message):
        parse_request(obj)


def test_source_shorthand() -> None:
    assert (
        parse_request({"source": "dev/web"}).source
        == parse_request({"source": {"name": "web", "namespace": "dev"}}).source
    )


def test_bad_workload() -> None:
    with pytest.raises(CheckInputError, match=r"workload\.namespace is required"):
        parse_workload({"consul_service": "a"})


def test_legacy_view_and_exact_edits() -> None:
    api = load_entry(
        {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}],
        }
    )
    star = load_entry(
        {"Kind": "service-intentions", "Name": "*", "Sources": [{"Name": "db", "Action": "allow"}]}
    )
    listed = [i.to_json() for i in legacy_intentions([star, api])]
    assert [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in listed] == [
        ("web", "api", 9),
        ("*", "api", 8),
        ("db", "*", 6),
    ]
    assert listed[0]["SourceNS"] == "default" and listed[0]["ID"] == ""
    assert [i.source.name for i in match([api, star], "destination", "api")] == ["web", "*", "db"]
    assert [i.entry.name for i in match([api, star], "source", "db")] == ["api", "*"]
    found = exact([api, star], "web", "api")
    assert found is not None and found.source.action == "allow"
    updated = upsert_source(api, "api", SourceIntention(name="web", action="deny"))
    assert [(s.name, s.action) for s in updated.sources] == [("web", "deny"), ("*", "deny")]
    created = upsert_source(None, "db", SourceIntention(name="web", action="allow"))
    assert (created.name, created.sources[0].precedence) == ("db", 9)
    assert remove_source(created, "web") is None


def test_render() -> None:
    # apply's plan is tested in test_authz_apply.py.
    entries = translate(load_policies(POLICIES)).entries
    assert '"Precedence"' not in entries_json(entries)
    hcl = entries_hcl(entries)
    assert 'Kind = "service-intentions"' in hcl and 'PathPrefix = "/admin"' in hcl


def test_consul_ce_mode_maps_one_istio_namespace() -> None:
    from intentions.translate import TranslateOptions

    options = TranslateOptions(single_namespace="foo")
    checker = PolicyChecker.build(load_policies(POLICIES), parse_workload(WORKLOAD), options)
    web = "spiffe://cluster.local/ns/foo/sa/web"
    assert checker.check(req(web, "/ok")).allowed
    assert not checker.check(req(web, "/admin")).allowed
    # Another Istio namespace does not exist in a CE mesh: no identity, so no access.
    assert checker.identity(req("spiffe://cluster.local/ns/bar/sa/web")) is None
    decision, origin = checker.explain(req(web, "/ok"))
    assert (decision.source, origin) == (("default", "web"), "ALLOW foo/web-only rules[0]")


def test_exact_put_body_becomes_a_source() -> None:
    from intentions.errors import EntryDecodeError
    from intentions.legacy import source_from_intention_body

    body = {"SourceType": "consul", "Action": "allow", "Description": "allow web to db"}
    src = source_from_intention_body(body, "web")
    assert (src.name, src.action, src.description, src.type) == (
        "web",
        "allow",
        "allow web to db",
        "consul",
    )
    l7 = source_from_intention_body(
        {"Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "/x"}}]}, "dev/web"
    )
    assert (l7.namespace, l7.permissions[0].action) == ("dev", "deny")
    with pytest.raises(EntryDecodeError, match='unknown field "Foo"'):
        source_from_intention_body({"Foo": 1}, "web")
    entry = upsert_source(None, "db", src)
    assert exact([entry], "web", "db") is not None
