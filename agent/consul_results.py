"""Typed, frozen views of what Consul returns, decoded strictly from its JSON.

Only what the agent uses is modelled; rarely used shapes stay JSON (e.g. `AgentSelf.raw`).
Every `from_json` raises `ShapeError` on a value of the wrong shape.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from agent.consul_json import (
    JSONObject,
    ShapeError,
    any_map,
    as_object,
    get_bool,
    get_int,
    get_object,
    get_optional_object,
    get_str,
    str_map,
    str_tuple,
)
from agent.consul_services import ProxyConfig, Weights

NODE_MAINTENANCE_CHECK = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"


class HealthStatus(StrEnum):
    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"
    MAINTENANCE = "maintenance"
    """Never a check's own status; the aggregate when a maintenance check is present."""


_CHECK_STATUSES = {
    s.value: s for s in (HealthStatus.PASSING, HealthStatus.WARNING, HealthStatus.CRITICAL)
}


@dataclass(frozen=True, slots=True)
class HealthCheck:
    node: str
    check_id: str
    name: str
    status: HealthStatus
    notes: str
    output: str
    service_id: str
    """"" for a node-level check."""
    service_name: str
    service_tags: tuple[str, ...]
    type: str
    """ttl, http, tcp, ... or "" for catalog-registered and serf checks."""

    @property
    def is_maintenance(self) -> bool:
        return self.check_id == NODE_MAINTENANCE_CHECK or self.check_id.startswith(
            SERVICE_MAINTENANCE_PREFIX
        )

    @classmethod
    def from_json(cls, value: object) -> HealthCheck:
        obj = as_object(value, "HealthCheck")
        status = get_str(obj, "Status")
        if status not in _CHECK_STATUSES:
            raise ShapeError(f"Status: {status!r} is not passing, warning or critical")
        return cls(
            node=get_str(obj, "Node", ""),
            check_id=get_str(obj, "CheckID"),
            name=get_str(obj, "Name", ""),
            status=_CHECK_STATUSES[status],
            notes=get_str(obj, "Notes", ""),
            output=get_str(obj, "Output", ""),
            service_id=get_str(obj, "ServiceID", ""),
            service_name=get_str(obj, "ServiceName", ""),
            service_tags=str_tuple(obj.get("ServiceTags"), "ServiceTags"),
            type=get_str(obj, "Type", ""),
        )


def aggregate_status(checks: Iterable[HealthCheck]) -> HealthStatus:
    """Consul's `HealthChecks.AggregatedStatus`: maintenance > critical > warning > passing.

    No checks at all is passing, as in Consul.
    """
    seen = set()
    for check in checks:
        if check.is_maintenance:
            return HealthStatus.MAINTENANCE
        seen.add(check.status)
    for status in (HealthStatus.CRITICAL, HealthStatus.WARNING):
        if status in seen:
            return status
    return HealthStatus.PASSING


def _checks(value: object, what: str) -> tuple[HealthCheck, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ShapeError(f"{what}: expected a list, got {type(value).__name__}")
    return tuple(HealthCheck.from_json(c) for c in value)


def _proxy(kind: str, value: object) -> ProxyConfig | None:
    # Consul renders a zero-valued Proxy for typical services; only proxies and gateways own one.
    if not kind or value is None:
        return None
    return ProxyConfig.from_json(value)


def _connect_native(value: object) -> bool:
    if value is None:
        return False
    return get_bool(as_object(value, "Connect"), "Native", False)


@dataclass(frozen=True, slots=True)
class AgentService:
    """A service as the agent holds it (`/v1/agent/services`, `/v1/agent/service/:id`,
    and the per-node service map of `/v1/catalog/node/:node`)."""

    id: str
    service: str
    kind: str
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    port: int
    address: str
    """As registered: "" means "the node's address"."""
    weights: Weights
    enable_tag_override: bool
    proxy: ProxyConfig | None
    connect_native: bool
    datacenter: str
    content_hash: str
    """Only filled by `/v1/agent/service/:id`."""

    @classmethod
    def from_json(cls, value: object) -> AgentService:
        obj = as_object(value, "AgentService")
        kind = get_str(obj, "Kind", "")
        return cls(
            id=get_str(obj, "ID"),
            service=get_str(obj, "Service"),
            kind=kind,
            tags=str_tuple(obj.get("Tags"), "Tags"),
            meta=str_map(obj.get("Meta"), "Meta"),
            port=get_int(obj, "Port", 0),
            address=get_str(obj, "Address", ""),
            weights=Weights.from_json(obj.get("Weights")),
            enable_tag_override=get_bool(obj, "EnableTagOverride", False),
            proxy=_proxy(kind, obj.get("Proxy")),
            connect_native=_connect_native(obj.get("Connect")),
            datacenter=get_str(obj, "Datacenter", ""),
            content_hash=get_str(obj, "ContentHash", ""),
        )


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    name: str
    address: str
    datacenter: str
    tagged_addresses: Mapping[str, str]
    meta: Mapping[str, str]

    @classmethod
    def from_json(cls, value: object) -> Node:
        obj = as_object(value, "Node")
        return cls(
            id=get_str(obj, "ID", ""),
            name=get_str(obj, "Node"),
            address=get_str(obj, "Address"),
            datacenter=get_str(obj, "Datacenter", ""),
            tagged_addresses=str_map(obj.get("TaggedAddresses"), "TaggedAddresses"),
            meta=str_map(obj.get("Meta"), "Meta"),
        )


@dataclass(frozen=True, slots=True)
class CatalogNode:
    """`/v1/catalog/node/:node`: the node and its services keyed by service ID."""

    node: Node
    services: Mapping[str, AgentService]

    @classmethod
    def from_json(cls, value: object) -> CatalogNode:
        obj = as_object(value, "CatalogNode")
        services = get_optional_object(obj, "Services") or {}
        return cls(
            node=Node.from_json(obj.get("Node")),
            services=MappingProxyType({k: AgentService.from_json(v) for k, v in services.items()}),
        )


@dataclass(frozen=True, slots=True)
class CatalogService:
    """One instance from `/v1/catalog/service/:name` or `/v1/catalog/connect/:name`."""

    node: str
    node_address: str
    datacenter: str
    service_id: str
    service_name: str
    kind: str
    address: str
    """Where to dial: the service's own address, or the node's when it has none."""
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    weights: Weights
    proxy: ProxyConfig | None
    connect_native: bool

    @classmethod
    def from_json(cls, value: object) -> CatalogService:
        obj = as_object(value, "CatalogService")
        node_address = get_str(obj, "Address")
        kind = get_str(obj, "ServiceKind", "")
        return cls(
            node=get_str(obj, "Node"),
            node_address=node_address,
            datacenter=get_str(obj, "Datacenter", ""),
            service_id=get_str(obj, "ServiceID"),
            service_name=get_str(obj, "ServiceName"),
            kind=kind,
            address=get_str(obj, "ServiceAddress", "") or node_address,
            port=get_int(obj, "ServicePort", 0),
            tags=str_tuple(obj.get("ServiceTags"), "ServiceTags"),
            meta=str_map(obj.get("ServiceMeta"), "ServiceMeta"),
            weights=Weights.from_json(obj.get("ServiceWeights")),
            proxy=_proxy(kind, obj.get("ServiceProxy")),
            connect_native=_connect_native(obj.get("ServiceConnect")),
        )


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One instance from `/v1/health/service/:name` or `/v1/health/connect/:name`, flattened:
    the node's and the service's fields plus the checks that decide its health."""

    node: str
    node_address: str
    datacenter: str
    service_id: str
    service_name: str
    kind: str
    address: str
    """Where to dial: `Service.Address`, or `Node.Address` when the service has none."""
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    weights: Weights
    proxy: ProxyConfig | None
    connect_native: bool
    checks: tuple[HealthCheck, ...]
    """The node's checks and the instance's own checks."""
    status: HealthStatus
    """`aggregate_status(checks)`."""

    @classmethod
    def from_json(cls, value: object) -> ServiceEntry:
        obj = as_object(value, "ServiceEntry")
        node = Node.from_json(obj.get("Node"))
        svc = AgentService.from_json(obj.get("Service"))
        checks = _checks(obj.get("Checks"), "Checks")
        return cls(
            node=node.name,
            node_address=node.address,
            datacenter=node.datacenter,
            service_id=svc.id,
            service_name=svc.service,
            kind=svc.kind,
            address=svc.address or node.address,
            port=svc.port,
            tags=svc.tags,
            meta=svc.meta,
            weights=svc.weights,
            proxy=svc.proxy,
            connect_native=svc.connect_native,
            checks=checks,
            status=aggregate_status(checks),
        )


@dataclass(frozen=True, slots=True)
class KVPair:
    key: str
    value: bytes
    """Decoded from Consul's base64; a null value (empty, or a "folder" key) is b""."""
    flags: int
    create_index: int
    modify_index: int
    lock_index: int
    session: str
    """The session holding the lock, or ""."""

    @classmethod
    def from_json(cls, value: object) -> KVPair:
        obj = as_object(value, "KVPair")
        encoded = obj.get("Value")
        if encoded is None:
            data = b""
        elif isinstance(encoded, str):
            try:
                data = base64.b64decode(encoded, validate=True)
            except ValueError as exc:  # binascii.Error, or a bare ValueError for non-ASCII
                raise ShapeError(f"Value: not base64: {exc}") from None
        else:
            raise ShapeError(f"Value: expected a base64 string, got {type(encoded).__name__}")
        return cls(
            key=get_str(obj, "Key"),
            value=data,
            flags=get_int(obj, "Flags", 0),
            create_index=get_int(obj, "CreateIndex", 0),
            modify_index=get_int(obj, "ModifyIndex", 0),
            lock_index=get_int(obj, "LockIndex", 0),
            session=get_str(obj, "Session", ""),
        )


@dataclass(frozen=True, slots=True)
class Member:
    """A serf member from `/v1/agent/members`; status 1 is alive (2 leaving, 3 left, 4 failed)."""

    name: str
    addr: str
    port: int
    status: int
    tags: Mapping[str, str]

    @classmethod
    def from_json(cls, value: object) -> Member:
        obj = as_object(value, "Member")
        return cls(
            name=get_str(obj, "Name"),
            addr=get_str(obj, "Addr"),
            port=get_int(obj, "Port", 0),
            status=get_int(obj, "Status"),
            tags=str_map(obj.get("Tags"), "Tags"),
        )


@dataclass(frozen=True, slots=True)
class AgentSelf:
    """`/v1/agent/self`: the fields the agent needs, and the rest as JSON."""

    node_name: str
    datacenter: str
    version: str
    raw: Mapping[str, Any]

    @classmethod
    def from_json(cls, value: object) -> AgentSelf:
        obj = as_object(value, "AgentSelf")
        config = get_object(obj, "Config")
        return cls(
            node_name=get_str(config, "NodeName"),
            datacenter=get_str(config, "Datacenter"),
            version=get_str(config, "Version", ""),
            raw=any_map(obj, "AgentSelf"),
        )


@dataclass(frozen=True, slots=True)
class LocalServiceHealth:
    """`/v1/agent/health/service/...`: one local instance and its aggregated health."""

    status: HealthStatus
    service: AgentService
    checks: tuple[HealthCheck, ...]

    @classmethod
    def from_json(cls, value: object) -> LocalServiceHealth:
        obj: JSONObject = as_object(value, "AgentServiceChecksInfo")
        status = get_str(obj, "AggregatedStatus")
        try:
            aggregated = HealthStatus(status)
        except ValueError:
            raise ShapeError(f"AggregatedStatus: unknown status {status!r}") from None
        return cls(
            status=aggregated,
            service=AgentService.from_json(obj.get("Service")),
            checks=_checks(obj.get("Checks"), "Checks"),
        )
