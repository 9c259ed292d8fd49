"""Translation output shapes, scoping, fail-closed rejections and warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from intentions.entries import entry_to_json
from intentions.errors import PolicyError
from intentions.policy import AuthorizationPolicy, load_policies
from intentions.translate import ServiceRef, TranslateOptions, translate

EXAMPLE = Path("/work/shared/examples/payment-authorizationpolicy.yaml")
PAYMENT = """
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: payment-auth, namespace: production}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/order-service"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/process-payment"]}}]
"""


def policies(*specs: dict[str, Any], namespace: str = "foo") -> tuple[AuthorizationPolicy, ...]:
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"p{i}", "namespace": namespace},
            "spec": spec,
        }
        for i, spec in enumerate(specs)
    ]
    return load_policies(yaml.safe_dump_all(docs), origin="t.yaml")


def as_json(specs: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    return [entry_to_json(e, with_indexes=False) for e in translate(policies(*specs), **kw).entries]


def test_payment_example() -> None:
    text = EXAMPLE.read_text() if EXAMPLE.exists() else PAYMENT
    result = translate(load_policies(text))
    assert [entry_to_json(e, with_indexes=False) for e in result.entries] == [
        {
            "Kind": "service-intentions",
            "Name": "payment-service",
            "Namespace": "production",
            "Sources": [
                {
                    "Name": "order-service",
                    "Namespace": "production",
                    "Permissions": [
                        {
                            "Action": "allow",
                            "HTTP": {"PathExact": "/process-payment", "Methods": ["POST"]},
                        },
                        {"Action": "deny", "HTTP": {"PathRegex": ".*"}},
                    ],
                    "Precedence": 9,
                    "Type": "consul",
                },
                {
                    "Name": "*",
                    "Namespace": "*",
                    "Action": "deny",
                    "Precedence": 7,
                    "Type": "consul",
                },
            ],
        }
    ]
    origins = result.origins[("production", "payment-service", "production", "order-service")]
    assert origins[0] == "ALLOW production/payment-auth rules[0]"
    assert origins[1].startswith("catch-all deny")


def test_consul_ce_single_namespace() -> None:
    opts = TranslateOptions(single_namespace="production")
    (entry,) = translate(load_policies(PAYMENT), options=opts).entries
    out = entry_to_json(entry, with_indexes=False)
    assert "Namespace" not in out
    assert [(s["Name"], s.get("Namespace")) for s in out["Sources"]] == [
        ("order-service", None),
        ("*", None),
    ]
    with pytest.raises(PolicyError, match="Consul CE has one namespace"):
        translate(
            policies(
                {"rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]},
                namespace="production",
            ),
            [ServiceRef("a", "production")],
            opts,
        )


def test_no_applicable_policy_gives_explicit_allow() -> None:
    out = as_json([], services=[ServiceRef("a", "foo")])
    assert out[0]["Sources"] == [
        {"Name": "*", "Namespace": "*", "Action": "allow", "Precedence": 7, "Type": "consul"}
    ]


def test_namespace_wide_policy_needs_the_inventory() -> None:
    deny_all = {"action": "DENY", "rules": [{}]}
    with pytest.raises(PolicyError) as err:
        translate(policies(deny_all))
    (problem,) = err.value.problems
    assert problem.document == "t.yaml foo/p0"
    assert "no such service is known" in problem.message
    out = as_json([deny_all], services=[ServiceRef("a", "foo"), ServiceRef("b", "bar")])
    assert [(e["Namespace"], e["Name"], e["Sources"][0]["Action"]) for e in out] == [
        ("bar", "b", "allow"),
        ("foo", "a", "deny"),
    ]


def test_root_namespace_policy_applies_everywhere() -> None:
    root = policies({"action": "DENY", "rules": [{}]}, namespace="istio-system")
    result = translate(root, [ServiceRef("a", "foo"), ServiceRef("b", "bar")])
    assert all(e.sources[0].action == "deny" for e in result.entries)


def test_l7_shapes() -> None:
    (entry,) = as_json(
        [
            {
                "selector": {"matchLabels": {"app": "api"}},
                "rules": [
                    {
                        "to": [
                            {
                                "operation": {
                                    "methods": ["get"],
                                    "hosts": ["Example.com"],
                                    "notPaths": ["/admin*"],
                                }
                            }
                        ],
                        "when": [{"key": "request.headers[X-Env]", "notValues": ["prod"]}],
                    }
                ],
            }
        ]
    )
    perms = entry["Sources"][0]["Permissions"]
    assert perms[-1] == {"Action": "deny", "HTTP": {"PathRegex": ".*"}}
    first = perms[0]["HTTP"]["Header"]
    assert {"Name": ":method", "Exact": "get"} in first  # not Methods: Consul upper-cases those
    assert {"Name": ":authority", "Exact": "Example.com", "IgnoreCase": True} in first
    assert {"Name": ":path", "Regex": "/admin[^?#]*(?:[?#].*)?", "Invert": True} in first
    # NOT(x-env == prod) is true without the header: that needs its own permission.
    assert {"Name": "x-env", "Present": True, "Invert": True} in first
    assert {"Name": "x-env", "Exact": "prod", "Invert": True} in perms[1]["HTTP"]["Header"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}, "CUSTOM"),
        ({"rules": [{"from": [{"source": {"ipBlocks": ["1.2.3.4"]}}]}]}, "IP-based sources"),
        ({"rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]}, "IP-based"),
        ({"rules": [{"to": [{"operation": {"notPorts": ["80"]}}]}]}, "port conditions"),
        ({"rules": [{"when": [{"key": "source.ip", "values": ["1.2.3.4"]}]}]}, "'source.ip'"),
        ({"rules": [{"when": [{"key": "connection.sni", "values": ["a"]}]}]}, "'connection.sni'"),
        (
            {"rules": [{"from": [{"source": {"principals": ["*/ns/foo/sa/a"]}}]}]},
            "partial-wildcard",
        ),
        ({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo"]}}]}]}, "form"),
        ({"rules": [{"from": [{"source": {"namespaces": ["foo-*"]}}]}]}, "partial-wildcard"),
        ({"rules": [{"from": [{"source": {"trustDomains": ["other.org"]}}]}]}, "trust domain"),
        ({"rules": [{"from": [{"source": {"requestPrincipals": ["iss/sub"]}}]}]}, "JWT"),
        ({"rules": [{"when": [{"key": "request.auth.claims[g]", "values": ["a"]}]}]}, "JWT"),
        ({"selector": {"matchLabels": {"version": "v1"}}, "rules": [{}]}, "selector without"),
        ({"selector": {"matchLabels": {"app": "a", "v": "1"}}, "rules": [{}]}, "subset selector"),
        ({"targetRefs": [{"kind": "Gateway", "name": "g"}], "rules": [{}]}, "targetRef"),
    ],
)
def test_untranslatable_content_is_rejected_with_its_field(
    spec: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(PolicyError) as err:
        translate(policies(spec), [ServiceRef("a", "foo")])
    assert any(fragment in p.message and p.kind == "unsupported" for p in err.value.problems), [
        str(p) for p in err.value.problems
    ]
    assert all(p.document == "t.yaml foo/p0" for p in err.value.problems)


def test_nothing_is_half_translated() -> None:
    good = {"selector": {"matchLabels": {"app": "a"}}, "rules": [{}]}
    bad = {
        "selector": {"matchLabels": {"app": "b"}},
        "rules": [{"to": [{"operation": {"ports": ["1"]}}]}],
    }
    with pytest.raises(PolicyError) as err:
        translate(policies(good, bad))
    assert [p.document for p in err.value.problems] == ["t.yaml#1 foo/p1"]


def test_audit_and_dry_run_warn_and_are_not_enforced() -> None:
    docs = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "audit", "namespace": "foo"},
            "spec": {"action": "AUDIT", "rules": [{}]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {
                "name": "dry",
                "namespace": "foo",
                "annotations": {"istio.io/dry-run": "true"},
            },
            "spec": {"action": "DENY", "rules": [{}]},
        },
    ]
    result = translate(load_policies(yaml.safe_dump_all(docs)), [ServiceRef("a", "foo")])
    assert [w.message for w in result.warnings] == [
        "AUDIT policy is never enforced; it was not translated",
        "dry-run policy is never enforced; it was not translated",
    ]
    assert result.entries[0].sources[0].action == "allow"


def test_tcp_follows_istio_and_warns() -> None:
    result = translate(
        policies(
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["bar"]}}],
                        "to": [{"operation": {"methods": ["GET"]}}],
                    }
                ],
            },
            {"rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]},
        ),
        [ServiceRef("db", "foo", "tcp")],
    )
    (entry,) = result.entries
    assert [(s.namespace, s.name, s.action) for s in entry.sources] == [
        ("bar", "*", "deny"),
        ("*", "*", "deny"),  # the only ALLOW rule is skipped on TCP: allow-nothing
    ]
    messages = " ".join(w.message for w in result.warnings)
    assert "DENY applies to all its traffic" in messages
    assert "whole ALLOW rule is ignored" in messages
    # Only the ignored ALLOW rule is a drop: `apply` refuses it unless told otherwise.
    (drop,) = result.dropped[("foo", "db")]
    assert drop.message.startswith("ALLOW foo/p1 rules[0] uses HTTP-only fields")
    assert result.applied[("foo", "db")] == ("foo/p0", "foo/p1")


def test_applied_names_the_enforced_policies_of_each_entry() -> None:
    result = translate(
        policies(
            {"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]},
            {"selector": {"matchLabels": {"app": "api"}}},
            {"selector": {"matchLabels": {"app": "db"}}, "rules": [{}]},
        )
        + policies(
            {"selector": {"matchLabels": {"app": "db"}}, "action": "AUDIT", "rules": [{}]},
            namespace="bar",
        ),
        [ServiceRef("cache", "foo"), ServiceRef("db", "bar")],
        TranslateOptions(),
    )
    assert dict(result.applied) == {
        ("bar", "db"): (),  # AUDIT only: not enforced, the entry states Istio's default
        ("foo", "api"): ("foo/p1",),
        ("foo", "cache"): (),
        ("foo", "db"): ("foo/p2",),
        ("foo", "web"): ("foo/p0",),
    }
    assert not result.dropped


def test_plaintext_admitting_rule_warns() -> None:
    result = translate(
        policies({"rules": [{"from": [{"source": {"notNamespaces": ["bar"]}}]}]}),
        [ServiceRef("a", "foo")],
    )
    assert any("plaintext" in w.message for w in result.warnings)


def test_redundant_classes_are_folded() -> None:
    # `bar/x` is allowed exactly like every other member of `bar`: no source of its own.
    out = as_json(
        [
            {
                "rules": [
                    {
                        "from": [
                            {"source": {"namespaces": ["bar"]}},
                            {"source": {"principals": ["cluster.local/ns/bar/sa/x"]}},
                        ]
                    }
                ]
            }
        ],
        services=[ServiceRef("a", "foo")],
    )
    names = [(s["Namespace"], s["Name"], s["Action"]) for s in out[0]["Sources"]]
    assert names == [("bar", "*", "allow"), ("*", "*", "deny")]


def test_negations_split_classes() -> None:
    # `bar/x` escapes the DENY that hits the rest of `bar`, so it needs its own source.
    out = as_json(
        [
            {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]},
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"notPrincipals": ["cluster.local/ns/bar/sa/x"]}}],
                        "to": [{"operation": {"paths": ["/admin"]}}],
                    }
                ],
            },
        ],
        services=[ServiceRef("a", "foo")],
    )
    names = [(s["Namespace"], s["Name"]) for s in out[0]["Sources"]]
    assert names == [("bar", "x"), ("bar", "*"), ("*", "*")]
