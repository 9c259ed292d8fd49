"""The agent's half of traffic management: the routing config entries watched, each upstream's
discovery chain compiled locally, and per chain target a health watch of its instances, handed
to the proxy as one immutable `RoutingSnapshot` per upstream.

    chains = ChainWatch(consul, "web", settings, connectivity)
    latest = chains.upstream("api")            # Latest[RoutingSnapshot | None]
    tg.create_task(chains.run())

Why compile locally instead of watching `/v1/discovery-chain/<name>`: the compiler is the one
devstack serves (traffic.chain, Consul's compile.go), five blocking watches (`/v1/config/<kind>`
for service-router, -splitter, -resolver, service-defaults, proxy-defaults) serve every
upstream, and the router's `Meta` (meshlet.io/route.<n>.* keys, which the compiled chain does
not carry) is at hand. The calling service's `service-defaults` `UpstreamConfig` (override for
the upstream merged over `Defaults`) gives `ConnectTimeoutMs` and `Protocol` as compile
overrides, as Consul's proxycfg passes them, and the limits and passive health check.

Each target is watched with `/v1/health/connect/<service>?filter=<subset filter>` in its
datacenter (meshlet's `UpstreamWatcher`), with `&passing` only for a subset with `OnlyPassing:
true`: as Consul has it, `OnlyPassing: false` (the default) uses instances in `warning` too,
and never critical ones (left out of the answer here).

An upstream is routed by its chain once the entry watches have answered, unless meshlet's own
config gives it a `filter`, `datacenter` or `peer` (then that section decides, as before). A
chain that fails to decode, compile or convert is rejected whole: the previous snapshot stays
(routing only: authorization never falls back), the reason is logged, counted and shown in
`status()`. A snapshot is published only once every target has had its first answer (a chain
change that adds a target keeps the previous snapshot until then, at most
INITIAL_FETCH_TIMEOUT; `applied` in `status()`). After a control-plane reset, a target's empty
answer keeps its last endpoints for `reset_hold` (`_target_endpoints`), and while Consul is
away the chains wait for every entry watch to answer again before compiling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.catalog import Snapshot, WatchKey
from agent.connectivity import Connectivity
from agent.consul import ConsulClient, ConsulUnavailable, Indexed
from agent.watch import UpstreamWatcher
from agent.watches import BlockingWatch, WatchSettings
from connect.balancer import Target
from connect.chain_routes import (
    ChainRejected,
    ChainRouting,
    RoutingSnapshot,
    chain_routing,
    merge_upstream_config,
    mirror_services,
)
from connect.latest import Latest
from traffic.chain import ChainEntries, CompiledDiscoveryChain, CompileRequest, compile_chain
from traffic.defaults import (
    ProxyDefaults,
    ServiceDefaults,
    UpstreamConfig,
    proxy_defaults_from_json,
    service_defaults_from_json,
)
from traffic.entries import RoutingEntry, entry_from_json
from traffic.errors import GraphError

log = logging.getLogger("meshlet.agent.routing")

INITIAL_FETCH_TIMEOUT = 15.0
"""Seconds a chain change waits for a new target's first answer before it applies with that
target empty (Envoy's `initial_fetch_timeout` default: a warming cluster is not waited for
for ever)."""

KINDS = (
    "service-router",
    "service-splitter",
    "service-resolver",
    "service-defaults",
    "proxy-defaults",
)

Bodies = tuple[Mapping[str, Any], ...]


def targets_of(snapshot: Snapshot | None) -> tuple[Target, ...]:
    if snapshot is None:
        return ()
    return tuple(
        Target(key=f"{e.node}/{e.service_id}", host=e.address, port=e.port, weight=e.weight)
        for e in snapshot.endpoints
    )


def decode_entries(bodies: Mapping[str, Bodies]) -> ChainEntries:
    """The watched entries as the compiler's models; ValueError names an unreadable entry."""
    models: list[RoutingEntry | ServiceDefaults | ProxyDefaults] = []
    for kind, entries in bodies.items():
        for body in entries:
            try:
                if kind == "service-defaults":
                    models.append(service_defaults_from_json(body))
                elif kind == "proxy-defaults":
                    models.append(proxy_defaults_from_json(body))
                else:
                    models.append(entry_from_json(body))
            except Exception as exc:
                raise ValueError(f"{kind} {body.get('Name')!r}: {exc}") from exc
    return ChainEntries.of(models)


def upstream_config(entries: ChainEntries, caller: str, upstream: str) -> UpstreamConfig | None:
    """The caller's `UpstreamConfig` for `upstream`: its override merged over `Defaults`."""
    defaults = entries.services.get(caller)
    uc = defaults.upstream_config if defaults is not None else None
    if uc is None:
        return None
    override = next((o for o in uc.overrides if o.name == upstream and not o.peer), None)
    return merge_upstream_config(uc.defaults, override)


def compile_upstream(
    entries: ChainEntries, caller: str, upstream: str, *, trust_domain: str, datacenter: str
) -> tuple[ChainRouting, bool]:
    """(the routing of `upstream` as `caller` calls it, whether the chain is Consul's default
    one with no upstream config). Raises `ChainRejected` or ValueError."""
    cfg = upstream_config(entries, caller, upstream)
    chain = compile_chain(
        CompileRequest(
            upstream,
            trust_domain,
            datacenter=datacenter,
            override_protocol=cfg.protocol if cfg is not None else "",
            override_connect_timeout_ns=(cfg.connect_timeout_ms * 1_000_000) if cfg else 0,
        ),
        entries,
    )
    router = entries.routers.get(upstream)
    meta = router.meta if router is not None else None
    mirrors = {
        m: mirror_chain(entries, m, trust_domain=trust_domain, datacenter=datacenter)
        for m in mirror_services(meta or {})
    }
    routing = chain_routing(chain, upstream_config=cfg, router_meta=meta, mirrors=mirrors)
    return routing, chain.default and cfg is None


def mirror_chain(
    entries: ChainEntries, mirror: str, *, trust_domain: str, datacenter: str
) -> CompiledDiscoveryChain:
    """The chain a route's mirror (`service` or `service/subset`) sends its copies down: the
    service's resolver (its subset as the default subset), not its router or splitter (a
    mirror names instances, as Istio's mirror destination does)."""
    service, _, subset = mirror.partition("/")
    resolvers = dict(entries.resolvers)
    resolver = resolvers.get(service)
    if subset:
        if resolver is None or subset not in resolver.subsets:
            raise ChainRejected(f"mirror {mirror!r}: service {service!r} has no subset {subset!r}")
        resolvers[service] = dataclasses.replace(resolver, default_subset=subset)
    only = dataclasses.replace(
        entries,
        routers={k: v for k, v in entries.routers.items() if k != service},
        splitters={k: v for k, v in entries.splitters.items() if k != service},
        resolvers=resolvers,
    )
    try:
        return compile_chain(
            CompileRequest(service, trust_domain, datacenter=datacenter, override_protocol="http"),
            only,
        )
    except GraphError as exc:
        raise ChainRejected(f"mirror {mirror!r}: {exc}") from None


def hold_routing_after_reset(
    default: bool, routed: bool, reset_at: float | None, now: float, grace: float
) -> bool:
    """Whether a chain that compiled to Consul's default keeps the upstream's last routing.

    Only after a control-plane reset (`reset_at`: when an entry watch's index was seen going
    backwards): a restarted, empty Consul answers "no entries" until they are written again
    or restored, and applying that would drop the splits, subsets and retries (and may turn
    an http chain into tcp) while the instances are still serving. So, for `grace` seconds
    (`WatchSettings.reset_hold`), as `agent.watch.hold_after_reset` holds an upstream's last
    endpoints. Without a reset, entries deleted take effect."""
    return default and routed and reset_at is not None and now - reset_at < grace


class _Upstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latest: Latest[RoutingSnapshot | None] = Latest(None)
        self.routing: ChainRouting | None = None
        self.index = 0
        self.protocol = ""
        self.error = ""
        self.rejected = 0
        self.logged_ignored: tuple[str, ...] = ()
        self.holding = False
        """The last routing kept after a control-plane reset (`hold_routing_after_reset`)."""


class ChainWatch:
    def __init__(
        self,
        consul: ConsulClient,
        caller: str,
        settings: Callable[[], WatchSettings],
        connectivity: Connectivity | None = None,
        *,
        trust_domain: Callable[[], str] = lambda: "consul",
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        initial_fetch_timeout: float = INITIAL_FETCH_TIMEOUT,
    ) -> None:
        self._consul = consul
        self.caller = caller
        self._initial_fetch_timeout = initial_fetch_timeout
        self._timed_out_logged: set[WatchKey] = set()
        self._settings = settings
        self._connectivity = connectivity if connectivity is not None else Connectivity(clock)
        self._trust_domain = trust_domain
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.datacenter = ""
        self.entries: dict[str, BlockingWatch[Bodies, Bodies | None]] = {
            kind: BlockingWatch(
                f"config {kind}",
                self._fetcher(kind),
                lambda bodies, _: bodies,
                None,
                settings,
                connectivity=self._connectivity,
                rng=self._rng,
                clock=clock,
            )
            for kind in KINDS
        }
        self.upstreams: dict[str, _Upstream] = {}
        self.targets: dict[WatchKey, tuple[UpstreamWatcher, asyncio.Task[None]]] = {}
        self.rejected_total = 0
        self._dirty = asyncio.Event()
        self._recompile = True
        """A config entry watch published since the last recompute: compile every chain."""
        self._targets_changed: set[WatchKey] = set()
        """Targets whose instances changed since then: republish only the upstreams using
        them (a change to one target's instances recompiles no chain)."""
        self._targets_of: dict[WatchKey, tuple[Snapshot | None, tuple[Target, ...]]] = {}
        """Each target's last snapshot and its `targets_of`, so an unchanged target keeps its
        very tuple (and a snapshot comparing it compares by identity)."""
        self.compiled = asyncio.Event()
        """Set once every registered upstream's chain was compiled (or rejected) once."""
        self.on_protocol: Callable[[], None] | None = None
        """Called when an upstream's chain protocol changed after its first compile."""
        self._tg: asyncio.TaskGroup | None = None
        self._entry_index: dict[str, int] = {}
        self._reset_at: float | None = None
        """When an entry watch's index was last seen going backwards, while a hold lasts."""
        self._hold_timer: asyncio.TimerHandle | None = None
        self._unreached: set[str] = set()
        """Entry kinds whose last read could not reach Consul: their value is from before."""
        self._reset_seen: float | None = None
        """When a control-plane reset was last seen, for `reset_hold` seconds after it (the
        chain targets' endpoints hold, `_target_endpoints`)."""
        self._back_since_reset: set[WatchKey] = set()
        """Targets that answered with instances since that reset: their hold is over."""
        self._answer_at_reset: dict[WatchKey, Snapshot | None] = {}
        """Each target's answer when the reset was seen: read before it, so its instances
        do not say the target is back (the reset is seen from the entry watches, and a
        target's watch may not have read the new Consul yet)."""
        self._reset_timer: asyncio.TimerHandle | None = None
        self._target_started: dict[WatchKey, float] = {}
        self._fetch_timers: dict[WatchKey, asyncio.TimerHandle] = {}
        self.initial_fetch_timeouts = 0
        """New targets applied empty because their watch had not answered in time."""

    def _fetcher(self, kind: str) -> Callable[[int, float], Any]:
        async def fetch(index: int, wait: float) -> Indexed[Bodies]:
            try:
                got = await self._consul.config_entries.list(kind, index=index, wait=wait)
            except ConsulUnavailable:
                self._unreached.add(kind)
                raise
            if kind in self._unreached:
                self._unreached.discard(kind)
                # Compile again even when this kind's answer is unchanged: the others may
                # have answered meanwhile, and were not compiled without it.
                self._recompile = True
                self._dirty.set()
            return got

        return fetch

    def upstream(self, name: str) -> Latest[RoutingSnapshot | None]:
        """The routing snapshots of `name` (registered on first call; None until routed)."""
        up = self.upstreams.get(name)
        if up is None:
            up = self.upstreams[name] = _Upstream(name)
            self._recompile = True
            self._dirty.set()
        return up.latest

    def protocol(self, name: str) -> str:
        """The chain's protocol for `name` ("" until compiled)."""
        up = self.upstreams.get(name)
        return up.protocol if up is not None else ""

    async def run(self) -> None:
        me = await self._consul.agent.self()
        self.datacenter = me.datacenter
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for kind, watch in self.entries.items():
                tg.create_task(watch.run(), name=f"watch config {kind}")
                tg.create_task(self._poke(watch.latest, None), name=f"follow config {kind}")
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                if self._recompile:
                    self._recompile = False
                    self._targets_changed.clear()
                    self._recompute()
                else:
                    changed, self._targets_changed = self._targets_changed, set()
                    self._republish(changed)

    async def _poke(self, latest: Latest[Any], target: WatchKey | None) -> None:
        """Follow `latest` (a config entry kind's when `target` is None, else a target's)."""
        version = latest.version
        while True:
            version, _ = await latest.changed(version)
            if target is None:
                self._recompile = True
            else:
                self._targets_changed.add(target)
            self._dirty.set()

    def _republish(self, changed: set[WatchKey]) -> None:
        """Only target instances changed: the chains stand, their endpoints move."""
        if not changed or self._unreached:
            # Consul was away: whether it came back reset (and an empty answer is to be
            # held) is known once the entry watches answer; `_recompute` publishes then.
            return
        for up in self.upstreams.values():
            routing = up.routing
            if routing is not None and any(
                self._key(t) in changed for t in routing.targets.values()
            ):
                self._publish(up)

    def _recompute(self) -> None:
        bodies = {kind: w.latest.get() for kind, w in self.entries.items()}
        if any(b is None for b in bodies.values()):
            return  # not every kind answered yet (or cannot be read): no routing yet
        if self._unreached:
            # Consul was away and some kinds have not answered since: compiling the ones
            # that did (a restarted Consul's "no splitter") with the others' old entries
            # would apply a chain neither state had (the split lost, http turned to tcp).
            return
        index = max(w.state.index for w in self.entries.values())
        for kind, w in self.entries.items():
            if w.state.index < self._entry_index.get(kind, 0):
                self._reset_at = self._clock()
                self._note_reset()
            self._entry_index[kind] = w.state.index
        wanted: set[WatchKey] = set()
        try:
            entries = decode_entries({k: b for k, b in bodies.items() if b is not None})
            decode_error = ""
        except ValueError as exc:
            entries, decode_error = ChainEntries(), str(exc)
        for up in self.upstreams.values():
            if decode_error:
                self._reject(up, decode_error, index)
            else:
                self._compile(up, entries, index)
            if up.routing is not None:
                wanted.update(self._key(t) for t in up.routing.targets.values())
        for key in wanted - set(self.targets):
            self._start_target(key)
        for key in set(self.targets) - wanted:
            self.targets.pop(key)[1].cancel()
            self._targets_of.pop(key, None)
            self._target_started.pop(key, None)
            self._timed_out_logged.discard(key)
            timer = self._fetch_timers.pop(key, None)
            if timer is not None:
                timer.cancel()
        for up in self.upstreams.values():
            self._publish(up)
        if not any(up.holding for up in self.upstreams.values()):
            self._reset_at = None  # every chain is back (or none was routed): the reset is over
        self.compiled.set()

    def _compile(self, up: _Upstream, entries: ChainEntries, index: int) -> None:
        try:
            routing, default = compile_upstream(
                entries,
                self.caller,
                up.name,
                trust_domain=self._trust_domain(),
                datacenter=self.datacenter or "dc1",
            )
        except (ChainRejected, ValueError) as exc:
            self._reject(up, str(exc), index)
            return
        now, grace = self._clock(), self._settings().reset_hold
        if hold_routing_after_reset(default, up.routing is not None, self._reset_at, now, grace):
            if not up.holding:
                log.warning(
                    "upstream %s: Consul answers no routing entries after a control-plane "
                    "reset: keeping the last routing for up to %gs until they are back",
                    up.name,
                    grace,
                )
                up.holding = True
            if self._hold_timer is None and self._reset_at is not None:
                # Compile again once the grace has passed: then Consul's answer applies.
                self._hold_timer = asyncio.get_running_loop().call_later(
                    self._reset_at + grace - now, self._hold_over
                )
            return
        up.holding = False
        if up.protocol != routing.protocol:
            was, up.protocol = up.protocol, routing.protocol
            if self.on_protocol is not None:
                log.info("upstream %s: chain protocol %s -> %s", up.name, was or "-", up.protocol)
                self.on_protocol()
        if default and up.routing is None:
            return  # Consul's default chain: the upstream's own watch serves it as before
        if routing.ignored != up.logged_ignored:
            for why in routing.ignored:
                log.warning("upstream %s: not enforced: %s", up.name, why)
            up.logged_ignored = routing.ignored
        up.routing, up.index, up.error = routing, index, ""

    def _hold_over(self) -> None:
        self._hold_timer = None
        self._recompile = True
        self._dirty.set()

    def _note_reset(self) -> None:
        """Consul's state was replaced: for `reset_hold` seconds, a chain target that had
        instances and now answers none keeps them (`_target_endpoints`), as each upstream's
        own watch does (agent.watch.hold_after_reset). Said here too because a target's watch
        sees the reset only if its own index went backwards, and a restarted Consul's index
        for a service can already be past the old one when the watch reads again (its
        instances and the others registered meanwhile)."""
        now, grace = self._clock(), self._settings().reset_hold
        if self._reset_seen is None:
            log.warning(
                "control-plane reset: chain targets that answer no instance keep their last "
                "ones for up to %gs or until instances register again",
                grace,
            )
        self._reset_seen = now
        self._back_since_reset.clear()
        self._answer_at_reset = {key: got[0].latest.get() for key, got in self.targets.items()}
        if self._reset_timer is not None:
            self._reset_timer.cancel()
        self._reset_timer = asyncio.get_running_loop().call_later(grace, self._reset_over)

    def _reset_over(self) -> None:
        self._reset_timer = None
        if self._reset_seen is not None:
            log.info("control-plane reset hold over: chain targets' answers apply as they are")
        self._reset_seen = None
        self._answer_at_reset = {}
        self._recompile = True
        self._dirty.set()

    def _resetting(self) -> bool:
        seen = self._reset_seen
        return seen is not None and self._clock() - seen < self._settings().reset_hold

    def _reject(self, up: _Upstream, why: str, index: int) -> None:
        if up.error != why:
            log.error(
                "upstream %s: discovery chain at index %d rejected whole, keeping the previous "
                "routing: %s",
                up.name,
                index,
                why,
            )
            up.rejected += 1
            self.rejected_total += 1
        up.error = why

    def _key(self, t: Any) -> WatchKey:
        dc = "" if t.datacenter in ("", self.datacenter) else t.datacenter
        # OnlyPassing false (the default): passing and warning instances, as Consul has it.
        return WatchKey(t.service, dc, t.peer, t.filter, warning=not t.only_passing)

    def _start_target(self, key: WatchKey) -> None:
        assert self._tg is not None
        watcher = UpstreamWatcher(
            self._consul,
            key,
            self._settings,
            self._connectivity,
            rng=self._rng,
            clock=self._clock,
        )
        task = self._tg.create_task(self._target(key, watcher), name=f"watch target {key.label}")
        self.targets[key] = (watcher, task)
        self._target_started[key] = self._clock()

    async def _target(self, key: WatchKey, watcher: UpstreamWatcher) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(watcher.run())
            tg.create_task(self._poke(watcher.latest, key))

    def _fetch_timed_out(self, key: WatchKey) -> bool:
        """Whether the new target `key`, not answered yet, has waited INITIAL_FETCH_TIMEOUT;
        until then a check is scheduled for when it will have."""
        now = self._clock()
        remaining = self._target_started.get(key, now) + self._initial_fetch_timeout - now
        if remaining <= 0:
            return True
        if key not in self._fetch_timers:

            def again() -> None:
                self._fetch_timers.pop(key, None)
                self._targets_changed.add(key)
                self._dirty.set()

            self._fetch_timers[key] = asyncio.get_running_loop().call_later(remaining, again)
        return False

    def _target_endpoints(
        self, tid: str, key: WatchKey, snap: Snapshot | None, current: RoutingSnapshot | None
    ) -> tuple[Target, ...] | None:
        """The endpoints published for target `tid`; None: keep the current snapshot whole.

        After a control-plane reset (`_note_reset`) an empty answer keeps the target's last
        endpoints until it answers with instances or `reset_hold` has passed, and a chain
        naming a target with none known does not replace a working one: Envoy keeps a
        cluster's last load assignment until a new one arrives, and a target's instances
        re-registering are still serving meanwhile."""
        endpoints = self._endpoints(key, snap)
        if endpoints:
            if snap is not self._answer_at_reset.get(key):
                self._back_since_reset.add(key)
            return endpoints
        if current is None or key in self._back_since_reset or not self._resetting():
            return endpoints
        before = current.endpoints.get(tid)
        if before:
            return before
        if tid not in current.endpoints and any(current.endpoints.values()):
            return None
        return endpoints

    def _endpoints(self, key: WatchKey, snap: Snapshot | None) -> tuple[Target, ...]:
        cached = self._targets_of.get(key)
        if cached is not None and cached[0] is snap:
            return cached[1]
        targets = targets_of(snap)
        self._targets_of[key] = (snap, targets)
        return targets

    def _publish(self, up: _Upstream) -> None:
        routing = up.routing
        if routing is None:
            return
        current = up.latest.get()
        endpoints: dict[str, tuple[Target, ...]] = {}
        for tid, t in routing.targets.items():
            key = self._key(t)
            got = self.targets.get(key)
            if got is None:
                return
            snap = got[0].latest.get()
            if snap is None and not got[0].state.loaded:
                # A target not answered yet has no endpoints: routing to it now would answer
                # 503 until its watch does, so the previous snapshot stays until then (as
                # Envoy keeps a new cluster warming until its first endpoints arrive), but
                # not for ever: after INITIAL_FETCH_TIMEOUT the chain applies without them.
                if not self._fetch_timed_out(key):
                    return
                if key not in self._timed_out_logged:
                    self._timed_out_logged.add(key)
                    self.initial_fetch_timeouts += 1
                    log.warning(
                        "upstream %s: target %s has not answered in %gs: applying the chain "
                        "without its instances",
                        up.name,
                        tid,
                        self._initial_fetch_timeout,
                    )
            kept = self._target_endpoints(tid, key, snap, current)
            if kept is None:
                return
            endpoints[tid] = kept
        new = RoutingSnapshot(routing, endpoints, up.index)
        if current is None or current != new:
            up.latest.publish(new)

    def status(self) -> dict[str, Any]:
        return {
            "entries": {
                kind: {
                    "loaded": w.state.loaded,
                    "index": w.state.index,
                    "error": w.state.last_error,
                }
                for kind, w in self.entries.items()
            },
            "rejected_total": self.rejected_total,
            "initial_fetch_timeouts": self.initial_fetch_timeouts,
            "reset_hold": self._resetting(),
            "upstreams": {
                name: {
                    "routed": up.routing is not None,
                    "protocol": up.protocol,
                    "index": up.index,
                    "applied": applied.index if (applied := up.latest.get()) else 0,
                    "targets": sorted(up.routing.targets) if up.routing else [],
                    "rejected": up.rejected,
                    "holding": up.holding,
                    "error": up.error,
                }
                for name, up in self.upstreams.items()
            },
        }
