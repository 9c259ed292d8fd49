"""`plan_apply`: what `meshlet intentions apply` may touch, keep, replace and refuse."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from intentions.apply import (
    MANAGED_DESCRIPTION,
    MANAGED_KEY,
    POLICIES_KEY,
    ApplyOptions,
    ApplyPlan,
    CatalogService,
    EntryChange,
    PlanRefused,
    Protocols,
    format_plan,
    plan_apply,
)
from intentions.entries import ServiceIntentions, load_entry
from intentions.policy import AuthorizationPolicy, load_policies
from intentions.translate import TranslateOptions

CATALOG = (
    CatalogService("api"),
    CatalogService("web"),
    CatalogService("api-sidecar-proxy", "connect-proxy"),
    CatalogService("web-sidecar-proxy", "connect-proxy"),
    CatalogService("mesh-gateway", "mesh-gateway"),
    CatalogService("egress", "terminating-gateway"),
    CatalogService("consul"),
)
HTTP = Protocols({"api": "http", "web": "http"})


def policies(*specs: dict[str, Any], namespace: str = "default") -> list[AuthorizationPolicy]:
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": spec.pop("name", f"p{i}"), "namespace": namespace},
            "spec": spec,
        }
        for i, spec in enumerate(specs)
    ]
    return list(load_policies(yaml.safe_dump_all(docs), origin="t.yaml"))


def allow(
    app: str, principal: str = "frontend", namespace: str = "default", **extra: Any
) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "from": [{"source": {"principals": [f"cluster.local/ns/{namespace}/sa/{principal}"]}}]
    }
    rule.update(extra)
    return {"selector": {"matchLabels": {"app": app}}, "rules": [rule]}


def held(name: str, *sources: dict[str, Any], index: int = 7, **top: Any) -> ServiceIntentions:
    body = {"Kind": "service-intentions", "Name": name, "Sources": list(sources), **top}
    return dataclasses.replace(load_entry(body), modify_index=index)


def plan(
    pols: Sequence[AuthorizationPolicy],
    current: Sequence[ServiceIntentions] = (),
    *,
    protocols: Protocols = HTTP,
    catalog: Sequence[CatalogService] = CATALOG,
    **options: Any,
) -> ApplyPlan:
    return plan_apply(pols, catalog, protocols, current, ApplyOptions(**options))


def by_name(result: ApplyPlan) -> dict[str, EntryChange]:
    return {c.name: c for c in result.changes}


def statuses(change: EntryChange) -> list[tuple[str, str]]:
    return [(c.status, c.label) for c in change.sources]


def test_only_services_a_policy_selects_are_planned() -> None:
    hand = held("api", {"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"})
    result = plan(policies(allow("web")), [hand])
    # Before: api (the translator's allow-all), the proxies and the gateways were all planned.
    assert list(by_name(result)) == ["web"]
    assert result.notes == ()


def test_namespace_wide_policy_never_reaches_proxies_gateways_or_consul() -> None:
    deny = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}
    result = plan(policies(deny))
    assert sorted(by_name(result)) == ["api", "web"]


def test_deny_only_policy_warns_that_everybody_else_is_allowed() -> None:
    deny = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}
    result = plan(policies(deny | {"selector": {"matchLabels": {"app": "api"}}}))
    (warning,) = result.warnings
    assert warning.startswith("default/api: no ALLOW policy selects it, so callers")


def test_a_proxy_registered_as_a_typical_service_is_still_a_proxy() -> None:
    result = plan(policies({}), catalog=[CatalogService("x"), CatalogService("x-sidecar-proxy")])
    assert list(by_name(result)) == ["x"]


@pytest.mark.parametrize("target", ["web-sidecar-proxy", "mesh-gateway", "egress", "consul"])
def test_selector_naming_a_proxy_gateway_or_consul_is_refused(target: str) -> None:
    with pytest.raises(PlanRefused, match=target):
        plan(policies(allow(target)))


def test_services_listing_a_proxy_is_refused() -> None:
    with pytest.raises(PlanRefused, match="--services lists 'api-sidecar-proxy'"):
        plan(policies(allow("web")), only={("default", "api-sidecar-proxy"): ""})


def test_services_filters_and_says_what_it_left_alone() -> None:
    deny = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}
    result = plan(policies(deny), only={("default", "web"): ""})
    assert list(by_name(result)) == ["web"]
    assert result.notes == (
        "default/api: left alone: selected by default/p0 but not in --services",
    )
    result = plan(policies(allow("web")), only={("default", "web"): "", ("default", "api"): ""})
    assert list(by_name(result)) == ["web"]
    assert result.notes == ("default/api: left alone: no enforced policy selects it",)


def test_warnings_about_services_left_alone_are_not_shown() -> None:
    anyone = {"selector": {"matchLabels": {"app": "api"}}, "rules": [{}]}
    assert any("plaintext" in w for w in plan(policies(anyone)).warnings)
    result = plan(policies(anyone, allow("web")), only={("default", "web"): ""})
    assert result.warnings == ()


def test_dry_run_or_audit_only_policy_touches_nothing() -> None:
    dry = allow("api") | {"name": "dry"}
    audit = allow("api") | {"action": "AUDIT", "name": "audit"}
    docs = policies(dry, audit)
    docs[0] = dataclasses.replace(docs[0], dry_run=True)
    result = plan(docs, only={("default", "api"): ""})
    assert result.changes == ()
    assert "default/api: left alone: no enforced policy selects it" in result.notes


def test_selected_service_not_in_the_catalog_is_planned_and_noted() -> None:
    result = plan(policies(allow("payments")), protocols=Protocols({"payments": "http"}))
    assert list(by_name(result)) == ["payments"]
    assert result.notes == ("default/p0 selects 'payments', which is not in the catalog (yet)",)


def test_written_entries_are_marked() -> None:
    (change,) = plan(policies(allow("web"))).changes
    assert change.action == "create" and change.cas == 0
    assert dict(change.entry.meta) == {MANAGED_KEY: "true", POLICIES_KEY: "default/p0"}
    assert {s.description for s in change.entry.sources} == {MANAGED_DESCRIPTION}
    assert change.body["Meta"][MANAGED_KEY] == "true"


def test_long_policy_lists_are_clipped_to_consuls_meta_limit() -> None:
    many = [allow("web") | {"name": f"policy-with-a-long-name-{i:03}"} for i in range(40)]
    (change,) = plan(policies(*many)).changes
    value = dict(change.entry.meta)[POLICIES_KEY]
    assert len(value) == 512 and value.endswith("...")


def test_applying_twice_is_unchanged() -> None:
    (first,) = plan(policies(allow("web"))).changes
    stored = dataclasses.replace(load_entry(first.body), modify_index=42)
    (again,) = plan(policies(allow("web")), [stored]).changes
    assert (again.action, again.cas) == ("unchanged", 42)
    assert {c.status for c in again.sources} == {"same"}
    assert format_plan(plan(policies(allow("web")), [stored])) == "unchanged: default/web\n"


def test_hand_written_source_is_kept_with_a_warning() -> None:
    hand = held("web", {"Name": "db", "Action": "allow"}, Meta={"owner": "team-a"})
    result = plan(policies(allow("web")), [hand])
    (change,) = result.changes
    assert change.action == "update" and change.cas == 7
    assert ("keep", "db") in statuses(change)
    assert [s.name for s in change.entry.sources] == ["frontend", "db", "*"]
    assert dict(change.entry.meta)["owner"] == "team-a"
    (warning,) = result.warnings
    assert "source db was not written by meshlet: kept" in warning and "--prune" in warning


def test_prune_removes_hand_written_sources() -> None:
    hand = held("web", {"Name": "db", "Action": "allow"})
    (change,) = plan(policies(allow("web")), [hand], prune=True).changes
    assert ("prune", "db") in statuses(change)
    assert [s.name for s in change.entry.sources] == ["frontend", "*"]


def test_hand_written_source_the_policy_redefines_needs_prune() -> None:
    hand = held("web", {"Name": "frontend", "Action": "allow"})
    policy = policies(allow("web", to=[{"operation": {"paths": ["/public/*"]}}]))
    with pytest.raises(PlanRefused, match="source frontend was not written by meshlet"):
        plan(policy, [hand])
    (change,) = plan(policy, [hand], prune=True).changes
    assert ("change", "frontend") in statuses(change)
    (frontend,) = [s for s in change.entry.sources if s.name == "frontend"]
    assert len(frontend.permissions) == 2


def test_identical_hand_written_source_is_adopted() -> None:
    hand = held("web", {"Name": "frontend", "Action": "allow"})
    (change,) = plan(policies(allow("web")), [hand]).changes
    assert ("adopt", "frontend") in statuses(change)
    assert change.action == "update"  # it gains meshlet's mark
    (frontend,) = [s for s in change.entry.sources if s.name == "frontend"]
    assert frontend.description == MANAGED_DESCRIPTION


def test_sources_meshlet_wrote_are_replaced_and_removed_without_prune() -> None:
    (first,) = plan(policies(allow("web"))).changes
    stored = load_entry(first.body)
    (change,) = plan(policies(allow("web", principal="other")), [stored]).changes
    assert statuses(change) == [("remove", "frontend"), ("add", "other"), ("same", "*/*")]
    assert "frontend" not in [s.name for s in change.entry.sources]


def test_legacy_fields_of_kept_sources_are_not_written_back() -> None:
    hand = held("web", {"Name": "db", "Action": "allow"})
    legacy = dataclasses.replace(
        hand.sources[0], legacy_id="abc", legacy_meta=(("k", "v"),), legacy_create_time="t"
    )
    (change,) = plan(policies(allow("web")), [dataclasses.replace(hand, sources=(legacy,))]).changes
    (db,) = [s for s in change.body["Sources"] if s["Name"] == "db"]
    assert not {"LegacyID", "LegacyMeta", "LegacyCreateTime"} & db.keys()


def test_hand_written_jwt_requirement_needs_prune() -> None:
    hand = held("web", {"Name": "db", "Action": "allow"}, JWT={"Providers": [{"Name": "okta"}]})
    with pytest.raises(PlanRefused, match="JWT requirement"):
        plan(policies(allow("web")), [hand])
    (change,) = plan(policies(allow("web")), [hand], prune=True).changes
    assert change.jwt_removed and change.entry.jwt is None


HTTP_ALLOW = allow("orders", to=[{"operation": {"paths": ["/public/*"]}}])


def test_allow_rule_dropped_for_an_unknown_protocol_is_refused() -> None:
    catalog = [CatalogService("orders")]
    with pytest.raises(PlanRefused) as err:
        plan(policies(HTTP_ALLOW), catalog=catalog, protocols=Protocols())
    (problem,) = err.value.problems
    assert "ALLOW default/p0 rules[0] uses HTTP-only fields on a tcp service" in problem
    assert "no service-defaults or proxy-defaults protocol" in problem
    assert "--allow-drop" in problem
    result = plan(policies(HTTP_ALLOW), catalog=catalog, protocols=Protocols(), allow_drop=True)
    (change,) = result.changes
    assert [(s.name, s.action) for s in change.entry.sources] == [("*", "deny")]
    assert any("whole ALLOW rule is ignored" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("protocols", "only"),
    [
        (Protocols({"orders": "http"}), None),
        (Protocols(mesh_default="http2"), None),
        (Protocols(), {("default", "orders"): "grpc"}),
    ],
)
def test_protocol_from_consul_or_services_keeps_the_rule(
    protocols: Protocols, only: dict[tuple[str, str], str] | None
) -> None:
    result = plan(
        policies(HTTP_ALLOW), catalog=[CatalogService("orders")], protocols=protocols, only=only
    )
    (change,) = result.changes
    assert change.entry.sources[0].permissions


def test_a_drop_on_a_service_not_planned_is_not_an_error() -> None:
    result = plan(
        policies(HTTP_ALLOW),
        catalog=[CatalogService("orders"), CatalogService("web")],
        protocols=Protocols({"web": "http"}),
        only={("default", "web"): ""},
    )
    assert result.changes == () and result.warnings == ()


def test_consul_ce_single_namespace() -> None:
    options = TranslateOptions(single_namespace="production")
    docs = policies(allow("web", namespace="production"), namespace="production")
    result = plan(docs, translate=options, namespace="production", only={("production", "web"): ""})
    (change,) = result.changes
    assert change.label == "default/web"


def test_diff_is_one_block_per_entry() -> None:
    hand = held("web", {"Name": "db", "Action": "allow"}, {"Name": "legacy", "Action": "deny"})
    api_policy = allow("api") | {"name": "api-allow"}
    (stored_api,) = plan(policies(dict(api_policy))).changes
    api = dataclasses.replace(load_entry(stored_api.body), modify_index=3)
    web_policy = allow("web", to=[{"operation": {"methods": ["GET"], "paths": ["/x"]}}])
    result = plan(
        policies(web_policy | {"name": "web-allow"}, api_policy),
        [hand, api],
        prune=True,
    )
    assert format_plan(result).splitlines() == [
        "default/web: update",
        "  - db: allow  (not written by meshlet; --prune)",
        "  + frontend",
        "  +     allow Methods=GET PathExact=/x",
        "  +     deny  PathRegex=.*",
        "  - legacy: deny  (not written by meshlet; --prune)",
        "  + */*: deny",
        "  + Meta meshlet.io/managed: true",
        "  + Meta meshlet.io/policies: default/web-allow",
        "unchanged: default/api",
    ]
