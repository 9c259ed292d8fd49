"""The decision engine: Consul intentions compiled into an immutable snapshot.

`compile_snapshot` does all the work when Consul says the entries changed: it orders sources by
Consul precedence, resolves, for every destination and every source key that could ever be
looked up, the one intention that decides, and compiles every permission's matchers (regexes
included). A decision is then at most three dict lookups plus the matchers of one intention.

Semantics are Consul's documented ones (consul-api.md §7.5, authz.md §2.3): the highest-precedence
intention whose source matches decides; an L7 intention's permissions are tried in order and
the first match decides; if none matches, the default policy decides, never a lower-precedence
intention. Matchers behave as Envoy's do for what Consul emits (a missing header matches nothing
except `Present` + `Invert`; path matchers see the path without the query).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from intentions.entries import (
    DEFAULT,
    WILDCARD,
    HeaderMatch,
    Permission,
    ServiceIntentions,
    SourceIntention,
    intention_display,
)
from intentions.errors import BadRequest, UnsupportedEntry

# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class Identity:
    """A source service as Consul identifies it (from the peer certificate's SPIFFE URI)."""

    name: str
    namespace: str = DEFAULT
    partition: str = DEFAULT
    peer: str = ""


_CONSUL_SPIFFE = re.compile(
    r"spiffe://(?P<td>[^/]+)(?:/ap/(?P<ap>[^/]+))?/ns/(?P<ns>[^/]+)/dc/(?P<dc>[^/]+)/svc/(?P<svc>[^/]+)"
)


def identity_from_consul_uri(uri: str) -> Identity | None:
    """Parse `spiffe://<td>[/ap/<p>]/ns/<ns>/dc/<dc>/svc/<svc>`; None if not a service URI."""
    m = _CONSUL_SPIFFE.fullmatch(uri)
    if m is None:
        return None
    return Identity(name=m["svc"], namespace=m["ns"], partition=m["ap"] or DEFAULT)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")


def normalize_path(path: str) -> str:
    """Istio/Consul default (`BASE`) normalization of a request's `:path`.

    `\\` becomes `/`, percent-encoded unreserved characters are decoded once, dot segments are
    removed (RFC 3986 §5.2.4); `//` is not merged and `%2F` is not decoded. The query is kept.
    Raises BadRequest for `%00`, which Envoy rejects with 400.
    """
    cut = len(path)
    for sep in "?#":
        pos = path.find(sep)
        if pos != -1:
            cut = min(cut, pos)
    raw, rest = path[:cut], path[cut:]
    if "%00" in raw:
        raise BadRequest("path contains %00")
    if not raw.startswith(("/", "\\")):
        return path  # asterisk-form (`OPTIONS *`) and oddities are matched as sent
    raw = raw.replace("\\", "/")

    def decode(m: re.Match[str]) -> str:
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else m.group(0)

    raw = _PCT.sub(decode, raw)
    return _remove_dot_segments(raw) + rest


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """An HTTP request as the authorization filter sees it, after normalization.

    `headers` maps lower-case names to the value, repeated headers joined with `,` (Envoy does
    the same before matching); it includes the pseudo-headers `:method`, `:path`, `:authority`.
    """

    method: str
    path: str
    url_path: str
    headers: Mapping[str, str]


def http_request(
    method: str,
    path: str,
    host: str | None = None,
    headers: Mapping[str, str | Sequence[str]] | None = None,
    *,
    normalize: bool = True,
) -> HTTPRequest:
    """Build the request the engine matches. `path` is the raw request target (query allowed)."""
    full = normalize_path(path) if normalize else path
    cut = len(full)
    for sep in "?#":
        pos = full.find(sep)
        if pos != -1:
            cut = min(cut, pos)
    merged: dict[str, list[str]] = {}
    for name, value in (headers or {}).items():
        values = [value] if isinstance(value, str) else list(value)
        merged.setdefault(name.lower(), []).extend(values)
    joined = {name: ",".join(vals) for name, vals in merged.items()}
    if host is not None:
        joined[":authority"] = host
    elif "host" in joined:
        joined[":authority"] = joined["host"]
    joined[":method"] = method
    joined[":path"] = full
    return HTTPRequest(method, full, full[:cut], MappingProxyType(joined))


# --------------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    intention: str | None = None
    """`api.Intention` string of the deciding intention, None when the default decided."""
    permission: int | None = None
    """Index of the deciding permission of an L7 intention."""

    @property
    def action(self) -> Literal["allow", "deny"]:
        return "allow" if self.allowed else "deny"


_Check = Callable[[HTTPRequest], bool]


@dataclass(frozen=True, slots=True)
class _CompiledPermission:
    allow: bool
    checks: tuple[_Check, ...]

    def matches(self, request: HTTPRequest) -> bool:
        return all(check(request) for check in self.checks)


@dataclass(frozen=True, slots=True)
class _CompiledIntention:
    display: str
    l4_allow: bool
    permissions: tuple[_CompiledPermission, ...] | None
    connection: Decision
    """Precomputed answer for an L4 check (`/agent/connect/authorize`, TCP listeners)."""


def _compile_header(h: HeaderMatch) -> _Check:
    name = h.name.lower()
    invert = h.invert
    if h.present:

        def present(r: HTTPRequest) -> bool:
            return (name in r.headers) != invert

        return present
    value_test: Callable[[str], bool]
    if h.regex:
        pattern = _compile_regex(h.regex)
        value_test = lambda v: pattern.fullmatch(v) is not None  # noqa: E731
    else:
        fold = h.ignore_case
        if h.exact:
            want = h.exact.lower() if fold else h.exact
            value_test = lambda v: (v.lower() if fold else v) == want  # noqa: E731
        elif h.prefix:
            want = h.prefix.lower() if fold else h.prefix
            value_test = lambda v: (v.lower() if fold else v).startswith(want)  # noqa: E731
        elif h.suffix:
            want = h.suffix.lower() if fold else h.suffix
            value_test = lambda v: (v.lower() if fold else v).endswith(want)  # noqa: E731
        else:
            want = h.contains.lower() if fold else h.contains
            value_test = lambda v: want in (v.lower() if fold else v)  # noqa: E731

    def header(r: HTTPRequest) -> bool:
        value = r.headers.get(name)
        if value is None:
            # Envoy: an absent header fails every matcher, inverted or not (except Present).
            return False
        return value_test(value) != invert

    return header


def _compile_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UnsupportedEntry(f"invalid regular expression {pattern!r}: {exc}") from None


def _compile_permission(perm: Permission, where: str) -> _CompiledPermission:
    if perm.jwt is not None:
        raise UnsupportedEntry(f"{where}: JWT requirements are not enforced by meshlet")
    if perm.http is None:
        raise UnsupportedEntry(f"{where}: permission without HTTP")
    http = perm.http
    checks: list[_Check] = []
    if http.path_exact:
        exact = http.path_exact
        checks.append(lambda r: r.url_path == exact)
    elif http.path_prefix:
        prefix = http.path_prefix
        checks.append(lambda r: r.url_path.startswith(prefix))
    elif http.path_regex:
        pattern = _compile_regex(http.path_regex)
        checks.append(lambda r: pattern.fullmatch(r.url_path) is not None)
    if http.methods:
        methods = frozenset(http.methods)
        checks.append(lambda r: r.method in methods)
    checks.extend(_compile_header(h) for h in http.header)
    return _CompiledPermission(perm.action == "allow", tuple(checks))


def _compile_intention(entry: ServiceIntentions, src: SourceIntention) -> _CompiledIntention:
    display = intention_display(entry, src)
    if src.sameness_group:
        raise UnsupportedEntry(f"{display}: sameness-group sources are not supported by meshlet")
    if entry.jwt is not None:
        raise UnsupportedEntry(f"{display}: JWT requirements are not enforced by meshlet")
    if src.permissions:
        perms = tuple(
            _compile_permission(p, f"{display} Permissions[{j}]")
            for j, p in enumerate(src.permissions)
        )
        # Consul's rule: an L7 intention answers an L4 question with deny.
        connection = Decision(False, f"Matched L7 intention: {display}", display)
        return _CompiledIntention(display, False, perms, connection)
    allow = src.action == "allow"
    connection = Decision(allow, f"Matched L4 intention: {display}", display)
    return _CompiledIntention(display, allow, None, connection)


# Lookup keys. Peer sources have no local partition; the key spaces stay separate that way.
_ExactKey = tuple[str, str, str, str]  # peer, partition, namespace, name
_NsKey = tuple[str, str, str]  # peer, partition, namespace
_AnyKey = tuple[str, str]  # peer, partition


def _source_tier(src: SourceIntention) -> tuple[int, tuple[str, ...]]:
    partition = "" if src.peer else (src.partition or DEFAULT)
    namespace = src.namespace or DEFAULT
    if namespace == WILDCARD:
        return 2, (src.peer, partition)
    if src.name == WILDCARD:
        return 1, (src.peer, partition, namespace)
    return 0, (src.peer, partition, namespace, src.name)


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Everything needed to authorize traffic to one destination, resolved in advance."""

    exact: Mapping[_ExactKey, _CompiledIntention]
    by_namespace: Mapping[_NsKey, _CompiledIntention]
    any_source: Mapping[_AnyKey, _CompiledIntention]
    default: Decision

    def intention_for(self, source: Identity) -> _CompiledIntention | None:
        partition = "" if source.peer else source.partition
        hit = self.exact.get((source.peer, partition, source.namespace, source.name))
        if hit is not None:
            return hit
        hit = self.by_namespace.get((source.peer, partition, source.namespace))
        if hit is not None:
            return hit
        return self.any_source.get((source.peer, partition))

    def decide_connection(self, source: Identity) -> Decision:
        intention = self.intention_for(source)
        return self.default if intention is None else intention.connection

    def decide_request(self, source: Identity, request: HTTPRequest) -> Decision:
        intention = self.intention_for(source)
        if intention is None:
            return self.default
        if intention.permissions is None:
            return intention.connection
        for index, perm in enumerate(intention.permissions):
            if perm.matches(request):
                action = "allow" if perm.allow else "deny"
                return Decision(
                    perm.allow,
                    f"Matched L7 intention: {intention.display}, Permissions[{index}] ({action})",
                    intention.display,
                    index,
                )
        return Decision(
            self.default.allowed,
            f"{self.default.reason}: no permission of L7 intention {intention.display} matched",
            intention.display,
        )


def _resolve(
    tiers: Sequence[tuple[ServiceIntentions, SourceIntention, _CompiledIntention]],
    default: Decision,
) -> DestinationPolicy:
    """Turn precedence-ordered sources into direct lookups.

    For every key that can be looked up, walk the sources in precedence order and keep the
    first that matches; a lookup then never needs to walk anything.
    """
    exact_keys: set[_ExactKey] = set()
    ns_keys: set[_NsKey] = set()
    any_keys: set[_AnyKey] = set()
    for _, src, _ in tiers:
        tier, key = _source_tier(src)
        if tier == 0:
            exact_keys.add((key[0], key[1], key[2], key[3]))
            ns_keys.add((key[0], key[1], key[2]))
        elif tier == 1:
            ns_keys.add((key[0], key[1], key[2]))
        any_keys.add((key[0], key[1]))

    def first(test: Callable[[int, tuple[str, ...]], bool]) -> _CompiledIntention | None:
        for _, src, compiled in tiers:
            tier, key = _source_tier(src)
            if test(tier, key):
                return compiled
        return None

    exact: dict[_ExactKey, _CompiledIntention] = {}
    for ek in exact_keys:
        hit = first(
            lambda t, k, ek=ek: k == (ek if t == 0 else ek[:3] if t == 1 else ek[:2])  # type: ignore[misc]
        )
        if hit is not None:
            exact[ek] = hit
    by_ns: dict[_NsKey, _CompiledIntention] = {}
    for nk in ns_keys:
        hit = first(lambda t, k, nk=nk: t > 0 and k == (nk if t == 1 else nk[:2]))  # type: ignore[misc]
        if hit is not None:
            by_ns[nk] = hit
    any_src: dict[_AnyKey, _CompiledIntention] = {}
    for ak in any_keys:
        hit = first(lambda t, k, ak=ak: t == 2 and k == ak)  # type: ignore[misc]
        if hit is not None:
            any_src[ak] = hit
    return DestinationPolicy(
        MappingProxyType(exact), MappingProxyType(by_ns), MappingProxyType(any_src), default
    )


_DestKey = tuple[str, str, str]  # partition, namespace, name


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Immutable authorization state for a whole set of entries; swap it whole on change."""

    exact: Mapping[_DestKey, DestinationPolicy]
    by_namespace: Mapping[tuple[str, str], DestinationPolicy]
    by_partition: Mapping[str, DestinationPolicy]
    default: Decision
    empty: DestinationPolicy = field(repr=False)

    def for_destination(
        self, name: str, namespace: str = DEFAULT, partition: str = DEFAULT
    ) -> DestinationPolicy:
        hit = self.exact.get((partition, namespace, name))
        if hit is not None:
            return hit
        hit = self.by_namespace.get((partition, namespace))
        if hit is not None:
            return hit
        return self.by_partition.get(partition, self.empty)

    def decide_request(
        self, destination: Identity, source: Identity, request: HTTPRequest
    ) -> Decision:
        policy = self.for_destination(
            destination.name, destination.namespace, destination.partition
        )
        return policy.decide_request(source, request)

    def decide_connection(self, destination: Identity, source: Identity) -> Decision:
        policy = self.for_destination(
            destination.name, destination.namespace, destination.partition
        )
        return policy.decide_connection(source)


DEFAULT_INTENTION_POLICY_REASON = "Default intention policy"
ACL_DEFAULT_REASON = "Default behavior configured by ACLs"


def compile_snapshot(
    entries: Iterable[ServiceIntentions],
    *,
    default_allow: bool,
    default_reason: str = DEFAULT_INTENTION_POLICY_REASON,
) -> Snapshot:
    """Compile normalized, validated entries (see `entries.load_entry`) into a Snapshot.

    Raises UnsupportedEntry for content meshlet cannot enforce exactly (JWT, sameness groups,
    regexes Python cannot compile); the caller should keep its previous snapshot.
    """
    default = Decision(default_allow, default_reason)
    exact_entries: dict[_DestKey, ServiceIntentions] = {}
    ns_entries: dict[tuple[str, str], ServiceIntentions] = {}
    any_entries: dict[str, ServiceIntentions] = {}
    compiled: dict[int, list[tuple[ServiceIntentions, SourceIntention, _CompiledIntention]]] = {}
    for entry in entries:
        partition = entry.partition_or_default
        namespace = entry.namespace_or_default
        if namespace == WILDCARD:
            any_entries[partition] = entry
        elif entry.name == WILDCARD:
            ns_entries[(partition, namespace)] = entry
        else:
            exact_entries[(partition, namespace, entry.name)] = entry
        ordered = sorted(entry.sources, key=lambda s: -s.precedence)
        compiled[id(entry)] = [(entry, s, _compile_intention(entry, s)) for s in ordered]

    def chain(*found: ServiceIntentions | None) -> DestinationPolicy:
        tiers = [t for e in found if e is not None for t in compiled[id(e)]]
        return _resolve(tiers, default)

    by_partition = {p: chain(e) for p, e in any_entries.items()}
    by_namespace = {(p, ns): chain(e, any_entries.get(p)) for (p, ns), e in ns_entries.items()}
    exact = {
        (p, ns, name): chain(e, ns_entries.get((p, ns)), any_entries.get(p))
        for (p, ns, name), e in exact_entries.items()
    }
    empty = _resolve((), default)
    return Snapshot(
        MappingProxyType(exact),
        MappingProxyType(by_namespace),
        MappingProxyType(by_partition),
        default,
        empty,
    )
