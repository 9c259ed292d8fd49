"""An independent, direct evaluator of Istio AuthorizationPolicy semantics (DENY before ALLOW,
no ALLOW policy means allow, any matching ALLOW allows).

It works on the raw YAML dicts and shares no code with `intentions`, so the property tests
compare the translator + engine pipeline against a second reading of the specification.
Scope: what the generators produce (no ipBlocks, ports, JWT, path templates, CUSTOM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HTTP_ONLY_OP = ("paths", "notPaths", "methods", "notMethods", "hosts", "notHosts")


def _template_match(template: str, path: str) -> bool:
    # Segment-wise: `{*}` is one non-empty segment, a trailing `{**}` any remaining segments.
    t_parts, p_parts = template.split("/"), path.split("/")
    for i, part in enumerate(t_parts):
        if part == "{**}":
            return i == len(t_parts) - 1 and len(p_parts) > i
        if i >= len(p_parts):
            return False
        if part == "{*}":
            if not p_parts[i]:
                return False
        elif part != p_parts[i]:
            return False
    return len(p_parts) == len(t_parts)


def string_match(pattern: str, value: str) -> bool:
    if "{*}" in pattern or "{**}" in pattern:
        return _template_match(pattern, value)
    if pattern == "*":
        return value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, the input-buffer algorithm as written there."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = "/" + inp[3:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = "/" + inp[4:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end == -1 else end
            out += inp[:end]
            inp = inp[end:]
    return out


def _url_path(path: str) -> str:
    path = path.split("?", 1)[0].split("#", 1)[0]
    # The generators only produce paths where BASE normalization is dot-segment removal.
    return _remove_dot_segments(path) if path.startswith("/") else path


def _header(request: Mapping[str, Any], name: str) -> str | None:
    found: list[str] = []
    for key, value in (request.get("headers") or {}).items():
        if key.lower() == name.lower():
            found.extend([value] if isinstance(value, str) else value)
    return ",".join(found) if found else None


def _peer(request: Mapping[str, Any]) -> tuple[str, str, str] | None:
    principal = request.get("source_principal")
    if principal is None:
        return None
    td, _, ns, _, sa = principal.removeprefix("spiffe://").split("/")
    return td, ns, sa


def _any(patterns: Sequence[str], value: str | None) -> bool:
    return value is not None and any(string_match(p, value) for p in patterns)


def _source_matches(src: Mapping[str, Any], request: Mapping[str, Any], policy_ns: str) -> bool:
    peer = _peer(request)
    principal = None if peer is None else "/".join((peer[0], "ns", peer[1], "sa", peer[2]))
    namespace = None if peer is None else peer[1]
    account = None if peer is None else f"{peer[1]}/{peer[2]}"
    checks = {
        "principals": lambda v: _any(v, principal),
        "notPrincipals": lambda v: not _any(v, principal),
        "namespaces": lambda v: _any(v, namespace),
        "notNamespaces": lambda v: not _any(v, namespace),
        "serviceAccounts": lambda v: account in [x if "/" in x else f"{policy_ns}/{x}" for x in v],
        "notServiceAccounts": lambda v: (
            account not in [x if "/" in x else f"{policy_ns}/{x}" for x in v]
        ),
    }
    return all(checks[k](v) for k, v in src.items() if k in checks)


def _operation_matches(op: Mapping[str, Any], request: Mapping[str, Any], tcp: bool) -> bool:
    if tcp:
        return True  # only reached for DENY: HTTP-only fields are dropped on TCP
    path = _url_path(request["path"])
    method = request["method"]
    host = (request.get("host") or "").lower()
    checks = {
        "paths": lambda v: _any(v, path),
        "notPaths": lambda v: not _any(v, path),
        "methods": lambda v: _any(v, method),
        "notMethods": lambda v: not _any(v, method),
        "hosts": lambda v: _any([x.lower() for x in v], host),
        "notHosts": lambda v: not _any([x.lower() for x in v], host),
    }
    return all(checks[k](v) for k, v in op.items())


def _condition_matches(cond: Mapping[str, Any], request: Mapping[str, Any], tcp: bool) -> bool:
    key = cond["key"]
    peer = _peer(request)
    if key.startswith("request.headers["):
        if tcp:
            return True
        value = _header(request, key[len("request.headers[") : -1])

        def hit(patterns: Sequence[str]) -> bool:
            if value is None:
                return False
            return any(value is not None if p == "*" else string_match(p, value) for p in patterns)

    elif key == "source.namespace":

        def hit(patterns: Sequence[str]) -> bool:
            return peer is not None and any(string_match(p, peer[1]) for p in patterns)

    elif key == "source.principal":

        def hit(patterns: Sequence[str]) -> bool:
            if peer is None:
                return False
            principal = f"{peer[0]}/ns/{peer[1]}/sa/{peer[2]}"
            return any(string_match(p, principal) for p in patterns)

    else:
        raise AssertionError(key)
    values, not_values = cond.get("values"), cond.get("notValues")
    return (not values or hit(values)) and (not not_values or not hit(not_values))


def _uses_http(rule: Mapping[str, Any]) -> bool:
    ops = [t["operation"] for t in rule.get("to") or ()]
    conds = rule.get("when") or ()
    return any(k in HTTP_ONLY_OP for op in ops for k in op) or any(
        c["key"].startswith("request.") for c in conds
    )


def rule_matches(
    rule: Mapping[str, Any], request: Mapping[str, Any], policy_ns: str, tcp: bool
) -> bool:
    froms = rule.get("from")
    tos = rule.get("to")
    if froms is not None and not any(
        _source_matches(f["source"], request, policy_ns) for f in froms
    ):
        return False
    if tos is not None and not any(_operation_matches(t["operation"], request, tcp) for t in tos):
        return False
    return all(_condition_matches(c, request, tcp) for c in rule.get("when") or ())


def applies(policy: Mapping[str, Any], workload: Mapping[str, Any], root: str) -> bool:
    ns = policy["metadata"]["namespace"]
    if ns not in (root, workload["namespace"]):
        return False
    labels = ((policy.get("spec") or {}).get("selector") or {}).get("matchLabels")
    if labels is None:
        return True
    return all(workload["labels"].get(k) == v for k, v in labels.items())


def deny_matches(
    policies: Sequence[Mapping[str, Any]],
    workload: Mapping[str, Any],
    request: Mapping[str, Any],
    root: str = "istio-system",
) -> bool:
    tcp = workload["protocol"] == "tcp"
    for p in policies:
        spec = p.get("spec") or {}
        if spec.get("action") != "DENY" or not applies(p, workload, root):
            continue
        ns = p["metadata"]["namespace"]
        if any(rule_matches(r, request, ns, tcp) for r in spec.get("rules") or ()):
            return True
    return False


def decide(
    policies: Sequence[Mapping[str, Any]],
    workload: Mapping[str, Any],
    request: Mapping[str, Any],
    root: str = "istio-system",
) -> str:
    """Istio's decision: DENY first, then implicit allow without ALLOW policies, then ALLOW."""
    tcp = workload["protocol"] == "tcp"
    if not tcp and not request["method"].isupper():
        return "deny"  # the HTTP codec answers 400 before authorization
    if deny_matches(policies, workload, request, root):
        return "deny"
    allows = [
        p
        for p in policies
        if (p.get("spec") or {}).get("action", "ALLOW") == "ALLOW" and applies(p, workload, root)
    ]
    if not allows:
        return "allow"
    for p in allows:
        ns = p["metadata"]["namespace"]
        for r in (p.get("spec") or {}).get("rules") or ():
            if tcp and _uses_http(r):
                continue  # Istio skips the whole ALLOW rule on TCP
            if rule_matches(r, request, ns, tcp):
                return "allow"
    return "deny"
