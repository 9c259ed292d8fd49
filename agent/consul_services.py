"""Service definitions the agent registers, in Consul's own JSON vocabulary.

Each type renders to the CamelCase body of `PUT /v1/agent/service/register` (or
`/v1/agent/check/register`), leaving out zero values the way Go's `omitempty` does, so a
definition round-trips through Consul unchanged. `ProxyConfig`, `Upstream` and `Weights` are
also read back from `/v1/agent/service/:id`, which is how a sidecar learns its upstreams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.consul_blocking import Wait, duration_seconds, format_duration
from agent.consul_json import (
    JSONObject,
    any_map,
    as_list,
    as_object,
    get_int,
    get_optional_object,
    get_str,
)


def _empty_map() -> Mapping[str, Any]:
    return MappingProxyType({})


def _duration(value: Wait) -> str:
    # Strings go out as written ("10s" stays "10s"); numbers are seconds.
    if isinstance(value, str):
        duration_seconds(value)  # raises ValueError naming the bad string
        return value
    return format_duration(value)


def _drop_empty(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v not in (None, "", 0, False, (), [], {})}


@dataclass(frozen=True, slots=True)
class Weights:
    """DNS SRV weights by health; Consul's default is 1 and 1."""

    passing: int = 1
    warning: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"Passing": self.passing, "Warning": self.warning}

    @classmethod
    def from_json(cls, value: object) -> Weights:
        if value is None:
            return cls()
        obj = as_object(value, "Weights")
        return cls(passing=get_int(obj, "Passing", 1), warning=get_int(obj, "Warning", 1))


@dataclass(frozen=True, slots=True)
class Upstream:
    """A service a proxy dials on the app's behalf, listening locally on `local_bind_port`."""

    destination_name: str
    local_bind_port: int = 0
    local_bind_address: str = ""
    """Consul's default is 127.0.0.1."""
    destination_type: str = ""
    """"service" (the default) or "prepared_query"."""
    datacenter: str = ""
    destination_peer: str = ""
    local_bind_socket_path: str = ""
    config: Mapping[str, Any] = field(default_factory=_empty_map)
    """Opaque per-upstream settings: protocol, connect_timeout_ms, limits, ..."""

    def to_json(self) -> dict[str, Any]:
        return _drop_empty(
            {
                "DestinationType": self.destination_type,
                "DestinationName": self.destination_name,
                "DestinationPeer": self.destination_peer,
                "Datacenter": self.datacenter,
                "LocalBindAddress": self.local_bind_address,
                "LocalBindPort": self.local_bind_port,
                "LocalBindSocketPath": self.local_bind_socket_path,
                "Config": dict(self.config),
            }
        )

    @classmethod
    def from_json(cls, value: object) -> Upstream:
        obj = as_object(value, "Upstream")
        return cls(
            destination_name=get_str(obj, "DestinationName"),
            local_bind_port=get_int(obj, "LocalBindPort", 0),
            local_bind_address=get_str(obj, "LocalBindAddress", ""),
            destination_type=get_str(obj, "DestinationType", ""),
            datacenter=get_str(obj, "Datacenter", ""),
            destination_peer=get_str(obj, "DestinationPeer", ""),
            local_bind_socket_path=get_str(obj, "LocalBindSocketPath", ""),
            config=any_map(obj.get("Config"), "Upstream.Config"),
        )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The `Proxy` block of a `connect-proxy` service."""

    destination_service_name: str = ""
    """The service this proxy fronts; Consul fills it in for a SidecarService."""
    destination_service_id: str = ""
    local_service_address: str = ""
    local_service_port: int = 0
    mode: str = ""
    """"", "direct" or "transparent"."""
    upstreams: tuple[Upstream, ...] = ()
    config: Mapping[str, Any] = field(default_factory=_empty_map)
    mesh_gateway_mode: str = ""

    def to_json(self) -> dict[str, Any]:
        body = _drop_empty(
            {
                "DestinationServiceName": self.destination_service_name,
                "DestinationServiceID": self.destination_service_id,
                "LocalServiceAddress": self.local_service_address,
                "LocalServicePort": self.local_service_port,
                "Mode": self.mode,
                "Config": dict(self.config),
                "Upstreams": [u.to_json() for u in self.upstreams],
            }
        )
        if self.mesh_gateway_mode:
            body["MeshGateway"] = {"Mode": self.mesh_gateway_mode}
        return body

    @classmethod
    def from_json(cls, value: object) -> ProxyConfig:
        obj = as_object(value, "Proxy")
        upstreams = obj.get("Upstreams")
        gateway = get_optional_object(obj, "MeshGateway") or {}
        return cls(
            destination_service_name=get_str(obj, "DestinationServiceName", ""),
            destination_service_id=get_str(obj, "DestinationServiceID", ""),
            local_service_address=get_str(obj, "LocalServiceAddress", ""),
            local_service_port=get_int(obj, "LocalServicePort", 0),
            mode=get_str(obj, "Mode", ""),
            upstreams=tuple(
                Upstream.from_json(u)
                for u in ([] if upstreams is None else as_list(upstreams, "Upstreams"))
            ),
            config=any_map(obj.get("Config"), "Proxy.Config"),
            mesh_gateway_mode=get_str(gateway, "Mode", ""),
        )


@dataclass(frozen=True, slots=True)
class CheckDefinition:
    """A health check, inside a service registration or registered on its own.

    Set exactly one of `ttl`, `http`, `tcp`, `grpc`, `args`, `alias_service`/`alias_node`;
    Consul validates the combination (e.g. interval checks need `interval`).
    """

    name: str = ""
    check_id: str = ""
    service_id: str = ""
    """Only for a check registered on its own: the local service it belongs to."""
    ttl: Wait | None = None
    http: str = ""
    method: str = ""
    header: Mapping[str, tuple[str, ...]] = field(default_factory=_empty_map)
    tcp: str = ""
    grpc: str = ""
    args: tuple[str, ...] = ()
    alias_service: str = ""
    alias_node: str = ""
    interval: Wait | None = None
    timeout: Wait | None = None
    status: str = ""
    """Initial status; Consul's default is critical."""
    notes: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    deregister_critical_service_after: Wait | None = None
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0

    def __post_init__(self) -> None:
        for value in (
            self.ttl,
            self.interval,
            self.timeout,
            self.deregister_critical_service_after,
        ):
            if value is not None:
                _duration(value)

    def to_json(self, *, standalone: bool = False) -> dict[str, Any]:
        """The check's body; `standalone` for `/v1/agent/check/register` (keyed `ID`)."""
        durations = {
            "TTL": self.ttl,
            "Interval": self.interval,
            "Timeout": self.timeout,
            "DeregisterCriticalServiceAfter": self.deregister_critical_service_after,
        }
        body: dict[str, Any] = {
            "ID" if standalone else "CheckID": self.check_id,
            "Name": self.name,
            "ServiceID": self.service_id if standalone else "",
            "HTTP": self.http,
            "Method": self.method,
            "Header": {k: list(v) for k, v in self.header.items()},
            "TCP": self.tcp,
            "GRPC": self.grpc,
            "Args": list(self.args),
            "AliasService": self.alias_service,
            "AliasNode": self.alias_node,
            "Status": self.status,
            "Notes": self.notes,
            "TLSServerName": self.tls_server_name,
            "TLSSkipVerify": self.tls_skip_verify,
            "SuccessBeforePassing": self.success_before_passing,
            "FailuresBeforeWarning": self.failures_before_warning,
            "FailuresBeforeCritical": self.failures_before_critical,
        }
        body.update({k: _duration(v) for k, v in durations.items() if v is not None})
        return _drop_empty(body)


@dataclass(frozen=True, slots=True)
class SidecarService:
    """`Connect.SidecarService`: Consul derives the rest (ID `<id>-sidecar-proxy`, kind,
    destination, local service port, default checks) from the parent service."""

    port: int = 0
    """0 lets Consul pick one from its sidecar range (21000-21255)."""
    name: str = ""
    address: str = ""
    tags: tuple[str, ...] | None = None
    """None inherits the parent's tags; () registers none."""
    meta: Mapping[str, str] | None = None
    proxy: ProxyConfig | None = None
    checks: tuple[CheckDefinition, ...] = ()
    """Empty gets Consul's default TCP-listening and alias checks."""

    def to_json(self) -> dict[str, Any]:
        body = _drop_empty(
            {
                "Name": self.name,
                "Port": self.port,
                "Address": self.address,
                "Checks": [c.to_json() for c in self.checks],
            }
        )
        if self.tags is not None:
            body["Tags"] = list(self.tags)
        if self.meta is not None:
            body["Meta"] = dict(self.meta)
        if self.proxy is not None:
            body["Proxy"] = self.proxy.to_json()
        return body


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    """The body of `PUT /v1/agent/service/register`."""

    name: str
    id: str = ""
    """Defaults to `name` on Consul's side."""
    kind: str = ""
    """"" for a typical service, "connect-proxy" for a proxy registered on its own."""
    port: int = 0
    address: str = ""
    """"" means the node's address."""
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=_empty_map)
    enable_tag_override: bool = False
    weights: Weights | None = None
    checks: tuple[CheckDefinition, ...] = ()
    proxy: ProxyConfig | None = None
    connect_native: bool = False
    sidecar: SidecarService | None = None

    def to_json(self) -> dict[str, Any]:
        body = _drop_empty(
            {
                "Kind": self.kind,
                "ID": self.id,
                "Name": self.name,
                "Tags": list(self.tags),
                "Port": self.port,
                "Address": self.address,
                "Meta": dict(self.meta),
                "EnableTagOverride": self.enable_tag_override,
                "Checks": [c.to_json() for c in self.checks],
            }
        )
        if self.weights is not None:
            body["Weights"] = self.weights.to_json()
        if self.proxy is not None:
            body["Proxy"] = self.proxy.to_json()
        connect: dict[str, Any] = {}
        if self.connect_native:
            connect["Native"] = True
        if self.sidecar is not None:
            connect["SidecarService"] = self.sidecar.to_json()
        if connect:
            body["Connect"] = connect
        return body


def registration_body(
    definition: ServiceRegistration | CheckDefinition | JSONObject, *, standalone: bool = False
) -> dict[str, Any]:
    """A typed definition's JSON, or a raw body passed through for shapes not modelled here."""
    if isinstance(definition, ServiceRegistration):
        return definition.to_json()
    if isinstance(definition, CheckDefinition):
        return definition.to_json(standalone=standalone)
    if not isinstance(definition, Mapping):
        raise TypeError(f"expected a definition or a JSON object, got {type(definition).__name__}")
    return dict(definition)
