"""AuthorizationPolicy parsing and Istio's validation rules."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from intentions.errors import PolicyError
from intentions.policy import (
    PolicyAction,
    load_policies,
    parse_policy,
    validate_policy,
)


def doc(spec: Any, name: str = "p", namespace: str = "foo", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }


def problems(spec: Any) -> list[str]:
    try:
        policies = load_policies(yaml.safe_dump(doc(spec)), origin="f.yaml")
    except PolicyError as err:
        return [f"{p.path}: {p.message}" for p in err.problems]
    assert policies
    return []


def test_payment_example_parses() -> None:
    text = """
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: payment-auth, namespace: production}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/production/sa/order-service"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/process-payment"]}}]
"""
    (policy,) = load_policies(text)
    assert policy.ref == "production/payment-auth"
    assert policy.action is PolicyAction.ALLOW
    assert policy.match_labels == (("app", "payment-service"),)
    assert policy.rules is not None
    assert policy.rules[0].to is not None


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"action": "DENY"},
            "spec.rules: DENY action without `rules` is meaningless as it will "
            "never be triggered, add an empty rule `{}` if you want it be triggered for every "
            "request",
        ),
        ({"action": "DENY", "rules": []}, "spec.rules: DENY action without `rules` is meaningless"),
        (
            {"action": "CUSTOM", "rules": [{}]},
            "spec.provider.name: `provider.name` must not be empty",
        ),
        (
            {"provider": {"name": "x"}, "rules": [{}]},
            "spec.provider: `provider` must not be with non CUSTOM action, found ALLOW",
        ),
        (
            {
                "action": "CUSTOM",
                "provider": {"name": "x"},
                "rules": [{"from": [{"source": {"principals": ["a"]}}]}],
            },
            "spec.rules[0].from[0].source.principals: From.Principals is currently not supported "
            "with CUSTOM action",
        ),
        (
            {"rules": [{"from": []}]},
            "spec.rules[0].from: `from` must not be empty, found at rule 0",
        ),
        ({"rules": [{"to": []}]}, "spec.rules[0].to: `to` must not be empty, found at rule 0"),
        (
            {"rules": [{"from": [{}]}]},
            "spec.rules[0].from[0].source: `from.source` must not be nil, found at rule 0",
        ),
        (
            {"rules": [{"from": [{"source": {}}]}]},
            "spec.rules[0].from[0].source: `from.source` must not be empty, found at rule 0",
        ),
        (
            {"rules": [{"to": [{"operation": {}}]}]},
            "spec.rules[0].to[0].operation: `to.operation` must not be empty, found at rule 0",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": [""]}}]}]},
            "spec.rules[0].from[0].source.principals: empty value not allowed, found in Principals",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": ["a"], "serviceAccounts": ["b"]}}]}]},
            "spec.rules[0].from[0].source: cannot set serviceAccounts with namespaces or "
            "principals, found at rule 0",
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]: bad IP address (10.0.0.300)",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]: bad port (http)",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/{*}/x/*"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path template, found "
            "in Paths",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/{name}/{**}"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path template",
        ),
        (
            {"rules": [{"when": [{"key": "request.headers[x]"}]}]},
            "spec.rules[0].when[0]: at least one of `values` or `notValues` must be set for key "
            "request.headers[x]",
        ),
        (
            {"rules": [{"when": [{"key": "foo.bar", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key: invalid `value` for `key` foo.bar: "
            "unknown attribute: foo.bar",
        ),
        (
            {"rules": [{"when": [{"key": "destination.labels[app]", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key: invalid `value` for `key` destination.labels[app]: "
            "attribute destination.labels[app] is replaced by the workload selector",
        ),
        (
            {"rules": [{"when": [{"key": "request.headers", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key: invalid `value` for `key` request.headers: bad key "
            "(request.headers): should have format a[b]",
        ),
        (
            {"rules": [{"when": [{"key": "destination.port", "values": ["99999"]}]}]},
            "spec.rules[0].when[0].key: invalid `value` for `key` destination.port: "
            "bad port (99999)",
        ),
        (
            {"selector": {"matchLabels": {"app": "a*"}}, "rules": [{}]},
            'spec.selector.matchLabels.app: wildcard is not supported in selector: "app=a*"',
        ),
        (
            {"selector": {"matchLabels": {"app": "a"}}, "targetRefs": [{"kind": "Service"}]},
            "spec: only one of targetRefs or workloadSelector can be set",
        ),
    ],
)
def test_istio_validation(spec: dict[str, Any], expected: str) -> None:
    found = problems(spec)
    assert any(p.startswith(expected) for p in found), found


def test_valid_shapes_pass() -> None:
    assert problems({}) == []  # allow-nothing
    assert problems({"rules": [{}]}) == []  # allow-all
    assert (
        problems({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]}) == []
    )
    assert problems({"rules": [{"to": [{"operation": {"paths": ["/a/{*}/b/{**}"]}}]}]}) == []


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        (
            {"rules": [{"to": [{"operation": {"method": ["GET"]}}]}]},
            "spec.rules[0].to[0].operation.method",
            "allowed: hosts, notHosts, ports",
        ),
        (
            {"rule": []},
            "spec.rule",
            "allowed: selector, targetRef, targetRefs, action, provider, rules",
        ),
        (
            {"action": "deny", "rules": [{}]},
            "spec.action",
            "must be one of ALLOW, DENY, AUDIT, CUSTOM",
        ),
        (
            {"rules": [{"when": [{"key": "request.headers[x]", "values": [True]}]}]},
            "spec.rules[0].when[0].values[0]",
            "must be a string, got bool True (quote it in YAML)",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": [8080]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]",
            "must be a string, got int 8080",
        ),
        ({"rules": "all"}, "spec.rules", "must be a list"),
    ],
)
def test_strict_parsing_names_the_field_and_the_allowed_values(
    spec: Any, path: str, fragment: str
) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(doc(spec), origin="f.yaml")
    (problem,) = [p for p in err.value.problems if p.path == path]
    assert fragment in problem.message
    assert problem.document == "f.yaml foo/p"
    assert str(problem).startswith("f.yaml foo/p: " + path + ": ")


def test_every_problem_of_every_document_is_reported() -> None:
    text = yaml.safe_dump_all(
        [
            doc({"action": "DENY"}, name="a"),
            doc({"rules": [{"from": []}]}, name="b"),
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {}},
            doc({"rules": [{}]}, name="ok"),
        ]
    )
    with pytest.raises(PolicyError) as err:
        load_policies(text, origin="set.yaml")
    docs = [p.document for p in err.value.problems]
    assert docs == ["set.yaml#0 foo/a", "set.yaml#1 foo/b", "set.yaml#2"]


def test_namespace_is_required_unless_defaulted() -> None:
    body = doc({"rules": [{}]})
    del body["metadata"]["namespace"]
    with pytest.raises(PolicyError, match=r"metadata\.namespace: is required"):
        parse_policy(body)
    assert parse_policy(body, default_namespace="foo").namespace == "foo"


def test_list_kind_and_dry_run_annotation() -> None:
    text = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [doc({"rules": [{}]}, annotations={"istio.io/dry-run": "true"})],
        }
    )
    (policy,) = load_policies(text)
    assert policy.dry_run


def test_deny_with_only_http_fields_warns_like_istio() -> None:
    policy = parse_policy(
        doc({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}]})
    )
    errors, warnings = validate_policy(policy)
    assert not errors
    assert "will deny all traffic to TCP ports" in warnings[0].message


def test_invalid_yaml_is_one_problem_on_one_line() -> None:
    with pytest.raises(PolicyError) as err:
        load_policies("a: [", origin="bad.yaml")
    (problem,) = err.value.problems
    assert str(problem).startswith("bad.yaml: not valid YAML: ")
    assert "line 1" in str(problem) and "\n" not in str(problem)


def test_duplicate_keys_are_refused() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - to:
    - operation:
        paths: ["/admin"]
        paths: ["/public"]
"""
    with pytest.raises(PolicyError, match="found duplicate key 'paths'"):
        load_policies(text)
