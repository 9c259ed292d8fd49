"""The decision engine: Consul intentions compiled into an immutable snapshot.

`compile_snapshot` does all the work when Consul says the entries changed: it indexes every
entry's sources by exact source, `ns/*` and `*/*`, chains each exact destination to its `ns/*`
and `*/*` destination entries (the precedence bands), compiles every permission's matchers
(regexes included) and precomputes every Decision. A decision is then a few dict lookups plus
the matchers of one intention; no parsing, no sorting, no allocation of reasons.

Semantics are Consul's documented ones: the highest-precedence
intention whose source matches decides; an L7 intention's permissions are tried in order and
the first match decides; if none matches, the default policy decides, never a lower-precedence
intention. Matchers behave as Envoy's do for what Consul emits (a missing header matches nothing
except `Present` + `Invert`; path matchers see the path without the query).

Fail closed per destination: an entry that cannot be compiled exactly (JWT, a regex RE2
cannot compile, or one the caller could not decode, passed as a `BrokenEntry`) becomes a
"broken" policy for its destination that denies everything that reaches it, with the reason;
the other destinations' entries are enforced as usual. Never the previous state of that entry:
intentions are not silently stale.
"""

from __future__ import annotations

import functools
import gc
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from intentions.entries import (
    DEFAULT,
    WILDCARD,
    HeaderMatch,
    Permission,
    ServiceIntentions,
    SourceIntention,
    destination_display,
    source_display,
)
from intentions.errors import BadRequest, UnsupportedEntry
from intentions.path_normalization import normalize_path

# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class Identity:
    """A source service as Consul identifies it (from the peer certificate's SPIFFE URI)."""

    name: str
    namespace: str = DEFAULT
    partition: str = DEFAULT
    peer: str = ""
    # Lookup keys, built once per identity (a connection), not once per request.
    exact_key: tuple[str, str, str, str] = field(init=False, repr=False, compare=False)
    namespace_key: tuple[str, str, str] = field(init=False, repr=False, compare=False)
    any_key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Peer sources have no local partition; keeping it empty keeps the key spaces apart.
        partition = "" if self.peer else self.partition
        object.__setattr__(self, "any_key", (self.peer, partition))
        object.__setattr__(self, "namespace_key", (self.peer, partition, self.namespace))
        object.__setattr__(self, "exact_key", (self.peer, partition, self.namespace, self.name))


_CONSUL_SPIFFE = re.compile(
    r"spiffe://(?P<td>[^/]+)(?:/ap/(?P<ap>[^/]+))?/ns/(?P<ns>[^/]+)/dc/(?P<dc>[^/]+)/svc/(?P<svc>[^/]+)"
)


def identity_from_consul_uri(uri: str) -> Identity | None:
    """Parse `spiffe://<td>[/ap/<p>]/ns/<ns>/dc/<dc>/svc/<svc>`; None if not a service URI."""
    m = _CONSUL_SPIFFE.fullmatch(uri)
    if m is None:
        return None
    return Identity(name=m["svc"], namespace=m["ns"], partition=m["ap"] or DEFAULT)


_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


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
    """Build the request the engine matches. `path` is the request target (query allowed),
    normalized here as Istio's default does; `normalize=False` when the caller already did (the
    proxy normalizes once, with its configured mode, and forwards what it authorized).

    Raises BadRequest where Envoy answers 400 before any authorization: a method that is not
    an upper-case token (methods are case-sensitive; Envoy's HTTP/1 codec rejects `get`, see
    coreruleset/coreruleset#3580), and `%00` in the path.
    """
    if _METHOD.fullmatch(method) is None:
        raise BadRequest(f"method {method!r} is not an upper-case token")
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
    return HTTPRequest(method, full, full[:cut], joined)


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
    source: tuple[str, str] | None = None
    """(namespace, name) of the deciding intention's source, as normalized by Consul."""

    @property
    def action(self) -> Literal["allow", "deny"]:
        return "allow" if self.allowed else "deny"


_Check = Callable[[HTTPRequest], bool]


def _all_of(checks: Sequence[_Check]) -> _Check:
    # Permissions have one to three matchers in practice; those get a closure without the
    # per-call generator that `all()` needs.
    if not checks:
        return lambda r: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda r: first(r) and second(r)
    frozen = tuple(checks)
    return lambda r: all(check(r) for check in frozen)


class _CompiledIntention(NamedTuple):
    """A tuple, not a frozen dataclass: 10,000 intentions build 10,000 of these, and a tuple is
    built without one `object.__setattr__` per field."""

    display: str
    permissions: tuple[tuple[_Check, Decision], ...] | None
    """For an L7 intention: each permission's matcher and the decision it yields."""
    connection: Decision
    """The answer to an L4 question (`/agent/connect/authorize`, TCP listeners), and the
    answer of an L4 intention to every request."""
    unmatched: Decision
    """What an L7 intention answers when no permission matches: the default policy."""


def _compile_header(h: HeaderMatch) -> _Check:
    name = h.name.lower()
    invert = h.invert
    if h.present:
        return lambda r: (name in r.headers) != invert
    value_test: Callable[[str], bool]
    if h.regex:
        pattern = _compile_regex(h.regex)
        value_test = pattern.fullmatch
    elif h.ignore_case:
        if h.exact:
            want = h.exact.lower()
            value_test = lambda v: v.lower() == want  # noqa: E731
        elif h.prefix:
            want = h.prefix.lower()
            value_test = lambda v: v.lower().startswith(want)  # noqa: E731
        elif h.suffix:
            want = h.suffix.lower()
            value_test = lambda v: v.lower().endswith(want)  # noqa: E731
        else:
            want = h.contains.lower()
            value_test = lambda v: want in v.lower()  # noqa: E731
    elif h.exact:
        exact = h.exact
        # The common case gets one closure: a decision evaluates it per request.
        return lambda r: (v := r.headers.get(name)) is not None and (v == exact) != invert
    elif h.prefix:
        prefix = h.prefix
        value_test = lambda v: v.startswith(prefix)  # noqa: E731
    elif h.suffix:
        suffix = h.suffix
        value_test = lambda v: v.endswith(suffix)  # noqa: E731
    else:
        contains = h.contains
        value_test = lambda v: contains in v  # noqa: E731

    def header(r: HTTPRequest) -> bool:
        value = r.headers.get(name)
        if value is None:
            # Envoy: an absent header fails every matcher, inverted or not (except Present).
            return False
        return value_test(value) != invert

    return header


# Envoy matches `safe_regex` with RE2, and so does the engine: the same syntax (what RE2
# refuses, Envoy refuses), and time linear in the input. Python's `re` backtracks: a pattern
# such as `(\w+\s?)*` against a 64-character header would hold the event loop for ever.
# The pybind layer (`re2._re2`) is called directly: the `re2.compile` wrapper builds a match
# object per call, ten times the cost of the match itself on a decision's hot path.
_NO_MATCH = (-1, -1)


@functools.cache
def _re2() -> tuple[Any, Any, Any]:
    """(re2._re2, the options, the full-match anchor), loaded at the first regex: RE2 and
    its C++ runtime are about 5 MB of a data-plane process, and most snapshots have none."""
    import re2
    from re2 import _re2

    options = re2.Options()
    options.log_errors = False  # the error is raised, with the pattern; no stray stderr line
    return _re2, options, _re2.RE2.Anchor.ANCHOR_BOTH


@dataclass(frozen=True, slots=True)
class _Regex:
    program: Any  # re2._re2.RE2 (untyped)
    anchor: Any

    def fullmatch(self, text: str) -> bool:
        try:
            data = text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (argv's surrogateescape, JSON's "\udcff") has no UTF-8 form;
            # read it as U+FFFD, as Go and Envoy read invalid text.
            data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()
        spans = self.program.Match(self.anchor, data, 0, len(data))
        return bool(spans[0] != _NO_MATCH)


def _compile_regex(pattern: str) -> _Regex:
    api, options, anchor = _re2()
    try:
        program = api.RE2(pattern.encode("utf-8"), options)
    except UnicodeEncodeError:
        raise UnsupportedEntry(f"invalid regular expression {pattern!r}: not UTF-8") from None
    if not program.ok():
        why = program.error()
        text = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise UnsupportedEntry(f"invalid regular expression {pattern!r}: {text}")
    return _Regex(program, anchor)


def _compile_permission(perm: Permission, where: str) -> tuple[_Check, bool]:
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
        checks.append(lambda r: pattern.fullmatch(r.url_path))
    if http.methods:
        methods = frozenset(http.methods)
        checks.append(lambda r: r.method in methods)
    checks.extend(_compile_header(h) for h in http.header)
    return _all_of(checks), perm.action == "allow"


_DEFAULTS = ("", DEFAULT)

_PermissionCache = dict[Permission, tuple[_Check, bool]]
"""Compiled matchers of the permissions seen in one `compile_snapshot`: a matcher depends only
on the permission, and the same permissions recur across destinations (one policy applied to
many services), so each distinct one is compiled once."""


def _compile_intention(
    entry: ServiceIntentions,
    src: SourceIntention,
    default: Decision,
    destination: str,
    compiled: _PermissionCache,
) -> _CompiledIntention:
    # `intention_display(entry, src)`, with the entry's `destination_display` computed once
    # per entry by the caller, and `source_display` skipped for the common plain source.
    n = len(src.permissions)
    detail = src.action if n == 0 else ("1 permission" if n == 1 else f"{n} permissions")
    plain = not src.peer and src.partition in _DEFAULTS and src.namespace in _DEFAULTS
    display = f"{src.name if plain else source_display(src)} => {destination} ({detail})"
    who = (src.namespace or DEFAULT, src.name)
    if src.sameness_group:
        raise UnsupportedEntry(f"{display}: sameness-group sources are not supported by meshlet")
    if entry.jwt is not None:
        raise UnsupportedEntry(f"{display}: JWT requirements are not enforced by meshlet")
    if src.permissions:
        perms: list[tuple[_Check, Decision]] = []
        for j, p in enumerate(src.permissions):
            hit = compiled.get(p)
            if hit is None:
                hit = compiled[p] = _compile_permission(p, f"{display} Permissions[{j}]")
            check, allow = hit
            action = "allow" if allow else "deny"
            reason = f"Matched L7 intention: {display}, Permissions[{j}] ({action})"
            perms.append((check, Decision(allow, reason, display, j, who)))
        # Consul's rule: an L7 intention answers an L4 question with deny.
        connection = Decision(False, f"Matched L7 intention: {display}", display, None, who)
        unmatched = Decision(
            default.allowed,
            f"{default.reason}: no permission of L7 intention {display} matched",
            display,
        )
        return _CompiledIntention(display, tuple(perms), connection, unmatched)
    allow = src.action == "allow"
    connection = Decision(allow, f"Matched L4 intention: {display}", display, None, who)
    # An L4 intention answers every request with `connection`; `unmatched` is never read.
    return _CompiledIntention(display, None, connection, connection)


_ExactKey = tuple[str, str, str, str]  # peer, partition, namespace, name
_NsKey = tuple[str, str, str]  # peer, partition, namespace
_AnyKey = tuple[str, str]  # peer, partition


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """The sources of one entry as direct lookups, chained to the next-less-specific entry.

    Within an entry an exact source outranks `ns/*`, which outranks `*/*`; every source of a
    more specific destination entry outranks every source of a less specific one (precedence
    bands 9-7, 6-4, 3-1). So a lookup tries this entry's three maps, then `fallback`'s.
    """

    exact: Mapping[_ExactKey, _CompiledIntention]
    by_namespace: Mapping[_NsKey, _CompiledIntention]
    any_source: Mapping[_AnyKey, _CompiledIntention]
    fallback: DestinationPolicy | None
    default: Decision

    broken: _CompiledIntention | None = None
    """Set when this destination's entry could not be compiled: it answers every source, of
    every request and connection, with deny (and nothing of this entry is enforced)."""

    def intention_for(self, source: Identity) -> _CompiledIntention | None:
        policy: DestinationPolicy | None = self
        while policy is not None:
            if policy.broken is not None:
                # A broken entry might hold any intention for any source: nothing that gets
                # this far can be decided by a less specific entry or the default.
                return policy.broken
            hit = policy.exact.get(source.exact_key)
            if hit is None:
                hit = policy.by_namespace.get(source.namespace_key)
                if hit is None:
                    hit = policy.any_source.get(source.any_key)
            if hit is not None:
                return hit
            policy = policy.fallback
        return None

    def decide_connection(self, source: Identity) -> Decision:
        intention = self.intention_for(source)
        return self.default if intention is None else intention.connection

    def decide_request(self, source: Identity, request: HTTPRequest) -> Decision:
        intention = self.exact.get(source.exact_key)
        if intention is None:
            intention = self.intention_for(source)
            if intention is None:
                return self.default
        permissions = intention.permissions
        if permissions is None:
            return intention.connection
        for matches, decision in permissions:
            if matches(request):
                return decision
        return intention.unmatched


@dataclass(frozen=True, slots=True)
class BrokenEntry:
    """An entry for one destination that cannot be enforced, and why (e.g. it did not decode)."""

    name: str
    reason: str
    namespace: str = DEFAULT
    partition: str = DEFAULT

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.partition or DEFAULT, self.namespace or DEFAULT, self.name)

    @property
    def display(self) -> str:
        """The destination as `[partition/][namespace/]name`, defaults elided."""
        parts = [p for p in (self.partition, self.namespace) if p and p != DEFAULT]
        return "/".join([*parts, self.name])


def _broken_policy(broken: BrokenEntry, fallback: DestinationPolicy | None) -> DestinationPolicy:
    deny = Decision(
        False,
        f"intentions for {broken.display} cannot be enforced, denying every request: "
        f"{broken.reason}",
    )
    compiled = _CompiledIntention(f"broken entry {broken.display}", None, deny, deny)
    # The fallback is kept for introspection only: `intention_for` stops at `broken`.
    return DestinationPolicy({}, {}, {}, fallback, deny, compiled)


def _entry_policy(
    entry: ServiceIntentions,
    fallback: DestinationPolicy | None,
    default: Decision,
    permissions: _PermissionCache,
) -> DestinationPolicy:
    """Raises UnsupportedEntry when some intention of the entry cannot be enforced exactly."""
    exact: dict[_ExactKey, _CompiledIntention] = {}
    by_ns: dict[_NsKey, _CompiledIntention] = {}
    any_src: dict[_AnyKey, _CompiledIntention] = {}
    destination = destination_display(entry)
    for src in entry.sources:
        compiled = _compile_intention(entry, src, default, destination, permissions)
        partition = "" if src.peer else (src.partition or DEFAULT)
        namespace = src.namespace or DEFAULT
        # Sources are unique per entry (validation), so no key is ever written twice.
        if namespace == WILDCARD:
            any_src[(src.peer, partition)] = compiled
        elif src.name == WILDCARD:
            by_ns[(src.peer, partition, namespace)] = compiled
        else:
            exact[(src.peer, partition, namespace, src.name)] = compiled
    return DestinationPolicy(exact, by_ns, any_src, fallback, default)


_DestKey = tuple[str, str, str]  # partition, namespace, name


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Immutable authorization state for a whole set of entries; swap it whole on change."""

    exact: Mapping[_DestKey, DestinationPolicy]
    by_namespace: Mapping[tuple[str, str], DestinationPolicy]
    by_partition: Mapping[str, DestinationPolicy]
    default: Decision
    empty: DestinationPolicy = field(repr=False)
    broken: Mapping[_DestKey, BrokenEntry] = field(default_factory=dict)
    """(partition, namespace, name) of every destination whose entry denies everything
    because it could not be compiled, with the reason."""

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
        policy = self.exact.get((destination.partition, destination.namespace, destination.name))
        if policy is None:
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
    broken: Iterable[BrokenEntry] = (),
) -> Snapshot:
    """Compile normalized, validated entries (see `entries.load_entry`) into a Snapshot.

    Never raises for an entry's content: an entry meshlet cannot enforce exactly (JWT,
    sameness groups, regexes RE2 cannot compile), and every `broken` one the caller could
    not decode, makes its destination deny everything (see `Snapshot.broken`). A `broken`
    entry wins over a decoded entry for the same destination.
    """
    # The build allocates tens of thousands of acyclic containers (decisions, closures, maps):
    # left on, the cyclic collector would walk them, and the whole heap in its full passes,
    # several times per build for nothing (measured: about a third of a 10,000-intention
    # build). Paused for the build only, and only if it was running.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _compile(entries, default_allow, default_reason, broken)
    finally:
        if paused:
            gc.enable()


def _compile(
    entries: Iterable[ServiceIntentions],
    default_allow: bool,
    default_reason: str,
    broken: Iterable[BrokenEntry],
) -> Snapshot:
    default = Decision(default_allow, default_reason)
    refused = {b.key: b for b in broken}
    exact_entries: dict[_DestKey, ServiceIntentions | BrokenEntry] = {}
    ns_entries: dict[tuple[str, str], ServiceIntentions | BrokenEntry] = {}
    any_entries: dict[str, ServiceIntentions | BrokenEntry] = {}
    listed: list[ServiceIntentions | BrokenEntry] = [*entries, *refused.values()]
    for entry in listed:
        if isinstance(entry, ServiceIntentions):
            partition, namespace, name = (
                entry.partition_or_default,
                entry.namespace_or_default,
                entry.name,
            )
            if (partition, namespace, name) in refused:
                continue
        else:
            partition, namespace, name = entry.key
        if namespace == WILDCARD:
            any_entries[partition] = entry
        elif name == WILDCARD:
            ns_entries[(partition, namespace)] = entry
        else:
            exact_entries[(partition, namespace, name)] = entry

    found: dict[_DestKey, BrokenEntry] = {}
    permissions: _PermissionCache = {}

    def build(
        key: _DestKey, e: ServiceIntentions | BrokenEntry, fallback: DestinationPolicy | None
    ) -> DestinationPolicy:
        if isinstance(e, ServiceIntentions):
            try:
                return _entry_policy(e, fallback, default, permissions)
            except UnsupportedEntry as exc:
                e = BrokenEntry(e.name, str(exc), e.namespace, e.partition)
        found[key] = e
        return _broken_policy(e, fallback)

    by_partition = {p: build((p, WILDCARD, WILDCARD), e, None) for p, e in any_entries.items()}
    by_namespace = {
        (p, ns): build((p, ns, WILDCARD), e, by_partition.get(p))
        for (p, ns), e in ns_entries.items()
    }
    exact = {
        key: build(key, e, by_namespace.get(key[:2]) or by_partition.get(key[0]))
        for key, e in exact_entries.items()
    }
    empty = DestinationPolicy({}, {}, {}, None, default)
    return Snapshot(exact, by_namespace, by_partition, default, empty, found)
