"""Consul's routing config entries: `service-router`, `service-splitter`, `service-resolver`.

`load_entry` decodes a `PUT /v1/config` body as Consul does (traffic.decoding), then applies
`Normalize()` and `Validate()` of consul `agent/structs/config_entry_discoverychain.go` (and the
CE-only checks of `config_entry_discoverychain_ce.go`) with their error texts verbatim. The
models are frozen; `to_json` renders an entry the way Consul marshals it (`omitempty` fields
vanish, durations are Go text, split weights float32 at 0.01 precision).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from traffic.decoding import (
    BOOL,
    DURATION,
    FLOAT32,
    STRING,
    UINT32,
    UINT64,
    ListOf,
    MapOf,
    Spec,
    Struct,
    decode_entry,
    float32,
)
from traffic.durations import format_duration
from traffic.errors import EntryDecodeError, InvalidEntry

SERVICE_ROUTER = "service-router"
SERVICE_SPLITTER = "service-splitter"
SERVICE_RESOLVER = "service-resolver"
KINDS = (SERVICE_ROUTER, SERVICE_SPLITTER, SERVICE_RESOLVER)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
LB_POLICIES = ("", "random", "round_robin", "least_request", "ring_hash", "maglev")
HASH_BASED_POLICIES = ("ring_hash", "maglev")
HASH_FIELDS = ("header", "cookie", "query_parameter")
HTTP_PROTOCOLS = ("http", "http2", "grpc")

_SUBSET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_META_MAX_PAIRS = 64
_META_KEY_MAX = 128
_META_VALUE_MAX = 512


def _empty_map() -> Mapping[str, Any]:
    return MappingProxyType({})


def is_http_like(protocol: str) -> bool:
    """`structs.IsProtocolHTTPLike`: the protocols that permit routers and splitters."""
    return protocol in HTTP_PROTOCOLS


def go_quote(text: str) -> str:
    """Go's `%q` (strconv.Quote) of `text`."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append(
                {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
                    ch, "\\v"
                )
            )
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _omit_empty(pairs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pairs.items() if v not in ("", 0, False, None, [], {})}


# ---- the models ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderModifiers:
    """`HTTPHeaderModifiers`: Add appends, Set overwrites, Remove strips (request or response)."""

    add: Mapping[str, str] = field(default_factory=_empty_map)
    set: Mapping[str, str] = field(default_factory=_empty_map)
    remove: tuple[str, ...] = ()

    def is_zero(self) -> bool:
        return not self.add and not self.set and not self.remove

    def to_json(self) -> dict[str, Any]:
        return _omit_empty(
            {"Add": dict(self.add), "Set": dict(self.set), "Remove": list(self.remove)}
        )


def merge_header_modifiers(
    base: HeaderModifiers | None, overrides: HeaderModifiers | None
) -> HeaderModifiers | None:
    """`MergeHTTPHeaderModifiers`: `overrides` wins on collisions; removes are deduplicated."""
    if base is None or base.is_zero():
        return overrides
    if overrides is None or overrides.is_zero():
        return base
    remove = list(base.remove)
    remove += [k for k in overrides.remove if k not in base.remove]
    return HeaderModifiers(
        add=_frozen({**base.add, **overrides.add}),
        set=_frozen({**base.set, **overrides.set}),
        remove=tuple(remove),
    )


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One `Match.HTTP.Header[]` criterion: Name plus exactly one of the matchers."""

    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: str = ""
    invert: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            **_omit_empty(
                {
                    "Present": self.present,
                    "Exact": self.exact,
                    "Prefix": self.prefix,
                    "Suffix": self.suffix,
                    "Regex": self.regex,
                    "Invert": self.invert,
                }
            ),
        }


@dataclass(frozen=True, slots=True)
class QueryParamMatch:
    """One `Match.HTTP.QueryParam[]` criterion: Name plus exactly one of the matchers."""

    name: str
    present: bool = False
    exact: str = ""
    regex: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            **_omit_empty({"Present": self.present, "Exact": self.exact, "Regex": self.regex}),
        }


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """`ServiceRouteHTTPMatch`: every criterion given must hold (AND); methods are upper case."""

    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    header: tuple[HeaderMatch, ...] = ()
    query_param: tuple[QueryParamMatch, ...] = ()
    methods: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.path_exact
            or self.path_prefix
            or self.path_regex
            or self.header
            or self.query_param
            or self.methods
        )

    def to_json(self) -> dict[str, Any]:
        return _omit_empty(
            {
                "PathExact": self.path_exact,
                "PathPrefix": self.path_prefix,
                "PathRegex": self.path_regex,
                "Header": [h.to_json() for h in self.header],
                "QueryParam": [q.to_json() for q in self.query_param],
                "Methods": list(self.methods),
            }
        )


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """`ServiceRouteMatch`; `http` None (or empty) matches every request."""

    http: HTTPMatch | None = None

    def is_empty(self) -> bool:
        return self.http is None or self.http.is_empty()

    def to_json(self) -> dict[str, Any]:
        return {} if self.http is None else {"HTTP": self.http.to_json()}


@dataclass(frozen=True, slots=True)
class RouteDestination:
    """`ServiceRouteDestination`; empty `service` means the router's own service."""

    service: str = ""
    service_subset: str = ""
    namespace: str = ""
    partition: str = ""
    prefix_rewrite: str = ""
    request_timeout_ns: int = 0
    idle_timeout_ns: int = 0
    num_retries: int = 0
    retry_on_connect_failure: bool = False
    retry_on: tuple[str, ...] = ()
    retry_on_status_codes: tuple[int, ...] = ()
    request_headers: HeaderModifiers | None = None
    response_headers: HeaderModifiers | None = None

    def has_retry_features(self) -> bool:
        return bool(
            self.num_retries
            or self.retry_on_connect_failure
            or self.retry_on_status_codes
            or self.retry_on
        )

    def to_json(self) -> dict[str, Any]:
        out = _omit_empty(
            {
                "RequestTimeout": format_duration(self.request_timeout_ns)
                if self.request_timeout_ns
                else "",
                "IdleTimeout": format_duration(self.idle_timeout_ns)
                if self.idle_timeout_ns
                else "",
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "Namespace": self.namespace,
                "Partition": self.partition,
                "PrefixRewrite": self.prefix_rewrite,
                "NumRetries": self.num_retries,
                "RetryOnConnectFailure": self.retry_on_connect_failure,
                "RetryOn": list(self.retry_on),
                "RetryOnStatusCodes": list(self.retry_on_status_codes),
            }
        )
        if self.request_headers is not None:
            out["RequestHeaders"] = self.request_headers.to_json()
        if self.response_headers is not None:
            out["ResponseHeaders"] = self.response_headers.to_json()
        return out


@dataclass(frozen=True, slots=True)
class Route:
    """`ServiceRoute`: a None match is a catch-all, a None destination the router's service."""

    match: RouteMatch | None = None
    destination: RouteDestination | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match is not None:
            out["Match"] = self.match.to_json()
        if self.destination is not None:
            out["Destination"] = self.destination.to_json()
        return out


@dataclass(frozen=True, slots=True)
class ServiceRouter:
    """`ServiceRouterConfigEntry`: routes in order, first match wins."""

    name: str
    routes: tuple[Route, ...] = ()
    meta: Mapping[str, str] = field(default_factory=_empty_map)

    kind = SERVICE_ROUTER

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Kind": SERVICE_ROUTER,
            "Name": self.name,
            "Routes": [r.to_json() for r in self.routes] if self.routes else None,
        }
        if self.meta:
            out["Meta"] = dict(self.meta)
        return out


def scale_weight(weight: float) -> int:
    """`scaleWeight`: a weight in units of 0.01 %, computed in float32 like Consul does."""
    scaled = float32(float32(weight) * 100.0)
    if not math.isfinite(scaled):
        return -(2**63)  # what Go's int(math.Round(±Inf or NaN)) gives on amd64
    return math.floor(abs(scaled) + 0.5) * (1 if scaled >= 0 else -1)


def normalize_weight(weight: float) -> float:
    """`NormalizeServiceSplitWeight`: round to 0.01 (float32 as Consul stores it)."""
    return float32(scale_weight(weight) / 100.0)


def weight_json(weight: float) -> float | int:
    """A float32 weight as Go's encoding/json writes it (shortest text that reads back)."""
    hundredths = scale_weight(weight)
    if hundredths % 100 == 0:
        return hundredths // 100
    return round(hundredths / 100.0, 2)


@dataclass(frozen=True, slots=True)
class Split:
    """`ServiceSplit`: weight is normalized to 0.01; empty `service` is the splitter's own."""

    weight: float
    service: str = ""
    service_subset: str = ""
    namespace: str = ""
    partition: str = ""
    request_headers: HeaderModifiers | None = None
    response_headers: HeaderModifiers | None = None

    def merge_parent(self, parent: Split) -> Split:
        """`ServiceSplit.MergeParent`: requests pass the parent first, responses the child."""
        return Split(
            weight=self.weight,
            service=self.service,
            service_subset=self.service_subset,
            namespace=self.namespace,
            partition=self.partition,
            request_headers=merge_header_modifiers(parent.request_headers, self.request_headers),
            response_headers=merge_header_modifiers(self.response_headers, parent.response_headers),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Weight": weight_json(self.weight)}
        out.update(
            _omit_empty(
                {
                    "Service": self.service,
                    "ServiceSubset": self.service_subset,
                    "Namespace": self.namespace,
                    "Partition": self.partition,
                }
            )
        )
        if self.request_headers is not None:
            out["RequestHeaders"] = self.request_headers.to_json()
        if self.response_headers is not None:
            out["ResponseHeaders"] = self.response_headers.to_json()
        return out


@dataclass(frozen=True, slots=True)
class ServiceSplitter:
    """`ServiceSplitterConfigEntry`: weights sum to exactly 100 in 0.01 units."""

    name: str
    splits: tuple[Split, ...] = ()
    meta: Mapping[str, str] = field(default_factory=_empty_map)

    kind = SERVICE_SPLITTER

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Kind": SERVICE_SPLITTER,
            "Name": self.name,
            "Splits": [s.to_json() for s in self.splits] if self.splits else None,
        }
        if self.meta:
            out["Meta"] = dict(self.meta)
        return out


@dataclass(frozen=True, slots=True)
class Subset:
    """`ServiceResolverSubset`: a bexpr filter over health entries, and `OnlyPassing`."""

    filter: str = ""
    only_passing: bool = False

    def to_json(self) -> dict[str, Any]:
        return _omit_empty({"Filter": self.filter, "OnlyPassing": self.only_passing})


@dataclass(frozen=True, slots=True)
class Redirect:
    """`ServiceResolverRedirect`."""

    service: str = ""
    service_subset: str = ""
    namespace: str = ""
    partition: str = ""
    datacenter: str = ""
    peer: str = ""
    sameness_group: str = ""

    def is_empty(self) -> bool:
        return not (
            self.service
            or self.service_subset
            or self.namespace
            or self.partition
            or self.datacenter
            or self.peer
        )

    def to_json(self) -> dict[str, Any]:
        return _omit_empty(
            {
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "Namespace": self.namespace,
                "Partition": self.partition,
                "Datacenter": self.datacenter,
                "Peer": self.peer,
                "SamenessGroup": self.sameness_group,
            }
        )


@dataclass(frozen=True, slots=True)
class FailoverTarget:
    """`ServiceResolverFailoverTarget`."""

    service: str = ""
    service_subset: str = ""
    partition: str = ""
    namespace: str = ""
    datacenter: str = ""
    peer: str = ""

    def to_json(self) -> dict[str, Any]:
        return _omit_empty(
            {
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "Partition": self.partition,
                "Namespace": self.namespace,
                "Datacenter": self.datacenter,
                "Peer": self.peer,
            }
        )


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """`ServiceResolverFailoverPolicy` (`Mode` other than "" is Enterprise-only)."""

    mode: str = ""
    regions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return _omit_empty({"Mode": self.mode, "Regions": list(self.regions)})


@dataclass(frozen=True, slots=True)
class Failover:
    """`ServiceResolverFailover`: where to go when the target has no healthy instance."""

    service: str = ""
    service_subset: str = ""
    namespace: str = ""
    datacenters: tuple[str, ...] = ()
    targets: tuple[FailoverTarget, ...] = ()
    policy: FailoverPolicy | None = None
    sameness_group: str = ""

    def is_empty(self) -> bool:
        return not (
            self.service
            or self.service_subset
            or self.namespace
            or self.datacenters
            or self.targets
        )

    def to_json(self) -> dict[str, Any]:
        out = _omit_empty(
            {
                "Service": self.service,
                "ServiceSubset": self.service_subset,
                "Namespace": self.namespace,
                "Datacenters": list(self.datacenters),
                "Targets": [t.to_json() for t in self.targets],
                "SamenessGroup": self.sameness_group,
            }
        )
        if self.policy is not None:
            out["Policy"] = self.policy.to_json()
        return out


@dataclass(frozen=True, slots=True)
class RingHashConfig:
    minimum_ring_size: int = 0
    maximum_ring_size: int = 0

    def to_json(self) -> dict[str, Any]:
        return _omit_empty(
            {"MinimumRingSize": self.minimum_ring_size, "MaximumRingSize": self.maximum_ring_size}
        )


@dataclass(frozen=True, slots=True)
class LeastRequestConfig:
    choice_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return _omit_empty({"ChoiceCount": self.choice_count})


@dataclass(frozen=True, slots=True)
class CookieConfig:
    session: bool = False
    ttl_ns: int = 0
    path: str = ""

    def to_json(self) -> dict[str, Any]:
        # TTL is a plain time.Duration: encoding/json writes integer nanoseconds.
        return _omit_empty({"Session": self.session, "TTL": self.ttl_ns, "Path": self.path})


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One `LoadBalancer.HashPolicies[]` entry: a header/cookie/query parameter, or source IP."""

    field: str = ""
    field_value: str = ""
    cookie_config: CookieConfig | None = None
    source_ip: bool = False
    terminal: bool = False

    def to_json(self) -> dict[str, Any]:
        out = _omit_empty({"Field": self.field, "FieldValue": self.field_value})
        if self.cookie_config is not None:
            out["CookieConfig"] = self.cookie_config.to_json()
        out.update(_omit_empty({"SourceIP": self.source_ip, "Terminal": self.terminal}))
        return out


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """`LoadBalancer`: the policy ("" is Envoy's default) and its configuration."""

    policy: str = ""
    ring_hash_config: RingHashConfig | None = None
    least_request_config: LeastRequestConfig | None = None
    hash_policies: tuple[HashPolicy, ...] = ()

    def is_hash_based(self) -> bool:
        return self.policy in HASH_BASED_POLICIES

    def to_json(self) -> dict[str, Any]:
        out = _omit_empty({"Policy": self.policy})
        if self.ring_hash_config is not None:
            out["RingHashConfig"] = self.ring_hash_config.to_json()
        if self.least_request_config is not None:
            out["LeastRequestConfig"] = self.least_request_config.to_json()
        if self.hash_policies:
            out["HashPolicies"] = [h.to_json() for h in self.hash_policies]
        return out


@dataclass(frozen=True, slots=True)
class ServiceResolver:
    """`ServiceResolverConfigEntry`: subsets, redirect or failover, timeouts, load balancing."""

    name: str
    default_subset: str = ""
    subsets: Mapping[str, Subset] = field(default_factory=lambda: MappingProxyType({}))
    redirect: Redirect | None = None
    failover: Mapping[str, Failover] = field(default_factory=lambda: MappingProxyType({}))
    connect_timeout_ns: int = 0
    request_timeout_ns: int = 0
    prioritize_by_locality: str | None = None
    load_balancer: LoadBalancer | None = None
    meta: Mapping[str, str] = field(default_factory=_empty_map)

    kind = SERVICE_RESOLVER

    def is_default(self) -> bool:
        """`IsDefault()`: a resolver that changes nothing (as the compiler materializes)."""
        return (
            not self.default_subset
            and not self.subsets
            and self.redirect is None
            and not self.failover
            and not self.connect_timeout_ns
            and not self.request_timeout_ns
            and self.load_balancer is None
        )

    def subset_exists(self, name: str) -> bool:
        return name == "" or name in self.subsets

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Kind": SERVICE_RESOLVER, "Name": self.name}
        if self.connect_timeout_ns:
            out["ConnectTimeout"] = format_duration(self.connect_timeout_ns)
        if self.request_timeout_ns:
            out["RequestTimeout"] = format_duration(self.request_timeout_ns)
        if self.default_subset:
            out["DefaultSubset"] = self.default_subset
        if self.subsets:
            out["Subsets"] = {k: v.to_json() for k, v in self.subsets.items()}
        if self.redirect is not None:
            out["Redirect"] = self.redirect.to_json()
        if self.failover:
            out["Failover"] = {k: v.to_json() for k, v in self.failover.items()}
        if self.prioritize_by_locality is not None:
            out["PrioritizeByLocality"] = _omit_empty({"Mode": self.prioritize_by_locality})
        if self.load_balancer is not None:
            out["LoadBalancer"] = self.load_balancer.to_json()
        if self.meta:
            out["Meta"] = dict(self.meta)
        return out


RoutingEntry = ServiceRouter | ServiceSplitter | ServiceResolver


# ---- decoding specs (field names and snake_case aliases from the Go structs) ----------------

_HEADER_MODIFIERS = Struct(
    "HTTPHeaderModifiers", {"Add": MapOf(STRING), "Set": MapOf(STRING), "Remove": ListOf(STRING)}
)
_ROUTE = Struct(
    "ServiceRoute",
    {
        "Match": Struct(
            "ServiceRouteMatch",
            {
                "HTTP": Struct(
                    "ServiceRouteHTTPMatch",
                    {
                        "PathExact": STRING,
                        "PathPrefix": STRING,
                        "PathRegex": STRING,
                        "Header": ListOf(
                            Struct(
                                "ServiceRouteHTTPMatchHeader",
                                {
                                    "Name": STRING,
                                    "Present": BOOL,
                                    "Exact": STRING,
                                    "Prefix": STRING,
                                    "Suffix": STRING,
                                    "Regex": STRING,
                                    "Invert": BOOL,
                                },
                            )
                        ),
                        "QueryParam": ListOf(
                            Struct(
                                "ServiceRouteHTTPMatchQueryParam",
                                {"Name": STRING, "Present": BOOL, "Exact": STRING, "Regex": STRING},
                            )
                        ),
                        "Methods": ListOf(STRING),
                    },
                    aliases=("PathExact", "PathPrefix", "PathRegex", "QueryParam"),
                )
            },
        ),
        "Destination": Struct(
            "ServiceRouteDestination",
            {
                "Service": STRING,
                "ServiceSubset": STRING,
                "Namespace": STRING,
                "Partition": STRING,
                "PrefixRewrite": STRING,
                "RequestTimeout": DURATION,
                "IdleTimeout": DURATION,
                "NumRetries": UINT32,
                "RetryOnConnectFailure": BOOL,
                "RetryOn": ListOf(STRING),
                "RetryOnStatusCodes": ListOf(UINT32),
                "RequestHeaders": _HEADER_MODIFIERS,
                "ResponseHeaders": _HEADER_MODIFIERS,
            },
            aliases=(
                "ServiceSubset",
                "PrefixRewrite",
                "RequestTimeout",
                "IdleTimeout",
                "NumRetries",
                "RetryOnConnectFailure",
                "RetryOn",
                "RetryOnStatusCodes",
                "RequestHeaders",
                "ResponseHeaders",
            ),
        ),
    },
)
_COMMON: dict[str, Spec] = {
    "Kind": STRING,
    "Name": STRING,
    "Meta": MapOf(STRING),
    "CreateIndex": UINT64,
    "ModifyIndex": UINT64,
}
ROUTER_SPEC = Struct("ServiceRouterConfigEntry", {**_COMMON, "Routes": ListOf(_ROUTE)})
SPLITTER_SPEC = Struct(
    "ServiceSplitterConfigEntry",
    {
        **_COMMON,
        "Splits": ListOf(
            Struct(
                "ServiceSplit",
                {
                    "Weight": FLOAT32,
                    "Service": STRING,
                    "ServiceSubset": STRING,
                    "Namespace": STRING,
                    "Partition": STRING,
                    "RequestHeaders": _HEADER_MODIFIERS,
                    "ResponseHeaders": _HEADER_MODIFIERS,
                },
                aliases=("ServiceSubset", "RequestHeaders", "ResponseHeaders"),
            )
        ),
    },
)
_FAILOVER_POLICY = Struct(
    "ServiceResolverFailoverPolicy", {"Mode": STRING, "Regions": ListOf(STRING)}
)
RESOLVER_SPEC = Struct(
    "ServiceResolverConfigEntry",
    {
        **_COMMON,
        "DefaultSubset": STRING,
        "Subsets": MapOf(
            Struct(
                "ServiceResolverSubset",
                {"Filter": STRING, "OnlyPassing": BOOL},
                aliases=("OnlyPassing",),
            )
        ),
        "Redirect": Struct(
            "ServiceResolverRedirect",
            {
                "Service": STRING,
                "ServiceSubset": STRING,
                "Namespace": STRING,
                "Partition": STRING,
                "Datacenter": STRING,
                "Peer": STRING,
                "SamenessGroup": STRING,
            },
            aliases=("ServiceSubset", "SamenessGroup"),
        ),
        "Failover": MapOf(
            Struct(
                "ServiceResolverFailover",
                {
                    "Service": STRING,
                    "ServiceSubset": STRING,
                    "Namespace": STRING,
                    "Datacenters": ListOf(STRING),
                    "Targets": ListOf(
                        Struct(
                            "ServiceResolverFailoverTarget",
                            {
                                "Service": STRING,
                                "ServiceSubset": STRING,
                                "Partition": STRING,
                                "Namespace": STRING,
                                "Datacenter": STRING,
                                "Peer": STRING,
                            },
                            aliases=("ServiceSubset",),
                        )
                    ),
                    "Policy": _FAILOVER_POLICY,
                    "SamenessGroup": STRING,
                },
                aliases=("ServiceSubset", "SamenessGroup"),
            )
        ),
        "ConnectTimeout": DURATION,
        "RequestTimeout": DURATION,
        "PrioritizeByLocality": Struct("ServiceResolverPrioritizeByLocality", {"Mode": STRING}),
        "LoadBalancer": Struct(
            "LoadBalancer",
            {
                "Policy": STRING,
                "RingHashConfig": Struct(
                    "RingHashConfig",
                    {"MinimumRingSize": UINT64, "MaximumRingSize": UINT64},
                    aliases=("MinimumRingSize", "MaximumRingSize"),
                ),
                "LeastRequestConfig": Struct(
                    "LeastRequestConfig", {"ChoiceCount": UINT32}, aliases=("ChoiceCount",)
                ),
                "HashPolicies": ListOf(
                    Struct(
                        "HashPolicy",
                        {
                            "Field": STRING,
                            "FieldValue": STRING,
                            "CookieConfig": Struct(
                                "CookieConfig", {"Session": BOOL, "TTL": DURATION, "Path": STRING}
                            ),
                            "SourceIP": BOOL,
                            "Terminal": BOOL,
                        },
                        aliases=("FieldValue", "CookieConfig", "SourceIP"),
                    )
                ),
            },
            aliases=("RingHashConfig", "LeastRequestConfig", "HashPolicies"),
        ),
    },
    aliases=(
        "DefaultSubset",
        "ConnectTimeout",
        "RequestTimeout",
        "LoadBalancer",
        "PrioritizeByLocality",
    ),
)
SPECS: Mapping[str, Struct] = {
    SERVICE_ROUTER: ROUTER_SPEC,
    SERVICE_SPLITTER: SPLITTER_SPEC,
    SERVICE_RESOLVER: RESOLVER_SPEC,
}


# ---- building the models from decoded data ---------------------------------------------------


def _modifiers(data: Mapping[str, Any] | None) -> HeaderModifiers | None:
    if data is None:
        return None
    return HeaderModifiers(
        add=_frozen(data.get("Add")),
        set=_frozen(data.get("Set")),
        remove=tuple(data.get("Remove") or ()),
    )


def _route(data: Mapping[str, Any]) -> Route:
    match = None
    if "Match" in data:
        http = data["Match"].get("HTTP")
        match = RouteMatch(
            None
            if http is None
            else HTTPMatch(
                path_exact=http.get("PathExact", ""),
                path_prefix=http.get("PathPrefix", ""),
                path_regex=http.get("PathRegex", ""),
                header=tuple(
                    HeaderMatch(
                        name=h.get("Name", ""),
                        present=h.get("Present", False),
                        exact=h.get("Exact", ""),
                        prefix=h.get("Prefix", ""),
                        suffix=h.get("Suffix", ""),
                        regex=h.get("Regex", ""),
                        invert=h.get("Invert", False),
                    )
                    for h in http.get("Header", ())
                ),
                query_param=tuple(
                    QueryParamMatch(
                        name=q.get("Name", ""),
                        present=q.get("Present", False),
                        exact=q.get("Exact", ""),
                        regex=q.get("Regex", ""),
                    )
                    for q in http.get("QueryParam", ())
                ),
                # Normalize(): methods are upper-cased before validation.
                methods=tuple(m.upper() for m in http.get("Methods", ())),
            )
        )
    destination = None
    if "Destination" in data:
        d = data["Destination"]
        destination = RouteDestination(
            service=d.get("Service", ""),
            service_subset=d.get("ServiceSubset", ""),
            namespace=d.get("Namespace", ""),
            partition=d.get("Partition", ""),
            prefix_rewrite=d.get("PrefixRewrite", ""),
            request_timeout_ns=d.get("RequestTimeout", 0),
            idle_timeout_ns=d.get("IdleTimeout", 0),
            num_retries=d.get("NumRetries", 0),
            retry_on_connect_failure=d.get("RetryOnConnectFailure", False),
            retry_on=tuple(d.get("RetryOn", ())),
            retry_on_status_codes=tuple(d.get("RetryOnStatusCodes", ())),
            request_headers=_modifiers(d.get("RequestHeaders")),
            response_headers=_modifiers(d.get("ResponseHeaders")),
        )
    return Route(match, destination)


def _router(data: Mapping[str, Any]) -> ServiceRouter:
    return ServiceRouter(
        name=data.get("Name", ""),
        routes=tuple(_route(r) for r in data.get("Routes", ())),
        meta=_frozen(data.get("Meta")),
    )


def _splitter(data: Mapping[str, Any]) -> ServiceSplitter:
    return ServiceSplitter(
        name=data.get("Name", ""),
        splits=tuple(
            Split(
                # Normalize(): every weight is rounded to 0.01.
                weight=normalize_weight(s.get("Weight", 0.0)),
                service=s.get("Service", ""),
                service_subset=s.get("ServiceSubset", ""),
                namespace=s.get("Namespace", ""),
                partition=s.get("Partition", ""),
                request_headers=_modifiers(s.get("RequestHeaders")),
                response_headers=_modifiers(s.get("ResponseHeaders")),
            )
            for s in data.get("Splits", ())
        ),
        meta=_frozen(data.get("Meta")),
    )


def _policy(data: Mapping[str, Any] | None) -> FailoverPolicy | None:
    if data is None:
        return None
    return FailoverPolicy(mode=data.get("Mode", ""), regions=tuple(data.get("Regions", ())))


def _resolver(data: Mapping[str, Any]) -> ServiceResolver:
    redirect = None
    if "Redirect" in data:
        r = data["Redirect"]
        redirect = Redirect(
            service=r.get("Service", ""),
            service_subset=r.get("ServiceSubset", ""),
            namespace=r.get("Namespace", ""),
            partition=r.get("Partition", ""),
            datacenter=r.get("Datacenter", ""),
            peer=r.get("Peer", ""),
            sameness_group=r.get("SamenessGroup", ""),
        )
    failover = {
        key: Failover(
            service=f.get("Service", ""),
            service_subset=f.get("ServiceSubset", ""),
            namespace=f.get("Namespace", ""),
            datacenters=tuple(f.get("Datacenters", ())),
            targets=tuple(
                FailoverTarget(
                    service=t.get("Service", ""),
                    service_subset=t.get("ServiceSubset", ""),
                    partition=t.get("Partition", ""),
                    namespace=t.get("Namespace", ""),
                    datacenter=t.get("Datacenter", ""),
                    peer=t.get("Peer", ""),
                )
                for t in f.get("Targets", ())
            ),
            policy=_policy(f.get("Policy")),
            sameness_group=f.get("SamenessGroup", ""),
        )
        for key, f in (data.get("Failover") or {}).items()
    }
    balancer = None
    if "LoadBalancer" in data:
        lb = data["LoadBalancer"]
        ring = lb.get("RingHashConfig")
        least = lb.get("LeastRequestConfig")
        balancer = LoadBalancer(
            policy=lb.get("Policy", ""),
            ring_hash_config=None
            if ring is None
            else RingHashConfig(
                minimum_ring_size=ring.get("MinimumRingSize", 0),
                maximum_ring_size=ring.get("MaximumRingSize", 0),
            ),
            least_request_config=None
            if least is None
            else LeastRequestConfig(choice_count=least.get("ChoiceCount", 0)),
            hash_policies=tuple(
                HashPolicy(
                    field=h.get("Field", ""),
                    field_value=h.get("FieldValue", ""),
                    cookie_config=None
                    if "CookieConfig" not in h
                    else CookieConfig(
                        session=h["CookieConfig"].get("Session", False),
                        ttl_ns=h["CookieConfig"].get("TTL", 0),
                        path=h["CookieConfig"].get("Path", ""),
                    ),
                    source_ip=h.get("SourceIP", False),
                    terminal=h.get("Terminal", False),
                )
                for h in lb.get("HashPolicies", ())
            ),
        )
    locality = data.get("PrioritizeByLocality")
    return ServiceResolver(
        name=data.get("Name", ""),
        default_subset=data.get("DefaultSubset", ""),
        subsets=MappingProxyType(
            {
                k: Subset(filter=v.get("Filter", ""), only_passing=v.get("OnlyPassing", False))
                for k, v in (data.get("Subsets") or {}).items()
            }
        ),
        redirect=redirect,
        failover=MappingProxyType(failover),
        connect_timeout_ns=data.get("ConnectTimeout", 0),
        request_timeout_ns=data.get("RequestTimeout", 0),
        prioritize_by_locality=None if locality is None else locality.get("Mode", ""),
        load_balancer=balancer,
        meta=_frozen(data.get("Meta")),
    )


# ---- Validate() ------------------------------------------------------------------------------


def multierror(errors: list[str]) -> str:
    """A go-multierror list, as Consul returns accumulated validation errors."""
    points = "\n\t".join(f"* {e}" for e in errors)
    if len(errors) == 1:
        return f"1 error occurred:\n\t{points}\n\n"
    return f"{len(errors)} errors occurred:\n\t{points}\n\n"


def meta_errors(meta: Mapping[str, str]) -> list[str]:
    """`validateConfigEntryMeta` (keys in sorted order, where Go ranges over a map)."""
    errors = []
    if len(meta) > _META_MAX_PAIRS:
        errors.append(f"Meta exceeds maximum element count {_META_MAX_PAIRS}")
    for key in sorted(meta):
        if len(key) > _META_KEY_MAX:
            errors.append(f"Meta key {go_quote(key)} exceeds maximum length {_META_KEY_MAX}")
        if len(meta[key]) > _META_VALUE_MAX:
            errors.append(
                f"Meta value for key {go_quote(key)} exceeds maximum length {_META_VALUE_MAX}"
            )
    return errors


def _validate_meta(meta: Mapping[str, str]) -> None:
    errors = meta_errors(meta)
    if errors:
        raise InvalidEntry(multierror(errors))


def validate_router(entry: ServiceRouter) -> None:
    if not entry.name:
        raise InvalidEntry("Name is required")
    _validate_meta(entry.meta)
    for i, route in enumerate(entry.routes):
        eligible_for_prefix_rewrite = False
        http = route.match.http if route.match is not None else None
        if http is not None:
            path_parts = 0
            if http.path_exact:
                eligible_for_prefix_rewrite = True
                path_parts += 1
                if not http.path_exact.startswith("/"):
                    raise InvalidEntry(
                        f"Route[{i}] PathExact doesn't start with '/': {go_quote(http.path_exact)}"
                    )
            if http.path_prefix:
                eligible_for_prefix_rewrite = True
                path_parts += 1
                if not http.path_prefix.startswith("/"):
                    raise InvalidEntry(
                        f"Route[{i}] PathPrefix doesn't start with '/': "
                        f"{go_quote(http.path_prefix)}"
                    )
            if http.path_regex:
                path_parts += 1
            if path_parts > 1:
                raise InvalidEntry(
                    f"Route[{i}] should only contain at most one of PathExact, PathPrefix, "
                    "or PathRegex"
                )
            for j, hdr in enumerate(http.header):
                if not hdr.name:
                    raise InvalidEntry(f"Route[{i}] Header[{j}] missing required Name field")
                parts = sum(
                    bool(x) for x in (hdr.present, hdr.exact, hdr.regex, hdr.prefix, hdr.suffix)
                )
                if parts != 1:
                    raise InvalidEntry(
                        f"Route[{i}] Header[{j}] should only contain one of Present, Exact, "
                        "Prefix, Suffix, or Regex"
                    )
            for j, qm in enumerate(http.query_param):
                if not qm.name:
                    raise InvalidEntry(f"Route[{i}] QueryParam[{j}] missing required Name field")
                if sum(bool(x) for x in (qm.present, qm.exact, qm.regex)) != 1:
                    raise InvalidEntry(
                        f"Route[{i}] QueryParam[{j}] should only contain one of Present, Exact, "
                        "or Regex"
                    )
            seen: set[str] = set()
            for method in http.methods:
                if method not in HTTP_METHODS:
                    raise InvalidEntry(
                        f"Route[{i}] Methods contains an invalid method {go_quote(method)}"
                    )
                if method in seen:
                    raise InvalidEntry(
                        f"Route[{i}] Methods contains {go_quote(method)} more than once"
                    )
                seen.add(method)
        dest = route.destination
        if dest is not None:
            if dest.prefix_rewrite and not eligible_for_prefix_rewrite:
                raise InvalidEntry(
                    f"Route[{i}] cannot make use of PrefixRewrite without configuring either "
                    "PathExact or PathPrefix"
                )
            for condition in dest.retry_on:
                if condition not in RETRY_CONDITIONS:
                    raise InvalidEntry(
                        f"Route[{i}] contains an invalid retry condition: {go_quote(condition)}"
                    )


def _go_float(value: float) -> str:
    """Go's `%f` of a float32 value."""
    return f"{float32(value):.6f}"


def validate_splitter(entry: ServiceSplitter) -> None:
    if not entry.name:
        raise InvalidEntry("Name is required")
    if not entry.splits:
        raise InvalidEntry("no splits configured")
    _validate_meta(entry.meta)
    found: set[tuple[str, ...]] = set()
    for split in entry.splits:
        service = split.service or entry.name
        if split.request_headers is not None or split.response_headers is not None:
            # Go keys the check on the struct, whose header modifiers are pointers: a split
            # carrying any never equals another.
            continue
        key = (service, split.service_subset, split.namespace, split.partition)
        if key in found:
            raise InvalidEntry(
                "split destination occurs more than once: "
                f"service={go_quote(service)}, subset={go_quote(split.service_subset)}, "
                f"namespace={go_quote(split.namespace)}, partition={go_quote(split.partition)}"
            )
        found.add(key)
    total = sum(scale_weight(s.weight) for s in entry.splits)
    if total != 100 * 100:
        raise InvalidEntry(
            f"the sum of all split weights must be 100, not {_go_float(float32(total) / 100)}"
        )


def _validate_subset_name(name: str) -> str | None:
    if not name or len(name) > 63:
        return "must be non-empty and 63 characters or fewer"
    if not _SUBSET_NAME.match(name):
        return (
            "must be 63 characters or fewer, begin or end with lower case alphanumeric "
            "characters, and contain lower case alphanumeric characters or '-' in between"
        )
    return None


FilterCheck = Callable[[str], str | None]


def validate_resolver(entry: ServiceResolver, check_filter: FilterCheck | None = None) -> None:
    """`check_filter(expr)` returns bexpr's parse error for an invalid filter, else None."""
    if not entry.name:
        raise InvalidEntry("Name is required")
    _validate_meta(entry.meta)
    # Go ranges over the map in random order; sorting makes the first error reproducible.
    for name in sorted(entry.subsets):
        subset = entry.subsets[name]
        if not name:
            raise InvalidEntry("Subset defined with empty name")
        problem = _validate_subset_name(name)
        if problem is not None:
            raise InvalidEntry(f"Subset {go_quote(name)} is invalid: {problem}")
        if subset.filter and check_filter is not None:
            error = check_filter(subset.filter)
            if error is not None:
                raise InvalidEntry(
                    f"Filter for subset {go_quote(name)} is not a valid expression: {error}"
                )

    def is_subset(name: str) -> bool:
        return name in entry.subsets

    if entry.default_subset and not is_subset(entry.default_subset):
        raise InvalidEntry(f"DefaultSubset {go_quote(entry.default_subset)} is not a valid subset")

    r = entry.redirect
    if r is not None:
        if (r.partition or "default") != "default" and r.datacenter:
            raise InvalidEntry("Cross-datacenter and cross-partition redirect is not supported")
        for value, what in (
            (r.partition, "Partition"),
            (r.namespace, "Namespace"),
            (r.sameness_group, "SamenessGroup"),
        ):
            if value:
                raise InvalidEntry(f"Redirect: Setting {what} requires Consul Enterprise")
        if entry.failover:
            raise InvalidEntry("Redirect and Failover cannot both be set")
        if r.is_empty():
            raise InvalidEntry("Redirect is empty")
        if r.peer and r.service_subset:
            raise InvalidEntry("Redirect.Peer cannot be set with Redirect.ServiceSubset")
        if r.peer and r.partition:
            raise InvalidEntry("Redirect.Partition cannot be set with Redirect.Peer")
        if r.peer and r.datacenter:
            raise InvalidEntry("Redirect.Peer cannot be set with Redirect.Datacenter")
        if not r.service:
            for value, what in (
                (r.service_subset, "ServiceSubset"),
                (r.namespace, "Namespace"),
                (r.partition, "Partition"),
                (r.peer, "Peer"),
            ):
                if value:
                    raise InvalidEntry(f"Redirect.{what} defined without Redirect.Service")
        elif r.service_subset and r.service == entry.name and not is_subset(r.service_subset):
            raise InvalidEntry(
                f"Redirect.ServiceSubset {go_quote(r.service_subset)} is not a valid subset of "
                f"{go_quote(entry.name)}"
            )

    for subset_key in sorted(entry.failover):
        f = entry.failover[subset_key]
        prefix = f"Bad Failover[{go_quote(subset_key)}]: "
        if f.namespace:
            raise InvalidEntry(prefix + "Setting Namespace requires Consul Enterprise")
        if f.sameness_group:
            raise InvalidEntry(prefix + "Setting SamenessGroup requires Consul Enterprise")
        if subset_key != "*" and not is_subset(subset_key):
            raise InvalidEntry(prefix + "not a valid subset subset")
        if f.is_empty():
            raise InvalidEntry(
                prefix
                + "one of Service, ServiceSubset, Namespace, Targets, or Datacenters is required"
            )
        if f.policy is not None and f.policy.mode:
            raise InvalidEntry(prefix + "Setting failover policies requires Consul Enterprise")
        if (
            f.service_subset
            and (not f.service or f.service == entry.name)
            and not is_subset(f.service_subset)
        ):
            raise InvalidEntry(
                f"{prefix}ServiceSubset {go_quote(f.service_subset)} is not a valid subset "
                f"of {go_quote(f.service)}"
            )
        if f.datacenters and f.targets:
            raise InvalidEntry(prefix + "Targets cannot be set with Datacenters")
        if f.service_subset and f.targets:
            raise InvalidEntry(prefix + "Targets cannot be set with ServiceSubset")
        if f.service and f.targets:
            raise InvalidEntry(prefix + "Targets cannot be set with Service")
        for i, t in enumerate(f.targets):
            tprefix = f"Bad Failover[{go_quote(subset_key)}].Targets[{i}]: "
            if t.partition:
                raise InvalidEntry(tprefix + "Setting Partition requires Consul Enterprise")
            if t.namespace:
                raise InvalidEntry(tprefix + "Setting Namespace requires Consul Enterprise")
            if t.peer and t.service_subset:
                raise InvalidEntry(tprefix + "Peer cannot be set with ServiceSubset")
            # (Partition with Peer or Datacenter cannot get here in CE: Partition is refused.)
            if t.peer and t.datacenter:
                raise InvalidEntry(tprefix + "Peer cannot be set with Datacenter")
            if (
                t.service_subset
                and (not t.service or t.service == entry.name)
                and not is_subset(t.service_subset)
            ):
                raise InvalidEntry(
                    f"{tprefix}ServiceSubset {go_quote(t.service_subset)} is not a valid subset "
                    f"of {go_quote(entry.name)}"
                )
        if any(dc == "" for dc in f.datacenters):
            raise InvalidEntry(
                f"Bad Failover[{go_quote(subset_key)}].Datacenters: found empty datacenter"
            )

    if entry.prioritize_by_locality:
        raise InvalidEntry("Prioritize-by-locality requires Consul Enterprise ")
    if entry.connect_timeout_ns < 0:
        raise InvalidEntry(
            f"Bad ConnectTimeout '{format_duration(entry.connect_timeout_ns)}', must be >= 0"
        )
    if entry.request_timeout_ns < 0:
        raise InvalidEntry(
            f"Bad RequestTimeout '{format_duration(entry.request_timeout_ns)}', must be >= 0"
        )
    lb = entry.load_balancer
    if lb is not None:
        if lb.policy not in LB_POLICIES:
            raise InvalidEntry(f"Bad LoadBalancer policy: {go_quote(lb.policy)} is not supported")
        if lb.policy != "ring_hash" and lb.ring_hash_config is not None:
            raise InvalidEntry(
                "Bad LoadBalancer configuration. RingHashConfig specified for incompatible load "
                f"balancing policy {go_quote(lb.policy)}"
            )
        if lb.policy != "least_request" and lb.least_request_config is not None:
            raise InvalidEntry(
                "Bad LoadBalancer configuration. LeastRequestConfig specified for incompatible "
                f"load balancing policy {go_quote(lb.policy)}"
            )
        if not lb.is_hash_based() and lb.hash_policies:
            raise InvalidEntry(
                "Bad LoadBalancer configuration: HashPolicies specified for non-hash-based "
                f"Policy: {go_quote(lb.policy)}"
            )
        for i, hp in enumerate(lb.hash_policies):
            prefix = f"Bad LoadBalancer HashPolicy[{i}]: "
            if hp.field and hp.field not in HASH_FIELDS:
                raise InvalidEntry(f"{prefix}{go_quote(hp.field)} is not a supported field")
            if hp.source_ip and hp.field:
                raise InvalidEntry(
                    f"{prefix}A single hash policy cannot hash both a source address and a "
                    f"{go_quote(hp.field)}"
                )
            if hp.source_ip and hp.field_value:
                raise InvalidEntry(
                    f"{prefix}A FieldValue cannot be specified when hashing SourceIP"
                )
            if hp.field and not hp.field_value:
                raise InvalidEntry(
                    f"{prefix}Field {go_quote(hp.field)} was specified without a FieldValue"
                )
            if hp.field_value and not hp.field:
                raise InvalidEntry(f"{prefix}FieldValue requires a Field to apply to")
            if hp.cookie_config is not None:
                if hp.field != "cookie":
                    raise InvalidEntry(f"{prefix}cookie_config provided for {go_quote(hp.field)}")
                if hp.cookie_config.session and hp.cookie_config.ttl_ns != 0:
                    raise InvalidEntry(f"{prefix}a session cookie cannot have an associated TTL")


# ---- entry points ----------------------------------------------------------------------------


def kind_of(body: Mapping[str, Any]) -> str:
    """The top-level kind as Consul finds it: `Kind`, else `kind`, and a string."""
    if "Kind" in body:
        kind = body["Kind"]
    elif "kind" in body:
        kind = body["kind"]
    else:
        raise EntryDecodeError(
            "Request decoding failed: Payload does not contain a kind/Kind key at the top level"
        )
    if not isinstance(kind, str):
        raise EntryDecodeError("Request decoding failed: Kind value in payload is not a string")
    return kind


def load_entry(body: Mapping[str, Any], *, check_filter: FilterCheck | None = None) -> RoutingEntry:
    """Decode, normalize and validate one routing entry body (the kind must be one of KINDS).

    Raises EntryDecodeError (Consul's 400 text) or InvalidEntry (Consul's 500 text).
    """
    kind = kind_of(body)
    if kind not in SPECS:
        raise EntryDecodeError(f"Request decoding failed: invalid config entry kind: {kind}")
    data = decode_entry(body, SPECS[kind])
    if kind == SERVICE_ROUTER:
        router = _router(data)
        validate_router(router)
        return router
    if kind == SERVICE_SPLITTER:
        splitter = _splitter(data)
        validate_splitter(splitter)
        return splitter
    resolver = _resolver(data)
    validate_resolver(resolver, check_filter)
    return resolver


def entry_from_json(body: Mapping[str, Any]) -> RoutingEntry:
    """Read back an entry this module rendered (or Consul returned) without re-validating it."""
    kind = kind_of(body)
    if kind not in SPECS:
        raise EntryDecodeError(f"Request decoding failed: invalid config entry kind: {kind}")
    data = decode_entry({k: v for k, v in body.items() if k not in ("Hash",)}, SPECS[kind])
    if kind == SERVICE_ROUTER:
        return _router(data)
    if kind == SERVICE_SPLITTER:
        return _splitter(data)
    return _resolver(data)


def related_services(entry: RoutingEntry) -> tuple[str, ...]:
    """`ListRelatedServices`: other services an entry sends traffic to (writers need read)."""
    found: set[str] = set()
    if isinstance(entry, ServiceRouter):
        found = {r.destination.service or entry.name for r in entry.routes if r.destination}
    elif isinstance(entry, ServiceSplitter):
        found = {s.service or entry.name for s in entry.splits}
    else:
        if entry.redirect is not None:
            found.add(entry.redirect.service or entry.name)
        for failover in entry.failover.values():
            if not failover.targets:
                found.add(failover.service or entry.name)
            found |= {t.service or entry.name for t in failover.targets if not t.peer}
    found.discard(entry.name)
    return tuple(sorted(found))
