"""DevServer: the embedded control plane, as an async context manager.

    async with DevServer(DevConfig()) as dev:   # listens on 127.0.0.1:<free port>
        ... dev.http_url ...

It holds the store, the agent's local view (which services and checks this agent registered),
the check runner and the HTTP listener. `meshlet dev` runs one in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from types import TracebackType
from typing import Any

from aiohttp import web

from devstack import ui
from devstack.acl import Authorizer
from devstack.checks import UNSUPPORTED, CheckRunner
from devstack.config import CONSUL_VERSION, DevConfig
from devstack.endpoints import (
    acl,
    agent,
    catalog,
    config,
    connect_ca,
    discovery_chain,
    health,
    intentions,
    kv,
    session,
    status,
    txn,
)
from devstack.httpapi import HTTPError, Router, make_handler
from devstack.identity_plane import IdentityPlane
from devstack.intentions_state import IntentionsState
from devstack.registration import SIDECAR_SUFFIX, InvalidRegistration
from devstack.store import PASSING, Check, Node, Service, Session, Store

log = logging.getLogger("devstack")

REAP_EVERY = 1.0
# Consul's floor for DeregisterCriticalServiceAfter.
MIN_DEREGISTER_AFTER = 60.0


def build_router() -> Router:
    router = Router()
    for family in (
        acl,
        agent,
        catalog,
        config,
        discovery_chain,
        health,
        intentions,
        kv,
        session,
        status,
        connect_ca,
        txn,
    ):
        family.routes(router)
    return router


class DevServer:
    def __init__(self, config: DevConfig | None = None) -> None:
        self.config = config or DevConfig()
        self.store = Store()
        self.acl = Authorizer(
            self.config.acl_initial_management_token, self.config.default_policy, self.store
        )
        self.node_id = str(uuid.uuid4())
        self.agent_tokens: dict[str, str] = {}
        self.checks = CheckRunner(self)
        self.intentions = IntentionsState(self.store, self.config)
        self.identity = IdentityPlane(self.store, self.config)
        self.shutdown_requested = asyncio.Event()
        self.shutdown_reason = ""
        self._sidecar_ports: dict[str, int] = {}
        self._session_timers: dict[str, asyncio.TimerHandle] = {}
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._log_queues: set[asyncio.Queue[logging.LogRecord]] = set()
        self._port = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self._bootstrap_catalog()
        await self.identity.start()
        app = web.Application(client_max_size=4 * 1024 * 1024)
        ui.add_routes(app, self)
        app.router.add_route("*", "/{tail:.*}", make_handler(self, build_router()))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self._port = self._runner.addresses[0][1]
        self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="reaper")
        log.info("devstack listening on %s", self.http_url)

    async def close(self) -> None:
        self.store.close()
        if self._reaper is not None:
            self._reaper.cancel()
        for timer in self._session_timers.values():
            timer.cancel()
        await self.checks.close()
        await self.identity.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def http_addr(self) -> str:
        return f"{self.config.host}:{self._port}"

    @property
    def http_url(self) -> str:
        host = self.config.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self._port}"

    def request_shutdown(self, reason: str) -> None:
        self.shutdown_reason = reason
        self.shutdown_requested.set()

    def _bootstrap_catalog(self) -> None:
        cfg = self.config
        self.store.upsert_node(
            Node(
                id=self.node_id,
                name=cfg.node_name,
                address="127.0.0.1",
                datacenter=cfg.datacenter,
                tagged_addresses={
                    "lan": "127.0.0.1",
                    "lan_ipv4": "127.0.0.1",
                    "wan": "127.0.0.1",
                    "wan_ipv4": "127.0.0.1",
                },
                meta={"consul-network-segment": "", "consul-version": CONSUL_VERSION},
            )
        )
        self.store.upsert_service(
            Service(
                node=cfg.node_name,
                data={
                    "ID": "consul",
                    "Service": "consul",
                    "Tags": [],
                    "Address": "",
                    "Meta": {
                        "non_voter": "false",
                        "raft_version": "3",
                        "read_replica": "false",
                        "serf_protocol_current": "2",
                        "serf_protocol_max": "5",
                        "serf_protocol_min": "1",
                        "version": CONSUL_VERSION,
                    },
                    "Port": 8300,
                },
            )
        )
        self.store.upsert_check(
            Check(
                node=cfg.node_name,
                check_id="serfHealth",
                name="Serf Health Status",
                status=PASSING,
                output="Agent alive and reachable",
            )
        )

    # ---- the agent's local view ------------------------------------------------------------

    def local_node(self) -> Node:
        return self.store.nodes[self.config.node_name]

    def local_services(self) -> list[Service]:
        return sorted(
            (s for s in self.store.node_services(self.config.node_name) if s.local),
            key=lambda s: s.id,
        )

    def local_service(self, service_id: str) -> Service | None:
        svc = self.store.services.get((self.config.node_name, service_id))
        return svc if svc is not None and svc.local else None

    def local_checks(self) -> list[Check]:
        return [c for c in self.store.checks_of(self.config.node_name, None) if c.local]

    def local_check(self, check_id: str) -> Check | None:
        chk = self.store.checks.get((self.config.node_name, check_id))
        return chk if chk is not None and chk.local else None

    def local_checks_of(self, service_id: str) -> list[Check]:
        return self.store.instance_checks(self.config.node_name, service_id)

    def sidecar_port(self, sidecar_id: str, defn: dict[str, Any]) -> int:
        """The lowest free port of the sidecar range, or the one this sidecar had before."""
        side = (defn.get("Connect") or {}).get("SidecarService") or {}
        if side.get("Port"):
            return int(side["Port"])
        if sidecar_id in self._sidecar_ports:
            return self._sidecar_ports[sidecar_id]
        used = {
            s.data.get("Port")
            for s in self.store.node_services(self.config.node_name)
            if s.data.get("Kind") == "connect-proxy"
        } | set(self._sidecar_ports.values())
        for port in range(self.config.sidecar_min_port, self.config.sidecar_max_port + 1):
            if port not in used:
                self._sidecar_ports[sidecar_id] = port
                return port
        raise InvalidRegistration(
            "Invalid SidecarService: no port provided for sidecar_service and none left in the "
            f"configured range [{self.config.sidecar_min_port}, {self.config.sidecar_max_port}]"
        )

    def add_service(
        self,
        data: dict[str, Any],
        checks: list[Check],
        *,
        replace_checks: bool,
        sidecar_of: str | None = None,
    ) -> None:
        for chk in checks:
            if chk.type in UNSUPPORTED:
                raise HTTPError(
                    400, f"Invalid check: devstack does not run {UNSUPPORTED[chk.type]} checks"
                )
        node = self.config.node_name
        svc_id = data["ID"]
        existing_ids = {c.check_id for c in self.store.checks_of(node, svc_id)}
        # Re-registration keeps the state of checks whose IDs survive (Consul snapshots and
        # restores check state around AddService).
        for chk in checks:
            old = self.store.checks.get((node, chk.check_id))
            if old is not None and "Status" not in (chk.runner or {}):
                chk.status, chk.output = old.status, old.output
        self.store.upsert_service(Service(node=node, data=data, local=True, sidecar_of=sidecar_of))
        for chk in checks:
            self.add_check(chk)
        if replace_checks:
            for stale in existing_ids - {c.check_id for c in checks}:
                if not stale.startswith("_service_maintenance:"):
                    self.remove_check(stale)

    def remove_service(self, service_id: str) -> None:
        node = self.config.node_name
        for chk in self.store.checks_of(node, service_id):
            self.checks.stop(chk.check_id)
        self.store.delete_service(node, service_id)
        self._sidecar_ports.pop(service_id, None)
        for child in [s for s in self.local_services() if s.sidecar_of == service_id]:
            self.remove_service(child.id)
        self._sidecar_ports.pop(service_id + SIDECAR_SUFFIX, None)

    def add_check(self, chk: Check) -> None:
        if chk.type in UNSUPPORTED:
            raise HTTPError(
                400, f"Invalid check: devstack does not run {UNSUPPORTED[chk.type]} checks"
            )
        self.store.upsert_check(chk)
        self.checks.start(chk)

    def remove_check(self, check_id: str) -> None:
        self.checks.stop(check_id)
        self.store.delete_check(self.config.node_name, check_id)

    def remove_catalog_service(self, node: str, service_id: str) -> None:
        if node == self.config.node_name:
            for chk in self.store.checks_of(node, service_id):
                self.checks.stop(chk.check_id)
        self.store.delete_service(node, service_id)

    def remove_catalog_check(self, node: str, check_id: str) -> None:
        if node == self.config.node_name:
            self.checks.stop(check_id)
        self.store.delete_check(node, check_id)

    def ttl_update(self, chk: Check, status: str, output: str) -> None:
        self.checks.ttl_touched(chk)
        self.checks.report(chk, status, output)

    # ---- sessions ----------------------------------------------------------------------------

    def session_ttl_started(self, session: Session) -> None:
        """(Re)arm a session's TTL; Consul invalidates it after twice the TTL."""
        timer = self._session_timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
        if session.ttl:
            from devstack.durations import parse_duration

            seconds = 2 * parse_duration(session.ttl) / 1e9
            self._session_timers[session.id] = asyncio.get_running_loop().call_later(
                seconds, self.destroy_session, session.id
            )

    def destroy_session(self, session_id: str) -> None:
        timer = self._session_timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        session = self.store.sessions.get(session_id)
        if session is not None and session.behavior == "delete":
            self.store.kv_delete([k for k, e in self.store.kv.items() if e.session == session_id])
        self.store.session_destroy(session_id)

    # ---- background work ----------------------------------------------------------------------

    async def _reap(self) -> None:
        """Deregister services whose check stayed critical past DeregisterCriticalServiceAfter."""
        while True:
            await asyncio.sleep(REAP_EVERY)
            for chk in self.local_checks():
                after = (chk.runner or {}).get("DeregisterCriticalServiceAfter", 0) / 1e9
                if not after or not chk.service_id or chk.status != "critical":
                    continue
                if self.checks.critical_for(chk.check_id) >= max(after, MIN_DEREGISTER_AFTER):
                    log.info(
                        "check %s critical for %.0fs: deregistering service %s",
                        chk.check_id,
                        after,
                        chk.service_id,
                    )
                    self.remove_service(chk.service_id)

    async def stream_logs(
        self, request: web.Request, level: str, *, json_lines: bool
    ) -> web.StreamResponse:
        """/v1/agent/monitor: devstack's own log records, until the client goes away."""
        threshold = {
            "trace": logging.DEBUG,
            "debug": logging.DEBUG,
            "info": logging.INFO,
            "warn": logging.WARNING,
            "warning": logging.WARNING,
            "err": logging.ERROR,
            "error": logging.ERROR,
        }[level]
        queue: asyncio.Queue[logging.LogRecord] = asyncio.Queue(maxsize=512)
        handler = _QueueHandler(queue, threshold)
        root = logging.getLogger("devstack")
        root.addHandler(handler)
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        try:
            while True:
                record = await queue.get()
                if json_lines:
                    line = json.dumps(
                        {
                            "@level": record.levelname.lower(),
                            "@message": record.getMessage(),
                            "@module": record.name,
                            "@timestamp": time.strftime(
                                "%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)
                            ),
                        }
                    )
                else:
                    line = f"[{record.levelname}] {record.name}: {record.getMessage()}"
                await response.write(line.encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        finally:
            root.removeHandler(handler)


class _QueueHandler(logging.Handler):
    def __init__(self, queue: asyncio.Queue[logging.LogRecord], level: int) -> None:
        super().__init__(level)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        # A slow reader loses lines rather than slowing the server.
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(record)
