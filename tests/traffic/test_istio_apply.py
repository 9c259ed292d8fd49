"""`meshlet routes apply`'s plan, decided without I/O: what it writes, keeps, refuses and
deletes given what Consul holds. (The process test in tests/integration/test_routes_cli.py runs
the parts devstack can hold today.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from traffic.from_istio import TranslateOptions, Translation, load_resources, translate
from traffic.istio_apply import (
    ApplyOptions,
    Facts,
    Key,
    PlanRefused,
    format_plan,
    plan_apply,
)

EXAMPLES = Path(__file__).parent / "istio-examples"
HTTP = Facts(protocols={"api": "http", "payment-service": "http"})


def _t(*names: str, **options: Any) -> Translation:
    resources = [r for n in names for r in load_resources((EXAMPLES / n).read_text(), n)]
    return translate(resources, TranslateOptions(**options))


def _held(*bodies: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    out = {}
    for n, given in enumerate(bodies, start=10):
        body = {**given, "CreateIndex": n, "ModifyIndex": n}
        out[(body["Kind"], "default", body["Name"])] = body
    return out


def _pa(mode: str, app: str = "api") -> Translation:
    text = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {app}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n"
        f"  mtls: {{mode: {mode}}}\n"
    )
    return translate(load_resources(text, "pa.yaml"))


def test_first_apply_creates_in_graph_order_marked_as_meshlets() -> None:
    t = _t("canary-virtualservice.yaml", "api-destinationrule.yaml", callers=("web",))
    plan = plan_apply(t, {}, HTTP)
    assert [(c.label, c.action, c.cas) for c in plan.changes] == [
        ("service-defaults/web", "create", 0),
        ("service-resolver/api", "create", 0),
        ("service-splitter/api", "create", 0),
        ("service-router/api", "create", 0),
    ]
    resolver = plan.changes[1].body
    assert resolver["Meta"] == {
        "meshlet.io/managed": "true",
        "meshlet.io/managed-fields": "LoadBalancer,Subsets",
        "meshlet.io/sources": "DestinationRule/default/api",
    }
    web = plan.changes[0].body
    assert web["Meta"]["meshlet.io/managed-fields"] == "UpstreamConfig.Overrides[api]"
    assert format_plan(plan).splitlines()[:3] == [
        "service-defaults/web: create",
        '  + UpstreamConfig.Overrides[api]: {"Name": "api", "Limits": {"MaxConnections": 100, '
        '"MaxPendingRequests": 50}, "PassiveHealthCheck": {"Interval": "10s", "MaxFailures": 5, '
        '"BaseEjectionTime": "30s", "MaxEjectionPercent": 50}}',
        "  + Meta meshlet.io/managed: true",
    ]


def test_reapplying_what_consul_returns_is_unchanged() -> None:
    t = _t("payment-virtualservice.yaml", "api-destinationrule.yaml", callers=("web",))
    first = plan_apply(t, {}, HTTP)
    stored = [dict(c.body) for c in first.changes]
    # Consul returns durations of UpstreamConfig as nanoseconds and fills zero values.
    web = stored[0]
    override = web["UpstreamConfig"]["Overrides"][0]
    override["PassiveHealthCheck"] = {
        **override["PassiveHealthCheck"],
        "Interval": 10_000_000_000,
        "BaseEjectionTime": 30_000_000_000,
    }
    override["ConnectTimeoutMs"] = 0
    again = plan_apply(t, _held(*stored), HTTP)
    assert [c.action for c in again.changes] == ["unchanged"] * 3
    assert format_plan(again).startswith("unchanged: service-defaults/web, service-resolver/api")


def test_only_the_owned_items_of_a_shared_entry_change() -> None:
    # web's service-defaults is the user's: its protocol and its other upstream stay as they are.
    held = _held(
        {
            "Kind": "service-defaults",
            "Name": "web",
            "Protocol": "http",
            "UpstreamConfig": {
                "Defaults": {"ConnectTimeoutMs": 2000},
                "Overrides": [{"Name": "ledger", "Limits": {"MaxConnections": 5}}],
            },
            "Meta": {"owner": "team-web"},
        }
    )
    t = _t("api-destinationrule.yaml", callers=("web",))
    plan = plan_apply(t, held, HTTP)
    web = plan.changes[0]
    assert (web.label, web.action, web.cas) == ("service-defaults/web", "update", 10)
    assert web.body["Protocol"] == "http"
    assert web.body["UpstreamConfig"]["Defaults"] == {"ConnectTimeoutMs": 2000}
    assert [o["Name"] for o in web.body["UpstreamConfig"]["Overrides"]] == ["api", "ledger"]
    assert web.body["Meta"]["owner"] == "team-web"
    assert web.body["Meta"]["meshlet.io/managed-fields"] == "UpstreamConfig.Overrides[api]"
    assert [i.item for i in web.items] == ["UpstreamConfig.Overrides[api]"]
    assert plan.warnings == ()


def test_hand_written_item_defined_differently_needs_prune() -> None:
    held = _held(
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}, "Destination": {}}],
        }
    )
    t = _t("canary-virtualservice.yaml")
    with pytest.raises(PlanRefused) as info:
        plan_apply(t, held, HTTP)
    assert info.value.problems == (
        "service-router/api: Routes was not written by meshlet and the input defines it "
        "differently; rerun with --prune to replace it",
    )
    pruned = plan_apply(t, held, HTTP, ApplyOptions(prune=True))
    router = next(c for c in pruned.changes if c.kind == "service-router")
    assert (router.action, router.cas, router.items[0].status) == ("update", 10, "change")


def test_identical_hand_written_entry_is_adopted() -> None:
    t = _t("canary-virtualservice.yaml")
    splitter = {k: v for k, v in t.entries[0].items()}
    plan = plan_apply(t, _held(splitter), HTTP)
    change = plan.changes[0]
    assert (change.label, change.action, change.items[0].status) == (
        "service-splitter/api",
        "update",  # only the Meta marks are new
        "adopt",
    )


def test_hand_written_fields_are_kept_with_a_warning_and_pruned_on_request() -> None:
    held = _held(
        {
            "Kind": "service-resolver",
            "Name": "api",
            "Failover": {"*": {"Datacenters": ["dc2"]}},
            "LoadBalancer": {"Policy": "least_request"},
        }
    )
    t = _t("api-destinationrule.yaml", callers=("web",))
    plan = plan_apply(t, held, HTTP)
    resolver = next(c for c in plan.changes if c.kind == "service-resolver")
    assert resolver.body["Failover"] == {"*": {"Datacenters": ["dc2"]}}
    assert {i.item: i.status for i in resolver.items} == {
        "Subsets": "add",
        "LoadBalancer": "adopt",
        "Failover": "keep",
    }
    assert resolver.body["Meta"]["meshlet.io/managed-fields"] == "LoadBalancer,Subsets"
    assert plan.warnings == (
        "service-resolver/api: Failover was not written by meshlet: kept; --prune removes it",
    )
    pruned = plan_apply(t, held, HTTP, ApplyOptions(prune=True))
    resolver = next(c for c in pruned.changes if c.kind == "service-resolver")
    assert "Failover" not in resolver.body


def test_a_split_the_input_no_longer_has_is_deleted_after_the_writes() -> None:
    canary = _t("canary-virtualservice.yaml")
    stored = _held(*[dict(c.body) for c in plan_apply(canary, {}, HTTP).changes])
    text = (EXAMPLES / "canary-virtualservice.yaml").read_text()
    # The rollout is over: everything to v2, no split.
    done = text.split("  - route:\n    - destination:\n        host: api\n        subset: v1")[0]
    done += "  - route:\n    - destination: {host: api, subset: v2}\n"
    plan = plan_apply(translate(load_resources(done, "vs.yaml")), stored, HTTP)
    assert [(c.label, c.action, c.cas) for c in plan.changes] == [
        ("service-router/api", "update", 11),
        ("service-splitter/api", "delete", 10),
    ]
    assert "  - Splits: " in format_plan(plan)


def test_hand_written_entry_is_not_deleted() -> None:
    held = _held({"Kind": "service-splitter", "Name": "api", "Splits": [{"Weight": 100}]})
    text = (EXAMPLES / "payment-virtualservice.yaml").read_text().replace("payment-service", "api")
    plan = plan_apply(translate(load_resources(text, "vs.yaml")), held, HTTP)
    splitter = next(c for c in plan.changes if c.kind == "service-splitter")
    assert splitter.action == "unchanged"
    assert any("Splits was not written by meshlet: kept" in w for w in plan.warnings)


def test_services_selects_what_is_applied() -> None:
    t = _t("canary-virtualservice.yaml", "payment-virtualservice.yaml")
    plan = plan_apply(t, {}, HTTP, ApplyOptions(services=frozenset({"payment-service", "nope"})))
    assert [c.label for c in plan.changes] == ["service-router/payment-service"]
    assert plan.notes == (
        "service-splitter/api: left alone: VirtualService/default/api is about 'api', not in "
        "--services",
        "service-router/api: left alone: VirtualService/default/api is about 'api', not in "
        "--services",
        "--services lists 'nope', which the input does not name",
    )


def test_routers_need_an_http_protocol() -> None:
    t = _t("canary-virtualservice.yaml")
    with pytest.raises(PlanRefused) as info:
        plan_apply(t, {}, Facts())
    assert info.value.problems == (
        "service-splitter/api: 'api' has protocol tcp (no service-defaults or proxy-defaults "
        "protocol); Consul refuses routers and splitters unless it is HTTP: set service-defaults "
        'api Protocol = "http" first',
        "service-router/api: 'api' has protocol tcp (no service-defaults or proxy-defaults "
        "protocol); Consul refuses routers and splitters unless it is HTTP: set service-defaults "
        'api Protocol = "http" first',
    )
    assert plan_apply(t, {}, Facts(mesh_protocol="http")).changes


def test_permissive_needs_the_mesh_entry_to_allow_it() -> None:
    t = _pa("PERMISSIVE")
    for allowed, suffix in ((None, " (the mesh entry was not read)"), (False, "")):
        with pytest.raises(PlanRefused) as info:
            plan_apply(t, {}, Facts(permissive_allowed=allowed))
        assert info.value.problems == (
            "service-defaults/api: MutualTLSMode permissive: Consul refuses it unless the mesh "
            "config entry sets AllowEnablingPermissiveMutualTLS = true" + suffix,
        )
    plan = plan_apply(t, {}, Facts(permissive_allowed=True))
    assert plan.changes[0].body["MutualTLSMode"] == "permissive"


def test_peer_authentication_keeps_the_rest_of_service_defaults() -> None:
    held = _held({"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    plan = plan_apply(_pa("STRICT"), held)
    (change,) = plan.changes
    assert dict(change.body) == {
        "Kind": "service-defaults",
        "Name": "api",
        "Protocol": "http",
        "MutualTLSMode": "strict",
        "Meta": {
            "meshlet.io/managed": "true",
            "meshlet.io/managed-fields": "MutualTLSMode",
            "meshlet.io/sources": "PeerAuthentication/default/api",
        },
    }
    # UNSET: meshlet's MutualTLSMode goes, the entry (with its protocol) stays.
    stored = _held(dict(change.body))
    unset = plan_apply(_pa("UNSET"), stored).changes[0]
    assert unset.action == "update"
    assert dict(unset.body) == {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}


def test_hand_written_permissive_mode_is_not_silently_made_strict() -> None:
    held = _held({"Kind": "service-defaults", "Name": "api", "MutualTLSMode": "permissive"})
    with pytest.raises(PlanRefused):
        plan_apply(_pa("STRICT"), held)
    plan = plan_apply(_pa("STRICT"), held, options=ApplyOptions(prune=True))
    assert plan.changes[0].body["MutualTLSMode"] == "strict"


def test_a_kept_hand_written_router_keeps_its_route_meta() -> None:
    held = _held(
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [{"Match": {"HTTP": {"PathPrefix": "/x"}}, "Destination": {}}],
            "Meta": {"meshlet.io/route.0.per-try-timeout": "1s", "team": "api"},
        }
    )
    # A VirtualService whose only route is Consul's implicit one: no router of its own.
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api]\n  http: [{route: [{destination: {host: api}}]}]\n"
    )
    plan = plan_apply(translate(load_resources(text, "vs.yaml")), held, HTTP)
    (router,) = plan.changes
    assert (router.label, router.action) == ("service-router/api", "unchanged")
    assert plan.warnings == (
        "service-router/api: Routes was not written by meshlet: kept; --prune removes it",
    )
    pruned = plan_apply(
        translate(load_resources(text, "vs.yaml")), held, HTTP, ApplyOptions(prune=True)
    )
    assert [(c.label, c.action) for c in pruned.changes] == [("service-router/api", "delete")]


def test_a_route_to_another_service_touches_only_the_host_s_entries() -> None:
    # Attack: a VirtualService for api that names web must not rewrite web's own routing.
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api]\n  http:\n  - match: [{uri: {prefix: /web}}]\n"
        "    route: [{destination: {host: web}}]\n"
    )
    held = _held(
        {"Kind": "service-router", "Name": "web", "Routes": [{"Destination": {"Service": "x"}}]},
        {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 100}]},
    )
    facts = Facts(protocols={"api": "http", "web": "http"})
    plan = plan_apply(translate(load_resources(text, "vs.yaml")), held, facts)
    assert [(c.label, c.action) for c in plan.changes] == [("service-router/api", "create")]
    # ... and web's protocol is checked, since Consul checks it for the router of api.
    with pytest.raises(PlanRefused) as info:
        plan_apply(translate(load_resources(text, "vs.yaml")), held, HTTP)
    assert info.value.problems[0].startswith("service-router/api: 'web' has protocol tcp")


def test_zero_durations_consul_fills_in_compare_as_unset() -> None:
    from traffic.istio_apply import canonical

    assert canonical({"ConnectTimeout": "0s", "RequestTimeout": 0, "Subsets": {}}) == {}
    assert canonical({"PassiveHealthCheck": {"EnforcingConsecutive5xx": 0}}) == {
        "PassiveHealthCheck": {"EnforcingConsecutive5xx": 0}
    }
