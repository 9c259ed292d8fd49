"""The discovery chain, compiled from routing entries as Consul's servers compile it.

`compile_chain` follows consul `agent/consul/discoverychain/compile.go`: the router of the
chain's own service (only that one), splitters followed and flattened, resolvers with redirect,
default subset, subset check, connect timeout (5 s when unset), failover targets; protocol
consistency; circular references. Target IDs and SNI follow `agent/structs/discovery_chain.go`
(`chainID`) and `agent/connect/sni.go` (`ServiceSNI`). `to_json` renders
`GET /v1/discovery-chain/:service`'s `Chain` as Consul marshals `CompiledDiscoveryChain`.

The result is frozen; the compiler's working state lives only inside one call.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from traffic.decoding import float32
from traffic.defaults import (
    PROXY_DEFAULTS,
    SERVICE_DEFAULTS,
    ProxyDefaults,
    ServiceDefaults,
    proxy_defaults_from_json,
    service_defaults_from_json,
)
from traffic.durations import format_duration
from traffic.entries import (
    KINDS,
    FailoverPolicy,
    HTTPMatch,
    LoadBalancer,
    Route,
    RouteDestination,
    RouteMatch,
    RoutingEntry,
    ServiceResolver,
    ServiceRouter,
    ServiceSplitter,
    Split,
    Subset,
    entry_from_json,
    go_quote,
    is_http_like,
    normalize_weight,
    scale_weight,
    weight_json,
)
from traffic.errors import GraphError

DEFAULT = "default"
DEFAULT_CONNECT_TIMEOUT_NS = 5_000_000_000
MESH_GATEWAY_MODES = ("", "none", "local", "remote")


# ---- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainEntries:
    """Every entry a chain may read, by service name (CE: one namespace and partition)."""

    routers: Mapping[str, ServiceRouter] = field(default_factory=lambda: MappingProxyType({}))
    splitters: Mapping[str, ServiceSplitter] = field(default_factory=lambda: MappingProxyType({}))
    resolvers: Mapping[str, ServiceResolver] = field(default_factory=lambda: MappingProxyType({}))
    services: Mapping[str, ServiceDefaults] = field(default_factory=lambda: MappingProxyType({}))
    proxy_defaults: ProxyDefaults | None = None

    @classmethod
    def of(
        cls,
        entries: Iterable[RoutingEntry | ServiceDefaults | ProxyDefaults],
    ) -> ChainEntries:
        routers, splitters, resolvers, services = {}, {}, {}, {}
        proxy: ProxyDefaults | None = None
        for entry in entries:
            if isinstance(entry, ServiceRouter):
                routers[entry.name] = entry
            elif isinstance(entry, ServiceSplitter):
                splitters[entry.name] = entry
            elif isinstance(entry, ServiceResolver):
                resolvers[entry.name] = entry
            elif isinstance(entry, ServiceDefaults):
                services[entry.name] = entry
            else:
                proxy = entry
        return cls(
            MappingProxyType(routers),
            MappingProxyType(splitters),
            MappingProxyType(resolvers),
            MappingProxyType(services),
            proxy,
        )

    @classmethod
    def from_json(cls, bodies: Iterable[Mapping[str, Any]]) -> ChainEntries:
        """From stored entries' canonical JSON (kinds other than the five are skipped)."""
        models: list[RoutingEntry | ServiceDefaults | ProxyDefaults] = []
        for body in bodies:
            kind = body.get("Kind")
            if kind in KINDS:
                models.append(entry_from_json(body))
            elif kind == SERVICE_DEFAULTS:
                models.append(service_defaults_from_json(body))
            elif kind == PROXY_DEFAULTS:
                models.append(proxy_defaults_from_json(body))
        return cls.of(models)


@dataclass(frozen=True, slots=True)
class CompileRequest:
    """`CompileRequest`: where the chain is evaluated, and an upstream's overrides."""

    service: str
    trust_domain: str
    datacenter: str = "dc1"
    namespace: str = DEFAULT
    partition: str = DEFAULT
    override_protocol: str = ""
    override_connect_timeout_ns: int = 0
    override_mesh_gateway_mode: str = ""


# ---- the compiled chain ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveryTarget:
    """A set of instances to query: service/subset in a datacenter, with its TLS name."""

    id: str
    service: str
    service_subset: str
    namespace: str
    partition: str
    datacenter: str
    peer: str = ""
    mesh_gateway_mode: str = ""
    subset: Subset = field(default_factory=Subset)
    dialed_directly: bool = False
    connect_timeout_ns: int = 0
    external: bool = False
    sni: str = ""
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.connect_timeout_ns:
            out["ConnectTimeout"] = format_duration(self.connect_timeout_ns)
        out["ID"] = self.id
        for key, value in (
            ("Service", self.service),
            ("ServiceSubset", self.service_subset),
            ("Namespace", self.namespace),
            ("Partition", self.partition),
            ("Datacenter", self.datacenter),
            ("Peer", self.peer),
        ):
            if value:
                out[key] = value
        # Non-pointer structs: encoding/json always writes them, even when empty.
        out["MeshGateway"] = {"Mode": self.mesh_gateway_mode} if self.mesh_gateway_mode else {}
        out["Subset"] = self.subset.to_json()
        out["TransparentProxy"] = {"DialedDirectly": True} if self.dialed_directly else {}
        if self.external:
            out["External"] = True
        if self.sni:
            out["SNI"] = self.sni
        if self.name:
            out["Name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class DiscoveryFailover:
    targets: tuple[str, ...] = ()
    policy: FailoverPolicy | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.targets:
            out["Targets"] = list(self.targets)
        if self.policy is not None:
            out["Policy"] = self.policy.to_json()
        return out


@dataclass(frozen=True, slots=True)
class DiscoveryResolver:
    default: bool
    connect_timeout_ns: int
    request_timeout_ns: int
    target: str
    failover: DiscoveryFailover | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.connect_timeout_ns:
            out["ConnectTimeout"] = format_duration(self.connect_timeout_ns)
        if self.default:
            out["Default"] = True
        if self.request_timeout_ns:
            # No custom marshaller for this one: encoding/json writes the nanoseconds.
            out["RequestTimeout"] = self.request_timeout_ns
        if self.target:
            out["Target"] = self.target
        if self.failover is not None:
            out["Failover"] = self.failover.to_json()
        return out


@dataclass(frozen=True, slots=True)
class DiscoveryRoute:
    definition: Route
    next_node: str

    def to_json(self) -> dict[str, Any]:
        return {"Definition": self.definition.to_json(), "NextNode": self.next_node}


@dataclass(frozen=True, slots=True)
class DiscoverySplit:
    """A split leg: `weight` is the effective (flattened) weight, the one a proxy must use."""

    definition: Split
    weight: float
    next_node: str

    @property
    def hundredths(self) -> int:
        """The weight in 0.01 % units (out of 10000), as Envoy's weighted clusters take it."""
        return scale_weight(self.weight)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Definition": self.definition.to_json()}
        if self.weight:
            out["Weight"] = weight_json(self.weight)
        out["NextNode"] = self.next_node
        return out


@dataclass(frozen=True, slots=True)
class DiscoveryGraphNode:
    """A router, splitter or resolver node; the map key is `<type>:<name>`."""

    type: str
    name: str
    routes: tuple[DiscoveryRoute, ...] = ()
    splits: tuple[DiscoverySplit, ...] = ()
    resolver: DiscoveryResolver | None = None
    load_balancer: LoadBalancer | None = None

    @property
    def key(self) -> str:
        return f"{self.type}:{self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Type": self.type, "Name": self.name}
        if self.routes:
            out["Routes"] = [r.to_json() for r in self.routes]
        if self.splits:
            out["Splits"] = [s.to_json() for s in self.splits]
        if self.resolver is not None:
            out["Resolver"] = self.resolver.to_json()
        if self.load_balancer is not None:
            out["LoadBalancer"] = self.load_balancer.to_json()
        return out


@dataclass(frozen=True, slots=True)
class CompiledDiscoveryChain:
    service_name: str
    namespace: str
    partition: str
    datacenter: str
    protocol: str
    start_node: str
    nodes: Mapping[str, DiscoveryGraphNode]
    targets: Mapping[str, DiscoveryTarget]
    default: bool = False
    customization_hash: str = ""
    service_meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    envoy_extensions: tuple[Mapping[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ServiceName": self.service_name,
            "Namespace": self.namespace,
            "Partition": self.partition,
            "Datacenter": self.datacenter,
        }
        if self.customization_hash:
            out["CustomizationHash"] = self.customization_hash
        if self.default:
            out["Default"] = True
        if self.protocol:
            out["Protocol"] = self.protocol
        if self.service_meta:
            out["ServiceMeta"] = dict(self.service_meta)
        if self.envoy_extensions:
            out["EnvoyExtensions"] = [dict(e) for e in self.envoy_extensions]
        out["StartNode"] = self.start_node
        out["Nodes"] = {k: self.nodes[k].to_json() for k in sorted(self.nodes)}
        out["Targets"] = {k: self.targets[k].to_json() for k in sorted(self.targets)}
        return out


# ---- names -----------------------------------------------------------------------------------


def chain_id(
    service: str, subset: str, *, namespace: str, partition: str, datacenter: str, peer: str = ""
) -> str:
    """`chainID`: `[subset.]service.namespace.partition.datacenter` (peers differ)."""
    if peer:
        return f"{service}.{namespace}.default.external.{peer}"
    if not subset:
        return f"{service}.{namespace}.{partition}.{datacenter}"
    return f"{subset}.{service}.{namespace}.{partition}.{datacenter}"


def service_sni(
    service: str,
    subset: str,
    *,
    namespace: str,
    partition: str,
    datacenter: str,
    trust_domain: str,
) -> str:
    """`connect.ServiceSNI`: the TLS server name of a target."""
    namespace = namespace or DEFAULT
    partition = partition or DEFAULT
    head = [subset, service] if subset else [service]
    if partition == DEFAULT:
        return ".".join([*head, namespace, datacenter, "internal", trust_domain])
    return ".".join([*head, namespace, partition, datacenter, "internal-v1", trust_domain])


# ---- the compiler ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Target:
    service: str
    service_subset: str
    namespace: str
    partition: str
    datacenter: str
    peer: str
    id: str = ""
    mesh_gateway_mode: str = ""
    subset: Subset = field(default_factory=Subset)
    dialed_directly: bool = False
    connect_timeout_ns: int = 0
    external: bool = False
    sni: str = ""
    name: str = ""

    def freeze(self) -> DiscoveryTarget:
        return DiscoveryTarget(
            id=self.id,
            service=self.service,
            service_subset=self.service_subset,
            namespace=self.namespace,
            partition=self.partition,
            datacenter=self.datacenter,
            peer=self.peer,
            mesh_gateway_mode=self.mesh_gateway_mode,
            subset=self.subset,
            dialed_directly=self.dialed_directly,
            connect_timeout_ns=self.connect_timeout_ns,
            external=self.external,
            sni=self.sni,
            name=self.name,
        )


@dataclass(slots=True)
class _Node:
    type: str
    name: str
    routes: list[DiscoveryRoute] = field(default_factory=list)
    splits: list[DiscoverySplit] = field(default_factory=list)
    resolver: DiscoveryResolver | None = None
    load_balancer: LoadBalancer | None = None

    @property
    def key(self) -> str:
        return f"{self.type}:{self.name}"


class _Compiler:
    def __init__(self, req: CompileRequest, entries: ChainEntries) -> None:
        self.req = req
        self.entries = entries
        self.resolvers: dict[str, ServiceResolver] = dict(entries.resolvers)
        self.splitter_nodes: dict[str, _Node] = {}
        self.resolve_nodes: dict[str, _Node] = {}
        self.nodes: dict[str, _Node] = {}
        self.loaded: dict[str, _Target] = {}
        self.retained: set[str] = set()
        self.protocol = ""
        self.uses_advanced = False
        self.disable_advanced = bool(req.override_protocol) and not is_http_like(
            req.override_protocol
        )
        self.customized_protocol = False
        self.customized_timeout = False
        self.customized_gateway = False
        self.start_node = ""

    # -- protocol

    def record_service_protocol(self, service: str) -> None:
        defaults = self.entries.services.get(service)
        if defaults is not None:
            self.record_protocol(service, defaults.protocol)
            return
        proxy = self.entries.proxy_defaults
        if proxy is not None and proxy.protocol:
            self.record_protocol(service, proxy.protocol)
            return
        self.record_protocol(service, "")

    def record_protocol(self, service: str, protocol: str) -> None:
        protocol = protocol.lower() if protocol else "tcp"
        if not self.protocol:
            self.protocol = protocol
        elif self.protocol != protocol:
            raise GraphError(
                f"discovery chain {go_quote(self.req.service)} uses inconsistent protocols; "
                f"service {go_quote(service)} has {go_quote(protocol)} which is not "
                f"{go_quote(self.protocol)}"
            )

    # -- nodes and targets

    def record_node(self, node: _Node) -> None:
        if node.type == "splitter":
            self.splitter_nodes[node.name] = node
        elif node.type == "resolver":
            assert node.resolver is not None
            self.resolve_nodes[node.resolver.target] = node
        self.nodes[node.key] = node

    def new_target(
        self,
        service: str,
        subset: str = "",
        *,
        namespace: str = "",
        partition: str = "",
        datacenter: str = "",
        peer: str = "",
    ) -> _Target:
        if peer:
            datacenter, partition, namespace = "", DEFAULT, namespace or DEFAULT
        else:
            datacenter = datacenter or self.req.datacenter
            namespace = namespace or self.req.namespace
            partition = partition or self.req.partition
        target = _Target(service, subset, namespace, partition, datacenter, peer)
        target.id = chain_id(
            service,
            subset,
            namespace=namespace,
            partition=partition,
            datacenter=datacenter,
            peer=peer,
        )
        if not peer:
            target.sni = service_sni(
                service,
                subset,
                namespace=namespace,
                partition=partition,
                datacenter=datacenter,
                trust_domain=self.req.trust_domain,
            )
            target.name = target.sni
        previous = self.loaded.get(target.id)
        if previous is not None:
            return previous
        self.loaded[target.id] = target
        return target

    def rewrite_target(
        self,
        target: _Target,
        *,
        service: str = "",
        subset: str = "",
        namespace: str = "",
        partition: str = "",
        datacenter: str = "",
        peer: str = "",
    ) -> _Target:
        merged_service = target.service
        merged_subset = target.service_subset
        if service and service != merged_service:
            merged_service = service
            merged_subset = ""  # another service's subsets are not ours
        if subset:
            merged_subset = subset
        merged_partition = partition or target.partition
        merged_namespace = namespace if (namespace or peer) else target.namespace
        merged_dc = datacenter or target.datacenter
        return self.new_target(
            merged_service,
            merged_subset,
            namespace=merged_namespace,
            partition=merged_partition,
            datacenter=merged_dc,
            peer=peer,
        )

    # -- assembly

    def assemble(self) -> None:
        service = self.req.service
        proxy = self.entries.proxy_defaults
        self.envoy_extensions: list[Mapping[str, Any]] = (
            list(proxy.envoy_extensions) if proxy is not None else []
        )
        self.service_meta: Mapping[str, str] = MappingProxyType({})
        defaults = self.entries.services.get(service)
        if defaults is not None:
            self.service_meta = defaults.meta
            self.envoy_extensions += defaults.envoy_extensions

        router = self.entries.routers.get(service)
        if router is not None and self.disable_advanced:
            router = None
            self.customized_protocol = True
        if router is None:
            node = self.splitter_or_resolver_node(self.new_target(service))
            self.start_node = node.key
            return

        route_node = _Node("router", f"{router.name}.{DEFAULT}.{DEFAULT}")
        self.uses_advanced = True
        self.record_service_protocol(router.name)
        for route in router.routes:
            dest = route.destination or RouteDestination(
                service=service, namespace=DEFAULT, partition=DEFAULT
            )
            svc = dest.service or service
            namespace = dest.namespace or DEFAULT
            partition = dest.partition or DEFAULT
            if not dest.service_subset:
                node = self.splitter_or_resolver_node(
                    self.new_target(svc, namespace=namespace, partition=partition)
                )
            else:
                node = self.resolver_node(
                    self.new_target(
                        svc, dest.service_subset, namespace=namespace, partition=partition
                    ),
                    False,
                )
            route_node.routes.append(DiscoveryRoute(route, node.key))

        default_node = self.splitter_or_resolver_node(
            self.new_target(router.name, namespace=DEFAULT, partition=DEFAULT)
        )
        catch_all = Route(
            match=RouteMatch(http=_PREFIX_SLASH),
            destination=RouteDestination(service=router.name, namespace=DEFAULT, partition=DEFAULT),
        )
        route_node.routes.append(DiscoveryRoute(catch_all, default_node.key))
        self.start_node = route_node.key
        self.record_node(route_node)

    def splitter_or_resolver_node(self, target: _Target) -> _Node:
        node = self.splitter_node(target.service)
        if node is not None:
            return node
        return self.resolver_node(target, False)

    def splitter_node(self, service: str) -> _Node | None:
        name = f"{service}.{DEFAULT}.{DEFAULT}"
        previous = self.splitter_nodes.get(name)
        if previous is not None:
            return previous
        splitter = self.entries.splitters.get(service)
        if splitter is not None and self.disable_advanced:
            splitter = None
            self.customized_protocol = True
        if splitter is None:
            return None
        node = _Node("splitter", name)
        # Recorded before recursing, so that a loop below finds it and stops.
        self.record_node(node)
        has_lb = False
        for split in splitter.splits:
            svc = split.service or service
            if svc != service and not split.service_subset:
                nested = self.splitter_node(svc)
                if nested is not None:
                    node.splits.append(DiscoverySplit(split, split.weight, nested.key))
                    continue
            resolver_node = self.resolver_node(
                self.new_target(svc, split.service_subset, namespace=DEFAULT, partition=DEFAULT),
                False,
            )
            node.splits.append(DiscoverySplit(split, split.weight, resolver_node.key))
            lb = resolver_node.load_balancer
            if not has_lb and lb is not None and lb.is_hash_based():
                node.load_balancer = lb
                has_lb = True
        self.uses_advanced = True
        return node

    def resolver(self, service: str) -> ServiceResolver:
        resolver = self.resolvers.get(service)
        if resolver is None:
            resolver = ServiceResolver(name=service)
            self.resolvers[service] = resolver
        return resolver

    def resolver_node(self, target: _Target, recursed_for_failover: bool) -> _Node:
        history: set[str] = set()
        order: list[str] = []
        while True:
            previous = self.resolve_nodes.get(target.id)
            if previous is not None:
                return previous
            if not target.peer:
                self.record_service_protocol(target.service)
            resolver = self.resolver(target.service)
            if target.id in history:
                order.append(target.id)
                raise GraphError(f"detected circular resolver redirect: [{' -> '.join(order)}]")
            history.add(target.id)
            order.append(target.id)
            redirect = resolver.redirect
            if redirect is not None:
                redirected = self.rewrite_target(
                    target,
                    service=redirect.service,
                    subset=redirect.service_subset,
                    namespace=redirect.namespace,
                    partition=redirect.partition,
                    datacenter=redirect.datacenter,
                    peer=redirect.peer,
                )
                if redirected.id != target.id:
                    target = redirected
                    continue
            if not target.service_subset and resolver.default_subset:
                target = self.rewrite_target(target, subset=resolver.default_subset)
                continue
            break
        if target.service_subset and not resolver.subset_exists(target.service_subset):
            raise GraphError(
                f"service {go_quote(target.service)} does not have a subset named "
                f"{go_quote(target.service_subset)}"
            )
        connect_timeout = resolver.connect_timeout_ns
        if connect_timeout < 1:
            connect_timeout = DEFAULT_CONNECT_TIMEOUT_NS
        override = self.req.override_connect_timeout_ns
        if override > 0 and connect_timeout != override:
            connect_timeout = override
            self.customized_timeout = True
        target.connect_timeout_ns = connect_timeout
        node = _Node(
            "resolver",
            target.id,
            resolver=DiscoveryResolver(
                default=resolver.is_default(),
                connect_timeout_ns=connect_timeout,
                request_timeout_ns=resolver.request_timeout_ns,
                target=target.id,
            ),
            load_balancer=resolver.load_balancer,
        )
        target.subset = resolver.subsets.get(target.service_subset, Subset())
        defaults = self.entries.services.get(target.service)
        if defaults is not None and defaults.external_sni:
            target.sni = defaults.external_sni
            target.external = True
        if target.external:
            for present, what in (
                (resolver.redirect is not None, "redirects"),
                (bool(resolver.subsets), "subsets"),
                (bool(resolver.failover), "failover"),
            ):
                if present:
                    raise GraphError(
                        f"service {go_quote(target.service)} has an external SNI set; "
                        f"cannot define {what} for external services"
                    )
            target.mesh_gateway_mode = ""
        else:
            if defaults is not None:
                target.mesh_gateway_mode = defaults.mesh_gateway_mode
                target.dialed_directly = defaults.dialed_directly
            proxy = self.entries.proxy_defaults
            if proxy is not None:
                if not target.mesh_gateway_mode:
                    target.mesh_gateway_mode = proxy.mesh_gateway_mode
                if not target.dialed_directly:
                    target.dialed_directly = proxy.dialed_directly
            gateway = self.req.override_mesh_gateway_mode
            if gateway and target.mesh_gateway_mode != gateway:
                target.mesh_gateway_mode = gateway
                self.customized_gateway = True
        self.retained.add(target.id)
        if recursed_for_failover:
            return node
        self.record_node(node)

        failover = resolver.failover.get(target.service_subset) or resolver.failover.get("*")
        if failover is None:
            return node
        candidates: list[_Target] = []
        if failover.datacenters:
            for dc in failover.datacenters:
                candidates.append(
                    self.rewrite_target(
                        target,
                        service=failover.service,
                        subset=failover.service_subset,
                        namespace=failover.namespace,
                        datacenter=dc,
                    )
                )
        elif failover.targets:
            for t in failover.targets:
                candidates.append(
                    self.rewrite_target(
                        target,
                        service=t.service,
                        subset=t.service_subset,
                        namespace=t.namespace,
                        partition=t.partition,
                        datacenter=t.datacenter,
                        peer=t.peer,
                    )
                )
        else:
            candidates.append(
                self.rewrite_target(
                    target,
                    service=failover.service,
                    subset=failover.service_subset,
                    namespace=failover.namespace,
                )
            )
        candidates = [c for c in candidates if c.id != target.id]  # never fail over to itself
        if candidates:
            policy = failover.policy
            if policy is None or not policy.mode:
                proxy = self.entries.proxy_defaults
                policy = proxy.failover_policy if proxy is not None else None
            ids = []
            for candidate in candidates:
                failover_node = self.resolver_node(candidate, True)
                assert failover_node.resolver is not None
                ids.append(failover_node.resolver.target)
            assert node.resolver is not None
            node.resolver = replace(node.resolver, failover=DiscoveryFailover(tuple(ids), policy))
        return node

    # -- passes over the graph

    def detect_circular_references(self) -> None:
        todo: list[str] = [self.start_node]
        visited: set[str] = set()
        visit_chain: list[str] = []
        # Nodes whose every path was walked without a loop: walking them again (Consul does)
        # finds nothing new, and splitters sharing next nodes have exponentially many paths.
        done: set[str] = set()
        while todo:
            current = todo.pop()
            if current == "_popvisit":
                if visit_chain:
                    finished = visit_chain.pop()
                    visited.discard(finished)
                    done.add(finished)
                continue
            if current in done:
                continue
            visit_chain.append(current)
            if current in visited:
                raise GraphError(f"detected circular reference: [{' -> '.join(visit_chain)}]")
            visited.add(current)
            todo.append("_popvisit")
            node = self.nodes[current]
            if node.type == "router":
                todo.extend(r.next_node for r in node.routes)
            elif node.type == "splitter":
                todo.extend(s.next_node for s in node.splits)

    def flatten_adjacent_splitters(self) -> None:
        changed_any = True
        while changed_any:
            changed_any = False
            for node in list(self.nodes.values()):
                if node.type != "splitter":
                    continue
                fixed: list[DiscoverySplit] = []
                changed = False
                for split in node.splits:
                    nxt = self.nodes[split.next_node]
                    if nxt.type != "splitter":
                        fixed.append(split)
                        continue
                    changed = True
                    for inner in nxt.splits:
                        effective = float32(float32(split.weight * inner.weight) / 100)
                        fixed.append(
                            DiscoverySplit(
                                inner.definition.merge_parent(split.definition),
                                normalize_weight(effective),
                                inner.next_node,
                            )
                        )
                if len(fixed) > _MAX_LEGS:
                    # Consul's flattening keeps every path as a leg: splitters sharing next
                    # splitters make 2**depth of them. Past 10,000 some weigh under 0.01 %.
                    raise GraphError(
                        f"discovery chain {go_quote(self.req.service)} splits into more than "
                        f"{_MAX_LEGS} legs once nested splitters are flattened "
                        "(a leg's weight is at least 0.01 %)"
                    )
                if changed:
                    node.splits = fixed
                    changed_any = True

    def remove_unused_nodes(self) -> None:
        visited: set[str] = set()
        todo = [self.start_node]
        while todo:
            name = todo.pop()
            if name in visited:
                continue
            visited.add(name)
            node = self.nodes[name]
            todo.extend(r.next_node for r in node.routes)
            todo.extend(s.next_node for s in node.splits)
        self.nodes = {k: v for k, v in self.nodes.items() if k in visited}

    def is_default_chain(self) -> bool:
        node = self.nodes.get(self.start_node)
        if node is None or node.type != "resolver" or node.resolver is None:
            return not self.nodes
        if not node.resolver.default:
            return False
        target = self.loaded[node.resolver.target]
        return (
            target.service == self.req.service
            and target.namespace == self.req.namespace
            and target.partition == self.req.partition
        )

    def compile(self) -> CompiledDiscoveryChain:
        self.assemble()
        self.detect_circular_references()
        self.flatten_adjacent_splitters()
        self.remove_unused_nodes()
        targets = {k: v for k, v in self.loaded.items() if k in self.retained}
        if not is_http_like(self.protocol) and self.uses_advanced:
            raise GraphError(
                f"discovery chain {go_quote(self.req.service)} uses a protocol "
                f"{go_quote(self.protocol)} that does not permit advanced routing or "
                "splitting behavior"
            )
        if self.req.override_protocol and self.req.override_protocol != self.protocol:
            self.protocol = self.req.override_protocol
            self.customized_protocol = True
        customization = ""
        if self.customized_protocol or self.customized_timeout or self.customized_gateway:
            customization = customization_hash(
                self.req.override_mesh_gateway_mode if self.customized_gateway else "",
                self.req.override_protocol if self.customized_protocol else "",
                self.req.override_connect_timeout_ns if self.customized_timeout else 0,
            )
        return CompiledDiscoveryChain(
            service_name=self.req.service,
            namespace=self.req.namespace,
            partition=self.req.partition,
            datacenter=self.req.datacenter,
            protocol=self.protocol,
            start_node=self.start_node,
            nodes=MappingProxyType(
                {
                    k: DiscoveryGraphNode(
                        n.type,
                        n.name,
                        tuple(n.routes),
                        tuple(n.splits),
                        n.resolver,
                        n.load_balancer,
                    )
                    for k, n in self.nodes.items()
                }
            ),
            targets=MappingProxyType({k: t.freeze() for k, t in targets.items()}),
            default=self.is_default_chain(),
            customization_hash=customization,
            service_meta=self.service_meta,
            envoy_extensions=tuple(self.envoy_extensions),
        )


_PREFIX_SLASH = HTTPMatch(path_prefix="/")
_MAX_LEGS = 10_000
"""Legs of one flattened splitter: as many as there are 0.01 % units of weight."""


def compile_chain(req: CompileRequest, entries: ChainEntries) -> CompiledDiscoveryChain:
    """Compile the chain for `req.service`; GraphError carries Consul's text."""
    try:
        return _Compiler(req, entries).compile()
    except RecursionError:
        # Go's goroutine stacks grow; Python's do not. Splitters nested hundreds deep are
        # refused with a clear error rather than crashing whoever asked.
        raise GraphError(
            f"discovery chain {go_quote(req.service)} nests splitters too deeply for this server"
        ) from None


def related_services(entries: ChainEntries) -> set[str]:
    """Every service whose chain any of `entries` can change (the chains to re-validate)."""
    names: set[str] = set(entries.routers) | set(entries.splitters) | set(entries.resolvers)
    names |= set(entries.services)
    for router in entries.routers.values():
        names |= {r.destination.service for r in router.routes if r.destination is not None}
    for splitter in entries.splitters.values():
        names |= {s.service for s in splitter.splits}
    for resolver in entries.resolvers.values():
        if resolver.redirect is not None:
            names.add(resolver.redirect.service)
        for f in resolver.failover.values():
            names.add(f.service)
            names |= {t.service for t in f.targets}
    names.discard("")
    return names


def validate_graph(entries: ChainEntries, trust_domain: str, datacenter: str = "dc1") -> None:
    """Compile every chain the entries touch, as Consul does before a write or delete.

    Raises GraphError with the first compiler error (services in sorted order).
    """
    for service in sorted(related_services(entries)):
        compile_chain(CompileRequest(service, trust_domain, datacenter), entries)


# ---- CustomizationHash: mitchellh/hashstructure (v1) over the override struct ----------------

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = 2**64 - 1


def _fnv1_64(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = (h * _FNV_PRIME) & _MASK
        h ^= byte
    return h


def _hash_ordered(a: int, b: int) -> int:
    return _fnv1_64(struct.pack("<QQ", a, b))


def _hash_struct(name: str, fields: list[tuple[str, int]]) -> int:
    h = _fnv1_64(name.encode())
    for field_name, value_hash in fields:
        h ^= _hash_ordered(_fnv1_64(field_name.encode()), value_hash)
    return h


def customization_hash(mesh_gateway_mode: str, protocol: str, connect_timeout_ns: int) -> str:
    """The first 8 hex digits of hashstructure.Hash of the overrides that changed the chain."""
    gateway = _hash_struct("MeshGatewayConfig", [("Mode", _fnv1_64(mesh_gateway_mode.encode()))])
    value = _hash_struct(
        "",
        [
            ("OverrideMeshGateway", gateway),
            ("OverrideProtocol", _fnv1_64(protocol.encode())),
            ("OverrideConnectTimeout", _fnv1_64(struct.pack("<q", connect_timeout_ns))),
        ],
    )
    return f"{value:x}"[:8]
