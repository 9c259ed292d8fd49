"""Consul's JSON shapes for nodes, service instances and health checks (CE flavour)."""

from __future__ import annotations

from typing import Any

from devstack.store import Check, Node, Service

_PROXY_ZERO: dict[str, Any] = {"Mode": "", "MeshGateway": {}, "Expose": {}}


def node(n: Node) -> dict[str, Any]:
    return {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": dict(n.tagged_addresses),
        "Meta": dict(n.meta),
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    }


def _weights(data: dict[str, Any]) -> dict[str, int]:
    w = data.get("Weights") or {}
    passing = w.get("Passing", 1)
    return {"Passing": passing if passing > 0 else 1, "Warning": w.get("Warning", 1)}


def _tagged(data: dict[str, Any]) -> dict[str, Any] | None:
    tagged = data.get("TaggedAddresses")
    if not tagged:
        return None
    return {
        k: {"Address": v.get("Address", ""), "Port": v.get("Port", 0)} for k, v in tagged.items()
    }


def proxy(data: dict[str, Any], *, agent_view: bool) -> dict[str, Any]:
    """The Proxy block: always an object (zero-valued for non-proxies)."""
    stored = data.get("Proxy") or {}
    out: dict[str, Any] = {} if agent_view else dict(_PROXY_ZERO)
    for key, raw in stored.items():
        value = [_upstream(u) for u in raw] if key == "Upstreams" else raw
        if value not in ("", 0, None, [], {}, False) or key in ("MeshGateway", "Expose"):
            out[key] = value
    out.setdefault("MeshGateway", {})
    out.setdefault("Expose", {})
    if not agent_view:
        out.setdefault("Mode", "")
    return out


def _upstream(u: dict[str, Any]) -> dict[str, Any]:
    out = {"DestinationType": "service", **u}
    out.setdefault("DestinationName", "")
    out.setdefault("LocalBindPort", 0)
    out.setdefault("MeshGateway", {})
    return out


def _connect(data: dict[str, Any]) -> dict[str, Any]:
    conn = data.get("Connect") or {}
    return {"Native": True} if conn.get("Native") else {}


def node_service(s: Service) -> dict[str, Any]:
    """structs.NodeService, as /v1/health/* and /v1/catalog/node/* show it."""
    d = s.data
    out: dict[str, Any] = {}
    if d.get("Kind"):
        out["Kind"] = d["Kind"]
    out |= {
        "ID": s.id,
        "Service": s.name,
        "Tags": list(d.get("Tags") or []),
        "Address": d.get("Address", ""),
    }
    tagged = _tagged(d)
    if tagged:
        out["TaggedAddresses"] = tagged
    out |= {"Meta": dict(d.get("Meta") or {}), "Port": d.get("Port", 0)}
    if d.get("SocketPath"):
        out["SocketPath"] = d["SocketPath"]
    out |= {"Weights": _weights(d), "EnableTagOverride": bool(d.get("EnableTagOverride"))}
    if d.get("Locality"):
        out["Locality"] = d["Locality"]
    out |= {
        "Proxy": proxy(d, agent_view=False),
        "Connect": _connect(d),
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }
    return out


def service_node(n: Node, s: Service) -> dict[str, Any]:
    """structs.ServiceNode: node and service flattened, as /v1/catalog/service/* shows it."""
    d = s.data
    out: dict[str, Any] = {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": dict(n.tagged_addresses),
        "NodeMeta": dict(n.meta),
        "ServiceKind": d.get("Kind", ""),
        "ServiceID": s.id,
        "ServiceName": s.name,
        "ServiceTags": list(d.get("Tags") or []),
        "ServiceAddress": d.get("Address", ""),
        "ServiceWeights": _weights(d),
        "ServiceMeta": dict(d.get("Meta") or {}),
        "ServicePort": d.get("Port", 0),
        "ServiceSocketPath": d.get("SocketPath", ""),
        "ServiceEnableTagOverride": bool(d.get("EnableTagOverride")),
        "ServiceProxy": proxy(d, agent_view=False),
        "ServiceConnect": _connect(d),
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }
    tagged = _tagged(d)
    if tagged:
        out["ServiceTaggedAddresses"] = tagged
    if d.get("Locality"):
        out["ServiceLocality"] = d["Locality"]
    return out


def agent_service(s: Service, datacenter: str) -> dict[str, Any]:
    """api.AgentService, as /v1/agent/services shows it."""
    d = s.data
    out: dict[str, Any] = {}
    if d.get("Kind"):
        out["Kind"] = d["Kind"]
    out |= {
        "ID": s.id,
        "Service": s.name,
        "Tags": list(d.get("Tags") or []),
        "Meta": dict(d.get("Meta") or {}),
        "Port": d.get("Port", 0),
        "Address": d.get("Address", ""),
    }
    if d.get("SocketPath"):
        out["SocketPath"] = d["SocketPath"]
    tagged = _tagged(d)
    if tagged:
        out["TaggedAddresses"] = tagged
    out |= {"Weights": _weights(d), "EnableTagOverride": bool(d.get("EnableTagOverride"))}
    if d.get("Kind"):
        out["Proxy"] = proxy(d, agent_view=True)
    if (d.get("Connect") or {}).get("Native"):
        out["Connect"] = {"Native": True}
    out["Datacenter"] = datacenter
    if d.get("Locality"):
        out["Locality"] = d["Locality"]
    return out


def check(c: Check) -> dict[str, Any]:
    return {
        "Node": c.node,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": list(c.service_tags),
        "Type": c.type,
        "Interval": c.interval,
        "Timeout": c.timeout,
        "ExposedPort": 0,
        "Definition": dict(c.definition),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    }
