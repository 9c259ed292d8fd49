"""Runner for the authorization case format of authz-cases-sample.yaml (see its header).

`kind: istio` cases go through translation and the engine (what `meshlet intentions check -f`
does); `kind: consul` cases through the engine alone (`check --entries`). The runner returns
failures instead of asserting so one test can report every broken case at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from intentions.check import (
    EntryChecker,
    PolicyChecker,
    parse_destination,
    parse_request,
    parse_workload,
)
from intentions.errors import PolicyError
from intentions.policy import load_policies
from intentions.translate import TranslateOptions


@dataclass(frozen=True)
class CaseResult:
    name: str
    failures: tuple[str, ...]
    requests: int
    rejected: bool


def options_for(conventions: Mapping[str, Any]) -> TranslateOptions:
    istio = conventions.get("istio", {})
    return TranslateOptions(
        trust_domain=istio.get("trust_domain", "cluster.local"),
        trust_domain_aliases=tuple(istio.get("trust_domain_aliases", ())),
        root_namespace=istio.get("root_namespace", "istio-system"),
    )


def run_case(case: Mapping[str, Any], options: TranslateOptions) -> CaseResult:
    if case["kind"] == "istio":
        return _run_istio(case, options)
    if case["kind"] == "consul":
        return _run_consul(case)
    return CaseResult(case["name"], (f"unknown kind {case['kind']!r}",), 0, False)


def _expectation_ok(request: Mapping[str, Any], got: str) -> bool:
    want = request["expect"]
    if got == want:
        return True
    # A Consul mesh refuses plaintext and foreign trust domains at the TLS layer, so what Istio
    # allows there a Consul-based sidecar may deny (never the other way round).
    istio_only = request.get("istio_only") or request.get("foreign_trust_domain")
    return bool(istio_only) and want == "allow" and got == "deny"


def _run_istio(case: Mapping[str, Any], options: TranslateOptions) -> CaseResult:
    name = case["name"]
    text = yaml.safe_dump_all(case.get("policies") or [])
    checkers: dict[str, PolicyChecker] = {}

    def checker(workload: Mapping[str, Any]) -> PolicyChecker:
        key = json.dumps(workload, sort_keys=True)
        if key not in checkers:
            policies = load_policies(text, origin=name) if case.get("policies") else ()
            checkers[key] = PolicyChecker.build(policies, parse_workload(workload), options)
        return checkers[key]

    try:
        checker(case["workload"])
        for request in case.get("requests") or ():
            if "workload" in request:
                checker(request["workload"])
    except PolicyError as err:
        if case.get("expect_error") or case.get("may_reject"):
            return CaseResult(name, (), 0, True)
        return CaseResult(name, (f"rejected: {err}",), 0, True)
    if case.get("expect_error"):
        return CaseResult(name, ("translated a policy set that must be rejected",), 0, False)
    failures = []
    requests = case.get("requests") or ()
    for i, request in enumerate(requests):
        decision = checker(request.get("workload", case["workload"])).check(parse_request(request))
        if not _expectation_ok(request, decision.action):
            failures.append(
                f"request[{i}] {request.get('source_principal')} {request.get('method')} "
                f"{request.get('path')}: want {request['expect']}, got {decision.action} "
                f"({decision.reason})"
            )
    return CaseResult(name, tuple(failures), len(requests), False)


def _run_consul(case: Mapping[str, Any]) -> CaseResult:
    name = case["name"]
    destination, protocol = parse_destination(case["destination"])
    try:
        checker = EntryChecker.build(
            case.get("intentions") or [],
            destination,
            protocol,
            default_allow=case["default_policy"] == "allow",
        )
    except PolicyError as err:
        if case.get("expect_error") or case.get("may_reject"):
            return CaseResult(name, (), 0, True)
        return CaseResult(name, (f"rejected: {err}",), 0, True)
    if case.get("expect_error"):
        return CaseResult(name, ("accepted entries that must be rejected",), 0, False)
    failures = []
    requests = case.get("requests") or ()
    for i, request in enumerate(requests):
        decision = checker.check(parse_request(request))
        if decision.action != request["expect"]:
            failures.append(
                f"request[{i}] {request.get('source')} {request.get('method')} "
                f"{request.get('path')}: want {request['expect']}, got {decision.action} "
                f"({decision.reason})"
            )
    return CaseResult(name, tuple(failures), len(requests), False)
