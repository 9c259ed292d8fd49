"""Registration of the local service and its sidecar, kept true by anti-entropy.

Pure part: `desired(config)` is the registration the agent wants, and `drift(config, services,
checks)` compares it with what the local Consul agent holds, naming each difference. The
`Registrar` shell registers when there is drift: at start, every `anti_entropy_interval`, when
Consul becomes reachable again (a restarted agent may have lost its state), after a SIGHUP
that changed the service, and when a TTL update finds its check gone. Registering is a PUT of
the whole definition, so repeating it is harmless.

The checks, so that Consul's health reflects reality:
- the service carries the application's own check from the config (http, tcp or ttl);
- the sidecar carries a TTL check the agent passes only while `SidecarReadiness` says its
  listeners are up and it holds a valid leaf (if the agent dies, the TTL lapses), and an alias
  of the service, as Consul's default sidecar checks do, so a sidecar in front of a failing
  application is not dialled either.

A process that runs no proxy (`meshlet agent`) has no readiness to report: it registers the
service alone, and removes a sidecar left by an earlier `meshlet sidecar` of the same ID, so the
catalog never holds a sidecar whose check nothing can pass.

A registration owned by someone else (`ExternalRegistration`: Nomad registers a Connect group's
proxy and its checks itself) is only watched: the registrar never writes it, never removes it,
and reports readiness to no check of its own (the owner's checks cover the listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent.config import AgentConfig, CheckSection
from agent.connectivity import Connectivity
from agent.consul import ConsulClient
from agent.consul_errors import ConsulError, ConsulNotFound, ConsulUnavailable
from agent.consul_results import AgentService, HealthCheck
from agent.consul_services import (
    CheckDefinition,
    ProxyConfig,
    ServiceRegistration,
    SidecarService,
    Upstream,
)
from agent.readiness import Readiness, SidecarReadiness
from agent.watch import backoff_delay

log = logging.getLogger("meshlet.agent.registration")

SIDECAR_SUFFIX = "-sidecar-proxy"


def sidecar_id(service_id: str) -> str:
    """Consul names a `SidecarService` `<parent ID>-sidecar-proxy`; it cannot be chosen."""
    return service_id + SIDECAR_SUFFIX


def app_check_id(service_id: str) -> str:
    return f"service:{service_id}"


def ready_check_id(service_id: str) -> str:
    return f"service:{sidecar_id(service_id)}:ready"


def alias_check_id(service_id: str) -> str:
    return f"service:{sidecar_id(service_id)}:alias"


def _app_check(service_id: str, check: CheckSection) -> CheckDefinition:
    return CheckDefinition(
        check_id=app_check_id(service_id),
        name=f"{service_id} application check",
        http=check.http,
        method=check.method,
        tls_skip_verify=check.tls_skip_verify,
        tcp=check.tcp,
        ttl=check.ttl,
        interval=check.interval,
        timeout=check.timeout,
        deregister_critical_service_after=check.deregister_critical_service_after,
    )


def _upstream_key(u: Upstream) -> tuple[str, str, str, str, int]:
    return (
        u.destination_name,
        u.datacenter,
        u.destination_peer,
        u.local_bind_address or "127.0.0.1",
        u.local_bind_port,
    )


def _proxy_config(cfg: AgentConfig) -> dict[str, Any]:
    """The sidecar's Proxy.Config: its protocol, and its own tracing when agent.yaml sets
    some (the sidecar reads it back from Consul, over proxy-defaults' Config.tracing)."""
    config: dict[str, Any] = {"protocol": cfg.sidecar.protocol}
    tracing = cfg.telemetry.tracing.block()
    if tracing:
        config["tracing"] = tracing
    return config


def desired(cfg: AgentConfig, *, sidecar: bool = True) -> ServiceRegistration:
    """`sidecar=False`: the service alone (no proxy runs for it)."""
    svc, side = cfg.service, cfg.sidecar
    sid = svc.service_id
    upstreams = tuple(
        Upstream(
            destination_name=u.name,
            local_bind_port=u.local_bind_port,
            local_bind_address=u.local_bind_address,
            datacenter=u.datacenter,
            destination_peer=u.peer,
        )
        for u in side.upstreams
    )
    alone = ServiceRegistration(
        name=svc.name,
        id=sid,
        port=svc.port,
        address=svc.address,
        tags=svc.tags,
        meta=svc.meta,
        checks=(_app_check(sid, svc.check),) if svc.check is not None else (),
    )
    if not sidecar:
        return alone
    return replace(
        alone,
        sidecar=SidecarService(
            port=side.port,
            address=side.address,
            proxy=ProxyConfig(
                local_service_address=svc.address or "127.0.0.1",
                local_service_port=svc.port,
                upstreams=upstreams,
                config=_proxy_config(cfg),
            ),
            checks=(
                CheckDefinition(
                    check_id=ready_check_id(sid),
                    name="meshlet sidecar ready",
                    ttl=side.check_ttl,
                    notes="passing while the sidecar's listeners are up and it holds a valid "
                    "leaf certificate",
                ),
                CheckDefinition(
                    check_id=alias_check_id(sid),
                    name=f"Connect Sidecar Aliasing {sid}",
                    alias_service=sid,
                ),
            ),
        ),
    )


def drift(
    cfg: AgentConfig,
    services: Mapping[str, AgentService],
    checks: Mapping[str, HealthCheck],
    *,
    sidecar: bool = True,
) -> tuple[str, ...]:
    """How the Consul agent's view differs from `desired(cfg, sidecar=sidecar)`; empty when
    in sync."""
    want = desired(cfg, sidecar=sidecar)
    sid = cfg.service.service_id
    have = services.get(sid)
    if have is None:
        return (f"service {sid!r} is not registered",)
    reasons: list[str] = []
    for what, mine, theirs in (
        ("name", want.name, have.service),
        ("port", want.port, have.port),
        ("address", want.address, have.address),
        ("tags", want.tags, have.tags),
        ("meta", dict(want.meta), dict(have.meta)),
    ):
        if mine != theirs:
            reasons.append(f"service {what} is {theirs!r}, want {mine!r}")
    side_id = sidecar_id(sid)
    side = services.get(side_id)
    if want.sidecar is None:
        if side is not None:
            reasons.append(f"sidecar {side_id!r} is registered, but no proxy runs for it")
        reasons += [
            f"check {c.check_id!r} is missing" for c in want.checks if c.check_id not in checks
        ]
        return tuple(reasons)
    assert want.sidecar.proxy is not None
    want_proxy = want.sidecar.proxy
    if side is None or side.proxy is None or side.kind != "connect-proxy":
        reasons.append(f"sidecar {side_id!r} is not registered")
    else:
        sidecar_fields: tuple[tuple[str, object, object], ...] = (
            ("port", want.sidecar.port, side.port),
            ("address", want.sidecar.address or want.address, side.address),
            ("destination", want.name, side.proxy.destination_service_name),
            ("local service port", want_proxy.local_service_port, side.proxy.local_service_port),
            ("protocol", want_proxy.config.get("protocol"), side.proxy.config.get("protocol")),
            ("tracing", want_proxy.config.get("tracing"), side.proxy.config.get("tracing")),
            (
                "upstreams",
                sorted(_upstream_key(u) for u in want_proxy.upstreams),
                sorted(_upstream_key(u) for u in side.proxy.upstreams),
            ),
        )
        for field_name, wanted, held in sidecar_fields:
            if wanted != held:
                reasons.append(f"sidecar {field_name} is {held!r}, want {wanted!r}")
    wanted_checks = [c.check_id for c in want.checks] + [c.check_id for c in want.sidecar.checks]
    reasons += [f"check {c!r} is missing" for c in wanted_checks if c not in checks]
    return tuple(reasons)


Phase = Literal["pending", "registered", "failing", "deregistered"]


@dataclass(frozen=True, slots=True)
class ExternalRegistration:
    """The sidecar's proxy registration belongs to `owner` (e.g. Nomad, which registers a
    Connect group's proxy and deregisters it before it signals the task): read, never written
    or removed here."""

    proxy_id: str
    owner: str


@dataclass(frozen=True, slots=True)
class RegistrationState:
    phase: Phase = "pending"
    service_id: str = ""
    last_sync: float | None = None
    """Unix time of the last successful comparison with the Consul agent."""
    registrations: int = 0
    """PUTs sent: one at start, one per repair or changed config."""
    last_error: str = ""
    last_repair: str = ""
    sidecar: Readiness | None = None
    sidecar_reported: float | None = None


class Registrar:
    def __init__(
        self,
        consul: ConsulClient,
        config: Callable[[], AgentConfig],
        connectivity: Connectivity,
        readiness: SidecarReadiness | None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        external: ExternalRegistration | None = None,
    ) -> None:
        self.state = RegistrationState(service_id=config().service.service_id)
        self._external = external
        """Set: someone else owns the registration; only watch that it is there."""
        self._external_hash = ""
        self.registered = asyncio.Event()
        """Set once the first registration is in place."""
        self._consul = consul
        self._config = config
        self._connectivity = connectivity
        self._readiness = readiness
        """None: no proxy runs for this service, so no sidecar is registered."""
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._sync_wake = asyncio.Event()
        self._report_wake = asyncio.Event()
        self._draining = False
        self._owned: set[str] = set()
        """Service IDs this process registered (a reload may rename the service)."""
        connectivity.on_recover(self.poke)

    @property
    def external(self) -> ExternalRegistration | None:
        return self._external

    def poke(self) -> None:
        """Compare and repair now rather than at the next anti-entropy tick."""
        self._sync_wake.set()

    def _set(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    async def _observe(self, external: ExternalRegistration) -> None:
        """Someone else's registration: note whether it is there; never write it."""
        try:
            held = await self._consul.agent.service(external.proxy_id)
        except ConsulNotFound:
            if self.registered.is_set() and self.state.phase != "deregistered":
                # The owner's stop sequence (Nomad: deregister, shutdown_delay, signal): keep
                # serving the connections already here until the signal comes.
                log.info("%s was deregistered by %s", external.proxy_id, external.owner)
            self._set(
                phase="deregistered" if self.registered.is_set() else "pending",
                last_error=f"{external.proxy_id} is not registered with the Consul agent "
                f"(registered by {external.owner}, not by meshlet)",
            )
            return
        if self._external_hash and held.content_hash != self._external_hash:
            # Listeners and identity were built from the registration read at start.
            log.warning(
                "%s changed in Consul (by %s); restart the sidecar to apply the change",
                external.proxy_id,
                external.owner,
            )
        self._external_hash = held.content_hash
        self._set(
            phase="registered",
            service_id=external.proxy_id,
            last_sync=self._clock(),
            last_error="",
        )
        self.registered.set()

    async def _sync(self, cfg: AgentConfig) -> None:
        if self._external is not None:
            await self._observe(self._external)
            return
        sid = cfg.service.service_id
        services = await self._consul.agent.services()
        checks = await self._consul.agent.checks()
        for old in sorted(self._owned - {sid}):
            # The service was renamed by a reload: the old instance must not linger.
            log.info("deregistering %s, replaced by %s", old, sid)
            with contextlib.suppress(ConsulNotFound):
                await self._consul.agent.deregister_service(old)
            self._owned.discard(old)
        with_sidecar = self._readiness is not None
        reasons = drift(cfg, services, checks, sidecar=with_sidecar)
        if not with_sidecar and sidecar_id(sid) in services:
            # Left by a `meshlet sidecar` of the same ID: its check would stay critical.
            log.info("deregistering %s: no proxy runs for it here", sidecar_id(sid))
            with contextlib.suppress(ConsulNotFound):
                await self._consul.agent.deregister_service(sidecar_id(sid))
        if reasons:
            first = self.state.registrations == 0 and not self.registered.is_set()
            if not first:
                log.warning("registration drifted, repairing: %s", "; ".join(reasons))
            await self._consul.agent.register_service(
                desired(cfg, sidecar=with_sidecar), replace_existing_checks=True
            )
            self._owned.add(sid)
            self._set(
                registrations=self.state.registrations + 1,
                last_repair="" if first else "; ".join(reasons),
            )
            if with_sidecar:
                log.info("registered %s and %s with Consul", sid, sidecar_id(sid))
            else:
                log.info("registered %s with Consul, without a sidecar", sid)
            # A fresh TTL check starts critical; say what the sidecar's state is right away.
            self._report_wake.set()
        self._owned.add(sid)
        self._set(phase="registered", service_id=sid, last_sync=self._clock(), last_error="")
        self.registered.set()

    async def run_sync(self) -> None:
        """Register, then keep the registration true until `deregister()`."""
        failures = 0
        while not self.draining():
            cfg = self._config()
            self._sync_wake.clear()
            try:
                await self._sync(cfg)
                self._connectivity.ok()
                failures = 0
                delay = cfg.watch.anti_entropy_interval
            except ConsulUnavailable as exc:
                failures += 1
                self._connectivity.failed(str(exc))
                self._set(
                    phase="failing" if self.registered.is_set() else "pending", last_error=str(exc)
                )
                delay = self._retry(cfg, failures)
            except ConsulError as exc:
                failures += 1
                self._connectivity.ok()
                log.error("registration refused by Consul: %s", exc)
                self._set(phase="failing", last_error=str(exc))
                delay = self._retry(cfg, failures)
            if self.draining():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_wake.wait(), delay)

    def draining(self) -> bool:
        """A call, not an attribute: `deregister()` flips it while the loops are parked."""
        return self._draining

    def _retry(self, cfg: AgentConfig, failures: int) -> float:
        return backoff_delay(failures, self._rng, cfg.watch.retry_initial, cfg.watch.retry_max)

    async def run_readiness(self) -> None:
        """Report the sidecar's readiness to its TTL check, at a third of the TTL."""
        await self.registered.wait()
        readiness = self._readiness
        if readiness is None:
            return  # no sidecar registered, no check to report to
        while not self.draining():
            cfg = self._config()
            self._report_wake.clear()
            ready = await readiness.check()
            check_id = ready_check_id(cfg.service.service_id)
            if self._external is not None:
                # The owner's checks (Nomad's TCP check on the listener) speak for the sidecar;
                # the verdict is kept for /ready and /v1/status only.
                if self.state.sidecar is None or self.state.sidecar.ready != ready.ready:
                    log.info("sidecar %s: %s", "ready" if ready.ready else "not ready", ready.note)
                self._set(sidecar=ready, sidecar_reported=self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._report_wake.wait(), cfg.sidecar.check_ttl / 3)
                continue
            try:
                if self.draining():
                    return
                if ready.ready:
                    await self._consul.agent.pass_check(check_id, ready.note)
                else:
                    await self._consul.agent.fail_check(check_id, ready.note)
                self._connectivity.ok()
                if self.state.sidecar is None or self.state.sidecar.ready != ready.ready:
                    log.info("sidecar %s: %s", "ready" if ready.ready else "not ready", ready.note)
                self._set(sidecar=ready, sidecar_reported=self._clock())
            except ConsulUnavailable as exc:
                self._connectivity.failed(str(exc))
                self._set(sidecar=ready)
            except ConsulError as exc:
                # Most likely the check is gone: the Consul agent lost its state.
                log.warning("sidecar check update failed (%s); repairing registration", exc)
                self._set(sidecar=ready)
                self.poke()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_wake.wait(), cfg.sidecar.check_ttl / 3)

    async def deregister(self) -> None:
        """Stop repairing and remove the service (Consul removes its sidecar with it)."""
        self._draining = True
        self._sync_wake.set()
        self._report_wake.set()
        if self._external is not None:
            log.info(
                "leaving %s registered: %s owns it and removes it itself",
                self._external.proxy_id,
                self._external.owner,
            )
            return
        for sid in sorted(self._owned):
            for target in (sid, sidecar_id(sid)):
                try:
                    await self._consul.agent.deregister_service(target)
                except ConsulNotFound:
                    pass  # the sidecar went with its parent, or Consul lost both already
                except ConsulError as exc:
                    log.error("could not deregister %s: %s", target, exc)
                    self._set(last_error=str(exc))
                    continue
            log.info("deregistered %s and its sidecar", sid)
        self._set(phase="deregistered")
