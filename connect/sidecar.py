"""The data plane of one sidecar, assembled from a whole spec and changed by diffing specs.

    sidecar = Sidecar(tls, authorizers, endpoints=latest_of, targets=targets_of)
    await sidecar.apply(SidecarSpec(inbound=InboundSpec(...), upstreams=(UpstreamSpec(...),)))
    await sidecar.apply(new_spec)     # a reload: only what changed is touched
    await sidecar.close(grace)

A spec is a value: what to listen on and what to speak there. `plan(old, new)` (pure) says
which listeners start, which stop and which are replaced, keyed by the address they bind, so
a listener whose spec did not change is never touched and its connections never notice a
reload. A removed listener stops accepting at once and its connections get `drain_grace`
seconds to finish; a replaced one (another protocol or destination on the same port) is
closed to new connections first, the new one bound in its place, and the old one drained in
the background, as a removed one is.

Per protocol (the assembly agent/sidecar.py and bench/proxy_sidecar.py share):
* inbound `http`: TLS terminated by an `InboundGate`, each request authorized (`InboundHTTP`);
  `tcp` (and http2/grpc, carried at L4): one decision per connection (`InboundL4`).
* upstream `http`: requests balanced over pooled mTLS connections (`OutboundHTTP`); anything
  else relayed per connection (`OutboundL4`). Each upstream's balancer is recompiled whenever
  the `Latest` its `endpoints` callback returns publishes (the agent's health watch).
  An upstream that also has a `routing` Latest is driven by its discovery chain once that
  publishes a `RoutingSnapshot` (connect.chain_routes): one `Upstream` per chain target, the
  http listener's route table and named clusters, or the tcp listener's target and failover
  chain, swapped whole per snapshot (`_Routed`).

The inbound spec's `mutual_tls_mode` (Consul's effective MutualTLSMode for the service) is
applied to the running listener, never by replacing it: permissive also admits plaintext
(connect.listener, connect.inbound); back to strict, new plaintext is refused and open
plaintext connections are closed, while mTLS connections are not touched.

TLS is whatever follows the leaf (connect.tls.DynamicTLS, or fixed contexts in the
benchmark); listeners keep one object, so a rotation never restarts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, Protocol, TypeVar

from connect.balancer import Balancer, BalancerConfig, Target, compile_balancer
from connect.chain_routes import RoutingSnapshot, TargetSettings
from connect.cluster import NO_LIMITS, Limits
from connect.dial import Upstream
from connect.http1 import HTTPLimits, InboundHTTP, OutboundHTTP
from connect.http1.origin import MeshOrigin
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4
from connect.latest import Latest
from connect.listener import ConnectionLimits
from connect.local_app import DEFAULT_LOCAL_APP, LocalAppTimeouts
from connect.observe import HTTPSide, Telemetry
from connect.peers import service_peers
from connect.seams import ConnectionAuthorizer, RequestAuthorizer
from connect.stats import ProxyStats
from connect.tracing_settings import TracingSettings
from intentions.path_normalization import PathNormalization

log = logging.getLogger("meshlet.connect.sidecar")

__all__ = [
    "InboundSpec",
    "MutualTLSMode",
    "Plan",
    "Running",
    "Sidecar",
    "SidecarSpec",
    "SidecarTLS",
    "UpstreamSpec",
    "bind_address",
    "claim_port",
    "plan",
]

S = TypeVar("S")


MutualTLSMode = Literal["strict", "permissive"]
"""Consul's MutualTLSMode as the data plane takes it ("" is strict)."""


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class InboundSpec:
    """The public mTLS listener in front of the local app."""

    protocol: str
    """What the app speaks: http (authorized per request), else relayed per connection."""
    host: str
    port: int
    app_host: str
    app_port: int
    local_uri: str
    """This sidecar's SPIFFE ID (who the app is told it was reached as)."""
    path_normalization: PathNormalization = "base"
    mutual_tls_mode: MutualTLSMode = "strict"
    """permissive: plaintext is accepted too, with no identity (only intentions whose source
    is `*` can allow it). Changed in place on the running listener."""

    @property
    def bind(self) -> str:
        return bind_address(self.host, self.port)

    @property
    def label(self) -> str:
        return f"inbound :{self.port}"

    @property
    def permissive(self) -> bool:
        return self.mutual_tls_mode == "permissive"


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One plaintext listener on loopback for the local app, carried over mTLS to `name`."""

    name: str
    protocol: str
    """http: per-request balancing over pooled connections; else relayed per connection."""
    host: str
    port: int
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    """Which instances (the agent's watch key): another value means other endpoints."""

    @property
    def bind(self) -> str:
        return bind_address(self.host, self.port)

    @property
    def label(self) -> str:
        return f"upstream {self.name} {self.bind}"


ListenerSpec = InboundSpec | UpstreamSpec


@dataclass(frozen=True, slots=True)
class SidecarSpec:
    inbound: InboundSpec | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()
    drain_grace: float = 5.0
    """Seconds a removed or replaced listener's connections get to finish."""
    limits: ConnectionLimits | None = None
    """Caps on each listener's connections (connect.listener), taken by listeners as they
    start: a running listener keeps the caps it started with."""
    tracing: TracingSettings | None = None
    """The telemetry's tracing (connect.tracing_settings; None: off), applied to every
    listener at once and without touching them."""
    http_limits: HTTPLimits | None = None
    """The HTTP listeners' request limits (header count and size, retry buffer), taken as
    `limits` is."""
    max_pending_requests: int = 0
    """Each upstream's HTTP requests waiting for a dial when Consul's Limits set none (0: no
    limit)."""
    local_app: LocalAppTimeouts = DEFAULT_LOCAL_APP
    """The local app's timeouts (connect.local_app): applied to the running inbound listener
    in place, as `tracing` is, without replacing it."""

    def cluster_limits(self, limits: Limits) -> Limits:
        """Consul's circuit-breaking `limits` for one upstream cluster, with this sidecar's
        pending-request cap where they leave it unset (0, as Consul's unset means Envoy's
        default)."""
        if limits.max_pending_requests or not self.max_pending_requests:
            return limits
        return replace(limits, max_pending_requests=self.max_pending_requests)

    def listeners(self) -> dict[str, ListenerSpec]:
        """Every listener by the address it binds (unique: the config checks it)."""
        out: dict[str, ListenerSpec] = {}
        if self.inbound is not None:
            out[self.inbound.bind] = self.inbound
        for up in self.upstreams:
            out[up.bind] = up
        return out


@dataclass(frozen=True, slots=True)
class Plan:
    """What `apply` changes to go from one spec to the next."""

    start: tuple[ListenerSpec, ...] = ()
    stop: tuple[ListenerSpec, ...] = ()
    replace: tuple[tuple[ListenerSpec, ListenerSpec], ...] = ()
    """(old, new) on the same address."""
    keep: tuple[ListenerSpec, ...] = ()
    modes: tuple[InboundSpec, ...] = ()
    """Running inbound listeners whose MutualTLSMode or own SPIFFE ID (a leaf of a new trust
    domain) alone changed (the new spec): applied in place, their connections kept
    (plaintext ones closed when it turns strict)."""
    in_place: tuple[str, ...] = ()
    """What changed of each of `modes`, described."""

    @property
    def empty(self) -> bool:
        return not (self.start or self.stop or self.replace or self.modes)

    def describe(self) -> str:
        parts = [f"start {s.label}" for s in self.start]
        parts += [f"stop {s.label}" for s in self.stop]
        parts += [
            f"replace {o.label} ({o.protocol}) with {n.label} ({n.protocol})"
            for o, n in self.replace
        ]
        for k, s in enumerate(self.modes):
            what = self.in_place[k] if k < len(self.in_place) else ""
            parts.append(f"{s.label}: {what or f'MutualTLSMode {s.mutual_tls_mode}'}")
        return "; ".join(parts) or "no listener changes"


def _in_place(old: ListenerSpec, new: ListenerSpec) -> str:
    """What `new` changes of `old` that the running inbound listener takes in place (its
    MutualTLSMode, its own SPIFFE ID), described; "" when `new` changes anything else.
    The SPIFFE ID changes with the trust domain when a CA is replaced without
    cross-signing: replacing the listener then would close every open connection after
    the drain grace, and nothing about them changed (connect.ca_switch keeps the old trust
    domain's peers for its grace)."""
    if not isinstance(old, InboundSpec) or not isinstance(new, InboundSpec):
        return ""
    same = dataclasses.replace(old, mutual_tls_mode=new.mutual_tls_mode, local_uri=new.local_uri)
    if same != new:
        return ""
    changed = []
    if old.mutual_tls_mode != new.mutual_tls_mode:
        changed.append(f"MutualTLSMode {new.mutual_tls_mode}")
    if old.local_uri != new.local_uri:
        changed.append(f"identity {new.local_uri}")
    return ", ".join(changed)


def plan(old: SidecarSpec, new: SidecarSpec) -> Plan:
    """The listener changes from `old` to `new`, in the order of `new` (inbound first)."""
    before, after = old.listeners(), new.listeners()
    changed = [
        (before[bind], s) for bind, s in after.items() if bind in before and before[bind] != s
    ]
    in_place = [(n, what) for o, n in changed if (what := _in_place(o, n))]
    return Plan(
        start=tuple(s for bind, s in after.items() if bind not in before),
        stop=tuple(s for bind, s in before.items() if bind not in after),
        replace=tuple((o, n) for o, n in changed if not _in_place(o, n)),
        keep=tuple(s for bind, s in after.items() if before.get(bind) == s),
        modes=tuple(n for n, _ in in_place if isinstance(n, InboundSpec)),
        in_place=tuple(what for n, what in in_place if isinstance(n, InboundSpec)),
    )


class SidecarTLS(Protocol):
    """What the listeners need of the current leaf and roots (connect.tls.DynamicTLS is one)."""

    @property
    def trust_domain(self) -> str: ...

    @property
    def grace_domains(self) -> tuple[str, ...]: ...

    def listener_context(self) -> ssl.SSLContext:
        """One context for an inbound listener's life (it follows rotation inside)."""
        ...

    def server(self) -> ssl.SSLContext:
        """The current generation's server context (new ticket keys per generation)."""
        ...

    def client(self) -> ssl.SSLContext:
        """The current client context for dialing upstreams."""
        ...


class _Listener(Protocol):
    server: asyncio.Server | None

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        reuse_port: bool = False,
        limits: ConnectionLimits | None = None,
    ) -> None: ...

    @property
    def open_connections(self) -> int: ...

    @property
    def pending_handshakes(self) -> int: ...

    @property
    def peak_connections(self) -> int: ...

    @property
    def accepted_connections(self) -> int: ...

    def reset_peak(self) -> None: ...

    async def close(self, grace: float = 5.0) -> None: ...


class _Endpoints:
    """An upstream's `EndpointSource`: the balancer compiled from the newest endpoint set."""

    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self.current: Balancer = compile_balancer([], config)
        self.on_apply: Callable[[], object] | None = None
        """Told after each new set (an HTTP listener closes pooled connections to the
        endpoints that left)."""

    def balancer(self) -> Balancer:
        return self.current

    def apply(self, targets: Sequence[Target]) -> None:
        self.current = compile_balancer(list(targets), self.config)
        if self.on_apply is not None:
            self.on_apply()


class _Routed:
    """An upstream listener driven by its discovery chain: one cluster (an `Upstream` over its
    own endpoint set) per chain target, swapped in whole per `RoutingSnapshot`. A target whose
    settings did not change keeps its Upstream, so its balancer state, ejections and pooled
    connections carry over; its endpoints are replaced."""

    def __init__(self, sidecar: Sidecar[Any], spec: UpstreamSpec, listener: _Listener) -> None:
        self.sidecar = sidecar
        self.spec = spec
        self.listener = listener
        self.targets: dict[str, tuple[TargetSettings, Upstream, _Endpoints]] = {}
        self.snapshot: RoutingSnapshot | None = None
        self.retired_ejections = 0
        """Ejections by target clusters since replaced: the upstream's counter never goes
        back when a target's settings change."""

    def ejections(self) -> tuple[int, int]:
        """(ejections since start, endpoints ejected now) over the chain's clusters, which the
        metrics count under the upstream's name as they do its refusals."""
        live = [upstream.cluster for _, upstream, _ in self.targets.values()]
        return (
            self.retired_ejections + sum(c.ejections for c in live),
            sum(len(c.ejected) for c in live),
        )

    def apply(self, snap: RoutingSnapshot) -> None:
        routing = snap.routing
        tls = self.sidecar.tls
        kept: dict[str, tuple[TargetSettings, Upstream, _Endpoints]] = {}
        for tid, settings in routing.targets.items():
            prior = self.targets.get(tid)
            if prior is not None and prior[0] == settings:
                kept[tid] = prior
            else:
                endpoints = _Endpoints(settings.balancer)
                upstream = Upstream(
                    f"{self.spec.name} ({tid})",
                    endpoints=endpoints,
                    client_ssl=tls.client,
                    verify_peer=service_peers(lambda: tls.trust_domain, lambda: tls.grace_domains),
                    expected_service=settings.service,
                    connect_timeout=settings.connect_timeout,
                    rng=random.Random(self.sidecar._rng.random()),
                    resume_tls=self.sidecar._resume_tls,
                    limits=self.sidecar.spec.cluster_limits(settings.limits),
                    ejection=settings.ejection,
                )
                base = self.sidecar.upstreams.get(self.spec.name)
                if base is not None:
                    # Refusals are counted by upstream name (meshlet_circuit_breaker_overflows),
                    # whichever of its chain's clusters made them.
                    upstream.cluster.overflows = base.cluster.overflows
                kept[tid] = (settings, upstream, endpoints)
            kept[tid][2].apply(snap.endpoints.get(tid, ()))
        named = {
            name: tuple(kept[tid][1] for tid in order) for name, order in routing.clusters.items()
        }
        listener = self.listener
        if isinstance(listener, OutboundHTTP):
            origin = listener.origin
            assert isinstance(origin, MeshOrigin)
            origin.set_clusters(named)
            origin.endpoints_changed()  # idle connections to endpoints that left are closed
            listener.fixed_routes = routing.table  # read once per request head
            observer = listener.observer
            if isinstance(observer, HTTPSide):
                # Metrics name the service a cluster reaches, not the chain's target ID.
                observer.services = {
                    name: kept[order[0]][0].service
                    for name, order in routing.clusters.items()
                    if order
                }
        elif isinstance(listener, OutboundL4):
            chain = named[routing.start]
            listener.upstream, listener.chain = chain[0], chain
        for tid, prior in self.targets.items():
            if kept.get(tid) is not prior:
                self.retired_ejections += prior[1].cluster.ejections
        self.targets = kept
        self.snapshot = snap
        log.info(
            "%s: routing applied (index %d, %d targets)", self.spec.label, snap.index, len(kept)
        )


@dataclass(eq=False)
class Running:
    """One listener as it runs now."""

    spec: ListenerSpec
    listener: _Listener
    upstream: Upstream | None = None
    endpoints: _Endpoints | None = None
    follower: asyncio.Task[None] | None = field(default=None, repr=False)
    routed: _Routed | None = None
    router: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def serving(self) -> bool:
        server = self.listener.server
        return server is not None and server.is_serving()


async def claim_port(host: str, port: int) -> None:
    """Raise `OSError` (EADDRINUSE) when some socket already holds `host:port`: a plain bind
    (SO_REUSEADDR as asyncio sets it, no SO_REUSEPORT) fails against any listener, shared or
    not. The probe is closed at once; the listener then binds with SO_REUSEPORT."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{host}:{port} is already in use ({exc.strerror})"
                ) from None


class Sidecar(Generic[S]):
    """The listeners of one sidecar, following a `SidecarSpec`.

    `endpoints(spec)` gives the `Latest` endpoint set an upstream follows (None: none known,
    no endpoints); `targets(value)` turns one of its values into dial targets.
    """

    def __init__(
        self,
        tls: SidecarTLS,
        authorizers: tuple[ConnectionAuthorizer, RequestAuthorizer],
        *,
        endpoints: Callable[[UpstreamSpec], Latest[S] | None],
        targets: Callable[[S], Sequence[Target]],
        stats: ProxyStats | None = None,
        rng: random.Random | None = None,
        reuse_port: bool = False,
        claim_ports: bool = False,
        balancer: BalancerConfig | None = None,
        resume_tls: bool = True,
        telemetry: Telemetry | None = None,
        routing: Callable[[UpstreamSpec], Latest[RoutingSnapshot | None] | None] | None = None,
    ) -> None:
        """`telemetry`: every listener reports its exchanges and connections to it
        (connect.observe); None: no observer, nothing measured.

        `reuse_port`: bind with SO_REUSEPORT (several processes serve the same ports).
        `claim_ports`: first check that no other socket holds a port this process starts
        listening on (the group's first process), so a port taken by a stranger fails as it
        does without SO_REUSEPORT instead of being silently shared."""
        self.tls = tls
        self.stats = stats if stats is not None else ProxyStats()
        self.spec = SidecarSpec()
        """What was last applied (a listener that failed to bind is missing from `running`)."""
        self.running: dict[str, Running] = {}
        """By bind address."""
        self.upstreams: dict[str, Upstream] = {}
        """By upstream name, for their dial counters (kept after removal: counters only grow)."""
        self._connection_authz, self._request_authz = authorizers
        self._endpoints = endpoints
        self._targets = targets
        self._rng = rng if rng is not None else random.Random()
        self._reuse_port = reuse_port
        self._claim_ports = claim_ports
        self._balancer = balancer if balancer is not None else BalancerConfig()
        self._resume_tls = resume_tls
        self.telemetry = telemetry
        self._routing = routing
        """An upstream's routing snapshots (None: routed by its one endpoint set only)."""
        self._draining: dict[asyncio.Task[None], Running] = {}
        """Listeners removed or replaced, still serving their open connections."""
        self._lock = asyncio.Lock()

    def listeners(self) -> list[_Listener]:
        """Every listener holding connections: running, or draining after a reload."""
        return [r.listener for r in [*self.running.values(), *self._draining.values()]]

    def recheck_connections(self) -> int:
        """The connection decision's inputs changed (new intentions, or MutualTLSMode back to
        strict): decide the open connections of the inbound listeners again and close those
        now denied; returns how many. HTTP inbound decides each request on the current
        snapshot, so only its plaintext connections (strict again) and its tunnels (an upgrade
        whose request is now denied) can be closed here."""
        return sum(
            listener.recheck()
            for listener in self.listeners()
            if isinstance(listener, InboundL4 | InboundHTTP)
        )

    def listener(self, spec: ListenerSpec) -> Running | None:
        """The running listener for `spec` (None when it is not running as that spec)."""
        got = self.running.get(spec.bind)
        return got if got is not None and got.spec == spec else None

    async def apply(self, spec: SidecarSpec) -> Plan:
        """Make the listeners match `spec`. Every change that can be made is made; a listener
        that cannot bind raises `OSError` after the others are applied (it is then not
        running, and `listener()` says so)."""
        async with self._lock:
            old = SidecarSpec(
                self.spec.inbound
                if self.spec.inbound and self.spec.inbound.bind in self.running
                else None,
                tuple(u for u in self.spec.upstreams if u.bind in self.running),
                self.spec.drain_grace,
            )
            changes = plan(old, spec)
            self.spec = spec
            if self.telemetry is not None:
                self.telemetry.set_tracing(spec.tracing)
            app_side = self.running.get(spec.inbound.bind) if spec.inbound is not None else None
            if app_side is not None:
                self._set_local_app(app_side, spec.local_app)
            for gone in changes.stop:
                self._retire(self.running.pop(gone.bind), spec.drain_grace)
            for before, _ in changes.replace:
                self._retire(self.running.pop(before.bind), spec.drain_grace)
            failed: list[OSError] = []
            for new in [*changes.start, *(n for _, n in changes.replace)]:
                try:
                    await self._start(new, claim=self._claim_ports and new in changes.start)
                except OSError as exc:
                    log.error("%s: cannot listen: %s", new.label, exc)
                    failed.append(exc)
            for inbound in changes.modes:
                self._set_mode(self.running[inbound.bind], inbound)
            if spec.inbound is None or not spec.inbound.permissive:
                # The mode is the service's: a listener still draining (replaced or removed)
                # follows it too, so strict closes its plaintext connections now, not after
                # drain_grace.
                for draining in self._draining.values():
                    old_spec = draining.spec
                    if isinstance(old_spec, InboundSpec) and old_spec.permissive:
                        strict = dataclasses.replace(old_spec, mutual_tls_mode="strict")
                        self._set_mode(draining, strict)
            if not changes.empty:
                log.info("listeners: %s", changes.describe())
            if failed:
                raise failed[0]
            return changes

    @staticmethod
    def _set_local_app(running: Running, timeouts: LocalAppTimeouts) -> None:
        listener = running.listener
        if isinstance(listener, InboundHTTP | InboundL4):
            listener.set_local_app(timeouts)

    def _set_mode(self, running: Running, spec: InboundSpec) -> None:
        """A new MutualTLSMode or own SPIFFE ID on the running inbound listener (`plan`'s
        `modes`): connections accepted from now on see the mode, requests from now on the
        ID; back to strict, the open plaintext ones are closed."""
        listener = running.listener
        assert isinstance(listener, InboundHTTP | InboundL4)
        was = running.spec
        running.spec = spec
        if isinstance(listener, InboundHTTP):
            listener.set_local_uri(spec.local_uri)
        if isinstance(was, InboundSpec) and was.mutual_tls_mode == spec.mutual_tls_mode:
            return
        gate = listener.inbound_gate if isinstance(listener, InboundHTTP) else listener.gate
        gate.permissive = spec.permissive
        closed = listener.recheck() if not spec.permissive else 0
        log.info(
            "%s: MutualTLSMode %s (%d plaintext connection(s) closed)",
            spec.label, spec.mutual_tls_mode, closed,
        )  # fmt: skip

    def _retire(self, running: Running, grace: float) -> None:
        """Stop accepting now (synchronously: the port is free for a replacement as soon as
        this returns), let its connections finish for `grace` seconds in the background."""
        if running.follower is not None:
            running.follower.cancel()
        if running.router is not None:
            running.router.cancel()
        server = running.listener.server
        if server is not None:
            server.close()
        task = asyncio.get_running_loop().create_task(
            self._drain(running, grace), name=f"drain {running.spec.label}"
        )
        self._draining[task] = running
        task.add_done_callback(lambda t: self._draining.pop(t, None))

    async def _drain(self, running: Running, grace: float) -> None:
        try:
            await running.listener.close(grace)
        except Exception:
            log.exception("%s: closing failed", running.spec.label)
        log.info("%s: closed (drained for up to %gs)", running.spec.label, grace)

    async def _start(self, spec: ListenerSpec, *, claim: bool) -> None:
        if claim:
            await claim_port(spec.host, spec.port)
        running = self._build(spec) if isinstance(spec, InboundSpec) else self._build_upstream(spec)
        await running.listener.start(
            spec.host, spec.port, reuse_port=self._reuse_port, limits=self.spec.limits
        )
        if isinstance(spec, UpstreamSpec):
            latest = self._endpoints(spec)
            if latest is not None and running.endpoints is not None:
                running.endpoints.apply(self._targets(latest.get()))
                running.follower = asyncio.get_running_loop().create_task(
                    self._follow(spec, latest, running.endpoints), name=f"endpoints {spec.label}"
                )
            routing = self._routing(spec) if self._routing is not None else None
            if routing is not None:
                running.routed = _Routed(self, spec, running.listener)
                running.router = asyncio.get_running_loop().create_task(
                    self._follow_routing(routing, running.routed), name=f"routing {spec.label}"
                )
        self.running[spec.bind] = running
        log.info("%s (%s) listening", spec.label, spec.protocol)

    def _build(self, spec: InboundSpec) -> Running:
        tls = self.tls
        peers = service_peers(lambda: tls.trust_domain, lambda: tls.grace_domains)
        listener: _Listener
        if spec.protocol == "http":
            gate = InboundGate(tls.listener_context(), peers, self.stats, current_ssl=tls.server)
            gate.permissive = spec.permissive
            listener = InboundHTTP(
                gate,
                spec.app_host,
                spec.app_port,
                authorize=self._request_authz,
                local_uri=spec.local_uri,
                path_normalization=spec.path_normalization,
                limits=self.spec.http_limits,
            )
            listener.set_local_app(self.spec.local_app)
            if self.telemetry is not None:
                listener.observer = self.telemetry.http(self.telemetry.inbound("http"))
                gate.on_refused = self.telemetry.listener_refused
        else:
            # tcp, and http2/grpc carried at L4: one decision per connection.
            gate = InboundGate(
                tls.listener_context(),
                peers,
                self.stats,
                authorize=self._connection_authz,
                current_ssl=tls.server,
            )
            gate.permissive = spec.permissive
            listener = InboundL4(gate, spec.app_host, spec.app_port)
            listener.set_local_app(self.spec.local_app)
            if self.telemetry is not None:
                listener.observer = self.telemetry.tcp(self.telemetry.inbound("tcp"))
                gate.on_refused = self.telemetry.listener_refused
        return Running(spec, listener)

    def _build_upstream(self, spec: UpstreamSpec) -> Running:
        tls = self.tls
        endpoints = _Endpoints(self._balancer)
        upstream = Upstream(
            spec.name,
            endpoints=endpoints,
            client_ssl=tls.client,
            verify_peer=service_peers(lambda: tls.trust_domain, lambda: tls.grace_domains),
            expected_service=spec.name,
            rng=random.Random(self._rng.random()),
            resume_tls=self._resume_tls,
            limits=self.spec.cluster_limits(NO_LIMITS),
        )
        prior = self.upstreams.get(spec.name)
        if prior is not None:
            upstream.refusals = prior.refusals  # counters of the name go on across a reload
        self.upstreams[spec.name] = upstream
        listener: _Listener = (
            OutboundHTTP(upstream, self.spec.http_limits, stats=self.stats)
            if spec.protocol == "http"
            else OutboundL4(upstream, stats=self.stats)
        )
        if self.telemetry is not None:
            side = self.telemetry.upstream(spec.name, "http" if spec.protocol == "http" else "tcp")
            if isinstance(listener, OutboundHTTP):
                listener.observer = self.telemetry.http(side)
            elif isinstance(listener, OutboundL4):
                listener.observer = self.telemetry.tcp(side)
        if isinstance(listener, OutboundHTTP) and isinstance(listener.origin, MeshOrigin):
            endpoints.on_apply = listener.origin.endpoints_changed
        return Running(spec, listener, upstream, endpoints)

    async def _follow(self, spec: UpstreamSpec, latest: Latest[S], endpoints: _Endpoints) -> None:
        version = latest.version
        while True:
            version, value = await latest.changed(version)
            endpoints.apply(self._targets(value))
            log.debug("%s: balancer over %d endpoints", spec.label, len(endpoints.current.targets))

    async def _follow_routing(
        self, latest: Latest[RoutingSnapshot | None], routed: _Routed
    ) -> None:
        version, value = latest.version, latest.get()
        while True:
            if value is not None:
                routed.apply(value)
            version, value = await latest.changed(version)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting everywhere; open exchanges get `grace` seconds, those of listeners
        still draining after a reload too (their longer drain is cut short)."""
        async with self._lock:
            running, self.running = list(self.running.values()), {}
            for r in running:
                if r.follower is not None:
                    r.follower.cancel()
                if r.router is not None:
                    r.router.cancel()
            draining = dict(self._draining)
            # Closing again with the shorter grace aborts what the first close still waits
            # for; that first close is then cancelled.
            await asyncio.gather(*(r.listener.close(grace) for r in [*running, *draining.values()]))
            for task in draining:
                task.cancel()
            await asyncio.gather(*draining, return_exceptions=True)
