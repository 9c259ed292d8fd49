"""The rule language alone (devstack.acl_rules): parsing HCL and JSON the same way, and the
decisions of consul acl/policy_authorizer.go (exact over prefix, longest prefix, deny wins a
merge, intentions implied by service rules, mesh falling back to operator)."""

from __future__ import annotations

import pytest

from devstack.acl_rules import RulesError, merge, parse_rules, service_identity_rules

HCL = """
# comments of every HCL kind
service "web" { policy = "write" }   // an exact rule
service_prefix "" {
  policy = "read", intentions = "deny"
}
/* a block comment */
service "db" { policy = "deny" }
key_prefix "app/" { policy = "list" }
key_prefix "app/secret/" { policy = "deny" }
key "app/secret/ok" { policy = "read" }
operator = "read"
"""
JSON = """
{"service": {"web": {"policy": "write"}, "db": {"policy": "deny"}},
 "service_prefix": {"": {"policy": "read", "intentions": "deny"}},
 "key_prefix": {"app/": {"policy": "list"}, "app/secret/": {"policy": "deny"}},
 "key": {"app/secret/ok": {"policy": "read"}},
 "operator": "read"}
"""


@pytest.mark.parametrize(
    ("permission", "resource", "expected"),
    [
        ("service:write", "web", True),
        ("service:write", "webx", False),  # the "" prefix grants read only
        ("service:read", "anything", True),
        ("service:read", "db", False),  # exact deny beats the "" prefix
        ("intentions:read", "web", True),  # implied by service "web" write
        ("intentions:write", "web", False),
        ("intentions:read", "api", False),  # the prefix rule says deny
        ("key:list", "app/x", True),
        ("key:write", "app/x", False),
        ("key:read", "app/secret/x", False),  # the longer prefix wins
        ("key:read", "app/secret/ok", True),  # the exact rule wins
        ("key:read", "other", None),  # no rule: the default policy decides
        ("operator:read", None, True),
        ("operator:write", None, False),
        ("mesh:read", None, True),  # mesh falls back to operator
        ("mesh:write", None, False),
        ("acl:read", None, None),
        ("node:read", "n1", None),
    ],
)
@pytest.mark.parametrize("source", [HCL, JSON], ids=["hcl", "json"])
def test_decisions(source: str, permission: str, resource: str | None, expected: bool) -> None:
    assert parse_rules(source).decide(permission, resource) is expected


def test_merge_deny_wins_then_write() -> None:
    a = parse_rules('service "web" { policy = "read" }\nkey "k" { policy = "write" }')
    b = parse_rules('service "web" { policy = "write" }\nkey "k" { policy = "deny" }')
    merged = merge([a, b])
    assert merged.decide("service:write", "web") is True
    assert merged.decide("key:read", "k") is False


def test_service_identity() -> None:
    rules = service_identity_rules("web")
    assert rules.decide("service:write", "web-sidecar-proxy") is True
    assert rules.decide("service:write", "api") is False
    assert rules.decide("node:read", "any") is True
    assert rules.decide("node:write", "any") is False


@pytest.mark.parametrize(
    "bad",
    [
        'service "w" { policy = "list" }',  # list is for keys only
        'key "k" { policy = "admin" }',
        'acl = "list"',
        'service "w" policy = "read"',
        'service "w" { policy = "read" ',
        'service "w" { policy = read }',
        "\x00",
        "[]",
        '{"operator": ["read"]}',
        '{"service": {"w": "read"}}',
    ],
)
def test_malformed_rules_raise(bad: str) -> None:
    with pytest.raises(RulesError):
        parse_rules(bad)
