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
* listeners: a `connect.sidecar.Sidecar` applying the `SidecarSpec` built from the config
  (`sidecar_spec`): the public inbound listener on `sidecar.port` in front of the local app,
  and one 127.0.0.1 listener per upstream whose balancer follows the agent's `UpstreamWatcher`
  snapshots. A reload (`reconfigure`) applies the new spec: upstreams added, removed or
  changed (protocol, port, destination) take effect without a restart, and listeners whose
  spec did not change, and their connections, are not touched.

The intentions watch and the datacenter read run on `agent.watches.BlockingWatch`.

Fail closed: no listener is opened before a leaf is held and the first intentions answer is
compiled (until then the snapshot denies everything); the readiness the registrar reports to
Consul passes only while every listener is serving and the leaf is unexpired.

Unless `sidecar.workers` is 0 (the in-process mode) this process runs no listener
(`listen=False`): the data-plane processes do, fed with `dataplane_snapshot()`
(agent/dataplanes.py, connect/dataplane/).

Known limits: a reload that changes `certs`, `service` or the inbound side of `sidecar`
(port, address, protocol, path normalization, workers) needs a restart, and says so.

* MutualTLSMode: blocking watches of the service-defaults and proxy-defaults entries resolve
  the local service's mode (agent/mutual_tls.py); a change is applied to the running inbound
  listener in place (`InboundSpec.mutual_tls_mode`): permissive also admits plaintext, with no
  identity; back to strict, open plaintext connections are closed. Strict until Consul says
  otherwise, and for any value meshlet does not know.

* routing: `agent.routing.ChainWatch` compiles each upstream's discovery chain from the watched
  routing entries and hands the data plane one `RoutingSnapshot` per upstream (routes, a
  cluster per chain target, their endpoints); an upstream without `protocol` speaks its
  chain's. See docs/routing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.catalog import Snapshot as EndpointSnapshot
from agent.catalog import WatchKey
from agent.config import AgentConfig
from agent.consul import ConsulClient, Hashed, Indexed
from agent.consul_connect import consul_leaf_source, consul_roots_source
from agent.consul_results import AgentSelf, AgentService
from agent.mutual_tls import ResolvedMode, entry_mode, resolve
from agent.readiness import Readiness
from agent.registration import sidecar_id
from agent.routing import ChainWatch
from agent.watch import watch_key
from agent.watches import (
    AnswerRejected,
    BlockingWatch,
    HashedFetch,
    WatchSettings,
    unindexed,
)
from connect.access_log import AccessLog, AccessLogSettings, effective_settings
from connect.authz import intentions_authorizers
from connect.balancer import Target
from connect.chain_routes import RoutingSnapshot
from connect.counters import proxy_counters
from connect.dataplane.snapshot import (
    IntentionsSource,
    PushedLeaf,
    PushedMaterial,
    PushedRoots,
    UpstreamEndpoints,
)
from connect.dataplane.snapshot import Snapshot as DataPlaneSnapshot
from connect.heap_trim import HeapTrimmer, keep_read_buffers_on_heap, settle_garbage_collector
from connect.http1 import HTTPLimits
from connect.latest import Latest
from connect.leaf import LeafSource, Material
from connect.leaf_rotation import LeafRotator
from connect.listener import ConnectionLimits
from connect.local_app import DEFAULT_LOCAL_APP, LocalAppTimeouts, effective_local_app
from connect.observe import Telemetry
from connect.sidecar import (
    InboundSpec,
    MutualTLSMode,
    Plan,
    SidecarSpec,
    UpstreamSpec,
    bind_address,
)
from connect.sidecar import Sidecar as DataPlane
from connect.stats import ProxyStats
from connect.tls import DynamicTLS
from connect.tracing_settings import TracingSettings, effective_tracing
from intentions.engine import Identity, compile_snapshot
from intentions.engine import Snapshot as IntentionsSnapshot
from intentions.stored import compile_stored, destination_of

log = logging.getLogger("meshlet.agent.sidecar")

_NOT_LOADED = "intentions not loaded yet"
METRICS_ONLY = frozenset({"mesh", "clusters", "process", "access_log", "tracing"})
"""Counters a worker reports for /metrics that /v1/status does not show (they are big)."""

_FIRST_ENDPOINTS_WAIT = 10.0
"""Seconds a reload waits for a new upstream's first endpoints before opening its port."""

REGISTRATION_POLL = 1.0
"""Seconds between reads of this sidecar's registration while the agent has none (a 404
cannot be blocked on; meshlet registers it right after start, Nomad before)."""


UpstreamLatest = Callable[[WatchKey], Latest[EndpointSnapshot | None] | None]
"""The agent's current endpoint snapshots of one upstream (None: not watched)."""

IntentionsAnswer = tuple[tuple[bool, str], tuple[Mapping[str, Any], ...]]
"""(the default decision and why, the stored service-intentions entries) at one index."""


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


def upstream_key(spec: UpstreamSpec) -> WatchKey:
    """What the agent watches for an upstream listener (agent.watch.watch_key of its section)."""
    return WatchKey(spec.name, spec.datacenter, spec.peer, spec.filter)


def sidecar_spec(
    cfg: AgentConfig,
    local_uri: str,
    chain_protocol: Callable[[str], str] = lambda name: "",
    mutual_tls_mode: MutualTLSMode = "strict",
    tracing: TracingSettings | None = None,
    *,
    local_app: LocalAppTimeouts = DEFAULT_LOCAL_APP,
) -> SidecarSpec:
    """The listeners `cfg` asks for; `local_uri` is the held leaf's SPIFFE ID. An upstream
    without a `protocol` speaks its discovery chain's (`chain_protocol(name)`; tcp while
    none is known). `mutual_tls_mode`: the service's, as Consul's entries resolve it.
    `tracing`, `local_app`: what Consul's entries say (Sidecar.tracing, Sidecar.local_app)."""
    app_host = cfg.service.address or "127.0.0.1"
    bind = cfg.sidecar.address or cfg.service.address or "127.0.0.1"
    return SidecarSpec(
        inbound=InboundSpec(
            cfg.sidecar.protocol,
            bind,
            cfg.sidecar.port,
            app_host,
            cfg.service.port,
            local_uri,
            cfg.sidecar.path_normalization,
            mutual_tls_mode,
        ),
        upstreams=tuple(
            UpstreamSpec(
                up.name,
                up.protocol or chain_protocol(up.name) or "tcp",
                up.local_bind_address,
                up.local_bind_port,
                up.datacenter,
                up.peer,
                up.filter,
            )
            for up in cfg.sidecar.upstreams
        ),
        drain_grace=cfg.shutdown.drain_period,
        limits=ConnectionLimits(
            max_connections=cfg.sidecar.max_connections,
            max_pending_handshakes=cfg.sidecar.max_pending_handshakes,
        ),
        tracing=tracing,
        http_limits=HTTPLimits(
            max_header_bytes=cfg.sidecar.max_header_bytes,
            max_headers=cfg.sidecar.max_headers,
            retry_body_bytes=cfg.sidecar.retry_buffer_bytes,
        ),
        max_pending_requests=cfg.sidecar.max_pending_requests,
        local_app=local_app,
    )


def live_changes(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    """`new` with what a running sidecar cannot change in place (certs, service, the inbound
    side of `sidecar`) put back to `old`'s values; upstreams and everything else from `new`."""
    return dataclasses.replace(
        new,
        certs=old.certs,
        service=old.service,
        sidecar=dataclasses.replace(old.sidecar, upstreams=new.sidecar.upstreams),
        # The metrics listener is bound once; access logs follow a reload.
        telemetry=dataclasses.replace(new.telemetry, metrics_address=old.telemetry.metrics_address),
    )


def needs_restart(old: AgentConfig, new: AgentConfig) -> bool:
    """Whether `new` changes anything a running sidecar keeps until a restart."""
    return live_changes(old, new) != new


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
        proxy_id: str = "",
        listen: bool = True,
    ) -> None:
        """`proxy_id`: the sidecar's registration whose Proxy.Config.tracing applies (default:
        the one meshlet registers, `<service id>-sidecar-proxy`; Nomad names its own).
        `reuse_port`: bind with SO_REUSEPORT (`sidecar.workers` > 1: every process of the
        group binds the same ports). `claim_ports`: first check that no other socket holds
        them (the group's first process), so a port already taken fails at start as it does
        without SO_REUSEPORT instead of being silently shared with a stranger."""
        self.config = config
        self._proxy_id = proxy_id
        self._reuse_port = reuse_port
        self._claim_ports = claim_ports
        self.listen = listen
        """False: the listeners run in data-plane processes (agent/dataplanes.py) fed with
        `dataplane_snapshot()`; this process only holds what feeds them."""
        self.listener_problems: Callable[[], list[str]] = lambda: []
        """With `listen` False: why the data planes do not serve (agent/runtime.py)."""
        self.intentions_source: tuple[tuple[bool, str], tuple[Mapping[str, Any], ...], int] = (
            (False, _NOT_LOADED),
            (),
            0,
        )
        """(default decision, the entries that concern this service, index): what a data
        plane compiles its intentions from."""
        self._env = dict(env)
        self._settings = settings
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.stats = ProxyStats()
        self.telemetry = Telemetry(config.service.name)
        """What the listeners observe (connect.observe): /metrics and the access log."""
        self.access_log = AccessLog(AccessLogSettings())
        """Off (denied requests only, on stderr) until proxy-defaults or agent.yaml enable it."""
        self.telemetry.access_log = self.access_log
        self._access_logs_raw: Mapping[str, Any] | None = None
        """The proxy-defaults entry's AccessLogs block, as last accepted."""
        self.proxy_defaults_watch: BlockingWatch[tuple[Mapping[str, Any], ...], AccessLogSettings]
        self.proxy_defaults_watch = BlockingWatch(
            "proxy-defaults",
            self._fetch_proxy_defaults,
            self._decode_proxy_defaults,
            AccessLogSettings(),
            settings,
            rng=self._rng,
            clock=clock,
        )
        self._service_mode: object = ""
        self._proxy_mode: object = ""
        self.mutual_tls = ResolvedMode("strict", "default")
        """The local service's MutualTLSMode as the entries resolve it now (strict until
        Consul says otherwise)."""
        self._mode_task: asyncio.Task[None] | None = None
        self.service_defaults_watch: BlockingWatch[tuple[Mapping[str, Any], ...], object]
        self.service_defaults_watch = BlockingWatch(
            "service-defaults",
            self._fetch_service_defaults,
            self._decode_service_defaults,
            "",
            settings,
            rng=self._rng,
            clock=clock,
        )
        self._mesh_tracing: Mapping[str, Any] | None = None
        """The proxy-defaults entry's Config.tracing, as last accepted."""
        self._service_tracing: Mapping[str, Any] | None = None
        """The sidecar registration's Proxy.Config.tracing, as last accepted."""
        self.tracing: TracingSettings | None = None
        """In force (None: off): the two blocks merged, the service's keys winning."""
        self._mesh_config: object = None
        """The proxy-defaults entry's Config, as last accepted (its local_*_ms keys)."""
        self._service_entry: object = None
        """The local service's service-defaults entry, as last accepted."""
        self._service_config: object = None
        """The sidecar registration's Proxy.Config, as last accepted."""
        self.local_app: LocalAppTimeouts = DEFAULT_LOCAL_APP
        """The local app's timeouts in force (connect.local_app): the three merged."""
        self.registration_watch: BlockingWatch[AgentService | None, None]
        self.registration_watch = BlockingWatch(
            "sidecar registration",
            HashedFetch(self._read_registration, absent=None, absent_poll=REGISTRATION_POLL),
            self._decode_registration,
            None,
            settings,
            rng=self._rng,
            clock=clock,
        )
        self.rotator: LeafRotator | None = None
        self.tls: DynamicTLS[Material] | None = None
        self.leaf_error = ""
        self._consul: ConsulClient | None = None
        self._default: tuple[bool, str] | None = None
        self._latest_for: UpstreamLatest = lambda key: None
        self.intentions_watch: BlockingWatch[IntentionsAnswer, IntentionsSnapshot] = BlockingWatch(
            "intentions",
            self._fetch_intentions,
            self._compile_answer,
            compile_snapshot([], default_allow=False, default_reason=_NOT_LOADED),
            settings,
            rng=self._rng,
            clock=clock,
        )
        self.intentions: Latest[IntentionsSnapshot] = self.intentions_watch.latest
        self.intentions_index = 0
        self.intentions_loaded = False
        self.intentions_broken: dict[str, str] = {}
        """Destination -> why its entry could not be compiled (every request to it is denied)."""
        self.intentions_broken_total = 0
        """Entries refused since start (a destination counts again when its reason changes)."""
        self._datacenter: BlockingWatch[AgentSelf, str] | None = None
        self.proxy: DataPlane[EndpointSnapshot | None] | None = None
        """The listeners, once a leaf is held."""
        self.chains: ChainWatch | None = None
        """The upstreams' discovery chains and their targets' instances (agent/routing.py)."""
        self._closed = False
        self.heap = HeapTrimmer(lambda: self.proxy.listeners() if self.proxy is not None else [])
        """Gives the heap back to the OS once a burst of connections has drained."""
        self.started = asyncio.Event()
        """Set once every listener is up."""

    @property
    def intentions_error(self) -> str:
        return self.intentions_watch.state.last_error

    @property
    def intentions_failures(self) -> int:
        return self.intentions_watch.state.failures

    # ---- LeafStatus / SidecarReadiness ------------------------------------------------------

    def leaf_expiry(self) -> float | None:
        material = self.rotator.current if self.rotator is not None else None
        return material.leaf.validity.not_after if material is not None else None

    def leaf_problem(self) -> str:
        if self.leaf_expiry() is not None:
            # A leaf that does not chain to the current roots is refused by every peer.
            return self.rotator.problem() if self.rotator is not None else ""
        error = self.leaf_error
        dc = self._datacenter
        if not error and dc is not None and not dc.state.loaded and dc.state.last_error:
            error = f"cannot read the datacenter from Consul: {dc.state.last_error}"
        why = f": {error}" if error else ""
        return f"no leaf certificate yet from the {self.config.certs.source!r} source{why}"

    def _listeners(self) -> list[tuple[str, bool | None]]:
        """Each listener the config asks for, and whether it serves (None: not running as
        asked, e.g. before the leaf, or its port could not be bound)."""
        cfg = self.config
        running = self.proxy.running if self.proxy is not None else {}
        host = cfg.sidecar.address or cfg.service.address or "127.0.0.1"
        wanted = [(f"inbound :{cfg.sidecar.port}", bind_address(host, cfg.sidecar.port))]
        wanted += [(f"upstream {up.name} {up.bind}", up.bind) for up in cfg.sidecar.upstreams]
        out: list[tuple[str, bool | None]] = []
        for label, address in wanted:
            got = running.get(address)
            out.append(
                (label, got.serving if got is not None and got.spec.label == label else None)
            )
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
        if not self.listen:
            reasons += self.listener_problems()
        for name, serving in self._listeners() if self.listen else ():
            if serving is None:
                reasons.append(f"listener {name}: not started")
            elif not serving:
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
        """What the proxy serves in a reduced way now: destinations it denies wholesale, and
        upstreams routed by an older chain because the newest was rejected."""
        chains = self.chains.upstreams.values() if self.chains is not None else ()
        found = [
            f"upstream {up.name}: discovery chain rejected, previous routing kept: {up.error}"
            for up in chains
            if up.error
        ] + [
            f"intentions for {dest} cannot be enforced (index {self.intentions_index}), "
            f"denying every request to it: {reason}"
            for dest, reason in sorted(self.intentions_broken.items())
        ]
        return [self.mutual_tls.problem, *found] if self.mutual_tls.problem else found

    def status(self) -> dict[str, Any]:
        material = self.rotator.current if self.rotator is not None else None
        st = self.intentions_watch.state
        upstreams: dict[str, Any] = {}
        if not self.listen:
            # The data planes balance over what this process pushed them: the same counts.
            for up in self.config.sidecar.upstreams:
                latest = self._latest_for(watch_key(up))
                snapshot = latest.get() if latest is not None else None
                upstreams[up.name] = {
                    "index": snapshot.index if snapshot is not None else None,
                    "endpoints": len(snapshot.endpoints) if snapshot is not None else 0,
                    "protocol": up.protocol
                    or (self.chains.protocol(up.name) if self.chains else "")
                    or "tcp",
                    "bind": up.bind,
                }
        if self.proxy is not None:
            for running in self.proxy.running.values():
                if isinstance(running.spec, UpstreamSpec) and running.endpoints is not None:
                    latest = self._latest_for(upstream_key(running.spec))
                    snapshot = latest.get() if latest is not None else None
                    upstreams[running.spec.name] = {
                        "index": snapshot.index if snapshot is not None else None,
                        "endpoints": len(running.endpoints.current.targets),
                        "protocol": running.spec.protocol,
                        "bind": running.spec.bind,
                    }
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
                # A CA replaced without cross-signing: its roots trusted until then (epoch s).
                "old_roots_trusted_until": material.bundle.grace_until if material else 0.0,
                "ca_switches": self.rotator.ca_switches if self.rotator is not None else 0,
            },
            "intentions": {
                "loaded": self.intentions_loaded,
                "index": self.intentions_index,
                "version": self.intentions.version,
                "failures": st.failures,
                "last_error": st.last_error,
                "last_success": st.last_success,
                "broken": dict(self.intentions_broken),
                "broken_total": self.intentions_broken_total,
            },
            "listeners": {name: serving is not None for name, serving in self._listeners()},
            "mutual_tls": {
                "mode": self.mutual_tls.mode,
                "source": self.mutual_tls.source,
                "problem": self.mutual_tls.problem,
            },
            "routing": self.chains.status() if self.chains is not None else {},
            "upstreams": upstreams,
            "connections": {
                r.spec.label: {
                    "open": r.listener.open_connections,
                    "handshaking": r.listener.pending_handshakes,
                }
                for r in (self.proxy.running.values() if self.proxy is not None else ())
            },
            "heap_trims": self.heap.trims,
            "tracing": self._tracing_status(),
            "local_app": self._local_app_status(),
            "stats": {k: v for k, v in self.counters().items() if k not in METRICS_ONLY},
        }

    def counters(self) -> dict[str, Any]:
        """What a worker reports and a worker group adds up (connect.counters)."""
        return proxy_counters(self.stats, self.proxy, self.telemetry, self.access_log)

    def _local_app_status(self) -> dict[str, Any]:
        """The local app's timeouts in force (seconds; None: none), and the answers of the
        three watches refused so far (a bad value in any of them keeps these)."""
        t = self.local_app
        watches = (self.proxy_defaults_watch, self.service_defaults_watch, self.registration_watch)
        return {
            "connect_timeout": t.connect_timeout,
            "request_timeout": t.request_timeout,
            "idle_timeout": t.idle_timeout,
            "rejected": sum(w.state.rejected for w in watches),
            "last_error": next((w.state.last_error for w in watches if w.state.last_error), ""),
        }

    def _tracing_status(self) -> dict[str, Any]:
        t = self.tracing
        pd, reg = self.proxy_defaults_watch.state, self.registration_watch.state
        return {
            "on": t is not None,
            "otlp_endpoint": t.otlp_endpoint if t is not None else "",
            "sampling_percent": t.sampling_percent if t is not None else 0.0,
            "propagation": list(t.propagation) if t is not None else [],
            "rejected": pd.rejected + reg.rejected,
            "last_error": reg.last_error or pd.last_error,
            "spans": self.telemetry.tracing_counters(),
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
        self._consul = consul
        self._latest_for = latest_for
        leaf_source = await self._leaf_source(consul)
        self.rotator = LeafRotator(leaf_source, consul_roots_source(consul))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._rotate(), name="leaf rotation")
            tg.create_task(self.intentions_watch.run(), name="intentions watch")
            tg.create_task(self.proxy_defaults_watch.run(), name="proxy-defaults watch")
            tg.create_task(self.service_defaults_watch.run(), name="service-defaults watch")
            tg.create_task(self._follow_access_logs(), name="access log settings")
            tg.create_task(self.registration_watch.run(), name="sidecar registration watch")
            tg.create_task(self._follow_registration(), name="tracing settings")
            tg.create_task(self._follow_service_defaults(), name="local app timeouts")
            tg.create_task(self.access_log.run(), name="access log writer")
            material = await self.rotator.ready()
            self.tls = DynamicTLS(material)
            self.telemetry.principal = material.leaf.service_uri
            log.info("leaf %s held (generation %d)", material.leaf.service_uri, material.generation)
            tg.create_task(self._follow_leaf(self.tls), name="leaf follower")
            await self.intentions.changed(0)
            if before_listen is not None:
                await before_listen()
            if self._closed:
                return
            local = Identity(self.config.service.name)
            tls = self.tls

            def latest_of(spec: UpstreamSpec) -> Latest[EndpointSnapshot | None] | None:
                return latest_for(upstream_key(spec))

            chains = self.chains = ChainWatch(
                consul,
                self.config.service.name,
                self._settings,
                trust_domain=lambda: tls.trust_domain,
                rng=self._rng,
                clock=self._clock,
            )
            for up in self.config.sidecar.upstreams:
                chains.upstream(up.name)
            tg.create_task(chains.run(), name="discovery chains")
            if not self.listen:
                if any(not up.protocol for up in self.config.sidecar.upstreams):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(chains.compiled.wait(), _FIRST_ENDPOINTS_WAIT)
                settle_garbage_collector()
                self.started.set()
                return

            def routing_of(spec: UpstreamSpec) -> Latest[RoutingSnapshot | None] | None:
                # An upstream whose section picks its own instances keeps doing so.
                if spec.filter or spec.datacenter or spec.peer:
                    return None
                return chains.upstream(spec.name)

            self.proxy = DataPlane(
                tls,
                intentions_authorizers(self.intentions.get, local),
                routing=routing_of,
                endpoints=latest_of,
                targets=targets_of,
                stats=self.stats,
                rng=self._rng,
                reuse_port=self._reuse_port,
                claim_ports=self._claim_ports,
                telemetry=self.telemetry,
            )
            if any(not up.protocol for up in self.config.sidecar.upstreams):
                # Upstreams that speak their chain's protocol: bounded wait for the chains.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(chains.compiled.wait(), _FIRST_ENDPOINTS_WAIT)
            chains.on_protocol = self._protocol_changed
            await self.proxy.apply(
                sidecar_spec(
                    self.config,
                    tls.material.leaf.service_uri,
                    chains.protocol,
                    self.mutual_tls.mode,
                    tracing=self.tracing,
                    local_app=self.local_app,
                )
            )
            tg.create_task(self._recheck_on_intentions(self.proxy), name="intentions recheck")
            tg.create_task(self.heap.run(), name="heap trimmer")
            settle_garbage_collector()
            keep_read_buffers_on_heap()  # no mmap/munmap per TLS read (connect.heap_trim)
            self.started.set()

    def dataplane_inputs(self) -> tuple[object, ...]:
        """Changes whenever `dataplane_snapshot()` would: cheap to poll (versions and
        identities, nothing encoded)."""
        chains = self.chains
        return (
            self.rotator.current if self.rotator is not None else None,
            self.config,
            self.intentions_source,
            self.access_log.settings,
            self.mutual_tls.mode,
            self.tracing,
            self.local_app,
            tuple(
                (up.name, latest.version if latest is not None else -1)
                for up in self.config.sidecar.upstreams
                for latest in [self._latest_for(watch_key(up))]
            ),
            tuple((name, up.latest.version) for name, up in chains.upstreams.items())
            if chains is not None
            else (),
        )

    def dataplane_snapshot(self, version: int) -> DataPlaneSnapshot | None:
        """Everything a data-plane process serves with, whole; None until a leaf is held and
        the first intentions answer compiled (a data plane never serves before that)."""
        material = self.rotator.current if self.rotator is not None else None
        if material is None or not self.intentions_loaded or not self.started.is_set():
            return None
        protocol = self.chains.protocol if self.chains is not None else (lambda name: "")
        spec = dataclasses.replace(
            sidecar_spec(self.config, material.leaf.service_uri, protocol, self.mutual_tls.mode),
            tracing=self.tracing,
            local_app=self.local_app,
        )
        endpoints = []
        for up in spec.upstreams:
            latest = self._latest_for(upstream_key(up))
            snap = latest.get() if latest is not None else None
            endpoints.append(
                UpstreamEndpoints(
                    up.name,
                    up.datacenter,
                    up.peer,
                    up.filter,
                    tuple(targets_of(snap)) if snap is not None else None,
                    snap.index if snap is not None else 0,
                )
            )
        routing = {}
        if self.chains is not None:
            for up in spec.upstreams:
                if up.filter or up.datacenter or up.peer:
                    continue
                chain = self.chains.upstream(up.name).get()
                if chain is not None:
                    routing[up.name] = chain
        default, entries, index = self.intentions_source
        return DataPlaneSnapshot(
            version=version,
            service=self.config.service.name,
            spec=spec,
            material=PushedMaterial(
                PushedLeaf(
                    material.leaf.cert_pem,
                    material.leaf.key_pem,
                    material.leaf.service_uri,
                    material.leaf.validity.not_after,
                ),
                PushedRoots(
                    material.bundle.pem,
                    material.bundle.trust_domain,
                    material.bundle.grace_domains,
                ),
            ),
            intentions=IntentionsSource(default[0], default[1], entries, index),
            endpoints=tuple(endpoints),
            routing=routing,
            access_log=self.access_log.settings,
            log_level=self.config.log_level,
        )

    async def _recheck_on_intentions(self, proxy: DataPlane[EndpointSnapshot | None]) -> None:
        """Each new intentions snapshot: open L4 connections now denied are closed (an HTTP
        request is decided on the snapshot current when it arrives)."""
        version = self.intentions.version
        while True:
            version, _ = await self.intentions.changed(version)
            proxy.recheck_connections()

    async def reconfigure(self, config: AgentConfig) -> Plan | None:
        """A reload: the listeners follow `config` (what `live_changes` lets change). None
        before the listeners are up: they then start from this config. Raises `OSError` for
        a listener that cannot bind (the others are applied)."""
        self.config = config
        self._apply_access_logs()
        if self.chains is not None:
            for up in config.sidecar.upstreams:
                self.chains.upstream(up.name)
        if self.proxy is None or self.tls is None or self._closed:
            return None
        protocol = self.chains.protocol if self.chains is not None else (lambda name: "")
        spec = sidecar_spec(
            config, self.tls.material.leaf.service_uri, protocol, self.mutual_tls.mode
        )
        await self._first_endpoints(spec)
        # The tracing in force now: it may have changed while the endpoints were awaited.
        return await self.proxy.apply(
            dataclasses.replace(spec, tracing=self.tracing, local_app=self.local_app)
        )

    def _protocol_changed(self) -> None:
        """A chain's protocol changed: an upstream that takes it gets its listener replaced."""
        if any(not up.protocol for up in self.config.sidecar.upstreams):
            asyncio.get_running_loop().create_task(self._reapply(), name="protocol change")

    async def _reapply(self) -> None:
        try:
            await self.reconfigure(self.config)
        except OSError as exc:
            log.error("applying a chain's protocol change: %s", exc)

    async def _first_endpoints(self, spec: SidecarSpec) -> None:
        """Before binding a new upstream's port, wait (bounded) for its watch's first answer,
        as a worker does at start: a connection accepted before that could only be refused
        with 503. Past the bound the port opens anyway and readiness says what is missing."""
        waits = []
        for up in spec.upstreams:
            latest = self._latest_for(upstream_key(up))
            if latest is not None and latest.get() is None:
                waits.append(latest.changed(0))
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), _FIRST_ENDPOINTS_WAIT)

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
        self._datacenter = BlockingWatch(
            "datacenter",
            unindexed(consul.agent.self),
            lambda me, _: me.datacenter,
            "",
            self._settings,
            rng=self._rng,
            clock=self._clock,
        )
        datacenter = await self._datacenter.first()
        return VaultLeafSource(vconf, cfg.service.name, datacenter)

    async def _follow_leaf(self, tls: DynamicTLS[Material]) -> None:
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

    async def _default_of(self, consul: ConsulClient) -> tuple[bool, str]:
        me = await consul.agent.self()
        return default_allow(me.raw)

    async def _fetch_proxy_defaults(
        self, index: int, wait: float
    ) -> Indexed[tuple[Mapping[str, Any], ...]]:
        consul = self._consul
        assert consul is not None, "the proxy-defaults watch runs inside run()"
        return await consul.config_entries.list("proxy-defaults", index=index, wait=wait)

    def _decode_proxy_defaults(
        self, entries: tuple[Mapping[str, Any], ...], index: int
    ) -> AccessLogSettings:
        """The access-log settings the entry and agent.yaml give; an entry meshlet cannot use
        is refused (counted as a rejected snapshot) and the settings in force stay. Its
        MutualTLSMode is taken first, whatever the access logs say."""
        self._proxy_mode = entry_mode(entries, "global")
        self._mode_inputs_changed()
        entry = next((e for e in entries if e.get("Name") == "global"), None)
        raw = entry.get("AccessLogs") if entry is not None else None
        if raw is not None and not isinstance(raw, Mapping):
            raise AnswerRejected("proxy-defaults global: AccessLogs is not an object")
        config = entry.get("Config") if entry is not None else None
        tracing = config.get("tracing") if isinstance(config, Mapping) else None
        try:
            settings = effective_settings(raw, self.config.telemetry.access_logs.overrides())
            effective_tracing(tracing, self._service_tracing)
            effective_local_app(config, self._service_entry, self._service_config)
        except ValueError as exc:
            raise AnswerRejected(f"proxy-defaults global (index {index}): {exc}") from None
        self._access_logs_raw = raw
        self._mesh_tracing = tracing
        self._mesh_config = config
        return settings

    async def _fetch_service_defaults(
        self, index: int, wait: float
    ) -> Indexed[tuple[Mapping[str, Any], ...]]:
        consul = self._consul
        assert consul is not None, "the service-defaults watch runs inside run()"
        return await consul.config_entries.list("service-defaults", index=index, wait=wait)

    def _decode_service_defaults(
        self, entries: tuple[Mapping[str, Any], ...], index: int
    ) -> object:
        """The local service's MutualTLSMode as its entry sets it ("" without one); its
        LocalConnectTimeoutMs / LocalRequestTimeoutMs are checked too (a bad one refuses the
        answer, after the mode was taken, as proxy-defaults does)."""
        self._service_mode = entry_mode(entries, self.config.service.name)
        self._mode_inputs_changed()
        entry = next((e for e in entries if e.get("Name") == self.config.service.name), None)
        try:
            effective_local_app(self._mesh_config, entry, self._service_config)
        except ValueError as exc:
            name = self.config.service.name
            raise AnswerRejected(f"service-defaults {name} (index {index}): {exc}") from None
        self._service_entry = entry
        return self._service_mode

    def _mode_inputs_changed(self) -> None:
        """Resolve the mode again; a new one is applied to the running listeners (in place)."""
        resolved = resolve(self.config.service.name, self._service_mode, self._proxy_mode)
        if resolved == self.mutual_tls:
            return
        if resolved.problem:
            log.error("%s", resolved.problem)
        else:
            log.info("MutualTLSMode %s (from %s)", resolved.mode, resolved.source)
        changed = resolved.mode != self.mutual_tls.mode
        self.mutual_tls = resolved
        if changed and self.proxy is not None and not self._closed:
            self._mode_task = asyncio.get_running_loop().create_task(
                self._reapply(), name="MutualTLSMode change"
            )

    async def _follow_access_logs(self) -> None:
        latest = self.proxy_defaults_watch.latest
        version = latest.version
        self._apply_access_logs()
        while True:
            version, _ = await latest.changed(version)
            self._apply_access_logs()
            await self._apply_tracing()
            await self._apply_local_app()

    async def _read_registration(self, known: str, wait: float) -> Hashed[AgentService]:
        # From the local agent, as Consul's own sidecars do: it needs service:read on the
        # proxy only, where the catalog also filters by node:read on the proxy's node.
        consul = self._consul
        assert consul is not None, "the registration watch runs inside run()"
        me = self._proxy_id or sidecar_id(self.config.service.service_id)
        return await consul.agent.service(me, hash=known, wait=wait)

    def _decode_registration(self, registration: AgentService | None, index: int) -> None:
        """This sidecar's own registration's Proxy.Config.tracing (absent: the mesh's);
        a block meshlet cannot use is refused and the settings in force stay."""
        me = self._proxy_id or sidecar_id(self.config.service.service_id)
        proxy = registration.proxy if registration is not None else None
        tracing = proxy.config.get("tracing") if proxy is not None else None
        config = proxy.config if proxy is not None else None
        try:
            effective_tracing(self._mesh_tracing, tracing)
            effective_local_app(self._mesh_config, self._service_entry, config)
        except ValueError as exc:
            raise AnswerRejected(f"sidecar registration {me} (answer {index}): {exc}") from None
        self._service_tracing = tracing
        self._service_config = config

    async def _follow_registration(self) -> None:
        latest = self.registration_watch.latest
        version = latest.version
        while True:
            version, _ = await latest.changed(version)
            await self._apply_tracing()
            await self._apply_local_app()

    async def _follow_service_defaults(self) -> None:
        latest = self.service_defaults_watch.latest
        version = latest.version
        while True:
            version, _ = await latest.changed(version)
            await self._apply_local_app()

    async def _apply_local_app(self) -> None:
        """The merged local app timeouts into the data plane's spec, when they changed (the
        running inbound listener takes them in place: connect.sidecar)."""
        try:
            timeouts = effective_local_app(
                self._mesh_config, self._service_entry, self._service_config
            )
        except ValueError as exc:  # each input alone was checked, this is belt and braces
            log.error("local app timeouts unchanged: %s", exc)
            return
        if timeouts == self.local_app:
            return
        self.local_app = timeouts
        log.info(
            "local app timeouts: connect %gs, request %s, idle %s",
            timeouts.connect_timeout,
            f"{timeouts.request_timeout:g}s" if timeouts.request_timeout else "none",
            f"{timeouts.idle_timeout:g}s" if timeouts.idle_timeout else "listener's",
        )
        proxy = self.proxy
        if proxy is not None and not self._closed:
            await proxy.apply(dataclasses.replace(proxy.spec, local_app=timeouts))

    async def _apply_tracing(self) -> None:
        """The merged tracing settings into the data plane's spec, when they changed."""
        try:
            settings = effective_tracing(self._mesh_tracing, self._service_tracing)
        except ValueError as exc:  # each block alone was checked, this is belt and braces
            log.error("tracing unchanged: %s", exc)
            return
        tracing = settings if settings.enabled else None
        if tracing == self.tracing:
            return
        self.tracing = tracing
        if tracing is None:
            log.info("tracing: off")
        else:
            log.info(
                "tracing: on, %g%% of new traces to %s (propagation %s)",
                tracing.sampling_percent,
                tracing.otlp_endpoint,
                ", ".join(tracing.propagation),
            )
        proxy = self.proxy
        if proxy is not None and not self._closed:
            await proxy.apply(dataclasses.replace(proxy.spec, tracing=tracing))

    def _apply_access_logs(self) -> None:
        """Consul's block with agent.yaml's overrides, as they are now (after a reload too)."""
        try:
            settings = effective_settings(
                self._access_logs_raw, self.config.telemetry.access_logs.overrides()
            )
        except ValueError as exc:
            log.error("access logs unchanged: %s", exc)
            return
        if settings != self.access_log.settings:
            log.info(
                "access logs: %s%s",
                "on" if settings.enabled else "off (denials only)",
                ", listener logs off" if settings.disable_listener_logs else "",
            )
            self.access_log.settings = settings

    async def _fetch_intentions(self, index: int, wait: float) -> Indexed[IntentionsAnswer]:
        """The intentions watch's read: the entries, and the default decision (read again
        whenever the watch starts over)."""
        consul = self._consul
        assert consul is not None, "the intentions watch runs inside run()"
        if self._default is None or index == 0:
            self._default = await self._default_of(consul)
        got = await consul.config_entries.list("service-intentions", index=index, wait=wait)
        answer: IntentionsAnswer = (self._default, got.value)
        return Indexed(answer, got.index, got.next_index, got.known_leader, got.last_contact)

    def _compile_answer(self, answer: IntentionsAnswer, index: int) -> IntentionsSnapshot:
        # Never rejects: an entry that cannot be compiled denies its destination (below), so
        # the watch never falls back to a previous snapshot for authorization.
        default, bodies = answer
        relevant = self._relevant(bodies)
        self.intentions_source = (default, relevant, index)
        return self._compile_intentions(relevant, index, default)

    def _relevant(self, bodies: tuple[Mapping[str, Any], ...]) -> tuple[Mapping[str, Any], ...]:
        """The entries that can decide for the local service: its own and the wildcard one
        (and one whose destination cannot be told, which fails closed as a wildcard). An
        entry for another service, valid or not, never affects ours."""
        names = (self.config.service.name, "*")
        return tuple(b for b in bodies if destination_of(b)[2] in names)

    def _apply_intentions(
        self, bodies: tuple[Mapping[str, Any], ...], index: int, default: tuple[bool, str]
    ) -> None:
        """Compile and publish at once (what the watch does with each new answer)."""
        self.intentions.publish(self._compile_intentions(bodies, index, default))

    def _compile_intentions(
        self, bodies: tuple[Mapping[str, Any], ...], index: int, default: tuple[bool, str]
    ) -> IntentionsSnapshot:
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
        log.info("intentions applied (index %d, %d entries)", index, len(bodies))
        return snapshot

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting and let open exchanges finish for `grace` seconds."""
        self._closed = True
        if self.proxy is not None:
            await self.proxy.close(grace)


__all__ = [
    "Sidecar",
    "compile_intentions",
    "default_allow",
    "live_changes",
    "needs_restart",
    "sidecar_spec",
]
