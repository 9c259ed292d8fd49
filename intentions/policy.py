"""Istio AuthorizationPolicy (security.istio.io/v1): model, strict parsing, Istio's validation.

Parsing is stricter than Kubernetes' pruning: an unknown or misspelt key is an error, because a
dropped `methods:` would silently widen an ALLOW rule. Validation reproduces istio/istio
`ValidateAuthorizationPolicy` and `pkg/config/security` (messages verbatim where Istio has one),
and reports every problem with the field path that caused it.
"""

from __future__ import annotations

import ipaddress
import re
import reprlib
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import yaml

from intentions.errors import PolicyError, Problem

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
DRY_RUN_ANNOTATION = "istio.io/dry-run"


class PolicyAction(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


# (YAML key, attribute) for the string lists of Source and Operation, in proto order.
SOURCE_FIELDS: tuple[tuple[str, str], ...] = (
    ("principals", "principals"),
    ("notPrincipals", "not_principals"),
    ("requestPrincipals", "request_principals"),
    ("notRequestPrincipals", "not_request_principals"),
    ("namespaces", "namespaces"),
    ("notNamespaces", "not_namespaces"),
    ("serviceAccounts", "service_accounts"),
    ("notServiceAccounts", "not_service_accounts"),
    ("ipBlocks", "ip_blocks"),
    ("notIpBlocks", "not_ip_blocks"),
    ("remoteIpBlocks", "remote_ip_blocks"),
    ("notRemoteIpBlocks", "not_remote_ip_blocks"),
    ("trustDomains", "trust_domains"),
    ("notTrustDomains", "not_trust_domains"),
)
OPERATION_FIELDS: tuple[tuple[str, str], ...] = (
    ("hosts", "hosts"),
    ("notHosts", "not_hosts"),
    ("ports", "ports"),
    ("notPorts", "not_ports"),
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
)


@dataclass(frozen=True, slots=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """`from_`/`to` are None when omitted (match anything); Istio rejects an explicit `[]`."""

    from_: tuple[Source | None, ...] | None = None
    to: tuple[Operation | None, ...] | None = None
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    name: str
    namespace: str
    action: PolicyAction = PolicyAction.ALLOW
    rules: tuple[Rule, ...] | None = None
    """None when `rules` is omitted; Istio treats `rules: []` the same way."""
    match_labels: tuple[tuple[str, str], ...] | None = None
    """None without `selector`; the selector's labels, sorted, otherwise."""
    target_refs: tuple[Mapping[str, Any], ...] = ()
    provider: str | None = None
    dry_run: bool = False
    origin: str = ""
    """Where the document came from (file and document index), for messages."""
    has_provider: bool = field(default=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.origin} {self.ref}" if self.origin else self.ref


# --------------------------------------------------------------------------------------------
# Parsing


class _Collector:
    def __init__(self, document: str) -> None:
        self.document = document
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.document, path, message))

    def mapping(self, value: object, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping with keys {', '.join(allowed)}")
            return {}
        for key in value:
            if key not in allowed:
                self.add(
                    f"{path}.{key}" if path else str(key),
                    f"unknown field; allowed: {', '.join(allowed)}",
                )
        return value

    def strings(self, value: object, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.add(path, "must be a list of strings")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            else:
                self.add(
                    f"{path}[{i}]",
                    f"must be a string, got {type(item).__name__} {_shown(item)} "
                    "(quote it in YAML)",
                )
        return tuple(out)

    def items(self, value: object, path: str) -> list[object] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            self.add(path, "must be a list")
            return None
        return value


def parse_policy(
    doc: Mapping[str, Any], *, origin: str = "", default_namespace: str | None = None
) -> AuthorizationPolicy:
    """Parse one AuthorizationPolicy object. Raises PolicyError listing every problem."""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    if namespace is None:
        namespace = default_namespace
    label_ref = f"{namespace or '?'}/{name or '?'}"
    c = _Collector(f"{origin} {label_ref}" if origin else label_ref)
    c.mapping(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if doc.get("apiVersion") not in API_VERSIONS:
        c.add("apiVersion", f"must be one of {', '.join(API_VERSIONS)}")
    if doc.get("kind") != "AuthorizationPolicy":
        c.add("kind", "must be AuthorizationPolicy")
    if not isinstance(meta, Mapping):
        c.add("metadata", "is required (name, namespace)")
    if not isinstance(name, str) or not name:
        c.add("metadata.name", "is required")
    if not isinstance(namespace, str) or not namespace:
        c.add("metadata.namespace", "is required (meshlet has no kubectl context to default it)")
    dry_run = False
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    if isinstance(annotations, Mapping) and DRY_RUN_ANNOTATION in annotations:
        raw = annotations[DRY_RUN_ANNOTATION]
        text = str(raw).lower() if isinstance(raw, str | bool) else ""
        if text in ("true", "1", "t"):
            dry_run = True
        elif text not in ("false", "0", "f"):
            c.add(f"metadata.annotations[{DRY_RUN_ANNOTATION}]", 'must be "true" or "false"')

    spec = c.mapping(
        doc.get("spec"),
        "spec",
        ("selector", "targetRef", "targetRefs", "action", "provider", "rules"),
    )
    action = PolicyAction.ALLOW
    raw_action = spec.get("action")
    if raw_action is not None:
        try:
            action = PolicyAction(raw_action)
        except ValueError:
            c.add("spec.action", f"must be one of {', '.join(a.value for a in PolicyAction)}")

    match_labels: tuple[tuple[str, str], ...] | None = None
    if spec.get("selector") is not None:
        selector = c.mapping(spec["selector"], "spec.selector", ("matchLabels",))
        labels = c.mapping(selector.get("matchLabels"), "spec.selector.matchLabels", ())
        pairs: list[tuple[str, str]] = []
        for k, v in labels.items():
            if not isinstance(v, str):
                c.add(f"spec.selector.matchLabels.{k}", "must be a string (quote it in YAML)")
                continue
            pairs.append((str(k), v))
        match_labels = tuple(sorted(pairs))
    # `c.mapping(..., ())` flags every label as unknown; undo that for matchLabels.
    c.problems = [
        p
        for p in c.problems
        if not (p.path.startswith("spec.selector.matchLabels.") and p.message.startswith("unknown"))
    ]

    target_refs: list[Mapping[str, Any]] = []
    if spec.get("targetRef") is not None:
        if isinstance(spec["targetRef"], Mapping):
            target_refs.append(spec["targetRef"])
        else:
            c.add("spec.targetRef", "must be a mapping")
    for i, ref in enumerate(c.items(spec.get("targetRefs"), "spec.targetRefs") or []):
        if isinstance(ref, Mapping):
            target_refs.append(ref)
        else:
            c.add(f"spec.targetRefs[{i}]", "must be a mapping")

    provider: str | None = None
    has_provider = spec.get("provider") is not None
    if has_provider:
        prov = c.mapping(spec["provider"], "spec.provider", ("name",))
        pname = prov.get("name")
        provider = pname if isinstance(pname, str) else None

    rules: tuple[Rule, ...] | None = None
    raw_rules = c.items(spec.get("rules"), "spec.rules")
    if raw_rules:
        rules = tuple(_parse_rule(c, r, f"spec.rules[{i}]") for i, r in enumerate(raw_rules))

    if c.problems:
        raise PolicyError(c.problems)
    assert isinstance(name, str) and isinstance(namespace, str)
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        rules=rules,
        match_labels=match_labels,
        target_refs=tuple(target_refs),
        provider=provider,
        dry_run=dry_run,
        origin=origin,
        has_provider=has_provider,
    )


def _parse_rule(c: _Collector, raw: object, path: str) -> Rule:
    if raw is None:
        c.add(path, "`rule` must not be nil")
        return Rule()
    r = c.mapping(raw, path, ("from", "to", "when"))
    from_: list[Source | None] | None = None
    raw_from = c.items(r.get("from"), f"{path}.from")
    if raw_from is not None:
        from_ = []
        for i, item in enumerate(raw_from):
            ipath = f"{path}.from[{i}]"
            m = c.mapping(item, ipath, ("source",))
            if m.get("source") is None:
                from_.append(None)
                continue
            s = c.mapping(m["source"], f"{ipath}.source", [k for k, _ in SOURCE_FIELDS])
            from_.append(
                Source(
                    **{
                        attr: c.strings(s.get(key), f"{ipath}.source.{key}")
                        for key, attr in SOURCE_FIELDS
                    }
                )
            )
    to: list[Operation | None] | None = None
    raw_to = c.items(r.get("to"), f"{path}.to")
    if raw_to is not None:
        to = []
        for i, item in enumerate(raw_to):
            ipath = f"{path}.to[{i}]"
            m = c.mapping(item, ipath, ("operation",))
            if m.get("operation") is None:
                to.append(None)
                continue
            o = c.mapping(m["operation"], f"{ipath}.operation", [k for k, _ in OPERATION_FIELDS])
            to.append(
                Operation(
                    **{
                        attr: c.strings(o.get(key), f"{ipath}.operation.{key}")
                        for key, attr in OPERATION_FIELDS
                    }
                )
            )
    when: list[Condition] = []
    for i, item in enumerate(c.items(r.get("when"), f"{path}.when") or []):
        ipath = f"{path}.when[{i}]"
        if item is None:
            c.add(ipath, "when field cannot be nil")
            continue
        w = c.mapping(item, ipath, ("key", "values", "notValues"))
        key = w.get("key")
        if key is not None and not isinstance(key, str):
            c.add(f"{ipath}.key", "must be a string")
            key = None
        when.append(
            Condition(
                key or "",
                c.strings(w.get("values"), f"{ipath}.values"),
                c.strings(w.get("notValues"), f"{ipath}.notValues"),
            )
        )
    return Rule(
        None if from_ is None else tuple(from_),
        None if to is None else tuple(to),
        tuple(when),
    )


# A value quoted back in an error is cut short: YAML aliases let a few hundred bytes stand for
# a list of billions of items (`&a [*b, *b, ...]`), and its full repr would be gigabytes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60


def _shown(value: object) -> str:
    return _SHORT.repr(value)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML keeps the last one silently, and a
    repeated `paths:` or `principals:` would then change a rule without a word."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            # `? {a: 1}` or `? [a]`: valid YAML, no dict key; SafeLoader's own wording.
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found unhashable key",
                key_node.start_mark,
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


def load_policies(
    text: str, *, origin: str = "<input>", default_namespace: str | None = None
) -> tuple[AuthorizationPolicy, ...]:
    """Parse and validate every AuthorizationPolicy in a YAML stream (`---`, `kind: List`).

    Raises PolicyError with every parse and validation problem of every document.
    """
    problems: list[Problem] = []
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except RecursionError:
        # PyYAML recurses once per level: thousands of `[` exhaust Python's stack.
        raise PolicyError([Problem(origin, "", "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise PolicyError([Problem(origin, "", f"not valid YAML: {what}{where}")]) from None
    flat: list[tuple[str, object]] = []
    for i, doc in enumerate(docs):
        where = f"{origin}#{i}" if len(docs) > 1 else origin
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                problems.append(
                    Problem(where, "items", "must be a list of AuthorizationPolicy objects")
                )
                continue
            for j, item in enumerate(items):
                flat.append((f"{where} items[{j}]", item))
        else:
            flat.append((where, doc))
    policies: list[AuthorizationPolicy] = []
    for where, doc in flat:
        if not isinstance(doc, Mapping):
            problems.append(Problem(where, "", "document is not a mapping"))
            continue
        if doc.get("kind") != "AuthorizationPolicy":
            problems.append(
                Problem(where, "kind", f"{_shown(doc.get('kind'))} is not an AuthorizationPolicy")
            )
            continue
        try:
            policy = parse_policy(doc, origin=where, default_namespace=default_namespace)
        except PolicyError as err:
            problems.extend(err.problems)
            continue
        errors, _ = validate_policy(policy)
        problems.extend(errors)
        policies.append(policy)
    if problems:
        raise PolicyError(problems)
    return tuple(policies)


# --------------------------------------------------------------------------------------------
# Istio's validation

_MEANINGLESS = (
    "{} action without `rules` is meaningless as it will never be triggered, "
    "add an empty rule `{{}}` if you want it be triggered for every request"
)
_CUSTOM_UNSUPPORTED_FROM = (
    ("namespaces", "From.Namespaces"),
    ("not_namespaces", "From.NotNamespaces"),
    ("service_accounts", "From.ServiceAccounts"),
    ("not_service_accounts", "From.NotServiceAccounts"),
    ("principals", "From.Principals"),
    ("not_principals", "From.NotPrincipals"),
    ("request_principals", "From.RequestPrincipals"),
    ("not_request_principals", "From.NotRequestPrincipals"),
)
KNOWN_EXACT_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
_MAX_SERVICE_ACCOUNTS = 16


def _camel(attr: str) -> str:
    head, *rest = attr.split("_")
    return head + "".join(p.capitalize() for p in rest)


def validate_policy(policy: AuthorizationPolicy) -> tuple[list[Problem], list[Problem]]:
    """Istio's checks. Returns (errors, warnings); errors mean Istio would refuse the object."""
    doc = policy.label
    errors: list[Problem] = []
    warnings: list[Problem] = []

    def err(path: str, message: str) -> None:
        errors.append(Problem(doc, path, message))

    if policy.match_labels is not None and policy.target_refs:
        err("spec", "only one of targetRefs or workloadSelector can be set")
    for k, v in policy.match_labels or ():
        if not k:
            err("spec.selector.matchLabels", f'empty key is not supported in selector: "{k}={v}"')
        if "*" in k or "*" in v:
            err(
                f"spec.selector.matchLabels.{k}",
                f'wildcard is not supported in selector: "{k}={v}"',
            )
    if policy.match_labels is not None and not policy.match_labels:
        warnings.append(Problem(doc, "spec.selector", "workload selector specified without labels"))

    rules = policy.rules
    if policy.action is PolicyAction.CUSTOM:
        if rules is None:
            err("spec.rules", _MEANINGLESS.format("CUSTOM"))
        elif not policy.provider:
            err("spec.provider.name", "`provider.name` must not be empty")
        for i, rule in enumerate(rules or ()):
            for j, src in enumerate(rule.from_ or ()):
                if src is None:
                    continue
                for attr, label in _CUSTOM_UNSUPPORTED_FROM:
                    if getattr(src, attr):
                        err(
                            f"spec.rules[{i}].from[{j}].source.{_camel(attr)}",
                            f"{label} is currently not supported with CUSTOM action",
                        )
            for j, cond in enumerate(rule.when):
                if cond.key in (
                    "source.namespace",
                    "source.serviceAccount",
                    "source.principal",
                ) or cond.key.startswith("request.auth."):
                    err(
                        f"spec.rules[{i}].when[{j}].key",
                        f"{cond.key} is currently not supported with CUSTOM action",
                    )
    if policy.has_provider and policy.action is not PolicyAction.CUSTOM:
        err(
            "spec.provider", f"`provider` must not be with non CUSTOM action, found {policy.action}"
        )
    if policy.action is PolicyAction.DENY and rules is None:
        err("spec.rules", _MEANINGLESS.format("DENY"))

    for i, rule in enumerate(rules or ()):
        _validate_rule(policy, i, rule, err, warnings)
    return errors, warnings


def _validate_rule(
    policy: AuthorizationPolicy,
    i: int,
    rule: Rule,
    err: Any,
    warnings: list[Problem],
) -> None:
    base = f"spec.rules[{i}]"
    if rule.from_ is not None and not rule.from_:
        err(f"{base}.from", f"`from` must not be empty, found at rule {i}")
    tcp_in_from = tcp_in_to = from_exists = to_exists = False
    for j, src in enumerate(rule.from_ or ()):
        path = f"{base}.from[{j}].source"
        if src is None:
            err(path, f"`from.source` must not be nil, found at rule {i}")
            continue
        from_exists = True
        identity = src.principals or src.not_principals or src.namespaces or src.not_namespaces
        if identity and (src.service_accounts or src.not_service_accounts):
            err(
                path, f"cannot set serviceAccounts with namespaces or principals, found at rule {i}"
            )
        if not any(getattr(src, attr) for _, attr in SOURCE_FIELDS):
            err(path, f"`from.source` must not be empty, found at rule {i}")
        for key, attr in SOURCE_FIELDS:
            values: tuple[str, ...] = getattr(src, attr)
            if "" in values:
                err(f"{path}.{key}", f"empty value not allowed, found in {key[0].upper()}{key[1:]}")
            if attr.endswith("ip_blocks"):
                for k, v in enumerate(values):
                    problem = _ip_problem(v)
                    if problem:
                        err(f"{path}.{key}[{k}]", problem)
            if attr.endswith("service_accounts"):
                label = f"{key[0].upper()}{key[1:]}"
                if len(values) > _MAX_SERVICE_ACCOUNTS:
                    err(f"{path}.{key}", f"{label}: at most {_MAX_SERVICE_ACCOUNTS} allowed")
                for k, v in enumerate(values):
                    if "*" in v:
                        err(f"{path}.{key}[{k}]", f"wildcard is not allowed in {label}")
                    elif v.count("/") > 1 or v.startswith("/") or v.endswith("/"):
                        err(f"{path}.{key}[{k}]", f"{label} must be <sa> or <namespace>/<sa>")
        if any(
            getattr(src, a)
            for a in (
                "principals",
                "not_principals",
                "ip_blocks",
                "not_ip_blocks",
                "namespaces",
                "not_namespaces",
                "remote_ip_blocks",
                "not_remote_ip_blocks",
                "service_accounts",
                "not_service_accounts",
            )
        ):
            tcp_in_from = True
    if rule.to is not None and not rule.to:
        err(f"{base}.to", f"`to` must not be empty, found at rule {i}")
    for j, op in enumerate(rule.to or ()):
        path = f"{base}.to[{j}].operation"
        if op is None:
            err(path, f"`to.operation` must not be nil, found at rule {i}")
            continue
        to_exists = True
        if not any(getattr(op, attr) for _, attr in OPERATION_FIELDS):
            err(path, f"`to.operation` must not be empty, found at rule {i}")
        for key, attr in OPERATION_FIELDS:
            values = getattr(op, attr)
            if "" in values:
                err(f"{path}.{key}", f"empty value not allowed, found in {key[0].upper()}{key[1:]}")
            if attr.endswith("ports"):
                for k, v in enumerate(values):
                    if not _valid_port(v):
                        err(f"{path}.{key}[{k}]", f"bad port ({v})")
            if attr.endswith("paths"):
                for k, v in enumerate(values):
                    if not valid_path_template(v):
                        err(
                            f"{path}.{key}[{k}]",
                            "invalid or unsupported path template, found in "
                            f"{key[0].upper()}{key[1:]}",
                        )
        if op.ports or op.not_ports:
            tcp_in_to = True
    for j, cond in enumerate(rule.when):
        path = f"{base}.when[{j}]"
        if not cond.key:
            err(f"{path}.key", "`key` must not be empty")
        elif not cond.values and not cond.not_values:
            err(path, f"at least one of `values` or `notValues` must be set for key {cond.key}")
        else:
            for label, values in (("value", cond.values), ("notValue", cond.not_values)):
                problem = attribute_problem(cond.key, values)
                if problem:
                    err(f"{path}.key", f"invalid `{label}` for `key` {cond.key}: {problem}")
    only_http = (from_exists and not to_exists and not tcp_in_from) or (to_exists and not tcp_in_to)
    if only_http and policy.action is PolicyAction.DENY:
        warnings.append(
            Problem(
                policy.label,
                base,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its "
                "scope due to the use of only HTTP attributes in a DENY rule; it is recommended "
                "to explicitly specify the port",
            )
        )


def _ip_problem(value: str) -> str | None:
    if "/" in value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            return f"bad CIDR range ({value}): {exc}"
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"bad IP address ({value})"
    return None


def _valid_port(value: str) -> bool:
    return value.isdigit() and value.isascii() and int(value) <= 65535


_UNSUPPORTED_TEMPLATE = re.compile(r"/\{\w+=\*[*]?\}|\{\w*\}|/\*[*]?|\*[*]?/")


def is_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def valid_path_template(value: str) -> bool:
    """Istio's `CheckValidPathTemplate`: templates may not mix in `*`, `**` or named variables."""
    if not is_path_template(value):
        return True
    return _UNSUPPORTED_TEMPLATE.search(value) is None


def attribute_problem(key: str, values: Iterable[str]) -> str | None:
    """Istio's `ValidateAttribute`: None when `key` and its values are acceptable."""
    values = tuple(values)
    if "" in values:
        return f"empty value not allowed, found in {key}"
    if key.startswith(("request.headers", "request.auth.claims", "experimental.envoy.filters.")):
        return _map_key_problem(key)
    if key in ("source.ip", "remote.ip", "destination.ip"):
        return next((p for p in map(_ip_problem, values) if p), None)
    if key == "destination.port":
        bad = [v for v in values if not _valid_port(v)]
        return f"bad port ({bad[0]})" if bad else None
    if key in KNOWN_EXACT_KEYS:
        return None
    if key == "destination.namespace":
        return f"attribute {key} is replaced by the metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    return f"unknown attribute: {key}"


def _map_key_problem(key: str) -> str | None:
    open_at = key.find("[")
    if key.endswith("]") and 0 < open_at < len(key) - 2:
        return None
    return f"bad key ({key}): should have format a[b]"


def map_key_name(key: str) -> str:
    """`request.headers[X-Foo]` -> `X-Foo`."""
    return key[key.find("[") + 1 : -1]
