"""The sidecar proxy inside the agent process: certificates, intentions and listeners wired.

    meshlet sidecar -c agent.yaml     ->   AgentRuntime(..., sidecar=True)

What runs (as tasks of the agent's one TaskGroup):

* leaf: a `LeafRotator` over the configured source (`certs.source`: Consul's Connect CA, or
  Vault PKI with Consul's roots) and a `DynamicTLS` that follows its generations. Listeners
  hold the `listener_context()` and the client-context getter, so rotation never restarts them.
* intentions: a blocking watch of the `service-intentions` config entries, read as Consul
  returns them (Legacy* fields and all) and compiled into the engine's `Snapshot` whenever
  Consul's index moves. An entry meshlet cannot read or enforce makes the sidecar deny every
  request and connection to its destination (never the entry's previous state), counts it and
  reports it as degraded. The default decision follows Consul's `DefaultIntentionPolicy`,
  else the ACL default policy when ACLs are on, else allow.
* listeners: the public inbound listener on `sidecar.port` (L4 for tcp/http2/grpc services,
  HTTP/1.1 for http) in front of the local app, and one 127.0.0.1 listener per upstream whose
  balancer is recompiled from the agent's `UpstreamWatcher` snapshots.

Fail closed: no listener is opened before a leaf is held and the first intentions answer is
compiled (until then the snapshot denies everything); the readiness the registrar reports to
Consul passes only while every listener is serving and the leaf is unexpired.

With `sidecar.workers` > 1 the listeners bind with SO_REUSEPORT, the first process after checking
that no other socket holds the ports (agent/supervisor.py, agent/worker.py).

Known limits: the listeners are fixed at start (a reload that changes `sidecar` or `certs`
needs a restart, and says so); upstreams balance with least request (service-resolver
`LoadBalancer` is not watched yet).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from agent.catalog import Snapshot as EndpointSnapshot
from agent.config import AgentConfig, UpstreamSection
from agent.consul import ConsulClient
from agent.consul_connect import consul_leaf_source, consul_roots_source
from agent.consul_errors import ConsulError, ConsulUnavailable
from agent.readiness import Readiness
from agent.watch import Latest, WatchSettings, backoff_delay
from connect.balancer import Balancer, BalancerConfig, Target, compile_balancer
from connect.heap_trim import HeapTrimmer
from connect.http1 import InboundHTTP, OutboundHTTP
from connect.inbound import InboundGate
from connect.l4 import InboundL4, OutboundL4
from connect.leaf import LeafSource, Material
from connect.leaf_rotation import LeafRotator
from connect.listener import ConnectionLimits
from connect.peers import service_peers
from connect.proxy import (
    ProxyStats,
    Upstream,
    intentions_authorizers,
)
from connect.tls import DynamicTLS
from intentions.engine import Identity, compile_snapshot
from intentions.engine import Snapshot as IntentionsSnapshot
from intentions.stored import compile_stored, destination_of

log = logging.getLogger("meshlet.agent.sidecar")

_NOT_LOADED = "intentions not loaded yet"


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


UpstreamLatest = Callable[[UpstreamSection], Latest[EndpointSnapshot | None] | None]
"""The agent's current endpoint snapshots of one upstream (None: not watched)."""


def default_allow(agent_self: Mapping[str, Any]) -> tuple[bool, str]:
    """Consul's intention default from `/v1/agent/self`: `DefaultIntentionPolicy` when set,
    else the ACL default policy when ACLs are enabled, else allow."""
    debug = agent_self.get("DebugConfig")
    debug = debug if isinstance(debug, Mapping) else {}
    explicit = debug.get("DefaultIntentionPolicy")
    if isinstance(explicit, str) and explicit:
        return explicit == "allow", f"default intention policy {explicit}"
    if debug.get("ACLsEnabled") is True:
        acl = debug.get("ACLResolverSettings")
        policy = acl.get("ACLDefaultPolicy") if isinstance(acl, Mapping) else None
        # An ACL default we cannot read is treated as deny: fail closed.
        allowed = policy == "allow"
        return allowed, f"ACL default policy {policy if isinstance(policy, str) else 'deny'}"
    return True, "default allow (ACLs disabled)"


def compile_intentions(
    bodies: tuple[Mapping[str, Any], ...], *, default_allow: bool, default_reason: str
) -> IntentionsSnapshot:
    """Stored `service-intentions` entries (as Consul's read returns them) -> the engine's
    snapshot. Never raises for content: `snapshot.broken` lists the destinations that deny
    everything because their entry could not be read or compiled."""
    return compile_stored(bodies, default_allow=default_allow, default_reason=default_reason)


def targets_of(snapshot: EndpointSnapshot | None) -> list[Target]:
    if snapshot is None:
        return []
    return [
        Target(key=f"{e.node}/{e.service_id}", host=e.address, port=e.port, weight=e.weight)
        for e in snapshot.endpoints
    ]


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


class _Endpoints:
    """An upstream's `EndpointSource`: the balancer compiled from the newest snapshot."""

    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self.current: Balancer = compile_balancer([], config)
        self.index: int | None = None

    def balancer(self) -> Balancer:
        return self.current

    def apply(self, snapshot: EndpointSnapshot | None) -> None:
        self.current = compile_balancer(targets_of(snapshot), self.config)
        self.index = snapshot.index if snapshot is not None else None


def _settle_garbage_collector() -> None:
    """Once serving: what start-up built (modules, config, first snapshots) leaves the cyclic
    collector's generations, and young collections become rarer. Requests allocate many
    short-lived containers that reference counting frees; without this, a full collection
    walks every long-lived object and stalls the event loop (the proxy benchmark's
    sidecars run with the same settings)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class Sidecar:
    """The proxy half of `meshlet sidecar`; also the agent's `SidecarReadiness` and
    `LeafStatus` (the registrar's check passes only through `check()`)."""

    def __init__(
        self,
        config: AgentConfig,
        env: Mapping[str, str],
        settings: Callable[[], WatchSettings],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        reuse_port: bool = False,
        claim_ports: bool = False,
    ) -> None:
        """`reuse_port`: bind with SO_REUSEPORT (`sidecar.workers` > 1: every process of the
        group binds the same ports). `claim_ports`: first check that no other socket holds
        them (the group's first process), so a port already taken fails at start as it does
        without SO_REUSEPORT instead of being silently shared with a stranger."""
        self.config = config
        self._reuse_port = reuse_port
        self._claim_ports = claim_ports
        self._env = dict(env)
        self._settings = settings
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.stats = ProxyStats()
        self.rotator: LeafRotator | None = None
        self.tls: DynamicTLS | None = None
        self.leaf_error = ""
        self.intentions: Latest[IntentionsSnapshot] = Latest(
            compile_snapshot([], default_allow=False, default_reason=_NOT_LOADED)
        )
        self.intentions_index = 0
        self.intentions_loaded = False
        self.intentions_error = ""
        self.intentions_failures = 0
        self.intentions_broken: dict[str, str] = {}
        """Destination -> why its entry could not be compiled (every request to it is denied)."""
        self.intentions_broken_total = 0
        """Entries refused since start (a destination counts again when its reason changes)."""
        self.inbound: _Listener | None = None
        self.outbound: dict[str, tuple[_Listener, _Endpoints]] = {}
        self.upstreams: dict[str, Upstream] = {}
        self._closed = False
        self.heap = HeapTrimmer(lambda: [lst for _, lst in self._listeners() if lst is not None])
        """Gives the heap back to the OS once a burst of connections has drained."""
        self.started = asyncio.Event()
        """Set once every listener is up."""

    # ---- LeafStatus / SidecarReadiness ------------------------------------------------------

    def leaf_expiry(self) -> float | None:
        material = self.rotator.current if self.rotator is not None else None
        return material.leaf.validity.not_after if material is not None else None

    def leaf_problem(self) -> str:
        if self.leaf_expiry() is not None:
            # A leaf that does not chain to the current roots is refused by every peer.
            return self.rotator.problem() if self.rotator is not None else ""
        why = f": {self.leaf_error}" if self.leaf_error else ""
        return f"no leaf certificate yet from the {self.config.certs.source!r} source{why}"

    def _listeners(self) -> list[tuple[str, _Listener | None]]:
        cfg = self.config
        out: list[tuple[str, _Listener | None]] = [(f"inbound :{cfg.sidecar.port}", self.inbound)]
        for up in cfg.sidecar.upstreams:
            got = self.outbound.get(up.name)
            out.append((f"upstream {up.name} {up.bind}", got[0] if got else None))
        return out

    async def check(self) -> Readiness:
        reasons = self.problems()
        return Readiness(not reasons, tuple(reasons), self.leaf_expiry())

    def problems(self) -> list[str]:
        """Why the proxy cannot take traffic now (empty when it can)."""
        reasons: list[str] = []
        if self._closed:
            reasons.append("sidecar stopped")
        if not self.intentions_loaded:
            err = f": {self.intentions_error}" if self.intentions_error else ""
            reasons.append(f"{_NOT_LOADED}{err}")
        for name, listener in self._listeners():
            if listener is None or listener.server is None:
                reasons.append(f"listener {name}: not started")
            elif not listener.server.is_serving():
                reasons.append(f"listener {name}: not serving")
        expiry = self.leaf_expiry()
        if expiry is None:
            reasons.append(self.leaf_problem())
        elif expiry <= self._clock():
            reasons.append("leaf certificate expired")
        elif problem := self.leaf_problem():
            reasons.append(problem)
        return reasons

    def degradations(self) -> list[str]:
        """What the proxy serves in a reduced way now: destinations it denies wholesale."""
        return [
            f"intentions for {dest} cannot be enforced (index {self.intentions_index}), "
            f"denying every request to it: {reason}"
            for dest, reason in sorted(self.intentions_broken.items())
        ]

    def status(self) -> dict[str, Any]:
        material = self.rotator.current if self.rotator is not None else None
        return {
            "leaf": {
                "source": self.config.certs.source,
                "generation": material.generation if material else 0,
                "uri": material.leaf.service_uri if material else "",
                "expires_at": self.leaf_expiry(),
                "health": self.rotator.health().value if self.rotator is not None else "",
                "error": self.leaf_error,
                "trust_domain": material.bundle.trust_domain if material else "",
                "problem": self.rotator.problem() if self.rotator is not None else "",
                "roots_changes": self.rotator.roots_changes if self.rotator is not None else 0,
                "chain_breaks": self.rotator.chain_breaks if self.rotator is not None else 0,
                "stale_leaves": self.rotator.stale_leaves if self.rotator is not None else 0,
            },
            "intentions": {
                "loaded": self.intentions_loaded,
                "index": self.intentions_index,
                "version": self.intentions.version,
                "failures": self.intentions_failures,
                "last_error": self.intentions_error,
                "broken": dict(self.intentions_broken),
                "broken_total": self.intentions_broken_total,
            },
            "listeners": {
                name: (listener is not None and listener.server is not None)
                for name, listener in self._listeners()
            },
            "upstreams": {
                name: {"index": ep.index, "endpoints": len(ep.current.targets)}
                for name, (_, ep) in self.outbound.items()
            },
            "connections": {
                name: {"open": lst.open_connections, "handshaking": lst.pending_handshakes}
                for name, lst in self._listeners()
                if lst is not None
            },
            "heap_trims": self.heap.trims,
            "stats": self.counters(),
        }

    def counters(self) -> dict[str, Any]:
        """The proxy's counters (`ProxyStats`) and the failed dials per upstream and kind
        (connect.dial_failures): what a worker reports and a worker group adds up."""
        return {
            **dataclasses.asdict(self.stats),
            "upstream_refusals": {
                name: upstream.refusal_counts() for name, upstream in self.upstreams.items()
            },
        }

    # ---- the tasks ---------------------------------------------------------------------------

    async def run(
        self,
        consul: ConsulClient,
        latest_for: UpstreamLatest,
        before_listen: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run until cancelled: leaf rotation, the intentions watch, then the listeners
        (after `before_listen()` too, when given: a worker waits for its endpoints)."""
        leaf_source = await self._leaf_source(consul)
        self.rotator = LeafRotator(leaf_source, consul_roots_source(consul))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._rotate(), name="leaf rotation")
            tg.create_task(self._watch_intentions(consul), name="intentions watch")
            material = await self.rotator.ready()
            self.tls = DynamicTLS(material)
            log.info("leaf %s held (generation %d)", material.leaf.service_uri, material.generation)
            tg.create_task(self._follow_leaf(self.tls), name="leaf follower")
            await self.intentions.changed(0)
            if before_listen is not None:
                await before_listen()
            if self._closed:
                return
            await self._start_listeners(tg, self.tls, latest_for)
            tg.create_task(self.heap.run(), name="heap trimmer")
            _settle_garbage_collector()
            self.started.set()

    async def _rotate(self) -> None:
        assert self.rotator is not None
        try:
            await self.rotator.run()
        except Exception as exc:
            # LeafRotator retries by itself; reaching here is a bug or a refusal it cannot
            # survive. The listeners keep the last contexts; readiness shows the expiry.
            self.leaf_error = f"leaf rotation stopped: {exc}"
            log.exception("leaf rotation stopped")

    async def _leaf_source(self, consul: ConsulClient) -> LeafSource:
        cfg = self.config
        if cfg.certs.source == "consul":
            return consul_leaf_source(consul, cfg.service.name)
        from connect.leaf_vault import VaultLeafSource, vault_config_from_env

        vault = cfg.certs.vault
        assert vault is not None, "config validation requires certs.vault for source vault"
        # Only the credentials of the configured `auth` count: a stray VAULT_ROLE_ID must not
        # turn a token login into an AppRole one, nor the reverse.
        unused = ("VAULT_ROLE_ID", "VAULT_SECRET_ID") if vault.auth == "token" else ("VAULT_TOKEN",)
        env = {k: v for k, v in self._env.items() if k not in unused}
        vconf = vault_config_from_env(
            env, addr=vault.address or None, mount=vault.mount, role=vault.role
        )
        delay_failures = 0
        while True:
            try:
                datacenter = (await consul.agent.self()).datacenter
                break
            except ConsulError as exc:
                delay_failures += 1
                self.leaf_error = f"cannot read the datacenter from Consul: {exc}"
                s = self._settings()
                await asyncio.sleep(
                    backoff_delay(delay_failures, self._rng, s.retry_initial, s.retry_max)
                )
        return VaultLeafSource(vconf, cfg.service.name, datacenter)

    async def _follow_leaf(self, tls: DynamicTLS) -> None:
        assert self.rotator is not None
        while True:
            material: Material = await self.rotator.changed(tls.material.generation)
            try:
                tls.update(material)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                # The old contexts stay in place: a bad leaf never replaces a good one.
                self.leaf_error = f"generation {material.generation} unusable: {exc}"
                log.error("leaf generation %d not applied: %s", material.generation, exc)
                await self.rotator.changed(material.generation)
                continue
            self.leaf_error = ""
            log.info("leaf rotated (generation %d)", material.generation)

    async def _default(self, consul: ConsulClient) -> tuple[bool, str]:
        me = await consul.agent.self()
        return default_allow(me.raw)

    async def _watch_intentions(self, consul: ConsulClient) -> None:
        """Blocking watch of service-intentions; the backoff pattern of agent/watch.py."""
        index = 0
        default: tuple[bool, str] | None = None
        while True:
            settings = self._settings()
            try:
                if default is None or index == 0:
                    default = await self._default(consul)
                got = await consul.config_entries.list(
                    "service-intentions", index=index, wait=settings.wait
                )
            except ConsulError as exc:
                self.intentions_failures += 1
                self.intentions_error = str(exc)
                if not isinstance(exc, ConsulUnavailable):
                    log.error("intentions watch: %s", exc)
                # A restarted Consul may be at a lower index: start over with a plain read.
                index = 0
                await asyncio.sleep(
                    backoff_delay(
                        self.intentions_failures,
                        self._rng,
                        settings.retry_initial,
                        settings.retry_max,
                    )
                )
                continue
            if self.intentions_failures:
                log.info("intentions watch recovered after %d failures", self.intentions_failures)
                self.intentions_failures = 0
            self.intentions_error = ""
            if not self.intentions_loaded or got.index != self.intentions_index or got.reset:
                self._apply_intentions(self._relevant(got.value), got.index, default)
            index = got.next_index

    def _relevant(self, bodies: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...]:
        """The entries that can decide for the local service: its own and the wildcard one
        (and one whose destination cannot be told, which fails closed as a wildcard). An
        entry for another service, valid or not, never affects ours."""
        names = (self.config.service.name, "*")
        return tuple(b for b in bodies if destination_of(b)[2] in names)

    def _apply_intentions(
        self, bodies: tuple[Mapping[str, Any], ...], index: int, default: tuple[bool, str]
    ) -> None:
        snapshot = compile_intentions(bodies, default_allow=default[0], default_reason=default[1])
        broken = {b.display: b.reason for b in snapshot.broken.values()}
        for dest, reason in broken.items():
            if self.intentions_broken.get(dest) != reason:
                self.intentions_broken_total += 1
                log.error(
                    "intentions at index %d: the entry for %s cannot be enforced, denying "
                    "every request to it: %s",
                    index,
                    dest,
                    reason,
                )
        for dest in self.intentions_broken.keys() - broken.keys():
            log.info("intentions at index %d: the entry for %s is enforced again", index, dest)
        self.intentions_broken = broken
        self.intentions_index = index
        self.intentions_loaded = True
        self.intentions.publish(snapshot)
        log.info("intentions applied (index %d, %d entries)", index, len(bodies))

    async def _start_listeners(
        self, tg: asyncio.TaskGroup, tls: DynamicTLS, latest_for: UpstreamLatest
    ) -> None:
        cfg = self.config
        local = Identity(cfg.service.name)
        conn_authz, request_authz = intentions_authorizers(self.intentions.get, local)
        app_host = cfg.service.address or "127.0.0.1"
        bind = cfg.sidecar.address or cfg.service.address or "127.0.0.1"
        peers = service_peers(lambda: tls.trust_domain)
        if self._claim_ports:
            for host, port in [(bind, cfg.sidecar.port)] + [
                (up.local_bind_address, up.local_bind_port) for up in cfg.sidecar.upstreams
            ]:
                await claim_port(host, port)
        limits = ConnectionLimits(
            max_connections=cfg.sidecar.max_connections,
            max_pending_handshakes=cfg.sidecar.max_pending_handshakes,
        )
        listener: _Listener
        if cfg.sidecar.protocol == "http":
            gate = InboundGate(tls.listener_context(), peers, self.stats, current_ssl=tls.server)
            listener = InboundHTTP(
                gate,
                app_host,
                cfg.service.port,
                authorize=request_authz,
                local_uri=tls.material.leaf.service_uri,
                path_normalization=cfg.sidecar.path_normalization,
            )
        else:
            # tcp, and http2/grpc carried at L4: one decision per connection.
            gate = InboundGate(
                tls.listener_context(),
                peers,
                self.stats,
                authorize=conn_authz,
                current_ssl=tls.server,
            )
            listener = InboundL4(gate, app_host, cfg.service.port)
        await listener.start(bind, cfg.sidecar.port, reuse_port=self._reuse_port, limits=limits)
        self.inbound = listener
        log.info(
            "inbound %s listener on %s:%d -> %s:%d",
            cfg.sidecar.protocol,
            bind,
            cfg.sidecar.port,
            app_host,
            cfg.service.port,
        )
        for up in cfg.sidecar.upstreams:
            endpoints = _Endpoints(BalancerConfig())
            upstream = Upstream(
                up.name,
                endpoints=endpoints,
                client_ssl=tls.client,
                verify_peer=service_peers(lambda: tls.trust_domain),
                expected_service=up.name,
                rng=random.Random(self._rng.random()),
            )
            self.upstreams[up.name] = upstream
            out: _Listener = (
                OutboundHTTP(upstream, stats=self.stats)
                if up.protocol == "http"
                else OutboundL4(upstream, stats=self.stats)
            )
            latest = latest_for(up)
            if latest is not None:
                endpoints.apply(latest.get())
                tg.create_task(self._follow_endpoints(up.name, latest, endpoints))
            bind_port = up.local_bind_port
            await out.start(
                up.local_bind_address, bind_port, reuse_port=self._reuse_port, limits=limits
            )
            self.outbound[up.name] = (out, endpoints)
            log.info("upstream %s (%s) listening on %s", up.name, up.protocol, up.bind)

    async def _follow_endpoints(
        self, name: str, latest: Latest[EndpointSnapshot | None], endpoints: _Endpoints
    ) -> None:
        version = latest.version
        while True:
            version, snapshot = await latest.changed(version)
            endpoints.apply(snapshot)
            log.debug(
                "upstream %s: balancer over %d endpoints", name, len(endpoints.current.targets)
            )

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting and let open exchanges finish for `grace` seconds."""
        self._closed = True
        listeners = [lst for _, lst in self._listeners() if lst is not None]
        await asyncio.gather(*(lst.close(grace) for lst in listeners))


__all__ = ["Sidecar", "compile_intentions", "default_allow"]
