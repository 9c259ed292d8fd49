"""A compiled discovery chain -> what one outbound listener applies: its route table and, per
chain target, a cluster's settings. Pure (no I/O); the agent runs it whenever the chain or the
calling service's `service-defaults` change, and refuses the result whole on `ChainRejected`.

    routing = chain_routing(chain, upstream_config=cfg, router_meta=router.meta)
    routing.table                     # connect.routes.RouteTable (http listeners)
    routing.clusters["<target id>"]   # the target ids tried in order (primary, then failover)
    routing.targets["<target id>"]    # TargetSettings: what to watch, how to dial and balance

What comes from where, as Consul's xDS generator (agent/xds/routes.go, clusters.go) reads it:

* routes: the router node's routes in order (first match wins; the compiler already appended
  the implicit catch-all), or one route to the start node. A route's `NextNode` is a
  splitter (weighted destinations, the chain's flattened weights in 0.01 % units, split by
  share of their total) or a resolver (one destination). A route cluster is named by its
  resolver's target id and stands for that target followed by its failover targets.
* `RequestTimeout`: the route destination's, else the resolver's, else (both 0: Consul leaves
  the route's `timeout` unset) Envoy's default 15 s; `per-try-timeout` from the
  router's `Meta` (`meshlet.io/route.<n>.per-try-timeout`, written by `meshlet routes
  translate`; the compiled chain does not carry Meta, hence `router_meta`).
* retries: only for a route destination with retry features (Consul's `HasRetryFeatures`);
  `NumRetries` 0 then means Envoy's 1. `RETRY_ON` says what each `RetryOn` value becomes.
  A route without them keeps the proxy's own default (one retry after a reset or a peer
  sidecar's refusal, connect.routes.DEFAULT_RETRY).
* clusters: the target's subset filter and `OnlyPassing` (what the agent watches), connect
  timeout (target, else resolver, else 5 s), the resolver node's `LoadBalancer`, and the
  calling service's `UpstreamConfig` (`Limits` -> circuit breaking, `PassiveHealthCheck` ->
  `EjectionPolicy.passive_health_check`).

* a splitter leg's `RequestHeaders` / `ResponseHeaders`: that leg's own (`WeightedCluster`),
  applied before the route's (Envoy's weighted-cluster edits).
* `IdleTimeout`: the route's stream idle timeout. The router's other `meshlet.io/route.<n>.*`
  keys (`route_extensions`): fault injection (`Fault`) and mirroring (`Mirror`, its cluster
  the start of the mirror's own chain, compiled by the agent: `mirrors`). An unknown or
  malformed key rejects the chain.
* `HashPolicies[].CookieConfig`: a cookie policy with `TTL` or `Session` generates its cookie
  (connect.balancer.HashPolicy.cookie_ttl).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from connect.balancer import BalancerConfig, ConfigError, HashPolicy, Policy, Target
from connect.cluster import DEFAULT_EJECTION, EjectionPolicy, Limits
from connect.routes import (
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY,
    NO_EDITS,
    Fault,
    HeaderEdits,
    HeaderMatch,
    Mirror,
    QueryMatch,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    WeightedCluster,
)
from traffic.route_meta import (
    FAULT_ABORT_PERCENT,
    FAULT_ABORT_STATUS,
    FAULT_DELAY,
    FAULT_DELAY_PERCENT,
    META_ROUTE,
    MIRROR,
    MIRROR_PERCENT,
    PER_TRY_TIMEOUT,
    ROUTE_FEATURES,
)

if TYPE_CHECKING:
    # The compiler's inputs: a data-plane process only receives its outputs (the types
    # below) and never loads the traffic package (~2.5 MB of its RSS).
    from traffic.chain import CompiledDiscoveryChain, DiscoveryGraphNode
    from traffic.defaults import PassiveHealthCheck, UpstreamConfig, UpstreamLimits
    from traffic.entries import HeaderModifiers, HTTPMatch, LoadBalancer, RouteDestination

__all__ = [
    "RETRY_ON",
    "ChainRejected",
    "ChainRouting",
    "RoutingSnapshot",
    "TargetSettings",
    "chain_routing",
    "merge_upstream_config",
    "mirror_services",
    "route_extensions",
]

_MIRROR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9-]*)?")
DEFAULT_CONNECT_TIMEOUT = 5.0


class ChainRejected(ValueError):
    """The chain cannot be applied as a whole; str() names the node and field."""


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """One chain target as a cluster: which instances, and how they are dialed and balanced."""

    id: str
    service: str
    datacenter: str
    peer: str
    filter: str
    only_passing: bool
    sni: str
    connect_timeout: float
    balancer: BalancerConfig
    limits: Limits
    ejection: tuple[EjectionPolicy, ...]


@dataclass(frozen=True, slots=True)
class ChainRouting:
    service: str
    protocol: str
    table: RouteTable
    clusters: Mapping[str, tuple[str, ...]]
    """Route cluster name (its resolver's target id) -> target ids in failover order."""
    targets: Mapping[str, TargetSettings]
    start: str
    """The route cluster a tcp listener relays to: the start node's (a resolver for tcp)."""
    ignored: tuple[str, ...] = field(default=())
    """Fields present but not enforced (logged once per snapshot)."""


# What each of Consul's RetryOn values (Envoy's x-envoy-retry-on) sets on a RetryPolicy.
# connect-failure: a failed dial is never a try here, the dialer moves to the next endpoint
# by itself (connect.dial), so it is always on. refused-stream is HTTP/2's REFUSED_STREAM; its
# HTTP/1.1 counterpart is a peer sidecar's x-meshlet-retriable refusal, also always on.
# envoy-ratelimited needs Envoy's x-envoy-ratelimited header, which nothing here sends; the gRPC
# statuses (cancelled ... unavailable) are read from grpc-status, and gRPC is relayed at L4.
RETRY_ON: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "5xx": frozenset({"on_5xx", "on_reset", "on_timeout"}),
        "gateway-error": frozenset({"on_gateway_error", "on_reset", "on_timeout"}),
        "reset": frozenset({"on_reset", "on_timeout"}),
        "connect-failure": frozenset(),
        "retriable-4xx": frozenset({"status:409"}),
        "refused-stream": frozenset({"on_refused"}),
        "envoy-ratelimited": frozenset({"ignored"}),
        "cancelled": frozenset({"ignored"}),
        "deadline-exceeded": frozenset({"ignored"}),
        "internal": frozenset({"ignored"}),
        "resource-exhausted": frozenset({"ignored"}),
        "unavailable": frozenset({"ignored"}),
    }
)


def merge_upstream_config(
    defaults: UpstreamConfig | None, override: UpstreamConfig | None
) -> UpstreamConfig | None:
    """The calling service's settings for one upstream: the override's fields where it sets
    them, else `Defaults`' (Consul merges UpstreamConfig field by field)."""
    if defaults is None or override is None:
        return override if override is not None else defaults
    from traffic.defaults import UpstreamConfig

    return UpstreamConfig(
        name=override.name,
        peer=override.peer,
        protocol=override.protocol or defaults.protocol,
        connect_timeout_ms=override.connect_timeout_ms or defaults.connect_timeout_ms,
        limits=_merge_limits(defaults.limits, override.limits),
        passive_health_check=override.passive_health_check or defaults.passive_health_check,
        mesh_gateway_mode=override.mesh_gateway_mode or defaults.mesh_gateway_mode,
        balance_outbound_connections=(
            override.balance_outbound_connections or defaults.balance_outbound_connections
        ),
    )


def _merge_limits(a: UpstreamLimits | None, b: UpstreamLimits | None) -> UpstreamLimits | None:
    if a is None or b is None:
        return b if b is not None else a
    from traffic.defaults import UpstreamLimits

    return UpstreamLimits(
        max_connections=b.max_connections if b.max_connections is not None else a.max_connections,
        max_pending_requests=(
            b.max_pending_requests if b.max_pending_requests is not None else a.max_pending_requests
        ),
        max_concurrent_requests=(
            b.max_concurrent_requests
            if b.max_concurrent_requests is not None
            else a.max_concurrent_requests
        ),
    )


def chain_routing(
    chain: CompiledDiscoveryChain,
    *,
    upstream_config: UpstreamConfig | None = None,
    router_meta: Mapping[str, str] | None = None,
    mirrors: Mapping[str, CompiledDiscoveryChain] | None = None,
) -> ChainRouting:
    """The whole routing of one upstream, or `ChainRejected` naming what cannot be applied.
    `mirrors`: the compiled chain of each mirror the router's Meta names (`mirror_services`),
    whose start cluster receives the copies (with the default limits and ejection: the
    caller's `UpstreamConfig` is for the upstream, not its mirror)."""
    ignored: list[str] = []
    clusters: dict[str, tuple[str, ...]] = {}
    targets: dict[str, TargetSettings] = {}
    _collect(chain, _limits(upstream_config), _ejection(upstream_config), clusters, targets)
    mirror_clusters: dict[str, str] = {}
    for name, mirror_chain in (mirrors or {}).items():
        _collect(mirror_chain, Limits(), (DEFAULT_EJECTION,), clusters, targets)
        mirror_clusters[name] = _first_cluster(mirror_chain, mirror_chain.start_node)
    start = chain.nodes.get(chain.start_node)
    if start is None:
        raise ChainRejected(f"start node {chain.start_node!r} is not in the chain")
    meta = router_meta or {}
    routes: list[Route] = []
    default: RouteAction
    if start.type == "router":
        for n, r in enumerate(start.routes):
            where = f"router {start.name!r} route {n}"
            dest = r.definition.destination
            action = _action(
                chain, r.next_node, dest=dest, meta=meta, n=n, where=where, mirrors=mirror_clusters
            )
            http = r.definition.match.http if r.definition.match is not None else None
            match = _match(http, where)
            try:
                routes.append(Route(match, action))
            except ValueError as exc:
                raise ChainRejected(f"{where}: {exc}") from None
        # The compiler always appends the catch-all route last: it is the table's default.
        if not routes:
            raise ChainRejected(f"router {start.name!r} has no routes")
        default = routes.pop().action
        _no_stray_keys(meta, len(start.routes), f"router {start.name!r}")
    else:
        default = _action(
            chain, chain.start_node, dest=None, meta=meta, n=-1, where="start node", mirrors={}
        )
    start_cluster = _first_cluster(chain, chain.start_node)
    return ChainRouting(
        chain.service_name,
        chain.protocol,
        RouteTable(tuple(routes), default),
        MappingProxyType(clusters),
        MappingProxyType(targets),
        start_cluster,
        tuple(ignored),
    )


def _collect(
    chain: CompiledDiscoveryChain,
    limits: Limits,
    ejection: tuple[EjectionPolicy, ...],
    clusters: dict[str, tuple[str, ...]],
    targets: dict[str, TargetSettings],
) -> None:
    """Each resolver node of `chain` as a route cluster (its target, then its failover
    targets) and each of those targets' settings."""
    for node in chain.nodes.values():
        if node.type != "resolver" or node.resolver is None:
            continue
        resolver = node.resolver
        order = (resolver.target, *(resolver.failover.targets if resolver.failover else ()))
        clusters.setdefault(resolver.target, order)
        balancer = _balancer(node)
        for tid in order:
            if tid in targets:
                continue
            t = chain.targets.get(tid)
            if t is None:
                raise ChainRejected(f"resolver {node.name!r}: unknown target {tid!r}")
            timeout_ns = t.connect_timeout_ns or resolver.connect_timeout_ns
            targets[tid] = TargetSettings(
                id=tid,
                service=t.service,
                datacenter=t.datacenter,
                peer=t.peer,
                filter=t.subset.filter,
                only_passing=t.subset.only_passing,
                sni=t.sni,
                connect_timeout=timeout_ns / 1e9 if timeout_ns else DEFAULT_CONNECT_TIMEOUT,
                balancer=balancer,
                limits=limits,
                ejection=ejection,
            )


def _first_cluster(chain: CompiledDiscoveryChain, key: str) -> str:
    node = chain.nodes[key]
    if node.resolver is not None:
        return node.resolver.target
    if node.splits:
        return _first_cluster(chain, node.splits[0].next_node)
    if node.routes:
        return _first_cluster(chain, node.routes[-1].next_node)
    raise ChainRejected(f"node {key!r} leads to no resolver")


def _limits(cfg: UpstreamConfig | None) -> Limits:
    lim = cfg.limits if cfg is not None else None
    if lim is None:
        return Limits()
    return Limits(
        max_connections=lim.max_connections or 0,
        max_pending_requests=lim.max_pending_requests or 0,
        max_concurrent_requests=lim.max_concurrent_requests or 0,
    )


def _ejection(cfg: UpstreamConfig | None) -> tuple[EjectionPolicy, ...]:
    phc: PassiveHealthCheck | None = cfg.passive_health_check if cfg is not None else None
    if phc is None:
        return (DEFAULT_EJECTION,)
    base = phc.base_ejection_time_ns
    return (
        DEFAULT_EJECTION,
        EjectionPolicy.passive_health_check(
            max_failures=phc.max_failures,
            max_ejection_percent=phc.max_ejection_percent or 0,
            base_ejection_time=base / 1e9 if base else 30.0,
        ),
    )


_POLICIES = {
    "": None,
    "random": Policy.RANDOM,
    "round_robin": Policy.ROUND_ROBIN,
    "least_request": Policy.LEAST_REQUEST,
    "ring_hash": Policy.RING_HASH,
    "maglev": Policy.MAGLEV,
}


def _balancer(node: DiscoveryGraphNode) -> BalancerConfig:
    lb: LoadBalancer | None = node.load_balancer
    if lb is None:
        return BalancerConfig()
    where = f"resolver {node.name!r} LoadBalancer"
    if lb.policy not in _POLICIES:
        raise ChainRejected(f"{where}: unknown Policy {lb.policy!r}")
    policy = _POLICIES[lb.policy]
    kwargs: dict[str, object] = {}
    if policy is not None:
        kwargs["policy"] = policy
    if lb.least_request_config is not None and lb.least_request_config.choice_count:
        kwargs["choice_count"] = lb.least_request_config.choice_count
    ring = lb.ring_hash_config
    if ring is not None:
        if ring.minimum_ring_size:
            kwargs["minimum_ring_size"] = ring.minimum_ring_size
        if ring.maximum_ring_size:
            kwargs["maximum_ring_size"] = ring.maximum_ring_size
    hashes = []
    for hp in lb.hash_policies:
        cc = hp.cookie_config
        # Consul gives Envoy a cookie ttl only for TTL (its value) or Session (zero): those
        # generate the cookie; Path alone does not (xds routes.go, makeHashPolicies).
        ttl = None
        if cc is not None and cc.session:
            ttl = 0.0
        elif cc is not None and cc.ttl_ns:
            ttl = cc.ttl_ns / 1e9
        hashes.append(
            HashPolicy(
                field=hp.field,
                field_value=hp.field_value,
                source_ip=hp.source_ip,
                terminal=hp.terminal,
                cookie_ttl=ttl if hp.field == "cookie" else None,
                cookie_path=cc.path if cc is not None else "",
            )
        )
    kwargs["hash_policies"] = tuple(hashes)
    try:
        return BalancerConfig(**kwargs)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ChainRejected(f"{where}: {exc}") from None


def _regex(text: str, where: str) -> re.Pattern[bytes]:
    try:
        return re.compile(text.encode())
    except re.error as exc:
        raise ChainRejected(f"{where}: regex {text!r}: {exc}") from None


def _match(http: HTTPMatch | None, where: str) -> RouteMatch:
    if http is None:
        return RouteMatch(path_prefix=b"/")
    headers = []
    for h in http.header:
        name = h.name.lower().encode()
        if h.exact:
            headers.append(HeaderMatch(name, exact=h.exact.encode(), invert=h.invert))
        elif h.prefix:
            headers.append(HeaderMatch(name, prefix=h.prefix.encode(), invert=h.invert))
        elif h.suffix:
            headers.append(HeaderMatch(name, suffix=h.suffix.encode(), invert=h.invert))
        elif h.regex:
            pattern = _regex(h.regex, f"{where} header {h.name!r}")
            headers.append(HeaderMatch(name, regex=pattern, invert=h.invert))
        else:
            headers.append(HeaderMatch(name, present=True, invert=h.invert))
    query = []
    for q in http.query_param:
        name = q.name.encode()
        if q.exact:
            query.append(QueryMatch(name, exact=q.exact.encode()))
        elif q.regex:
            query.append(QueryMatch(name, regex=_regex(q.regex, f"{where} query {q.name!r}")))
        else:
            query.append(QueryMatch(name, present=True))
    path: dict[str, object] = {}
    if http.path_exact:
        path["path_exact"] = http.path_exact.encode()
    elif http.path_regex:
        path["path_regex"] = _regex(http.path_regex, f"{where} PathRegex")
    else:
        # Consul (makeRouteMatchForDiscoveryRoute): no path given matches the prefix "/".
        path["path_prefix"] = (http.path_prefix or "/").encode()
    try:
        return RouteMatch(
            methods=frozenset(m.upper().encode() for m in http.methods),
            headers=tuple(headers),
            query=tuple(query),
            **path,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise ChainRejected(f"{where}: {exc}") from None


def _edits(mods: HeaderModifiers | None, where: str) -> HeaderEdits:
    if mods is None:
        return NO_EDITS
    try:
        return HeaderEdits(
            add=tuple((k.lower().encode(), v.encode()) for k, v in mods.add.items()),
            set=tuple((k.lower().encode(), v.encode()) for k, v in mods.set.items()),
            remove=frozenset(k.lower().encode() for k in mods.remove),
        )
    except ValueError as exc:
        raise ChainRejected(f"{where}: {exc}") from None


def _retry(dest: RouteDestination | None, per_try: float | None, where: str) -> RetryPolicy:
    if dest is None or not (
        dest.num_retries
        or dest.retry_on_connect_failure
        or dest.retry_on
        or dest.retry_on_status_codes
    ):
        return DEFAULT_RETRY
    flags: set[str] = set()
    statuses = set(dest.retry_on_status_codes)
    for value in dest.retry_on:
        got = RETRY_ON.get(value)
        if got is None:
            raise ChainRejected(f"{where}: RetryOn {value!r} is not a known condition")
        for flag in got:
            if flag.startswith("status:"):
                statuses.add(int(flag.removeprefix("status:")))
            elif flag != "ignored":
                flags.add(flag)
    # Envoy retries a per-try timeout only under 5xx, gateway-error or reset.
    on_timeout = "on_timeout" in flags and per_try is not None
    return RetryPolicy(
        num_retries=dest.num_retries or 1,
        on_reset="on_reset" in flags or DEFAULT_RETRY.on_reset,
        on_refused=True,
        on_status=frozenset(statuses),
        on_5xx="on_5xx" in flags,
        on_gateway_error="on_gateway_error" in flags,
        on_timeout=on_timeout,
        # Envoy's fully jittered exponential back-off with its 25 ms base.
        backoff=0.025,
    )


@dataclass(frozen=True, slots=True)
class RouteExtensions:
    """What a router's `meshlet.io/route.<n>.*` Meta keys ask of route n."""

    per_try_timeout: float | None = None
    fault: Fault | None = None
    mirror: str = ""
    """`service` or `service/subset`; the agent compiles its chain (`mirrors`)."""
    mirror_percent: float = 100.0


def _key(n: int, feature: str) -> str:
    return f"{META_ROUTE}{n}.{feature}"


def _seconds(meta: Mapping[str, str], n: int, feature: str, where: str) -> float | None:
    text = meta.get(_key(n, feature))
    if text is None:
        return None
    from traffic.durations import parse_duration

    try:
        ns = parse_duration(text)
    except ValueError as exc:
        raise ChainRejected(f"{where}: Meta {_key(n, feature)}: {exc}") from None
    if ns <= 0:
        raise ChainRejected(f"{where}: Meta {_key(n, feature)} must be positive")
    return ns / 1e9


def _percent(meta: Mapping[str, str], n: int, feature: str, where: str) -> float:
    text = meta.get(_key(n, feature))
    if text is None:
        return 100.0  # Istio: unset means every request
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:  # (also refuses nan)
        raise ChainRejected(
            f"{where}: Meta {_key(n, feature)}: {text!r} is not a percentage from 0 to 100"
        )
    return value


def route_extensions(meta: Mapping[str, str], n: int, where: str) -> RouteExtensions:
    """Route n's meshlet.io Meta keys, checked; an unknown or malformed one rejects the
    chain (a misspelt key would otherwise be silently ignored)."""
    prefix = f"{META_ROUTE}{n}."
    for key in meta:
        if key.startswith(prefix) and key.removeprefix(prefix) not in ROUTE_FEATURES:
            raise ChainRejected(f"{where}: Meta {key} is not a meshlet route key")
    fault = None
    delay = _seconds(meta, n, FAULT_DELAY, where)
    status_text = meta.get(_key(n, FAULT_ABORT_STATUS))
    status = 0
    if status_text is not None:
        status = int(status_text) if status_text.isdigit() else 0
        if not 200 <= status <= 599:
            raise ChainRejected(
                f"{where}: Meta {_key(n, FAULT_ABORT_STATUS)}: {status_text!r} is not an HTTP "
                "status from 200 to 599"
            )
    for orphan, needs in ((FAULT_DELAY_PERCENT, delay), (FAULT_ABORT_PERCENT, status or None)):
        if _key(n, orphan) in meta and needs is None:
            raise ChainRejected(f"{where}: Meta {_key(n, orphan)} without its fault")
    if delay is not None or status:
        fault = Fault(
            abort_status=status,
            abort_percent=_percent(meta, n, FAULT_ABORT_PERCENT, where),
            delay=delay or 0.0,
            delay_percent=_percent(meta, n, FAULT_DELAY_PERCENT, where),
        )
    mirror = meta.get(_key(n, MIRROR), "")
    if _key(n, MIRROR_PERCENT) in meta and not mirror:
        raise ChainRejected(f"{where}: Meta {_key(n, MIRROR_PERCENT)} without {_key(n, MIRROR)}")
    if mirror and not _MIRROR.fullmatch(mirror):
        raise ChainRejected(
            f"{where}: Meta {_key(n, MIRROR)}: {mirror!r} is not `service` or `service/subset`"
        )
    return RouteExtensions(
        per_try_timeout=_seconds(meta, n, PER_TRY_TIMEOUT, where),
        fault=fault,
        mirror=mirror,
        mirror_percent=_percent(meta, n, MIRROR_PERCENT, where) if mirror else 100.0,
    )


def _no_stray_keys(meta: Mapping[str, str], routes: int, where: str) -> None:
    """A meshlet.io route key for a route the router does not have would be ignored
    silently (the routes were reordered or removed by hand): refused instead."""
    for key in meta:
        if key.startswith(META_ROUTE):
            n = key[len(META_ROUTE) :].partition(".")[0]
            if not (n.isdigit() and int(n) < routes):
                raise ChainRejected(f"{where}: Meta {key} names no route of the router")


def mirror_services(meta: Mapping[str, str]) -> frozenset[str]:
    """Every mirror (`service` or `service/subset`) a router's Meta names: the chains the
    agent compiles beside the upstream's (`chain_routing`'s `mirrors`)."""
    return frozenset(
        v for k, v in meta.items() if k.startswith(META_ROUTE) and k.endswith("." + MIRROR) and v
    )


def _action(
    chain: CompiledDiscoveryChain,
    next_node: str,
    *,
    dest: RouteDestination | None,
    meta: Mapping[str, str],
    n: int,
    where: str,
    mirrors: Mapping[str, str],
) -> RouteAction:
    node = chain.nodes.get(next_node)
    if node is None:
        raise ChainRejected(f"{where}: next node {next_node!r} is not in the chain")
    request = _edits(dest.request_headers if dest else None, where)
    response = _edits(dest.response_headers if dest else None, where)
    destinations: tuple[WeightedCluster, ...]
    resolver_timeout = 0
    if node.type == "splitter":
        legs = []
        for s in node.splits:
            target_node = chain.nodes.get(s.next_node)
            if target_node is None or target_node.resolver is None:
                raise ChainRejected(f"splitter {node.name!r}: leg {s.next_node!r} is no resolver")
            # Each leg keeps its own edits (Envoy's weighted-cluster header edits), applied
            # before the route's: a route Set of the same name wins.
            legs.append(
                WeightedCluster(
                    target_node.resolver.target,
                    s.hundredths,
                    request_headers=_edits(s.definition.request_headers, f"splitter {node.name!r}"),
                    response_headers=_edits(
                        s.definition.response_headers, f"splitter {node.name!r}"
                    ),
                )
            )
        destinations = tuple(legs)
    elif node.resolver is not None:
        destinations = (WeightedCluster(node.resolver.target),)
        resolver_timeout = node.resolver.request_timeout_ns
    else:
        raise ChainRejected(f"{where}: next node {next_node!r} is a {node.type}")
    idle_ns = dest.idle_timeout_ns if dest is not None else 0
    timeout_ns = (dest.request_timeout_ns if dest is not None else 0) or resolver_timeout
    ext = route_extensions(meta, n, where) if n >= 0 else RouteExtensions()
    mirror = None
    if ext.mirror:
        cluster = mirrors.get(ext.mirror)
        if cluster is None:
            raise ChainRejected(f"{where}: Meta {_key(n, MIRROR)}: no chain for {ext.mirror!r}")
        mirror = Mirror(cluster, ext.mirror_percent)
    prefix = dest.prefix_rewrite.encode() if dest is not None and dest.prefix_rewrite else None
    try:
        return RouteAction(
            destinations,
            prefix_rewrite=prefix,
            request_headers=request,
            response_headers=response,
            retry=_retry(dest, ext.per_try_timeout, where),
            request_timeout=timeout_ns / 1e9 if timeout_ns else DEFAULT_REQUEST_TIMEOUT,
            try_timeout=ext.per_try_timeout,
            idle_timeout=idle_ns / 1e9 if idle_ns > 0 else None,
            fault=ext.fault,
            mirror=mirror,
        )
    except ValueError as exc:
        raise ChainRejected(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """What one upstream listener applies at once: the routing and, per target id, the
    endpoints of its instances (the agent's health watch of that target)."""

    routing: ChainRouting
    endpoints: Mapping[str, tuple[Target, ...]]
    index: int = 0
    """The config-entry index the routing was compiled at (for status)."""
