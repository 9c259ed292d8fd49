"""/v1/catalog/*: nodes and service instances as the servers hold them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from devstack import decode as schema
from devstack import render
from devstack.config_entries import INGRESS_GATEWAY
from devstack.filter_schemas import AGENT_SERVICE, CATALOG_NODE, CATALOG_SERVICE_NODE
from devstack.httpapi import Call, Reply, Router, RPCError, bad_request
from devstack.registration import validate_node_service
from devstack.store import STATUSES, Check, Node, Service


def routes(router: Router) -> None:
    router.add("/v1/catalog/register", rpc=True, put=register)
    router.add("/v1/catalog/deregister", rpc=True, put=deregister)
    router.add("/v1/catalog/datacenters", get=datacenters)
    router.add("/v1/catalog/nodes", rpc=True, get=nodes)
    router.add("/v1/catalog/services", rpc=True, get=services)
    router.add("/v1/catalog/service/", rpc=True, get=service)
    router.add("/v1/catalog/connect/", rpc=True, get=connect)
    router.add("/v1/catalog/node/", rpc=True, get=node)
    router.add("/v1/catalog/node-services/", rpc=True, get=node_services)
    router.add("/v1/catalog/gateway-services/", rpc=True, get=gateway_services)


def node_meta_filter(call: Call) -> dict[str, str]:
    """`?node-meta=key:value`, repeatable; every pair must match."""
    pairs: dict[str, str] = {}
    for item in call.query.getall("node-meta", []):
        key, _, value = item.partition(":")
        pairs[key] = value
    return pairs


def node_matches(n: Node, meta: dict[str, str]) -> bool:
    return all(n.meta.get(k) == v for k, v in meta.items())


def tags_match(svc: Service, tags: tuple[str, ...]) -> bool:
    have = set(svc.data.get("Tags") or [])
    return all(t in have for t in tags)


@dataclass(frozen=True)
class InstanceQuery:
    """The selection that /v1/catalog/{service,connect}/:s and /v1/health/{service,connect}/:s
    share: by name (or Connect capability), `?tag` (all must match), `?node-meta`, `?peer`."""

    name: str
    connect: bool
    tags: tuple[str, ...]
    node_meta: dict[str, str]
    peer: str

    @classmethod
    def parse(cls, call: Call, *, connect: bool) -> InstanceQuery:
        return cls(
            name=service_name_of(call),
            connect=connect,
            tags=tuple(call.query.getall("tag", [])),
            node_meta=node_meta_filter(call),
            peer=call.query.get("peer", ""),
        )

    def select(self, call: Call) -> tuple[int, list[tuple[Node, Service]]]:
        """The blocking index of the selection and its instances, by node then service ID."""
        store = call.store
        watch = f"{'connect' if self.connect else 'service'}/{self.name}"
        index = store.key_index(watch, "services")
        # No peerings exist on a dev agent: any peer name selects nothing.
        # A Connect query without service:read on the destination answers empty, without
        # saying it was filtered (consul catalog_endpoint.go / health_endpoint.go ServiceNodes).
        if self.peer or (self.connect and not call.identity.allowed("service:read", self.name)):
            return index, []
        selected = []
        for s in sorted(store.instances(watch), key=lambda s: (s.node, s.id)):
            n = store.nodes.get(s.node)
            if n is not None and node_matches(n, self.node_meta) and tags_match(s, self.tags):
                # CheckServiceNode.CanRead: node:read on the node and service:read on the
                # instance's own name (the proxy's, for a Connect query).
                if not (
                    call.identity.allowed("node:read", n.name)
                    and call.identity.allowed("service:read", s.name)
                ):
                    call.results_filtered = True
                    continue
                selected.append((n, s))
        return index, selected


def service_name_of(call: Call) -> str:
    if not call.tail:
        raise bad_request("Missing service name")
    return call.tail


# ---- writes -----------------------------------------------------------------------------------


async def register(call: Call) -> Reply:
    req = await call.body(schema.CATALOG_REGISTER)
    store, server = call.store, call.server
    if req.get("Datacenter", server.config.datacenter) != server.config.datacenter:
        raise RPCError("No path to datacenter")
    node_name = req.get("Node", "")
    if not node_name:
        raise RPCError("Must provide node")
    if not req.get("Address") and not req.get("SkipNodeUpdate"):
        raise RPCError("Must provide address if SkipNodeUpdate is not set")
    node_id = req.get("ID", "")
    if node_id:
        try:
            uuid.UUID(node_id)
        except ValueError:
            raise RPCError(f"Bad node ID: uuid string is wrong length: {node_id}") from None
    svc_req = dict(req.get("Service") or {})
    if svc_req:
        if svc_req.get("ID") and not svc_req.get("Service"):
            raise RPCError(
                "Must provide service name (Service.Service) when service ID is provided"
            )
        if not svc_req.get("Service"):
            svc_req = {}
    if svc_req:
        if svc_req.get("Address") in ("0.0.0.0", "::", "[::]"):
            raise RPCError("Invalid service address")
        svc_req.setdefault("ID", svc_req["Service"])
        errors = validate_node_service(svc_req)
        if errors:
            raise RPCError("; ".join(errors))
        call.identity.require("service:write", svc_req["Service"])
    checks = list(req.get("Checks") or [])
    if req.get("Check"):
        checks.append(req["Check"])
    for chk in checks:
        if chk.get("Node") and chk["Node"] != node_name:
            raise RPCError(
                f"Node '{chk['Node']}' for check '{chk.get('CheckID', '')}' doesn't match "
                f"register request node '{node_name}'"
            )
        if chk.get("Status") and chk["Status"] not in STATUSES:
            raise RPCError(f"Check status {chk['Status']!r} is invalid")
        sid = chk.get("ServiceID", "")
        if sid and sid != svc_req.get("ID") and (node_name, sid) not in store.services:
            raise RPCError(f"Unknown service ID '{sid}' for check ID '{chk.get('CheckID', '')}'")

    existing = store.nodes.get(node_name)
    if existing is None or not req.get("SkipNodeUpdate"):
        call.identity.require("node:write", node_name)
        tagged = dict(req.get("TaggedAddresses") or {})
        store.upsert_node(
            Node(
                id=node_id or (existing.id if existing else ""),
                name=node_name,
                address=req.get("Address") or (existing.address if existing else ""),
                datacenter=server.config.datacenter,
                tagged_addresses=tagged,
                meta=dict(req.get("NodeMeta") or {}),
            )
        )
    if svc_req:
        data = {k: v for k, v in svc_req.items() if k not in ("CreateIndex", "ModifyIndex")}
        data.setdefault("Tags", [])
        data.setdefault("Meta", {})
        data.setdefault("Port", 0)
        data.setdefault("Address", "")
        old = store.services.get((node_name, data["ID"]))
        store.upsert_service(Service(node=node_name, data=data, local=bool(old and old.local)))
    for chk in checks:
        sid = chk.get("ServiceID", "")
        svc = store.services.get((node_name, sid)) if sid else None
        check_id = chk.get("CheckID") or chk.get("Name", "")
        store.upsert_check(
            Check(
                node=node_name,
                check_id=check_id,
                name=chk.get("Name", ""),
                status=chk.get("Status") or "critical",
                notes=chk.get("Notes", ""),
                output=chk.get("Output", ""),
                service_id=sid,
                service_name=svc.name if svc else "",
                service_tags=list(svc.data.get("Tags") or []) if svc else [],
                type=chk.get("Type", ""),
                definition=dict(chk.get("Definition") or {}),
            )
        )
    return call.reply(True)


async def deregister(call: Call) -> Reply:
    req = await call.body(schema.CATALOG_DEREGISTER)
    store = call.store
    if req.get("Datacenter", call.server.config.datacenter) != call.server.config.datacenter:
        raise RPCError("No path to datacenter")
    node_name = req.get("Node", "")
    if not node_name:
        raise RPCError("Must provide node")
    service_id, check_id = req.get("ServiceID", ""), req.get("CheckID", "")
    if service_id:
        svc = store.services.get((node_name, service_id))
        if svc is None:
            if node_name in store.nodes:
                return call.reply(True)
        else:
            call.identity.require("service:write", svc.name)
            call.server.remove_catalog_service(node_name, service_id)
    if check_id:
        chk = store.checks.get((node_name, check_id))
        if chk is not None:
            call.identity.require(
                "service:write" if chk.service_id else "node:write",
                chk.service_name if chk.service_id else node_name,
            )
            call.server.remove_catalog_check(node_name, check_id)
    if not service_id and not check_id:
        call.identity.require("node:write", node_name)
        if node_name == call.server.config.node_name:
            raise RPCError(f"Cannot deregister the agent's own node {node_name!r} in dev mode")
        store.delete_node(node_name)
    return call.reply(True)


# ---- reads ------------------------------------------------------------------------------------


async def datacenters(call: Call) -> Reply:
    return call.reply([call.server.config.datacenter])


async def nodes(call: Call) -> Reply:
    f = call.filter(CATALOG_NODE)
    meta = node_meta_filter(call)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        out = [
            render.node(n)
            for n in sorted(call.store.nodes.values(), key=lambda n: n.name)
            if node_matches(n, meta) and call.identity.allowed("node:read", n.name)
        ]
        if f is not None:
            out = [n for n in out if f.matches(n)]
        return call.store.table_index("nodes"), out

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def services(call: Call) -> Reply:
    f = call.filter(CATALOG_SERVICE_NODE)
    meta = node_meta_filter(call)
    if call.query.get("peer"):
        return call.reply({}, index=call.store.table_index("services"))

    def compute() -> tuple[int, dict[str, list[str]]]:
        out: dict[str, set[str]] = {}
        for s in call.store.services.values():
            n = call.store.nodes.get(s.node)
            if n is None or not node_matches(n, meta):
                continue
            if not call.identity.allowed("service:read", s.name):
                call.results_filtered = True
                continue
            if f is not None and not f.matches(render.service_node(n, s)):
                continue
            out.setdefault(s.name, set()).update(s.data.get("Tags") or [])
        return call.store.table_index("services"), {k: sorted(v) for k, v in sorted(out.items())}

    index, result = await call.blocking(compute)
    return call.reply(result, index=index)


async def _service_nodes(call: Call, *, connect: bool) -> Reply:
    query = InstanceQuery.parse(call, connect=connect)
    f = call.filter(CATALOG_SERVICE_NODE)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        index, selected = query.select(call)
        entries = [render.service_node(n, s) for n, s in selected]
        return index, [e for e in entries if f is None or f.matches(e)]

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def service(call: Call) -> Reply:
    return await _service_nodes(call, connect=False)


async def connect(call: Call) -> Reply:
    return await _service_nodes(call, connect=True)


async def node(call: Call) -> Reply:
    name = call.tail
    if not name:
        raise bad_request("Missing node name")
    f = call.filter(AGENT_SERVICE)

    def compute() -> tuple[int, dict[str, Any] | None]:
        index = call.store.table_index("nodes", "services")
        n = call.store.nodes.get(name)
        if n is None or not call.identity.allowed("node:read", name):
            return index, None
        svcs = {
            s.id: render.node_service(s)
            for s in sorted(call.store.node_services(name), key=lambda s: s.id)
            if call.identity.allowed("service:read", s.name)
        }
        if f is not None:
            svcs = {k: v for k, v in svcs.items() if f.matches(v)}
        return index, {"Node": render.node(n), "Services": svcs}

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def node_services(call: Call) -> Reply:
    name = call.tail
    if not name:
        raise bad_request("Missing node name")
    f = call.filter(AGENT_SERVICE)

    def compute() -> tuple[int, dict[str, Any] | None]:
        index = call.store.table_index("nodes", "services")
        n = call.store.nodes.get(name)
        if n is None:
            return index, None
        # Consul's filterNodeServiceList: an unreadable node empties the whole answer (so it
        # reads as not found); otherwise each service needs service:read.
        if not call.identity.allowed("node:read", name):
            call.results_filtered = True
            return index, None
        services = call.store.node_services(name)
        readable = [s for s in services if call.identity.allowed("service:read", s.name)]
        if len(readable) < len(services):
            call.results_filtered = True
        svcs = [render.node_service(s) for s in sorted(readable, key=lambda s: s.id)]
        if f is not None:
            svcs = [s for s in svcs if f.matches(s)]
        return index, {"Node": render.node(n), "Services": svcs}

    index, out = await call.blocking(compute)
    if out is None:
        return Reply(
            raw=f"Node not found: {name!r}".encode(), status=404, content_type="text/plain"
        )
    return call.reply(out, index=index)


async def gateway_services(call: Call) -> Reply:
    """Services an ingress gateway's config entry routes to, one entry per listener."""
    gateway = call.tail
    if not gateway:
        raise bad_request("Missing gateway name")
    call.identity.require("service:read", gateway)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        store = call.store
        index = store.table_index("config", "services")
        entry = store.config.get((INGRESS_GATEWAY, gateway))
        if entry is None:
            return index, []
        out = []
        for listener in entry.body.get("Listeners") or []:
            for svc in listener.get("Services") or []:
                out.append(
                    {
                        "Gateway": {"Name": gateway},
                        "Service": {"Name": svc["Name"]},
                        "GatewayKind": INGRESS_GATEWAY,
                        "Port": listener.get("Port", 0),
                        "Protocol": listener.get("Protocol", "tcp"),
                        "Hosts": svc.get("Hosts") or None,
                        "CAFile": "",
                        "CertFile": "",
                        "KeyFile": "",
                        "SNI": "",
                        "FromWildcard": svc["Name"] == "*",
                        "CreateIndex": entry.create_index,
                        "ModifyIndex": entry.modify_index,
                    }
                )
        return index, out

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)
