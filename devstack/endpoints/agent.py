"""/v1/agent/*: the local agent's services, checks, health, self, members and tokens."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import platform
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from devstack import decode as schema
from devstack import render
from devstack.config import CONSUL_VERSION
from devstack.endpoints.status import RAFT_ADDR
from devstack.filter_schemas import AGENT_CHECK, AGENT_MEMBER, AGENT_SERVICE
from devstack.httpapi import Call, HTTPError, Reply, Router, bad_request, not_found
from devstack.registration import (
    InvalidRegistration,
    make_check,
    node_service,
    service_checks,
    sidecar_definition,
    validate_check,
)
from devstack.store import (
    CRITICAL,
    MAINTENANCE_PREFIX,
    NODE_MAINTENANCE,
    PASSING,
    STATUSES,
    WARNING,
    Check,
    Service,
)

if TYPE_CHECKING:
    from devstack.server import DevServer

log = logging.getLogger("devstack.agent")

TOKEN_TYPES = (
    "default",
    "agent",
    "agent_recovery",
    "agent_master",
    "acl_agent_token",
    "acl_token",
    "acl_agent_master_token",
    "replication",
    "acl_replication_token",
    "config_file_service_registration",
    "dns",
)
LOG_LEVELS = ("trace", "debug", "info", "warn", "err", "error", "warning")


def routes(router: Router) -> None:
    router.add("/v1/agent/self", get=self_)
    router.add("/v1/agent/version", get=version)
    router.add("/v1/agent/host", get=host)
    router.add("/v1/agent/members", get=members)
    router.add("/v1/agent/metrics", get=metrics)
    router.add("/v1/agent/monitor", get=monitor)
    router.add("/v1/agent/reload", put=reload)
    router.add("/v1/agent/leave", put=leave)
    router.add("/v1/agent/join/", put=join)
    router.add("/v1/agent/force-leave/", put=force_leave)
    router.add("/v1/agent/maintenance", put=node_maintenance)
    router.add("/v1/agent/token/", put=set_token)
    router.add("/v1/agent/services", get=services)
    router.add("/v1/agent/service/", get=service)
    router.add("/v1/agent/service/register", put=register_service)
    router.add("/v1/agent/service/deregister/", put=deregister_service)
    router.add("/v1/agent/service/maintenance/", put=service_maintenance)
    router.add("/v1/agent/checks", get=checks)
    router.add("/v1/agent/check/register", put=register_check)
    router.add("/v1/agent/check/deregister/", put=deregister_check)
    router.add("/v1/agent/check/pass/", put=check_pass)
    router.add("/v1/agent/check/warn/", put=check_warn)
    router.add("/v1/agent/check/fail/", put=check_fail)
    router.add("/v1/agent/check/update/", put=check_update)
    router.add("/v1/agent/health/service/name/", get=health_by_name)
    router.add("/v1/agent/health/service/id/", get=health_by_id)


# ---- self, members, misc ----------------------------------------------------------------------


def member(server: DevServer, *, wan: bool = False) -> dict[str, Any]:
    cfg = server.config
    return {
        "Name": f"{cfg.node_name}.{cfg.datacenter}" if wan else cfg.node_name,
        "Addr": "127.0.0.1",
        "Port": 8302 if wan else 8301,
        "Tags": {
            "acls": "1" if cfg.acl_enabled else "0",
            "build": f"{CONSUL_VERSION}:meshlet",
            "dc": cfg.datacenter,
            "expect": "0" if wan else "",
            "ft_fs": "1",
            "ft_si": "1",
            "id": server.node_id,
            "port": "8300",
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
        },
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


async def self_(call: Call) -> Reply:
    call.identity.require("agent:read", call.server.config.node_name)
    s, cfg = call.server, call.server.config
    return call.reply(
        {
            "Config": {
                "Datacenter": cfg.datacenter,
                "PrimaryDatacenter": cfg.datacenter,
                "NodeName": cfg.node_name,
                "NodeID": s.node_id,
                "Revision": "meshlet",
                "Server": True,
                "Version": CONSUL_VERSION,
                "BuildDate": "2025-01-01T00:00:00Z",
            },
            "DebugConfig": {
                "DevMode": True,
                "Datacenter": cfg.datacenter,
                "NodeName": cfg.node_name,
                "ACLsEnabled": cfg.acl_enabled,
                "ACLResolverSettings": {"ACLDefaultPolicy": cfg.default_policy},
                "DefaultIntentionPolicy": cfg.default_intention_policy or "",
                "EnableRemoteScriptChecks": cfg.enable_script_checks,
                "HTTPAddrs": [f"tcp://{s.http_addr}"],
            },
            "Coord": {
                "Vec": [0.0] * 8,
                "Error": 1.5,
                "Adjustment": 0.0,
                "Height": 1e-05,
            },
            "Member": member(s),
            "Stats": {
                "agent": {
                    "check_monitors": "0",
                    "check_ttls": str(sum(1 for c in s.local_checks() if c.type == "ttl")),
                    "checks": str(len(s.local_checks())),
                    "services": str(len(s.local_services())),
                },
                "build": {"prerelease": "", "revision": "meshlet", "version": CONSUL_VERSION},
                "consul": {
                    "bootstrap": "true",
                    "known_datacenters": "1",
                    "leader": "true",
                    "leader_addr": RAFT_ADDR,
                    "server": "true",
                },
                "raft": {"state": "Leader", "commit_index": str(s.store.index)},
                "runtime": {"goroutines": "0"},
                "serf_lan": {"members": "1"},
            },
            "Meta": dict(s.local_node().meta),
            "xDS": {
                "SupportedProxies": {},
                "Port": -1,
                "Ports": {"Plaintext": -1, "TLS": -1},
            },
        }
    )


async def version(call: Call) -> Reply:
    return call.reply(
        {
            "SHA": "",
            "BuildDate": "2025-01-01T00:00:00Z",
            "HumanVersion": f"Consul v{CONSUL_VERSION}",
            "FIPS": "",
        }
    )


async def host(call: Call) -> Reply:
    call.identity.require("operator:read")
    return call.reply(
        {
            "Host": {
                "hostname": platform.node(),
                "os": platform.system().lower(),
                "kernelVersion": platform.release(),
            },
            "CollectionTime": time.time_ns(),
            "Errors": None,
        }
    )


async def members(call: Call) -> Reply:
    wan = call.bool_param("wan", "Invalid value for ?wan")
    segment = call.query.get("segment", "")
    if wan and segment and segment != "_all":
        raise bad_request("Cannot provide a segment with wan=true")
    items = [member(call.server, wan=wan)]
    # Consul's filterMembers: node:read on each member.
    readable = [m for m in items if call.identity.allowed("node:read", m["Name"])]
    call.results_filtered = len(readable) < len(items)
    items = readable
    f = call.filter(AGENT_MEMBER)
    if f is not None:
        items = [m for m in items if f.matches(m)]
    return call.reply(items)


async def metrics(call: Call) -> Reply:
    call.identity.require("agent:read", call.server.config.node_name)
    if call.query.get("format") == "prometheus":
        # As Consul without telemetry.prometheus_retention_time.
        return Reply(
            headers={"X-Consul-Reason": "Prometheus is not enabled since its retention time is 0"}
        )
    s = call.server
    stamp = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
    return call.reply(
        {
            "Timestamp": stamp,
            "Gauges": [
                {"Name": "consul.raft.commitIndex", "Value": float(s.store.index), "Labels": {}},
                {"Name": "consul.catalog.services", "Value": float(len(s.store.services))},
                {"Name": "consul.kv.entries", "Value": float(len(s.store.kv)), "Labels": {}},
            ],
            "Points": [],
            "Counters": [],
            "Samples": [],
        }
    )


async def monitor(call: Call) -> web.StreamResponse | Reply:
    call.identity.require("agent:read", call.server.config.node_name)
    level = call.query.get("loglevel", "info").lower()
    if level not in LOG_LEVELS:
        raise bad_request(f"Unknown log level: {level}")
    return await call.server.stream_logs(call.request, level, json_lines=call.flag("logjson"))


async def reload(call: Call) -> Reply:
    call.identity.require("agent:write", call.server.config.node_name)
    return Reply()


async def leave(call: Call) -> Reply:
    call.identity.require("agent:write", call.server.config.node_name)
    call.server.request_shutdown("leave requested through /v1/agent/leave")
    return Reply()


async def join(call: Call) -> Reply:
    call.identity.require("agent:write", call.server.config.node_name)
    raise HTTPError(500, f"1 error occurred:\n\t* Failed to join {call.tail}: dev agent\n\n")


async def force_leave(call: Call) -> Reply:
    call.identity.require("operator:write")
    if call.tail == call.server.config.node_name:
        return Reply()
    raise HTTPError(500, f"No node found with name '{call.tail}'")


async def set_token(call: Call) -> Reply:
    if not call.server.acl.enabled:
        raise HTTPError(401, "ACL support disabled")
    call.identity.require("agent:write", call.server.config.node_name)
    body = await call.body(
        schema.Struct("token", {"Token": schema.STRING, "AccessorID": schema.STRING})
    )
    if call.tail not in TOKEN_TYPES:
        raise not_found(f'Token "{call.tail}" is unknown')
    call.server.agent_tokens[call.tail] = body.get("Token", "")
    if call.tail == "default":
        call.server.acl.default_token = body.get("Token", "")
    return Reply()


# ---- services -------------------------------------------------------------------------------


def _visible(call: Call, svc: Service) -> bool:
    if call.identity.allowed("service:read", svc.name):
        return True
    call.results_filtered = True
    return False


async def services(call: Call) -> Reply:
    dc = call.server.config.datacenter
    out = {s.id: render.agent_service(s, dc) for s in call.server.local_services()}
    f = call.filter(AGENT_SERVICE)
    if f is not None:
        out = {k: v for k, v in out.items() if f.matches(v)}
    visible = {s.id for s in call.server.local_services() if _visible(call, s)}
    return call.reply({k: v for k, v in out.items() if k in visible})


def _content_hash(body: dict[str, Any]) -> str:
    hashed = {k: v for k, v in body.items() if k not in ("Datacenter", "Locality", "ContentHash")}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16]


async def service(call: Call) -> Reply:
    service_id = call.tail
    call.parse_blocking()
    known_hash = call.query.get("hash", "")
    dc = call.server.config.datacenter

    def current() -> tuple[str, dict[str, Any]]:
        svc = call.server.local_service(service_id)
        if svc is None:
            raise not_found(f"unknown service ID: {service_id}")
        call.identity.require("service:read", svc.name)
        body = render.agent_service(svc, dc)
        digest = _content_hash(body)
        return digest, {**body, "ContentHash": digest}

    digest, body = current()
    if known_hash:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.wait
        while (
            digest == known_hash
            and not call.store.closed
            and (remaining := deadline - loop.time()) > 0
        ):
            await call.store.wait_for_change(remaining)
            digest, body = current()
    return Reply(body=body, headers={"X-Consul-ContentHash": digest})


async def register_service(call: Call) -> Reply:
    server = call.server
    defn = await call.body(schema.SERVICE)
    try:
        data = node_service(defn)
        checks = service_checks(defn, data, server.config.node_name)
    except InvalidRegistration as err:
        raise bad_request(str(err)) from None
    call.identity.require("service:write", data["Service"])
    if data.get("Kind") == "connect-proxy":
        dest = (data.get("Proxy") or {}).get("DestinationServiceName", "")
        call.identity.require("service:write", dest)
    sidecar: tuple[dict[str, Any], list[Check]] | None = None
    if (defn.get("Connect") or {}).get("SidecarService") is not None:
        try:
            port = server.sidecar_port(data["ID"] + "-sidecar-proxy", defn)
            side_defn = sidecar_definition(defn, data, port)
            side_data = node_service(side_defn)
            side_checks = service_checks(side_defn, side_data, server.config.node_name)
        except InvalidRegistration as err:
            raise bad_request(str(err)) from None
        sidecar = (side_data, side_checks)
        # Consul vets the sidecar as its own registration (vetServiceRegisterWithAuthorizer).
        call.identity.require("service:write", side_data["Service"])
    _require_script_checks(server, checks + (sidecar[1] if sidecar else []))
    replace = call.bool_param(
        "replace-existing-checks", "Invalid value for replace-existing-checks"
    )
    server.add_service(data, checks, replace_checks=replace)
    if sidecar is not None:
        server.add_service(sidecar[0], sidecar[1], replace_checks=replace, sidecar_of=data["ID"])
    return Reply()


def _require_script_checks(server: DevServer, checks: list[Check]) -> None:
    if not server.config.enable_script_checks and any(
        c.type in ("script", "docker") for c in checks
    ):
        raise HTTPError(
            500,
            "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' "
            "or 'enable_local_script_checks' to true",
        )


def _local_service_or_404(call: Call, service_id: str) -> Service:
    svc = call.server.local_service(service_id)
    if svc is None:
        raise not_found(
            f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
            "not the service name."
        )
    return svc


async def deregister_service(call: Call) -> Reply:
    svc = _local_service_or_404(call, call.tail)
    call.identity.require("service:write", svc.name)
    call.server.remove_service(svc.id)
    return Reply()


def _enable_flag(call: Call) -> bool:
    if "enable" not in call.query:
        raise bad_request("Missing value for enable")
    raw = call.query["enable"]
    if raw.lower() in ("1", "t", "true"):
        return True
    if raw.lower() in ("0", "f", "false"):
        return False
    raise bad_request(f'Invalid value for enable: "{raw}"')


async def service_maintenance(call: Call) -> Reply:
    if not call.tail:
        raise bad_request("Missing service ID")
    enable = _enable_flag(call)
    svc = call.server.local_service(call.tail)
    if svc is None:
        raise not_found(f'Unknown service ID "{call.tail}"')
    call.identity.require("service:write", svc.name)
    check_id = MAINTENANCE_PREFIX + svc.id
    if enable:
        reason = call.query.get("reason") or (
            "Maintenance mode is enabled for this service, but no reason was provided. "
            "This is a default message."
        )
        call.server.add_check(
            Check(
                node=svc.node,
                check_id=check_id,
                name="Service Maintenance Mode",
                status=CRITICAL,
                notes=reason,
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.data.get("Tags") or []),
                type="maintenance",
                local=True,
            )
        )
    else:
        call.server.remove_check(check_id)
    return Reply()


async def node_maintenance(call: Call) -> Reply:
    enable = _enable_flag(call)
    call.identity.require("node:write", call.server.config.node_name)
    if enable:
        reason = call.query.get("reason") or (
            "Maintenance mode is enabled for this node, but no reason was provided. "
            "This is a default message."
        )
        call.server.add_check(
            Check(
                node=call.server.config.node_name,
                check_id=NODE_MAINTENANCE,
                name="Node Maintenance Mode",
                status=CRITICAL,
                notes=reason,
                type="maintenance",
                local=True,
            )
        )
    else:
        call.server.remove_check(NODE_MAINTENANCE)
    return Reply()


# ---- checks ---------------------------------------------------------------------------------


async def checks(call: Call) -> Reply:
    # Consul's filterChecksWithAuthorizer: service:read for a service's check, else node:read.
    local = call.server.local_checks()
    visible = [
        c
        for c in local
        if call.identity.allowed(
            "service:read" if c.service_id else "node:read",
            c.service_name if c.service_id else c.node,
        )
    ]
    call.results_filtered = len(visible) < len(local)
    out = {c.check_id: render.check(c) for c in visible}
    f = call.filter(AGENT_CHECK)
    if f is not None:
        out = {k: v for k, v in out.items() if f.matches(v)}
    return call.reply(out)


async def register_check(call: Call) -> Reply:
    server = call.server
    defn = await call.body(schema.CHECK)
    name = defn.get("Name", "")
    if not name:
        raise bad_request("Missing check name")
    if defn.get("Status") and defn["Status"] not in STATUSES:
        raise bad_request("Bad check status")
    try:
        validate_check(defn)
    except InvalidRegistration as err:
        raise bad_request(f"Invalid check: {err}") from None
    service_id = defn.get("ServiceID", "")
    svc = None
    if service_id:
        svc = server.local_service(service_id)
        if svc is None:
            raise not_found(f'ServiceID "{service_id}" does not exist')
        call.identity.require("service:write", svc.name)
    else:
        call.identity.require("node:write", server.config.node_name)
    chk = make_check(
        defn,
        node=server.config.node_name,
        check_id=defn.get("CheckID") or defn.get("ID") or name,
        name=name,
        service_id=svc.id if svc else "",
        service_name=svc.name if svc else "",
        service_tags=(svc.data.get("Tags") or []) if svc else [],
    )
    _require_script_checks(server, [chk])
    server.add_check(chk)
    return Reply()


def _local_check_or_404(call: Call, check_id: str) -> Check:
    chk = call.server.local_check(check_id)
    if chk is None:
        raise not_found(
            f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
            "not the check name."
        )
    if chk.service_id:
        call.identity.require("service:write", chk.service_name)
    else:
        call.identity.require("node:write", call.server.config.node_name)
    return chk


async def deregister_check(call: Call) -> Reply:
    chk = _local_check_or_404(call, call.tail)
    call.server.remove_check(chk.check_id)
    return Reply()


def _ttl_update(call: Call, status: str, output: str) -> Reply:
    chk = _local_check_or_404(call, call.tail)
    if chk.type != "ttl":
        raise HTTPError(500, f'CheckID "{chk.check_id}" does not have associated TTL')
    call.server.ttl_update(chk, status, output)
    return Reply()


async def check_pass(call: Call) -> Reply:
    return _ttl_update(call, PASSING, call.query.get("note", ""))


async def check_warn(call: Call) -> Reply:
    return _ttl_update(call, WARNING, call.query.get("note", ""))


async def check_fail(call: Call) -> Reply:
    return _ttl_update(call, CRITICAL, call.query.get("note", ""))


async def check_update(call: Call) -> Reply:
    body = await call.body(schema.CHECK_UPDATE)
    status = body.get("Status", "")
    if status not in STATUSES:
        raise bad_request(f"Invalid check status: '{status}'")
    return _ttl_update(call, status, body.get("Output", ""))


# ---- local health -----------------------------------------------------------------------------

_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2, "maintenance": 3}
_HEALTH_CODE = {PASSING: 200, WARNING: 429, CRITICAL: 503, "maintenance": 503}


def _aggregate(checks: list[Check]) -> str:
    worst = PASSING
    for c in checks:
        status = (
            "maintenance"
            if c.check_id.startswith(MAINTENANCE_PREFIX) or c.check_id == NODE_MAINTENANCE
            else c.status
        )
        if _SEVERITY[status] > _SEVERITY[worst]:
            worst = status
    return worst


def _wants_text(call: Call) -> bool:
    return call.query.get("format") == "text" or call.request.headers.get("Accept") == "text/plain"


def _health_entry(call: Call, svc: Service) -> tuple[str, dict[str, Any]]:
    checks = call.server.local_checks_of(svc.id)
    status = _aggregate(checks)
    return status, {
        "AggregatedStatus": status,
        "Service": render.agent_service(svc, call.server.config.datacenter),
        "Checks": [render.check(c) for c in checks],
    }


async def health_by_id(call: Call) -> Reply:
    if not call.tail:
        raise bad_request("Missing serviceID")
    svc = call.server.local_service(call.tail)
    text = _wants_text(call)
    if svc is None:
        body = f"ServiceId {call.tail} not found"
        if text:
            return Reply(raw=body.encode(), status=404, content_type="text/plain")
        return Reply(
            body={"AggregatedStatus": CRITICAL, "Service": None, "Checks": None}, status=404
        )
    call.identity.require("service:read", svc.name)
    status, entry = _health_entry(call, svc)
    code = _HEALTH_CODE[status]
    if text:
        return Reply(raw=status.encode(), status=code, content_type="text/plain")
    return Reply(body=entry, status=code)


async def health_by_name(call: Call) -> Reply:
    if not call.tail:
        raise bad_request("Missing service Name")
    call.identity.require("service:read", call.tail)
    matching = [s for s in call.server.local_services() if s.name == call.tail]
    text = _wants_text(call)
    if not matching:
        body = f"ServiceName {call.tail} Not Found"
        if text:
            return Reply(raw=body.encode(), status=404, content_type="text/plain")
        return Reply(body=[], status=404)
    entries = [_health_entry(call, s) for s in matching]
    worst = _aggregate_statuses([s for s, _ in entries])
    code = _HEALTH_CODE[worst]
    if text:
        return Reply(raw=worst.encode(), status=code, content_type="text/plain")
    return Reply(body=[e for _, e in entries], status=code)


def _aggregate_statuses(statuses: list[str]) -> str:
    return max(statuses, key=lambda s: _SEVERITY[s], default=PASSING)
