"""The agent process: the composition root that wires everything under one TaskGroup.

    meshlet agent -c agent.yaml     ->   run_agent(path, env)

Start: the admin listener binds first (so /live answers and a bad port fails fast), then the
registrar and one watcher per upstream start; READY=1 goes to systemd once the service is
registered and every upstream has its first snapshot. Consul unreachable at start is not an
error: the agent keeps trying, is not ready, and /ready says why.

SIGHUP re-reads the file. A file that does not parse changes nothing (the error is logged and
shown in /v1/status); a good one is applied in place: watchers of unchanged upstreams keep
their snapshots, new ones start, removed ones stop, the registration is repaired if it moved,
and the sidecar's upstream listeners follow (added, removed, or replaced when their protocol
or destination changed; the others and their connections are untouched), in the workers too.
Settings that need new sockets (consul, admin, the inbound listener) or a new identity
(certs, service) are reported as needing a restart.

`meshlet sidecar` (`--workers N`, N >= 1, default 1) runs no listener in this process:
`DataPlanes` (agent/dataplanes.py) keeps N data-plane processes serving the same ports with
SO_REUSEPORT, fed by `_feed` with a whole snapshot whenever its inputs change; they drain and
stop with this process, survive its crash (adopted when it starts again) and show in
/v1/status under `workers`; the `proxy` section says what they serve
(agent/dataplane_status.py). `--workers 0` runs the listeners in this process instead (the
in-process mode: development, and tests that reach into the proxy's objects).

SIGTERM (or SIGINT) drains: STOPPING=1, deregister first, keep serving for
`shutdown.drain_period` while Consul's watchers of this service drop it, then stop. A second
signal ends the drain early.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.admin import AdminServer
from agent.bind_check import bind_error, bind_exit_code, bind_refused, sidecar_binds
from agent.catalog import Snapshot, WatchKey
from agent.config import AgentConfig, ConfigError, UpstreamSection, load, with_workers
from agent.connectivity import Connectivity
from agent.consul import ConsulClient, ConsulError, ConsulPermissionDenied
from agent.dataplane_status import merge_proxy_status
from agent.metrics import MetricsServer, metrics_route
from agent.readiness import SidecarReadiness
from agent.registration import ExternalRegistration, Registrar, sidecar_id
from agent.supervisor import WorkerState, sum_counters
from agent.systemd import Notifier
from agent.watch import (
    HOLDING,
    ApplyTimes,
    Latest,
    UpstreamWatcher,
    WatchSettings,
    watch_key,
)

if TYPE_CHECKING:
    from agent.dataplanes import DataPlanes
    from agent.sidecar import Sidecar
    from connect.dataplane.snapshot import Snapshot as DataPlaneSnapshot

log = logging.getLogger("meshlet.agent")

# How often STATUS= is refreshed for `systemctl status` when no watchdog asks for more.
_STATUS_EVERY = 5.0
# How often the data planes' feed looks for a change to push.
_FEED_EVERY = 0.1
# Seconds a new upstream's port waits for its first endpoints before the data planes open it.
_FIRST_ENDPOINTS_WAIT = 10.0


@dataclasses.dataclass
class _Watch:
    watcher: UpstreamWatcher
    task: asyncio.Task[None]
    bind: str


def _iso_age(ts: float | None) -> float | None:
    return None if ts is None else round(ts, 3)


class AgentRuntime:
    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        readiness: SidecarReadiness | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        sidecar: bool = False,
        workers: int | None = None,
        external: ExternalRegistration | None = None,
    ) -> None:
        self._external = external
        """Set: the proxy's registration is someone else's (Nomad's); never written here."""
        self._workers = workers
        """`--workers N`: wins over `sidecar.workers`, at start and on every reload."""
        config = with_workers(config, workers)
        self.config: Latest[AgentConfig] = Latest(config)
        self._path = config_path
        self._env = dict(env or {})
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._notifier = notifier if notifier is not None else Notifier(None)
        lean = sidecar and config.sidecar.workers > 0
        self.sidecar: Sidecar | None = None
        """The proxy (`meshlet sidecar`); None for `meshlet agent` (registration and watches).
        Unless --workers 0 (in-process), it only holds what feeds the data planes."""
        self.dataplanes: DataPlanes | None = None
        """The N data-plane processes of `meshlet sidecar --workers N` (N >= 1, the default
        1): they run the listeners, this process feeds them snapshots (agent/dataplanes.py)."""
        if sidecar:
            # Imported here: the proxy's stack and cryptography are `meshlet sidecar`'s; a
            # node agent without a sidecar never loads them.
            from agent.sidecar import Sidecar

            self.sidecar = Sidecar(
                config,
                self._env,
                self._watch_settings,
                rng=self._rng,
                clock=clock,
                listen=not lean,
                proxy_id=external.proxy_id if external is not None else "",
            )
        if lean:
            from agent.dataplanes import DataPlanes, control_dir

            self.dataplanes = DataPlanes(
                config.sidecar.workers, control_dir(config, self._env), self._env
            )
        if self.sidecar is not None and self.dataplanes is not None:
            self.sidecar.listener_problems = self._dataplane_problems
        self._snapshot_version = 0
        self._leaves: dict[int, dict[str, Any]] = {}
        """The leaf each recent snapshot version carried (for /v1/status)."""
        self._pushed_inputs: tuple[object, ...] | None = None
        """What the newest published snapshot was built from (`Sidecar.dataplane_inputs`)."""
        self._published_binds: set[str] | None = None
        self._refused_binds: dict[str, str] = {}
        self._adopted = 0
        if not sidecar and config.sidecar.workers > 1:
            log.warning("sidecar.workers is ignored by meshlet agent (it runs no proxy)")
        self._readiness: SidecarReadiness | None = readiness or self.sidecar
        """None for `meshlet agent`: no proxy runs here, so no sidecar is registered (a
        sidecar whose check nothing passes would only sit critical in the catalog)."""
        self._exit_code = 0
        self.connectivity = Connectivity(clock)
        self.apply_times = ApplyTimes()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload = asyncio.Event()
        self.ready = asyncio.Event()
        self.draining = False
        self._watches: dict[WatchKey, _Watch] = {}
        self._registrar: Registrar | None = None
        self._consul: ConsulClient | None = None
        self.admin: AdminServer | None = None
        self._loaded_at = clock()
        self._reloads = 0
        self._last_reload_error = ""

    # ---- signals ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # ---- the process -------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.config.get()
        host, _, port = cfg.admin.address.rpartition(":")
        self.admin = AdminServer(
            self, host.strip("[]"), int(port), extra_routes=[metrics_route(self.metrics_snapshot)]
        )
        try:
            await self.admin.start()
        except OSError as exc:
            log.error("cannot listen on admin.address %s: %s", cfg.admin.address, exc.strerror)
            return bind_exit_code(exc.errno)
        adopted = 0
        if self.dataplanes is not None:
            try:
                adopted = self._adopted = await self.dataplanes.open()
            except OSError as exc:
                log.error("cannot open the data planes' control socket: %s", exc)
                await self.admin.close()
                return 1
        if self.sidecar is not None and not adopted:
            # Before registering anything: a port held by someone else is a one-line error and
            # an exit that a supervisor can tell from a crash (docs/operations.md), not a
            # traceback once the leaf and intentions are in. (Data planes a killed agent left
            # serving hold them: adopted, they are ours.)
            refused = await bind_refused(sidecar_binds(cfg))
            if refused is not None:
                log.error("%s", refused)
                await self.admin.close()
                return refused.exit_code
        elif self._readiness is None:
            log.info(
                "meshlet agent runs no proxy: %s is registered without a sidecar, so the mesh "
                "cannot reach it; `meshlet sidecar` runs the proxy and registers %s",
                cfg.service.service_id,
                sidecar_id(cfg.service.service_id),
            )
        log.info(
            "meshlet agent for %s: admin at http://%s, Consul at %s",
            cfg.service.service_id,
            self.admin.address,
            cfg.consul_client.base_url,
        )
        metrics: MetricsServer | None = None
        if cfg.telemetry.metrics_address:
            metrics = MetricsServer(self.metrics_snapshot, cfg.telemetry.metrics_address)
            try:
                await metrics.start()
            except OSError as exc:
                log.error(
                    "cannot listen on telemetry.metrics_address %s: %s",
                    cfg.telemetry.metrics_address,
                    exc.strerror,
                )
                await self.admin.close()
                return bind_exit_code(exc.errno)
            log.info("metrics at http://%s/metrics", metrics.address)
        try:
            async with ConsulClient(cfg.consul_client) as consul:
                self._consul = consul
                registrar = Registrar(
                    consul,
                    self.config.get,
                    self.connectivity,
                    self._readiness,
                    rng=self._rng,
                    clock=self._clock,
                    external=self._external,
                )
                self._registrar = registrar
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(registrar.run_sync(), name="registration"),
                        tg.create_task(registrar.run_readiness(), name="sidecar-readiness"),
                        tg.create_task(self._systemd(), name="systemd"),
                        tg.create_task(self._reloads_loop(tg), name="reload"),
                    ]
                    for up in cfg.sidecar.upstreams:
                        self._start_watch(tg, up)
                    if self.sidecar is not None:
                        tasks.append(tg.create_task(self._run_sidecar(consul), name="sidecar"))
                    if self.dataplanes is not None:
                        tasks.append(tg.create_task(self._run_dataplanes(), name="data planes"))
                        tasks.append(tg.create_task(self._feed(), name="snapshot feed"))
                    await self._stop.wait()
                    if self.dataplanes is not None:
                        self.dataplanes.begin_stop()  # the data planes drain alongside
                    await self._drain(registrar)
                    await asyncio.gather(
                        *([self.dataplanes.stop()] if self.dataplanes is not None else []),
                        *([self.sidecar.close(grace=1.0)] if self.sidecar is not None else []),
                    )
                    for task in tasks:
                        task.cancel()
                    for watch in self._watches.values():
                        watch.task.cancel()
        finally:
            if metrics is not None:
                await metrics.close()
            if self.dataplanes is not None:
                await self.dataplanes.close()
            await self.admin.close()
        log.info("meshlet agent stopped")
        return self._exit_code

    async def _run_sidecar(self, consul: ConsulClient) -> None:
        assert self.sidecar is not None
        side = self.sidecar

        def consul_back() -> None:
            # A control plane back (maybe empty, with a new CA): the roots are read now, so
            # every sidecar takes the new CA within a round trip, not at its own backoff's end.
            if side.rotator is not None:
                side.rotator.consul_back()

        self.connectivity.on_recover(consul_back)
        try:
            await self.sidecar.run(consul, self._upstream_latest)
        except Exception as exc:
            # A listener that cannot bind, a certificate source that cannot be built: the
            # proxy cannot serve, so the process stops (deregistering first) and says why.
            bind = bind_error(exc)
            if bind is not None:
                # Taken since the check at start: one line, as that check says it.
                log.error("sidecar cannot listen, stopping: %s", bind)
                self._exit_code = bind_exit_code(bind.errno)
            else:
                log.error("sidecar failed, stopping: %s", exc, exc_info=exc)
                self._exit_code = 1
            self.request_stop()
            self._force.set()

    async def _run_dataplanes(self) -> None:
        assert self.sidecar is not None and self.dataplanes is not None
        await self.sidecar.started.wait()
        log.info("starting %d data-plane processes", len(self.dataplanes.planes))
        await self.dataplanes.run()

    async def _feed(self) -> None:
        """Push a whole snapshot to the data planes whenever what it is built from changes
        (polled: comparing versions costs next to nothing; a change reaches them within
        _FEED_EVERY seconds)."""
        sidecar, planes = self.sidecar, self.dataplanes
        assert sidecar is not None and planes is not None
        await sidecar.started.wait()
        last: tuple[object, ...] | None = None
        held: dict[str, float] = {}
        while True:
            try:
                last, held = await self._push(last, held)
                self._pushed_inputs = last
            except Exception:
                # A bug building a snapshot must not stop registration and the watches: the
                # data planes keep the last one, and the next change tries again.
                log.exception("snapshot for the data planes not built")
                with contextlib.suppress(Exception):
                    last = sidecar.dataplane_inputs()  # tried again at the next change
            await asyncio.sleep(_FEED_EVERY)

    async def _push(
        self, last: tuple[object, ...] | None, held: dict[str, float]
    ) -> tuple[tuple[object, ...] | None, dict[str, float]]:
        """One look at the inputs: a new snapshot published when they changed (or a held
        upstream's wait is over); the inputs it was built from, and what is still held."""
        sidecar, planes = self.sidecar, self.dataplanes
        assert sidecar is not None and planes is not None
        inputs = sidecar.dataplane_inputs()
        now = self._clock()
        due = any(now - since >= _FIRST_ENDPOINTS_WAIT for since in held.values())
        if inputs == last and not due:
            return last, held
        snapshot = sidecar.dataplane_snapshot(self._snapshot_version + 1)
        if snapshot is None:
            return last, held
        serving = self._published_binds
        if serving is None and self._adopted:
            # Adopted data planes serve the previous agent's listeners: a listener left out
            # of their first snapshot would be closed.
            serving = set(snapshot.spec.listeners())
        from agent.dataplanes import hold_unanswered

        snapshot, held = hold_unanswered(
            snapshot, serving or set(), held, now, _FIRST_ENDPOINTS_WAIT
        )
        snapshot = await self._claimed(snapshot)
        self._snapshot_version = snapshot.version
        material = sidecar.rotator.current if sidecar.rotator is not None else None
        if material is not None:
            self._leaves[snapshot.version] = {
                "generation": material.generation,
                "uri": material.leaf.service_uri,
                "trust_domain": material.bundle.trust_domain,
            }
        for old in [v for v in self._leaves if v <= snapshot.version - 64]:
            del self._leaves[old]  # a data plane 64 snapshots behind shows generation 0
        planes.publish(snapshot)
        return inputs, held

    async def _claimed(self, snapshot: DataPlaneSnapshot) -> DataPlaneSnapshot:
        """`snapshot` without the listeners whose port another socket holds: a port the
        data planes did not hold before is probed here first, as the in-process proxy does
        (SO_REUSEPORT would otherwise share it with whoever holds it)."""
        from connect.sidecar import claim_port

        binds = set(snapshot.spec.listeners())
        if self._published_binds is None:
            self._published_binds = binds  # checked at start (or held by adopted planes)
            return snapshot
        for bind in binds - self._published_binds:
            listener = snapshot.spec.listeners()[bind]
            try:
                await claim_port(listener.host, listener.port)
                self._refused_binds.pop(bind, None)
            except OSError as exc:
                log.error("%s not started: %s", listener.label, exc)
                self._refused_binds[bind] = f"listener {listener.label}: not started: {exc}"
                self._last_reload_error = f"listener not started: {exc}"
        for bind in list(self._refused_binds):
            if bind not in binds:
                del self._refused_binds[bind]
        self._published_binds = binds - self._refused_binds.keys()
        if not self._refused_binds:
            return snapshot
        spec = dataclasses.replace(
            snapshot.spec,
            upstreams=tuple(
                u for u in snapshot.spec.upstreams if u.bind not in self._refused_binds
            ),
        )
        return dataclasses.replace(snapshot, spec=spec)

    def _dataplane_problems(self) -> list[str]:
        planes = self.dataplanes
        if planes is None:
            return []
        reasons = list(self._refused_binds.values())
        if not planes.serving():
            why = "; ".join(planes.problems()) or (
                f"snapshot {planes.version} not applied yet"
                if planes.version
                else "none started yet"
            )
            reasons.append(f"no data plane serving: {why}")
        return reasons

    def _processes(self) -> list[WorkerState]:
        return self.dataplanes.workers if self.dataplanes is not None else []

    def _upstream_latest(self, key: WatchKey) -> Latest[Snapshot | None] | None:
        watch = self._watches.get(key)
        return watch.watcher.latest if watch is not None else None

    async def _drain(self, registrar: Registrar) -> None:
        period = self.config.get().shutdown.drain_period
        was_registered = registrar.registered.is_set()
        self.draining = True
        self._notifier.stopping("deregistering and draining")
        if registrar.external is None:
            log.info("stopping: deregistering from Consul first")
        await registrar.deregister()
        if not was_registered:
            return  # nobody was sent here, so there is nothing to drain
        log.info("deregistered; draining for %gs (signal again to stop now)", period)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._force.wait(), period)

    def _start_watch(self, tg: asyncio.TaskGroup, up: UpstreamSection) -> None:
        key = watch_key(up)
        if key in self._watches:
            return
        watcher = UpstreamWatcher(
            self._require_consul(),
            key,
            self._watch_settings,
            self.connectivity,
            rng=self._rng,
            clock=self._clock,
            apply_times=self.apply_times,
        )
        task = tg.create_task(watcher.run(), name=f"watch {key.label}")
        self._watches[key] = _Watch(watcher, task, f"{up.local_bind_address}:{up.local_bind_port}")
        log.info("watching upstream %s", key.label)

    def _require_consul(self) -> ConsulClient:
        assert self._consul is not None, "watches start inside run()"
        return self._consul

    def _watch_settings(self) -> WatchSettings:
        w = self.config.get().watch
        return WatchSettings(
            wait=w.wait,
            retry_initial=w.retry_initial,
            retry_max=w.retry_max,
            reset_hold=w.reset_hold,
        )

    async def _until_ready(self) -> None:
        registrar = self._registrar
        assert registrar is not None
        await registrar.registered.wait()
        if self.sidecar is not None:
            await self.sidecar.started.wait()
        # READY=1 (and the "ready:" line) means serving: a data plane has the snapshot. Polled:
        # serving() is made of several processes' reports, no one event says it.
        while self.dataplanes is not None and not self.dataplanes.serving():  # noqa: ASYNC110
            await asyncio.sleep(_FEED_EVERY)
        while True:
            pending = [w for w in self._watches.values() if w.watcher.latest.get() is None]
            if not pending:
                return
            await pending[0].watcher.latest.changed(0)

    async def _explain_empty_upstreams(self) -> None:
        """Say so when an upstream is empty because the token may not read it.

        Consul answers a Connect health query without service:read on the destination with no
        instances and no sign of filtering, which looks like a service nobody runs. The agent
        health endpoint refuses the same token with 403 and the missing permission, so ask it
        once for each upstream that starts empty."""
        consul = self._require_consul()
        for watch in list(self._watches.values()):
            key = watch.watcher.key
            snapshot = watch.watcher.latest.get()
            if snapshot is None or snapshot.endpoints or key.peer or key.datacenter:
                continue
            try:
                await consul.agent.service_health_by_name(key.name)
            except ConsulPermissionDenied as err:
                log.error("upstream %s: the token may not read it: %s", key.label, err.message)
            except ConsulError:
                continue  # not found, or Consul busy: nothing to explain

    async def _systemd(self) -> None:
        await self._until_ready()
        self.ready.set()
        summary = self._summary()
        log.info("ready: %s", summary)
        self._notifier.ready(summary)
        await self._explain_empty_upstreams()
        interval = self._notifier.watchdog_interval
        last = summary
        while True:
            # The ping is sent by the loop itself: a wedged loop stops pinging and systemd
            # restarts the process, which is the point of the watchdog.
            if interval is not None:
                self._notifier.watchdog()
            summary = self._summary()
            if summary != last:
                self._notifier.status(summary)
                last = summary
            await asyncio.sleep(interval if interval is not None else _STATUS_EVERY)

    async def _reloads_loop(self, tg: asyncio.TaskGroup) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            self._notifier.reloading()
            if self._apply_reload(tg):
                await self._apply_listeners()
            self._notifier.ready(self._summary())

    async def _apply_listeners(self) -> None:
        """After a reload: the sidecar's listeners follow the new configuration (with data
        planes, the feed pushes the snapshot built from it, probing new ports first)."""
        new = self.config.get()
        if self.sidecar is not None:
            try:
                await self.sidecar.reconfigure(new)
            except OSError as exc:
                self._last_reload_error = f"listener not started: {exc}"
                log.error("reload: a listener could not be started: %s", exc)

    def _apply_reload(self, tg: asyncio.TaskGroup) -> bool:
        """Read the file again and apply what changes in place; False when nothing was."""
        if self._path is None:
            log.warning("SIGHUP ignored: the agent was not started from a file")
            return False
        old = self.config.get()
        try:
            new = with_workers(load(self._path, self._env), self._workers)
        except ConfigError as exc:
            self._last_reload_error = str(exc)
            log.error("reload failed, keeping the running configuration:\n%s", exc)
            return False
        if self.sidecar is not None:
            from agent.sidecar import live_changes, needs_restart
        restart = [
            what
            for what, changed in (
                ("consul", new.consul != old.consul or new.consul_client != old.consul_client),
                ("admin", new.admin != old.admin),
                (
                    "sidecar proxy (certs, service, sidecar other than upstreams)",
                    self.sidecar is not None and needs_restart(old, new),
                ),
            )
            if changed
        ]
        if restart:
            log.warning(
                "reload: %s changed; that takes effect after a restart (kept the running values)",
                ", ".join(restart),
            )
            new = dataclasses.replace(
                new, consul=old.consul, consul_client=old.consul_client, admin=old.admin
            )
            if self.sidecar is not None:
                new = live_changes(old, new)
        if len(new.sidecar.upstreams) + 16 > old.consul_client.max_connections:
            log.warning(
                "reload: %d upstreams need more than the %d Consul connections sized at start; "
                "restart the agent (or raise consul.max_connections)",
                len(new.sidecar.upstreams),
                old.consul_client.max_connections,
            )
        self.config.publish(new)
        self._reloads += 1
        self._loaded_at = self._clock()
        self._last_reload_error = ""
        logging.getLogger("meshlet").setLevel(new.log_level.upper())
        wanted = {watch_key(u): u for u in new.sidecar.upstreams}
        for key in [k for k in self._watches if k not in wanted]:
            self._watches.pop(key).task.cancel()
            log.info("stopped watching upstream %s", key.label)
        for up in wanted.values():
            self._start_watch(tg, up)
        for key, up in wanted.items():
            self._watches[key].bind = f"{up.local_bind_address}:{up.local_bind_port}"
        if (new.service, new.sidecar) != (old.service, old.sidecar) and self._registrar:
            self._registrar.poke()
        log.info("reloaded %s", self._path)
        return True

    # ---- what /ready and /v1/status say ------------------------------------------------------

    def readiness(self) -> tuple[bool, tuple[str, ...]]:
        if self.draining:
            return False, ("draining: deregistered, shutting down",)
        reasons: list[str] = []
        registrar = self._registrar
        if registrar is None or not registrar.registered.is_set():
            why = registrar.state.last_error if registrar is not None else ""
            reasons.append(f"not registered yet{': ' + why if why else ''}")
        for key, watch in self._watches.items():
            if watch.watcher.latest.get() is None:
                err = watch.watcher.state.last_error
                reasons.append(f"no endpoints yet for {key.label}{': ' + err if err else ''}")
        if self.sidecar is not None:
            reasons.extend(f"proxy: {p}" for p in self.sidecar.problems())
        return not reasons, tuple(reasons)

    def degraded(self) -> tuple[str, ...]:
        reasons: list[str] = []
        state = self.connectivity.state
        if state.reachable is False:
            reasons.append(f"Consul unreachable: {state.last_error}")
        for key, watch in self._watches.items():
            if watch.watcher.state.stale_since is not None:
                reasons.append(f"{key.label} stale: {watch.watcher.state.last_error}")
            if watch.watcher.holding:
                reasons.append(f"{key.label}: {HOLDING}")
        if self._registrar is not None and self._registrar.state.phase == "failing":
            reasons.append(f"registration failing: {self._registrar.state.last_error}")
        if self.sidecar is not None:
            reasons.extend(self.sidecar.degradations())
        if (
            self.dataplanes is not None
            and self.sidecar is not None
            and self.sidecar.started.is_set()
        ):
            reasons.extend(self.dataplanes.problems())
        return tuple(reasons)

    def _summary(self) -> str:
        ready, reasons = self.readiness()
        degraded = self.degraded()
        n = len(self._watches)
        if not ready:
            return "not ready: " + "; ".join(reasons)
        if degraded:
            return f"degraded ({len(degraded)} problems), serving {n} upstreams: {degraded[0]}"
        return f"ready, {n} upstreams"

    def status(self, upstream: str | None) -> Mapping[str, Any]:
        cfg = self.config.get()
        ready, reasons = self.readiness()
        degraded = self.degraded()
        reg = self._registrar.state if self._registrar is not None else None
        side = reg.sidecar if reg is not None else None
        conn = self.connectivity.state
        upstreams = []
        for key, watch in self._watches.items():
            if upstream is not None and key.name != upstream:
                continue
            snap = watch.watcher.latest.get()
            st = watch.watcher.state
            upstreams.append(
                {
                    "name": key.name,
                    "datacenter": key.datacenter,
                    "peer": key.peer,
                    "filter": key.filter,
                    "local_bind": watch.bind,
                    "index": snap.index if snap else None,
                    "updated_at": _iso_age(snap.updated_at if snap else None),
                    "stale_since": _iso_age(st.stale_since),
                    "holding": HOLDING if watch.watcher.holding else "",
                    "failures": st.failures,
                    "rejected": st.rejected,
                    "last_error": st.last_error,
                    "endpoints": [
                        {
                            "node": e.node,
                            "service_id": e.service_id,
                            "address": e.address,
                            "port": e.port,
                            "weight": e.weight,
                        }
                        for e in (snap.endpoints if snap else ())
                    ],
                }
            )
        return {
            "service": {"id": cfg.service.service_id, "name": cfg.service.name},
            "ready": ready,
            "reasons": list(reasons),
            "degraded": bool(degraded),
            "degraded_reasons": list(degraded),
            "draining": self.draining,
            "registration": {
                "phase": reg.phase if reg else "pending",
                "last_sync": _iso_age(reg.last_sync) if reg else None,
                "registrations": reg.registrations if reg else 0,
                "last_error": reg.last_error if reg else "",
                "last_repair": reg.last_repair if reg else "",
            },
            "sidecar": {
                "ready": side.ready if side else False,
                "reasons": list(side.reasons)
                if side
                else [
                    "not checked yet"
                    if self._readiness is not None
                    else "none registered: meshlet agent runs no proxy (meshlet sidecar does)"
                ],
                "reported_at": _iso_age(reg.sidecar_reported) if reg else None,
            },
            "leaf": {"expires_at": side.leaf_expires_at if side else None},
            "consul": {
                "address": cfg.consul_client.base_url,
                "reachable": conn.reachable,
                "since": _iso_age(conn.since),
                "last_error": conn.last_error,
            },
            "config": {
                "file": str(self._path) if self._path else None,
                "loaded_at": _iso_age(self._loaded_at),
                "reloads": self._reloads,
                "last_reload_error": self._last_reload_error,
            },
            "apply": self.apply_times.summary(),
            "upstreams": upstreams,
            "proxy": self._proxy_status(),
            "workers": self._workers_status(),
            # This process's asyncio tasks: a fault or soak that leaks them shows here.
            "tasks": _task_count(),
        }

    def metrics_snapshot(self) -> Mapping[str, Any]:
        """What /metrics renders (agent.metrics): the proxy counters summed over every
        process, and this process's view of the watches, the leaf and the endpoints."""
        watches: dict[str, Any] = {}
        rejected = 0
        endpoints: dict[str, int] = {}
        for key, watch in self._watches.items():
            st = watch.watcher.state
            watches[f"health:{key.name}"] = {
                "failures": st.failures,
                "last_success": st.last_success,
            }
            rejected += st.rejected
            snap = watch.watcher.latest.get()
            endpoints[key.name] = len(snap.endpoints) if snap is not None else 0
        snapshot: dict[str, Any] = {
            "watches": watches,
            "endpoints": endpoints,
            "snapshots_rejected": rejected,
        }
        side = self.sidecar
        if side is not None:
            st = side.intentions_watch.state
            watches["intentions"] = {"failures": st.failures, "last_success": st.last_success}
            pd = side.proxy_defaults_watch.state
            watches["proxy-defaults"] = {"failures": pd.failures, "last_success": pd.last_success}
            sd = side.service_defaults_watch.state
            watches["service-defaults"] = {"failures": sd.failures, "last_success": sd.last_success}
            reg = side.registration_watch.state
            watches["sidecar-registration"] = {
                "failures": reg.failures,
                "last_success": reg.last_success,
            }
            snapshot["snapshots_rejected"] = (
                rejected + st.rejected + pd.rejected + reg.rejected + side.intentions_broken_total
            )
            snapshot["leaf_expires_at"] = side.leaf_expiry()
            material = side.rotator.current if side.rotator is not None else None
            snapshot["roots_generation"] = material.generation if material is not None else 0
            own = side.counters()
            counters = sum_counters([own, *(w.stats for w in self._processes())])
            snapshot["counters"] = counters
            snapshot["mesh"] = counters.get("mesh", {})
        return snapshot

    def _proxy_status(self) -> Mapping[str, Any] | None:
        """The proxy as it serves: with data planes, what they report put into the agent's
        view (agent/dataplane_status.py); in-process, the listeners' own."""
        if self.sidecar is None:
            return None
        own = self.sidecar.status()
        if self.dataplanes is None:
            return own
        from agent.sidecar import METRICS_ONLY

        reports = self.dataplanes.reports()
        total = sum_counters([self.sidecar.counters(), *(r[2] for r in reports)])
        stats = {k: v for k, v in total.items() if k not in METRICS_ONLY}
        merged = merge_proxy_status(own, reports, self._leaves, stats)
        version = self.dataplanes.version
        applied = min((r[0] for r in reports), default=0)
        merged["snapshot"] = {
            "version": version,
            "applied": applied,
            # What the agent holds now is what every data plane serves: a change the agent
            # logged (access logs, tracing, a reload) is in force once this is true.
            "current": bool(reports)
            and applied == version
            and self.sidecar.dataplane_inputs() == self._pushed_inputs,
        }
        return merged

    def _workers_status(self) -> Mapping[str, Any] | None:
        """The worker processes, and `stats_total`: the proxy counters of every process
        (this one's are `proxy.stats`; a worker's restart from zero when it restarts)."""
        if self.sidecar is None:
            return None
        from agent.sidecar import METRICS_ONLY

        own = self.sidecar.counters()
        total = sum_counters([own, *(w.stats for w in self._processes())])
        # /metrics shows the rest (they are big).
        total = {k: v for k, v in total.items() if k not in METRICS_ONLY}
        if self.dataplanes is None:
            return {"count": 1, "processes": [], "stats_total": total}
        status = dict(self.dataplanes.status())
        status["stats_total"] = total
        return status


def configure_logging(level: str) -> None:
    logging.getLogger("meshlet").setLevel(level.upper())


async def run_agent(
    path: Path | None,
    env: Mapping[str, str],
    config: AgentConfig,
    *,
    sidecar: bool = False,
    workers: int | None = None,
    external: ExternalRegistration | None = None,
) -> int:
    """`meshlet agent -c FILE` (or `meshlet sidecar -c FILE`, with the proxy) once the file is
    known to be valid: run until signalled. `path` None: the configuration was not read from a
    file (`meshlet sidecar --nomad`), so SIGHUP has nothing to re-read."""
    configure_logging(config.log_level)
    runtime = AgentRuntime(
        config,
        config_path=path,
        env=env,
        notifier=Notifier.from_env(env),
        sidecar=sidecar,
        workers=workers,
        external=external,
    )
    runtime.install_signal_handlers()
    return await runtime.run()


def _task_count() -> int | None:
    """The running loop's tasks; None when the status is built outside it (a test, or a
    report assembled after the loop stopped)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None
