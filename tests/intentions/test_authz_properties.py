"""Hypothesis properties: translation + engine == Istio semantics evaluated directly."""

from __future__ import annotations

import random
from typing import Any

import istio_reference
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intentions.check import PolicyChecker, Workload, parse_request
from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import entry_to_json, load_entry
from intentions.errors import PolicyError
from intentions.policy import load_policies
from intentions.translate import ServiceRef, translate

NAMESPACES = ["foo", "bar", "baz"]
ACCOUNTS = ["a", "b", "c"]
PATH_VALUES = ["/a", "/a*", "/a/*", "*b", "*", "/b", "/a/b", "a*", "/a/{*}", "/{*}/b", "/a/{**}"]
PATHS = [
    "/a",
    "/a/",
    "/a/b",
    "/b",
    "/ab",
    "/a?x=1",
    "/a/../b",
    "/b/./a/b",
    "/a/b/..",
    "/",
    "/x/b",
    "/a/b/c",
    "//b",
]
METHOD_VALUES = ["GET", "POST", "get", "G*", "*T", "*", "PROPFIND"]
METHODS = ["GET", "POST", "PUT", "PROPFIND", "get"]
HOST_VALUES = ["h.com", "*.com", "h.*", "*", "H.COM", "h.com:80"]
HOSTS = ["h.com", "H.com", "h.com:80", "x.org"]
HEADER_VALUES = ["v1", "v*", "*1", "*", "v2"]
HEADERS: list[dict[str, Any]] = [
    {},
    {"x-h": "v1"},
    {"X-H": "v2"},
    {"x-h": ["v1", "v2"]},
    {"x-h": ""},
]


def principal(ns: str, sa: str) -> str:
    return f"cluster.local/ns/{ns}/sa/{sa}"


principals = st.builds(principal, st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS))
some = st.lists


def _non_empty(d: dict[str, Any]) -> bool:
    return bool(d)


identity_sources = st.fixed_dictionaries(
    {},
    optional={
        "principals": some(st.one_of(principals, st.just("*")), min_size=1, max_size=2),
        "notPrincipals": some(principals, min_size=1, max_size=2),
        "namespaces": some(st.sampled_from([*NAMESPACES, "*"]), min_size=1, max_size=2),
        "notNamespaces": some(st.sampled_from(NAMESPACES), min_size=1, max_size=2),
    },
).filter(_non_empty)
accounts = st.one_of(
    st.sampled_from(ACCOUNTS),
    st.builds("{}/{}".format, st.sampled_from(NAMESPACES), st.sampled_from(ACCOUNTS)),
)
account_sources = st.fixed_dictionaries(
    {},
    optional={
        "serviceAccounts": some(accounts, min_size=1, max_size=2),
        "notServiceAccounts": some(accounts, min_size=1, max_size=2),
    },
).filter(_non_empty)
sources = st.one_of(identity_sources, account_sources)
operations = st.fixed_dictionaries(
    {},
    optional={
        "paths": some(st.sampled_from(PATH_VALUES), min_size=1, max_size=2),
        "notPaths": some(st.sampled_from(PATH_VALUES), min_size=1, max_size=2),
        "methods": some(st.sampled_from(METHOD_VALUES), min_size=1, max_size=2),
        "notMethods": some(st.sampled_from(METHOD_VALUES), min_size=1, max_size=2),
        "hosts": some(st.sampled_from(HOST_VALUES), min_size=1, max_size=2),
        "notHosts": some(st.sampled_from(HOST_VALUES), min_size=1, max_size=2),
    },
).filter(_non_empty)
header_conditions = st.fixed_dictionaries(
    {"key": st.sampled_from(["request.headers[x-h]", "request.headers[X-H]"])},
    optional={
        "values": some(st.sampled_from(HEADER_VALUES), min_size=1, max_size=2),
        "notValues": some(st.sampled_from(HEADER_VALUES), min_size=1, max_size=2),
    },
).filter(lambda c: "values" in c or "notValues" in c)
namespace_conditions = st.fixed_dictionaries(
    {"key": st.just("source.namespace")},
    optional={
        "values": some(st.sampled_from(NAMESPACES), min_size=1, max_size=2),
        "notValues": some(st.sampled_from(NAMESPACES), min_size=1, max_size=2),
    },
).filter(lambda c: "values" in c or "notValues" in c)
principal_conditions = st.fixed_dictionaries(
    {"key": st.just("source.principal")},
    optional={
        "values": some(st.one_of(principals, st.just("*")), min_size=1, max_size=2),
        "notValues": some(principals, min_size=1, max_size=2),
    },
).filter(lambda c: "values" in c or "notValues" in c)
rules = st.fixed_dictionaries(
    {},
    optional={
        "from": some(st.fixed_dictionaries({"source": sources}), min_size=1, max_size=2),
        "to": some(st.fixed_dictionaries({"operation": operations}), min_size=1, max_size=2),
        "when": some(
            st.one_of(header_conditions, namespace_conditions, principal_conditions),
            min_size=1,
            max_size=2,
        ),
    },
)


@st.composite
def policies(draw: st.DrawFn, index: int) -> dict[str, Any]:
    action = draw(st.sampled_from(["ALLOW", "DENY"]))
    spec: dict[str, Any] = {"action": action}
    selector = draw(st.sampled_from([None, "httpbin", "other"]))
    if selector:
        spec["selector"] = {"matchLabels": {"app": selector}}
    min_rules = 1 if action == "DENY" else 0
    rule_list = draw(some(rules, min_size=min_rules, max_size=2))
    if rule_list or action == "DENY":
        spec["rules"] = rule_list
    namespace = draw(st.sampled_from(["foo", "foo", "istio-system"]))
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"p{index}", "namespace": namespace},
        "spec": spec,
    }


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 3))
    return [draw(policies(i)) for i in range(count)]


requests = st.fixed_dictionaries(
    {
        "source_principal": st.builds(
            lambda ns, sa: f"spiffe://{principal(ns, sa)}",
            st.sampled_from(NAMESPACES),
            st.sampled_from(ACCOUNTS),
        ),
        "method": st.sampled_from(METHODS),
        "path": st.sampled_from(PATHS),
        "host": st.sampled_from(HOSTS),
        "headers": st.sampled_from(HEADERS),
    }
)

WORKLOADS = {
    "http": {"namespace": "foo", "labels": {"app": "httpbin"}, "protocol": "http"},
    "tcp": {"namespace": "foo", "labels": {"app": "httpbin"}, "protocol": "tcp"},
}


def _checker(docs: list[dict[str, Any]], protocol: str) -> PolicyChecker | None:
    text = yaml.safe_dump_all(docs)
    try:
        parsed = load_policies(text) if docs else ()
        return PolicyChecker.build(parsed, Workload("foo", "httpbin", protocol))
    except PolicyError:
        return None


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(300)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_sets(), st.lists(requests, min_size=1, max_size=8), st.sampled_from(["http", "tcp"]))
def test_engine_agrees_with_istio(
    docs: list[dict[str, Any]], reqs: list[dict[str, Any]], protocol: str
) -> None:
    checker = _checker(docs, protocol)
    if checker is None:
        return
    workload = WORKLOADS[protocol]
    for raw in reqs:
        request = dict(raw)
        if protocol == "tcp":
            request.update(method=None, path=None, host=None, headers={})
        want = istio_reference.decide(docs, workload, request)
        got = checker.check(parse_request(request))
        assert got.action == want, (request, got.reason, [e for e in checker.translation.entries])


@SETTINGS
@given(policy_sets(), st.lists(requests, min_size=1, max_size=8))
def test_deny_never_loses_to_allow(docs: list[dict[str, Any]], reqs: list[dict[str, Any]]) -> None:
    checker = _checker(docs, "http")
    if checker is None:
        return
    for request in reqs:
        if istio_reference.deny_matches(docs, WORKLOADS["http"], request):
            assert not checker.check(parse_request(request)).allowed


@SETTINGS
@given(policy_sets(), st.randoms(use_true_random=False))
def test_translation_is_deterministic_and_a_fixed_point(
    docs: list[dict[str, Any]], rnd: random.Random
) -> None:
    text = yaml.safe_dump_all(docs)
    try:
        parsed = load_policies(text) if docs else ()
        services = [ServiceRef("httpbin", "foo"), ServiceRef("web", "foo")]
        first = translate(parsed, services)
    except PolicyError:
        return
    shuffled = list(parsed)
    rnd.shuffle(shuffled)
    again = translate(shuffled, list(reversed(services)))
    assert again.entries == first.entries
    # Idempotent through Consul: writing the entries and reading them back changes nothing.
    for entry in first.entries:
        assert load_entry(entry_to_json(entry)) == entry


@SETTINGS
@given(policy_sets(), st.lists(requests, min_size=1, max_size=4))
def test_translation_does_not_depend_on_consul_default(
    docs: list[dict[str, Any]], reqs: list[dict[str, Any]]
) -> None:
    checker = _checker(docs, "http")
    if checker is None:
        return
    permissive = compile_snapshot(checker.translation.entries, default_allow=True)
    for raw in reqs:
        if not raw["method"].isupper():
            continue  # rejected before authorization, whatever the default
        request = parse_request(raw)
        identity = checker.identity(request)
        assert identity is not None
        dest = Identity("httpbin", "foo")
        r = http_request(raw["method"], raw["path"], raw["host"], raw["headers"])
        assert (
            permissive.decide_request(dest, identity, r).allowed == checker.check(request).allowed
        )
