"""AuthorizationPolicy -> Consul `service-intentions`, keeping Istio's meaning exactly.

Istio combines policies by action (any DENY wins, then any ALLOW, then deny if an ALLOW policy
exists, else allow); Consul picks the single most specific intention and never falls through.
The two only agree if every destination gets one self-contained entry in which each source class
carries the whole decision as an ordered list: DENY rules, then ALLOW rules, then an explicit
catch-all. The source classes are the identities the rules name: exact
(namespace, service account) pairs, whole namespaces, and everybody else; every Istio source
predicate is constant over a class, so it can be evaluated once per class at translation time.

Anything that cannot be represented exactly is rejected with a Problem naming the policy, the
field and the reason; a set with any problem yields no entries at all.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from types import MappingProxyType
from typing import Literal

from intentions.entries import (
    HTTP_METHODS,
    WILDCARD,
    HeaderMatch,
    HTTPMatch,
    Permission,
    ServiceIntentions,
    SourceIntention,
    normalize,
    validate,
)
from intentions.errors import InvalidEntry, PolicyError, Problem
from intentions.policy import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyAction,
    Rule,
    Source,
    is_path_template,
    map_key_name,
)

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc"})
MAX_PERMISSIONS_PER_RULE = 512


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """A Consul service that policies may apply to (from the catalog or `--services`)."""

    name: str
    namespace: str
    protocol: str = "http"
    labels: tuple[tuple[str, str], ...] | None = None
    """The workload labels, when known (checking one workload); None for catalog services."""

    @property
    def is_http(self) -> bool:
        return self.protocol.lower() in HTTP_PROTOCOLS


@dataclass(frozen=True, slots=True)
class TranslateOptions:
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()
    root_namespace: str = "istio-system"
    service_label: str = "app"
    """The selector label that names the Consul service."""
    single_namespace: str | None = None
    """Consul CE: the one Istio namespace that Consul's only namespace stands for. None means
    Consul Enterprise with namespace mirroring (Istio namespace N = Consul namespace N)."""
    default_protocol: str = "http"
    """Protocol of services named only by a selector (not in the inventory)."""
    inventory_is_complete: bool = False
    """True when `services` lists every service of interest (e.g. one workload being checked):
    a policy matching none of them then simply does not apply. False (translate/apply): such a
    policy is an error, because its services are unknown, not absent."""

    @property
    def local_trust_domains(self) -> frozenset[str]:
        return frozenset({self.trust_domain, "cluster.local", *self.trust_domain_aliases})


@dataclass(frozen=True, slots=True)
class Translation:
    entries: tuple[ServiceIntentions, ...]
    warnings: tuple[Problem, ...]
    origins: Mapping[tuple[str, str, str, str], tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """(destination namespace, destination, source namespace, source), with Consul's
    normalized names ("default" in CE) -> for each permission of that source (one item for an
    L4 source), the Istio rule or catch-all it came from."""
    applied: Mapping[tuple[str, str], tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """(namespace, name) of each entry, as Consul normalizes them -> the enforced policies
    (`namespace/name`) that select the service; empty for an entry that only states Istio's
    default (no enforced policy selects the service)."""
    dropped: Mapping[tuple[str, str], tuple[Problem, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """(namespace, name) -> the ALLOW rules ignored because they use HTTP-only fields on a
    service that is not HTTP (also in `warnings`): Istio's TCP semantics, but what the rule's
    author meant to allow is denied."""


# --------------------------------------------------------------------------------------------
# Source side: identity predicates evaluated per class


@dataclass(frozen=True, slots=True)
class _Peer:
    """A source class: an exact identity, a namespace's other members, or everybody else.

    `None` fields stand for "a member not named anywhere"; `plaintext` for a peer without mTLS,
    used only to warn where Istio would have admitted plaintext.
    """

    namespace: str | None
    name: str | None
    plaintext: bool = False


@dataclass(frozen=True, slots=True)
class _IdAtom:
    kind: Literal["any", "exact", "namespace", "none"]
    namespace: str = ""
    name: str = ""

    def holds(self, peer: _Peer) -> bool:
        if peer.plaintext or self.kind == "none":
            return False
        if self.kind == "any":
            return True
        if self.kind == "namespace":
            return peer.namespace == self.namespace
        return peer.namespace == self.namespace and peer.name == self.name


@dataclass(frozen=True, slots=True)
class _IdField:
    """OR over `atoms`, negated for `not*` fields."""

    atoms: tuple[_IdAtom, ...]
    negated: bool

    def holds(self, peer: _Peer) -> bool:
        hit = any(a.holds(peer) for a in self.atoms)
        return hit != self.negated


_SourcePred = tuple[tuple[_IdField, ...], ...] | None
"""OR over `from` items of AND over fields; None when the rule has no `from`."""


# --------------------------------------------------------------------------------------------
# Request side: permissions as disjunctions of conjunctions


@dataclass(frozen=True, slots=True)
class _Path:
    kind: Literal["exact", "prefix", "regex"]
    value: str


@dataclass(frozen=True, slots=True)
class _Methods:
    methods: tuple[str, ...]


_Atom = _Path | _Methods | HeaderMatch
_Conj = tuple[_Atom, ...]
_DNF = tuple[_Conj, ...]
_TRUE: _DNF = ((),)
_FALSE: _DNF = ()


def _unsatisfiable(conj: _Conj) -> bool:
    # "Header absent" next to any other matcher on that header can never hold in Envoy
    # (every other matcher, inverted or not, fails on a missing header).
    absent = {a.name for a in conj if isinstance(a, HeaderMatch) and a.present and a.invert}
    return any(
        isinstance(a, HeaderMatch) and a.name in absent and not (a.present and a.invert)
        for a in conj
    )


def _and(*parts: _DNF) -> _DNF:
    out: list[_Conj] = []
    for combo in product(*parts):
        conj: list[_Atom] = []
        for c in combo:
            conj.extend(a for a in c if a not in conj)
        if not _unsatisfiable(tuple(conj)):
            out.append(tuple(conj))
    return tuple(dict.fromkeys(out))


def _or(*parts: _DNF) -> _DNF:
    merged = [c for p in parts for c in p]
    if () in merged:
        return _TRUE
    return tuple(dict.fromkeys(merged))


_RE_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def _re_escape(text: str) -> str:
    # Escapes only what both RE2 (Envoy) and Python treat as special.
    return "".join(f"\\{ch}" if ch in _RE_SPECIAL else ch for ch in text)


# Envoy uri_template (convertPathPatternSyntaxToRegex): `{*}` is one non-empty segment of
# RFC 3986 pchars, `{**}` any run of pchars and `/` (zero or more segments).
_PCHAR = r"[A-Za-z0-9\-._~%!$&'()+,;:@=]"
_ONE_SEGMENT = _PCHAR + "+"
_ANY_SEGMENTS = r"[A-Za-z0-9\-._~%!$&'()+,;:@=/]*"


def _template_regex(value: str) -> str:
    out: list[str] = []
    for piece in re.split(r"(\{\*\*\}|\{\*\})", value):
        if piece == "{**}":
            out.append(_ANY_SEGMENTS)
        elif piece == "{*}":
            out.append(_ONE_SEGMENT)
        else:
            out.append(_re_escape(piece))
    return "".join(out)


def _path_regex(value: str, any_char: str) -> str:
    """Full-match regex for an Istio path value; `any_char` excludes `?#` when matching `:path`."""
    if is_path_template(value):
        return _template_regex(value)
    if value == "*":
        return any_char + "+"
    if value.startswith("*"):
        return any_char + "*" + _re_escape(value[1:])
    if value.endswith("*"):
        return _re_escape(value[:-1]) + any_char + "*"
    return _re_escape(value)


def _path_atom(value: str) -> _Path:
    if is_path_template(value) or value == "*" or value.startswith("*"):
        return _Path("regex", _path_regex(value, "."))
    if value.endswith("*"):
        stem = value[:-1]
        return (
            _Path("prefix", stem)
            if stem.startswith("/")
            else _Path("regex", _path_regex(value, "."))
        )
    return _Path("exact", value) if value.startswith("/") else _Path("regex", _re_escape(value))


def _not_path_atom(value: str) -> HeaderMatch:
    # `:path` carries the query; Istio matches without it, so allow an optional query/fragment.
    regex = _path_regex(value, "[^?#]") + "(?:[?#].*)?"
    return HeaderMatch(":path", regex=regex, invert=True)


def _string_header(name: str, value: str, *, ignore_case: bool = False) -> HeaderMatch:
    """Istio's string match as an Envoy header matcher (`*` presence, `*x` suffix, `x*` prefix)."""
    if value == "*":
        return HeaderMatch(name, present=True)
    if value.startswith("*"):
        return HeaderMatch(name, suffix=value[1:], ignore_case=ignore_case)
    if value.endswith("*"):
        return HeaderMatch(name, prefix=value[:-1], ignore_case=ignore_case)
    return HeaderMatch(name, exact=value, ignore_case=ignore_case)


def _header_any(name: str, values: Sequence[str], *, ignore_case: bool = False) -> _DNF:
    return _or(*(((_string_header(name, v, ignore_case=ignore_case),),) for v in values))


def _header_none(name: str, values: Sequence[str], *, ignore_case: bool = False) -> _DNF:
    """NOT(any value matches): true when the header is absent, as in Istio.

    Envoy's inverted matchers fail on a missing header, so the absent case is its own branch.
    """
    absent: _Conj = (HeaderMatch(name, present=True, invert=True),)
    if "*" in values:
        return (absent,)
    inverted = tuple(
        dataclasses.replace(_string_header(name, v, ignore_case=ignore_case), invert=True)
        for v in values
    )
    return (absent, inverted)


def _methods_any(values: Sequence[str]) -> _DNF:
    standard = tuple(v for v in values if v in HTTP_METHODS)
    # Consul upper-cases `Methods`; anything else must stay a case-sensitive `:method` match.
    others = _header_any(":method", [v for v in values if v not in HTTP_METHODS])
    return _or(((_Methods(standard),),) if standard else _FALSE, others)


def _operation_dnf(op: Operation) -> _DNF:
    parts: list[_DNF] = []
    if op.paths:
        parts.append(tuple((_path_atom(v),) for v in dict.fromkeys(op.paths)))
    if op.not_paths:
        parts.append((tuple(_not_path_atom(v) for v in dict.fromkeys(op.not_paths)),))
    if op.methods:
        parts.append(_methods_any(op.methods))
    if op.not_methods:
        # `:method` is always present, so no absent branch is needed.
        inverted = tuple(
            dataclasses.replace(_string_header(":method", v), invert=True)
            for v in dict.fromkeys(op.not_methods)
        )
        parts.append((inverted,))
    if op.hosts:
        parts.append(_header_any(":authority", op.hosts, ignore_case=True))
    if op.not_hosts:
        parts.append(_header_none(":authority", op.not_hosts, ignore_case=True))
    return _and(*parts) if parts else _TRUE


def _render(conj: _Conj) -> HTTPMatch:
    http = HTTPMatch()
    headers: list[HeaderMatch] = []
    for atom in conj:
        if isinstance(atom, _Path):
            # One path atom per conjunction by construction (paths come from one operation).
            if atom.kind == "exact":
                http = dataclasses.replace(http, path_exact=atom.value)
            elif atom.kind == "prefix":
                http = dataclasses.replace(http, path_prefix=atom.value)
            else:
                http = dataclasses.replace(http, path_regex=atom.value)
        elif isinstance(atom, _Methods):
            http = dataclasses.replace(http, methods=atom.methods)
        else:
            headers.append(atom)
    if not conj:
        # Explicit catch-all; `PathPrefix: /` would miss the asterisk-form `OPTIONS *`.
        return HTTPMatch(path_regex=".*")
    return dataclasses.replace(http, header=tuple(headers))


# --------------------------------------------------------------------------------------------
# Translation


HTTP_ONLY_OPERATION = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
_SOURCE_WHEN = {
    "source.principal": "principals",
    "source.namespace": "namespaces",
    "source.serviceAccount": "service_accounts",
    "source.trustDomain": "trust_domains",
}
_UNSUPPORTED_SOURCE = {
    "ip_blocks": "ipBlocks",
    "not_ip_blocks": "notIpBlocks",
    "remote_ip_blocks": "remoteIpBlocks",
    "not_remote_ip_blocks": "notRemoteIpBlocks",
}


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    policy: AuthorizationPolicy
    index: int
    source: _SourcePred
    when_source: tuple[_IdField, ...]
    http: _DNF
    """Request-side condition on an HTTP destination."""
    tcp: _DNF | None
    """On a TCP destination: None when Istio skips the rule, else its (L4) condition."""
    http_only: bool
    """The rule uses fields that only exist for HTTP (ignored or fatal on TCP, as in Istio)."""

    @property
    def origin(self) -> str:
        return f"{self.policy.action} {self.policy.ref} rules[{self.index}]"

    def source_holds(self, peer: _Peer) -> bool:
        if not all(f.holds(peer) for f in self.when_source):
            return False
        if self.source is None:
            return True
        return any(all(f.holds(peer) for f in item) for item in self.source)


class _Translator:
    def __init__(self, options: TranslateOptions) -> None:
        self.o = options
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.dropped: list[Problem] = []

    def problem(self, policy: AuthorizationPolicy, path: str, message: str) -> None:
        self.problems.append(Problem(policy.label, path, message, "unsupported"))

    # -- identities ---------------------------------------------------------------------------

    def _namespace_ok(self, policy: AuthorizationPolicy, path: str, namespace: str) -> bool:
        single = self.o.single_namespace
        if single is not None and namespace != single:
            self.problem(
                policy,
                path,
                f"namespace {namespace!r}: Consul CE has one namespace, which stands for "
                f"Istio namespace {single!r} only",
            )
            return False
        return True

    def principal(self, policy: AuthorizationPolicy, path: str, value: str) -> _IdAtom:
        if value == "*":
            return _IdAtom("any")
        if value.startswith("*") or value.endswith("*"):
            self.problem(
                policy,
                path,
                f"partial-wildcard principal {value!r}: Consul sources name a whole service or "
                "'*'; use an exact principal, '*', or namespaces",
            )
            return _IdAtom("none")
        parts = value.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
            self.problem(
                policy,
                path,
                f"principal {value!r} is not of the form "
                "<trust-domain>/ns/<namespace>/sa/<service-account>",
            )
            return _IdAtom("none")
        if parts[0] not in self.o.local_trust_domains:
            self.problem(
                policy,
                path,
                f"principal {value!r} is in trust domain {parts[0]!r}, not the mesh's "
                f"({', '.join(sorted(self.o.local_trust_domains))}); foreign trust domains "
                "cannot be expressed as Consul intentions",
            )
            return _IdAtom("none")
        if not self._namespace_ok(policy, path, parts[2]):
            return _IdAtom("none")
        return _IdAtom("exact", parts[2], parts[4])

    def namespace(self, policy: AuthorizationPolicy, path: str, value: str) -> _IdAtom:
        if value == "*":
            return _IdAtom("any")
        if "*" in value:
            self.problem(
                policy,
                path,
                f"partial-wildcard namespace {value!r}: Consul namespaces are exact or '*'",
            )
            return _IdAtom("none")
        if not self._namespace_ok(policy, path, value):
            return _IdAtom("none")
        return _IdAtom("namespace", value)

    def service_account(self, policy: AuthorizationPolicy, path: str, value: str) -> _IdAtom:
        namespace, _, account = value.rpartition("/")
        namespace = namespace or policy.namespace
        if not self._namespace_ok(policy, path, namespace):
            return _IdAtom("none")
        return _IdAtom("exact", namespace, account)

    def trust_domain(self, policy: AuthorizationPolicy, path: str, value: str) -> _IdAtom:
        if value == "*" or value in self.o.local_trust_domains:
            return _IdAtom("any")  # every peer Consul lets in is from the local trust domain
        self.problem(
            policy,
            path,
            f"trust domain {value!r} is not the mesh's; foreign trust domains cannot be "
            "expressed as Consul intentions",
        )
        return _IdAtom("none")

    def id_field(
        self, policy: AuthorizationPolicy, path: str, kind: str, values: Sequence[str], neg: bool
    ) -> _IdField:
        parse = {
            "principals": self.principal,
            "namespaces": self.namespace,
            "service_accounts": self.service_account,
            "trust_domains": self.trust_domain,
        }[kind]
        return _IdField(tuple(parse(policy, f"{path}[{i}]", v) for i, v in enumerate(values)), neg)

    # -- rules --------------------------------------------------------------------------------

    def compile_rule(self, policy: AuthorizationPolicy, index: int, rule: Rule) -> _CompiledRule:
        base = f"spec.rules[{index}]"
        http_only_used: list[str] = []
        source: _SourcePred = None
        if rule.from_ is not None:
            items: list[tuple[_IdField, ...]] = []
            for j, src in enumerate(rule.from_):
                assert src is not None  # validation rejected nil sources
                items.append(
                    self._source_fields(policy, f"{base}.from[{j}].source", src, http_only_used)
                )
            source = tuple(items)
        when_source: list[_IdField] = []
        when_http: list[_DNF] = []
        for j, cond in enumerate(rule.when):
            out = (when_source, when_http, http_only_used)
            self._condition(policy, f"{base}.when[{j}]", cond, out)
        ops: list[_DNF] = []
        tcp_ops: list[_DNF] = []
        for j, op in enumerate(rule.to or ()):
            assert op is not None
            path = f"{base}.to[{j}].operation"
            if op.ports or op.not_ports:
                key = "ports" if op.ports else "notPorts"
                self.problem(
                    policy,
                    f"{path}.{key}",
                    "port conditions have no Consul intention equivalent (intentions apply to "
                    "the whole service)",
                )
            used = [a for a in HTTP_ONLY_OPERATION if getattr(op, a)]
            http_only_used.extend(f"{path}.{a}" for a in used)
            ops.append(_operation_dnf(op))
            tcp_ops.append(_TRUE)  # ports are rejected above, so nothing TCP-usable remains
        http = _and(_or(*ops) if rule.to is not None else _TRUE, *when_http)
        if len(http) > MAX_PERMISSIONS_PER_RULE:
            self.problem(
                policy,
                base,
                f"expands to {len(http)} Consul permissions (limit {MAX_PERMISSIONS_PER_RULE}); "
                "split the rule",
            )
        tcp: _DNF | None = _TRUE
        if http_only_used:
            if policy.action is PolicyAction.ALLOW:
                tcp = None  # Istio skips the whole ALLOW rule on a TCP port
            else:
                tcp = _or(*tcp_ops) if rule.to is not None else _TRUE
        return _CompiledRule(
            policy, index, source, tuple(when_source), http, tcp, bool(http_only_used)
        )

    def _source_fields(
        self, policy: AuthorizationPolicy, path: str, src: Source, http_only: list[str]
    ) -> tuple[_IdField, ...]:
        fields: list[_IdField] = []
        for attr, key in _UNSUPPORTED_SOURCE.items():
            if getattr(src, attr):
                self.problem(
                    policy,
                    f"{path}.{key}",
                    "IP-based sources have no Consul intention equivalent (Consul authorizes "
                    "by mTLS identity only)",
                )
        for attr in ("request_principals", "not_request_principals"):
            if getattr(src, attr):
                http_only.append(f"{path}.{attr}")
        for kind in ("principals", "namespaces", "service_accounts", "trust_domains"):
            for neg in (False, True):
                attr = f"not_{kind}" if neg else kind
                values: tuple[str, ...] = getattr(src, attr)
                if values:
                    camel = attr.split("_")[0] + "".join(
                        p.capitalize() for p in attr.split("_")[1:]
                    )
                    fields.append(self.id_field(policy, f"{path}.{camel}", kind, values, neg))
        return tuple(fields)

    def _condition(
        self,
        policy: AuthorizationPolicy,
        path: str,
        cond: Condition,
        out: tuple[list[_IdField], list[_DNF], list[str]],
    ) -> None:
        when_source, when_http, http_only = out
        key = cond.key
        if key in _SOURCE_WHEN:
            kind = _SOURCE_WHEN[key]
            if cond.values:
                when_source.append(
                    self.id_field(policy, f"{path}.values", kind, cond.values, False)
                )
            if cond.not_values:
                when_source.append(
                    self.id_field(policy, f"{path}.notValues", kind, cond.not_values, True)
                )
            return
        if key.startswith("request.headers["):
            http_only.append(f"{path}.key")
            name = map_key_name(key).lower()
            parts: list[_DNF] = []
            if cond.values:
                parts.append(_header_any(name, cond.values))
            if cond.not_values:
                parts.append(_header_none(name, cond.not_values))
            when_http.append(_and(*parts))
            return
        if key.startswith("request.auth."):
            # JWT claims need a RequestAuthentication and Consul jwt-provider entries.
            http_only.append(f"{path}.key")
            when_http.append(_FALSE)
            return
        self.problem(
            policy,
            f"{path}.key",
            f"condition {key!r} has no Consul intention equivalent (supported: "
            "request.headers[...], source.principal, source.namespace, source.serviceAccount, "
            "source.trustDomain)",
        )

    def reject_jwt_on_http(self, rule: _CompiledRule) -> None:
        """JWT fields are only translatable where Istio ignores them (TCP services)."""
        policy, i = rule.policy, rule.index
        raw = (policy.rules or ())[i]
        for j, src in enumerate(raw.from_ or ()):
            if src is not None and (src.request_principals or src.not_request_principals):
                key = "requestPrincipals" if src.request_principals else "notRequestPrincipals"
                self.problem(
                    policy,
                    f"spec.rules[{i}].from[{j}].source.{key}",
                    "JWT principals are not supported: meshlet does not validate JWTs "
                    "(Consul JWT providers are not wired)",
                )
        for j, cond in enumerate(raw.when):
            if cond.key.startswith("request.auth."):
                self.problem(
                    policy,
                    f"spec.rules[{i}].when[{j}].key",
                    f"{cond.key}: JWT conditions are not supported: meshlet does not validate JWTs",
                )


@dataclass(frozen=True, slots=True)
class _Selector:
    service: str | None
    """The Consul service the selector names; None when it selects every workload in scope."""
    extra: tuple[tuple[str, str], ...] = ()
    """Labels other than the service label; non-empty means a subset of a service."""


def _selector(t: _Translator, policy: AuthorizationPolicy, label: str) -> _Selector | None:
    if policy.target_refs:
        t.problem(
            policy,
            "spec.targetRefs",
            "targetRef(s) select gateways and waypoints, which meshlet sidecars are not",
        )
        return None
    if not policy.match_labels:
        return _Selector(None)
    labels = dict(policy.match_labels)
    service = labels.pop(label, None)
    return _Selector(service, tuple(sorted(labels.items())))


def _subset_problem(
    t: _Translator, policy: AuthorizationPolicy, sel: _Selector, label: str
) -> None:
    if sel.service is None:
        what = f"selector without the {label!r} label that names the Consul service"
    else:
        extra = ", ".join(k for k, _ in sel.extra)
        what = f"subset selector (labels {extra} besides {label!r})"
    t.problem(
        policy,
        "spec.selector.matchLabels",
        f"{what}: intentions apply to whole services, so a subset of a service's workloads "
        "cannot be selected",
    )


def _selects(sel: _Selector, svc: ServiceRef, label: str) -> bool:
    if svc.labels is None:
        return sel.service is None or sel.service == svc.name
    labels = dict(svc.labels)
    wanted = dict(sel.extra)
    if sel.service is not None:
        wanted[label] = sel.service
    return all(labels.get(k) == v for k, v in wanted.items())


def translate(
    policies: Iterable[AuthorizationPolicy],
    services: Iterable[ServiceRef] = (),
    options: TranslateOptions | None = None,
) -> Translation:
    """Translate validated policies (see `policy.load_policies`) into one entry per service.

    `services` is the inventory for namespace-wide and root-namespace policies; services named
    by a selector are added with `options.default_protocol` unless listed. Every service in
    scope gets an entry, including an explicit allow-all where no enforced policy applies
    (Istio's default), so the result never depends on Consul's global default.
    Raises PolicyError (every problem, nothing translated).
    """
    o = options or TranslateOptions()
    t = _Translator(o)
    policies = sorted(policies, key=lambda p: (p.namespace, p.name, p.origin))
    inventory: dict[tuple[str, str], ServiceRef] = {}
    for svc in services:
        namespace = svc.namespace if o.single_namespace is None else o.single_namespace
        inventory.setdefault((namespace, svc.name), dataclasses.replace(svc, namespace=namespace))

    enforced: list[tuple[AuthorizationPolicy, _Selector]] = []
    for policy in policies:
        sel = _selector(t, policy, o.service_label)
        if policy.action is PolicyAction.CUSTOM:
            t.problem(
                policy,
                "spec.action",
                "CUSTOM (external authorization) cannot be enforced with Consul intentions",
            )
            continue
        if policy.action is PolicyAction.AUDIT or policy.dry_run:
            why = "AUDIT" if policy.action is PolicyAction.AUDIT else "dry-run"
            t.warnings.append(
                Problem(policy.label, "", f"{why} policy is never enforced; it was not translated")
            )
            continue
        if sel is None:
            continue
        if sel.extra and not o.inventory_is_complete:
            # Workload labels are unknown here, so the policy's reach cannot be decided.
            _subset_problem(t, policy, sel, o.service_label)
            continue
        is_root = policy.namespace == o.root_namespace
        if not is_root:
            t._namespace_ok(policy, "metadata.namespace", policy.namespace)
        if sel.service is not None and not sel.extra and not is_root:
            inventory.setdefault(
                (policy.namespace, sel.service),
                ServiceRef(sel.service, policy.namespace, o.default_protocol),
            )
        enforced.append((policy, sel))

    scope: dict[tuple[str, str], list[AuthorizationPolicy]] = {k: [] for k in inventory}
    for policy, sel in enforced:
        is_root = policy.namespace == o.root_namespace
        service = sel.service
        matched = [
            key
            for key in inventory
            if (is_root or key[0] == policy.namespace)
            and _selects(sel, inventory[key], o.service_label)
        ]
        if sel.extra:
            if matched:
                _subset_problem(t, policy, sel, o.service_label)
            continue  # selects none of the known workloads: it does not apply
        if not matched and not o.inventory_is_complete:
            where = "any namespace" if is_root else f"namespace {policy.namespace!r}"
            what = f"service {service!r}" if service else "every service"
            t.problem(
                policy,
                "spec.selector" if service else "metadata.namespace",
                f"applies to {what} in {where}, but no such service is known; list them "
                "(--services namespace/name) so the policy is not silently dropped",
            )
        for key in matched:
            scope[key].append(policy)

    compiled: dict[tuple[str, str, int], _CompiledRule] = {}
    for policy, _ in enforced:
        for i, rule in enumerate(policy.rules or ()):
            compiled[(policy.namespace, policy.name, i)] = t.compile_rule(policy, i, rule)

    entries: list[ServiceIntentions] = []
    origins: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
    applied: dict[tuple[str, str], tuple[str, ...]] = {}
    dropped: dict[tuple[str, str], tuple[Problem, ...]] = {}
    for key in sorted(scope):
        svc = inventory[key]
        applicable = scope[key]
        rules = [
            compiled[(p.namespace, p.name, i)]
            for p in applicable
            for i in range(len(p.rules or ()))
        ]
        if svc.is_http:
            for crule in rules:
                t.reject_jwt_on_http(crule)
        t.dropped = []
        entry, entry_origins = _entry_for(t, svc, applicable, rules)
        entries.append(entry)
        origins.update(entry_origins)
        consul_key = (entry.namespace_or_default, entry.name)
        applied[consul_key] = tuple(p.ref for p in applicable)
        if t.dropped:
            dropped[consul_key] = tuple(t.dropped)
    if t.problems:
        raise PolicyError(dict.fromkeys(t.problems))
    return Translation(
        tuple(entries),
        tuple(dict.fromkeys(t.warnings)),
        MappingProxyType(origins),
        MappingProxyType(applied),
        MappingProxyType(dropped),
    )


def _entry_for(
    t: _Translator,
    svc: ServiceRef,
    applicable: Sequence[AuthorizationPolicy],
    rules: Sequence[_CompiledRule],
) -> tuple[ServiceIntentions, dict[tuple[str, str, str, str], tuple[str, ...]]]:
    o = t.o
    allow_policies = [p for p in applicable if p.action is PolicyAction.ALLOW]
    denies = [r for r in rules if r.policy.action is PolicyAction.DENY]
    allows = [r for r in rules if r.policy.action is PolicyAction.ALLOW]
    if allow_policies:
        refs = ", ".join(p.ref for p in allow_policies)
        catch_all = ("deny", f"catch-all deny: ALLOW policies apply ({refs}) and none matched")
    else:
        catch_all = ("allow", "catch-all allow: no ALLOW policy applies (Istio default)")

    # Source classes: every exact identity and namespace any rule names, plus everybody else.
    exact: set[tuple[str, str]] = set()
    namespaces: set[str] = set()
    for rule in rules:
        fields = [f for item in rule.source or () for f in item] + list(rule.when_source)
        for f in fields:
            for atom in f.atoms:
                if atom.kind == "exact":
                    exact.add((atom.namespace, atom.name))
                elif atom.kind == "namespace":
                    namespaces.add(atom.namespace)
    single = o.single_namespace
    generic = _Peer(single, None)
    classes: list[_Peer] = [_Peer(ns, name) for ns, name in sorted(exact)]
    if single is None:
        classes += [_Peer(ns, None) for ns in sorted(namespaces)]
    classes.append(generic)

    def permissions_for(peer: _Peer) -> list[tuple[str, _Conj, str]]:
        perms: list[tuple[str, _Conj, str]] = []
        for action, group in (("deny", denies), ("allow", allows)):
            for rule in group:
                if not rule.source_holds(peer):
                    continue
                dnf = rule.http if svc.is_http else rule.tcp
                if dnf is None:
                    continue
                perms.extend((action, conj, rule.origin) for conj in dnf)
        perms.append((catch_all[0], (), catch_all[1]))
        # First match wins: nothing after an unconditional permission is reachable, and a run
        # of same-action permissions just before the final catch-all cannot change its answer.
        cut = next(i for i, p in enumerate(perms) if not p[1])
        perms = perms[: cut + 1]
        while len(perms) > 1 and perms[-2][0] == perms[-1][0]:
            perms[-2:] = [perms[-1]]
        return perms

    lists = {peer: permissions_for(peer) for peer in classes}
    where = f"service {svc.namespace}/{svc.name}"
    plaintext = _Peer(None, None, plaintext=True)
    if allow_policies and any(r.source_holds(plaintext) for r in allows):
        t.warnings.append(
            Problem(
                where,
                "",
                "Istio would also admit plaintext (non-mTLS) requests here; Consul's mesh "
                "requires mTLS, so they are refused",
            )
        )
    if not svc.is_http:
        for rule in rules:
            if rule.tcp is None:
                drop = Problem(
                    where,
                    "",
                    f"{rule.origin} uses HTTP-only fields on a {svc.protocol} service; as in "
                    "Istio the whole ALLOW rule is ignored",
                )
                t.warnings.append(drop)
                t.dropped.append(drop)
            elif rule.http_only:
                t.warnings.append(
                    Problem(
                        where,
                        "",
                        f"{rule.origin} uses HTTP-only fields on a {svc.protocol} service; as in "
                        "Istio they are ignored, so the DENY applies to all its traffic",
                    )
                )

    def fallback(peer: _Peer) -> _Peer:
        if peer.name is not None and single is None and _Peer(peer.namespace, None) in kept:
            return _Peer(peer.namespace, None)
        return generic

    kept: dict[_Peer, list[tuple[str, _Conj, str]]] = {generic: lists[generic]}
    for peer in classes:
        if peer.name is None and peer != generic and lists[peer] != lists[generic]:
            kept[peer] = lists[peer]
    for peer in classes:
        if peer.name is not None and lists[peer] != kept[fallback(peer)]:
            kept[peer] = lists[peer]

    sources: list[SourceIntention] = []
    pending: list[tuple[str, ...]] = []
    origins: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
    ordered = sorted(
        kept,
        key=lambda p: (p.name is None, p.namespace is None, p.namespace or "", p.name or ""),
    )
    for peer in ordered:
        perms = kept[peer]
        name = peer.name or WILDCARD
        # Consul CE has no namespaces: sources stay unqualified there.
        namespace = "" if single is not None else peer.namespace or WILDCARD
        if len(perms) == 1:
            src = SourceIntention(name=name, namespace=namespace, action=perms[0][0])
        elif not svc.is_http:
            raise AssertionError("L7 permissions on a TCP destination")  # unreachable
        else:
            src = SourceIntention(
                name=name,
                namespace=namespace,
                permissions=tuple(Permission(a, _render(c)) for a, c, _ in perms),
            )
        sources.append(src)
        pending.append(tuple(origin for _, _, origin in perms))
    raw = ServiceIntentions(
        name=svc.name,
        namespace="" if single is not None else svc.namespace,
        sources=tuple(sources),
    )
    entry = normalize(raw)
    # Sources were emitted in precedence order, so normalize's stable sort kept that order;
    # the key is what the engine reports for a match: the normalized Consul names.
    for src, origin in zip(entry.sources, pending, strict=True):
        origins[(entry.namespace_or_default, entry.name, src.namespace, src.name)] = origin
    try:
        validate(entry)
    except InvalidEntry as exc:  # a translator bug must not reach Consul as a silent change
        t.problems.append(
            Problem(f"service {svc.namespace}/{svc.name}", "", f"internal: {exc}", "unsupported")
        )
    return entry, origins
