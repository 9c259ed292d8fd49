"""Request-body decoding with Go `encoding/json` rules, as Consul applies them.

Consul decodes bodies into Go structs with `DisallowUnknownFields`: keys match field names
case-insensitively, unknown keys are an error, and service/check/proxy definitions also accept
snake_case aliases. Durations are Go text or nanoseconds. The output is a plain dict keyed by
the canonical (CamelCase) field names, so the rest of devstack never sees caller spelling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devstack.durations import DurationError, duration_from_json


class DecodeError(ValueError):
    """A body that Go's decoder would refuse; str() is Go's message."""


@dataclass(frozen=True)
class Scalar:
    go_type: str  # "string", "int", "bool", "float64", "time.Duration", "interface {}"


STRING = Scalar("string")
INT = Scalar("int")
BOOL = Scalar("bool")
FLOAT = Scalar("float64")
DURATION = Scalar("time.Duration")
ANY = Scalar("interface {}")


@dataclass(frozen=True)
class ListOf:
    item: Spec


@dataclass(frozen=True)
class MapOf:
    value: Spec


@dataclass(frozen=True)
class Struct:
    name: str
    fields: Mapping[str, Spec | Callable[[], Spec]]
    snake_aliases: bool = False
    _lookup: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for canonical in self.fields:
            self._lookup[canonical.lower()] = canonical
            if self.snake_aliases:
                self._lookup.setdefault(_snake(canonical), canonical)

    def field_for(self, key: str) -> str | None:
        return self._lookup.get(key.lower())

    def spec_of(self, canonical: str) -> Spec:
        spec = self.fields[canonical]
        if isinstance(spec, Scalar | ListOf | MapOf | Struct):
            return spec
        return spec()


Spec = Scalar | ListOf | MapOf | Struct


def _snake(name: str) -> str:
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return (
            f"number {value}" if isinstance(value, float) and not value.is_integer() else "number"
        )
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def decode(value: object, spec: Spec, where: str = "") -> Any:
    """Decode `value` against `spec`; None (JSON null) is left to the caller as absent."""
    if isinstance(spec, Struct):
        if not isinstance(value, dict):
            raise _mismatch(value, where or spec.name, spec.name)
        out: dict[str, Any] = {}
        for key, item in value.items():
            canonical = spec.field_for(key)
            if canonical is None:
                raise DecodeError(f'json: unknown field "{key}"')
            if item is None:
                continue
            out[canonical] = decode(item, spec.spec_of(canonical), f"{spec.name}.{canonical}")
        return out
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise _mismatch(value, where, "[]" + _type_name(spec.item))
        return [decode(v, spec.item, where) for v in value if v is not None]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            raise _mismatch(value, where, "map[string]" + _type_name(spec.value))
        return {str(k): decode(v, spec.value, where) for k, v in value.items()}
    return _decode_scalar(value, spec, where)


def _decode_scalar(value: object, spec: Scalar, where: str) -> Any:
    kind = spec.go_type
    if kind == "interface {}":
        return value
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "float64" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "time.Duration":
        try:
            return duration_from_json(value)
        except DurationError as err:
            raise DecodeError(str(err)) from None
    raise _mismatch(value, where, kind)


def _type_name(spec: Spec) -> str:
    if isinstance(spec, Struct):
        return "structs." + spec.name
    if isinstance(spec, ListOf):
        return "[]" + _type_name(spec.item)
    if isinstance(spec, MapOf):
        return "map[string]" + _type_name(spec.value)
    return spec.go_type


def _mismatch(value: object, where: str, go_type: str) -> DecodeError:
    place = f" into Go struct field {where}" if where else ""
    return DecodeError(f"json: cannot unmarshal {_json_kind(value)}{place} of type {go_type}")


# ---- Consul's request structs (the subset of fields our endpoints accept) ----------------------

MESH_GATEWAY = Struct("MeshGatewayConfig", {"Mode": STRING})

UPSTREAM = Struct(
    "Upstream",
    {
        "DestinationType": STRING,
        "DestinationPartition": STRING,
        "DestinationNamespace": STRING,
        "DestinationPeer": STRING,
        "DestinationName": STRING,
        "Datacenter": STRING,
        "LocalBindAddress": STRING,
        "LocalBindPort": INT,
        "LocalBindSocketPath": STRING,
        "LocalBindSocketMode": STRING,
        "Config": MapOf(ANY),
        "MeshGateway": MESH_GATEWAY,
        "CentrallyConfigured": BOOL,
    },
    snake_aliases=True,
)

TRANSPARENT_PROXY = Struct(
    "TransparentProxyConfig",
    {"OutboundListenerPort": INT, "DialedDirectly": BOOL},
    snake_aliases=True,
)
EXPOSE = Struct(
    "ExposeConfig",
    {
        "Checks": BOOL,
        "Paths": ListOf(
            Struct(
                "ExposePath",
                {
                    "ListenerPort": INT,
                    "Path": STRING,
                    "LocalPathPort": INT,
                    "Protocol": STRING,
                    "ParsedFromCheck": BOOL,
                },
                snake_aliases=True,
            )
        ),
    },
)
ACCESS_LOGS = Struct(
    "AccessLogsConfig",
    {
        "Enabled": BOOL,
        "DisableListenerLogs": BOOL,
        "Type": STRING,
        "Path": STRING,
        "JSONFormat": STRING,
        "TextFormat": STRING,
    },
    snake_aliases=True,
)

PROXY = Struct(
    "ConnectProxyConfig",
    {
        "DestinationServiceName": STRING,
        "DestinationServiceID": STRING,
        "LocalServiceAddress": STRING,
        "LocalServicePort": INT,
        "LocalServiceSocketPath": STRING,
        "Mode": STRING,
        "TransparentProxy": TRANSPARENT_PROXY,
        "Config": MapOf(ANY),
        "Upstreams": ListOf(UPSTREAM),
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
        "AccessLogs": ACCESS_LOGS,
        "EnvoyExtensions": ListOf(MapOf(ANY)),
    },
    snake_aliases=True,
)

CHECK = Struct(
    "CheckType",
    {
        "CheckID": STRING,
        "ID": STRING,
        "Name": STRING,
        "Args": ListOf(STRING),
        "ScriptArgs": ListOf(STRING),
        "DockerContainerID": STRING,
        "Shell": STRING,
        "Interval": DURATION,
        "Timeout": DURATION,
        "TTL": DURATION,
        "HTTP": STRING,
        "Header": MapOf(ListOf(STRING)),
        "Method": STRING,
        "Body": STRING,
        "DisableRedirects": BOOL,
        "TCP": STRING,
        "TCPUseTLS": BOOL,
        "UDP": STRING,
        "OSService": STRING,
        "Status": STRING,
        "Notes": STRING,
        "TLSServerName": STRING,
        "TLSSkipVerify": BOOL,
        "GRPC": STRING,
        "GRPCUseTLS": BOOL,
        "H2PING": STRING,
        "H2PingUseTLS": BOOL,
        "AliasNode": STRING,
        "AliasService": STRING,
        "SuccessBeforePassing": INT,
        "FailuresBeforeWarning": INT,
        "FailuresBeforeCritical": INT,
        "DeregisterCriticalServiceAfter": DURATION,
        "OutputMaxSize": INT,
        "ServiceID": STRING,
        "Namespace": STRING,
        "Partition": STRING,
    },
    snake_aliases=True,
)

_WEIGHTS = Struct("Weights", {"Passing": INT, "Warning": INT})
_SERVICE_ADDRESS = Struct("ServiceAddress", {"Address": STRING, "Port": INT})
_LOCALITY = Struct("Locality", {"Region": STRING, "Zone": STRING})


def _connect() -> Spec:
    return Struct(
        "ServiceConnect",
        {"Native": BOOL, "SidecarService": lambda: SERVICE},
        snake_aliases=True,
    )


SERVICE = Struct(
    "ServiceDefinition",
    {
        "Kind": STRING,
        "ID": STRING,
        "Name": STRING,
        "Tags": ListOf(STRING),
        "Port": INT,
        "Address": STRING,
        "SocketPath": STRING,
        "TaggedAddresses": MapOf(_SERVICE_ADDRESS),
        "EnableTagOverride": BOOL,
        "Meta": MapOf(STRING),
        "Weights": _WEIGHTS,
        "Check": CHECK,
        "Checks": ListOf(CHECK),
        "Proxy": PROXY,
        "Connect": _connect,
        "Token": STRING,
        "Namespace": STRING,
        "Partition": STRING,
        "Locality": _LOCALITY,
    },
    snake_aliases=True,
)

CHECK_UPDATE = Struct("checkUpdate", {"Status": STRING, "Output": STRING})

CATALOG_SERVICE = Struct(
    "NodeService",
    {
        "Kind": STRING,
        "ID": STRING,
        "Service": STRING,
        "Tags": ListOf(STRING),
        "Address": STRING,
        "TaggedAddresses": MapOf(_SERVICE_ADDRESS),
        "Meta": MapOf(STRING),
        "Port": INT,
        "SocketPath": STRING,
        "Weights": _WEIGHTS,
        "EnableTagOverride": BOOL,
        "Proxy": PROXY,
        "Connect": _connect,
        "Locality": _LOCALITY,
        "Namespace": STRING,
        "Partition": STRING,
        "PeerName": STRING,
        "CreateIndex": INT,
        "ModifyIndex": INT,
    },
    snake_aliases=True,
)

CATALOG_CHECK = Struct(
    "HealthCheck",
    {
        "Node": STRING,
        "CheckID": STRING,
        "Name": STRING,
        "Status": STRING,
        "Notes": STRING,
        "Output": STRING,
        "ServiceID": STRING,
        "ServiceName": STRING,
        "ServiceTags": ListOf(STRING),
        "Type": STRING,
        "Interval": STRING,
        "Timeout": STRING,
        "ExposedPort": INT,
        "Definition": MapOf(ANY),
        "Namespace": STRING,
        "Partition": STRING,
        "PeerName": STRING,
        "CreateIndex": INT,
        "ModifyIndex": INT,
    },
)

CATALOG_REGISTER = Struct(
    "RegisterRequest",
    {
        "ID": STRING,
        "Node": STRING,
        "Address": STRING,
        "Datacenter": STRING,
        "TaggedAddresses": MapOf(STRING),
        "NodeMeta": MapOf(STRING),
        "Service": CATALOG_SERVICE,
        "Check": CATALOG_CHECK,
        "Checks": ListOf(CATALOG_CHECK),
        "SkipNodeUpdate": BOOL,
        "Namespace": STRING,
        "Partition": STRING,
        "PeerName": STRING,
        "Token": STRING,
        "Locality": _LOCALITY,
    },
)

CATALOG_DEREGISTER = Struct(
    "DeregisterRequest",
    {
        "Node": STRING,
        "Datacenter": STRING,
        "CheckID": STRING,
        "ServiceID": STRING,
        "Namespace": STRING,
        "Partition": STRING,
        "PeerName": STRING,
        "Token": STRING,
    },
)

SESSION = Struct(
    "SessionRequest",
    {
        "LockDelay": DURATION,
        "Name": STRING,
        "Node": STRING,
        "Checks": ListOf(STRING),
        "NodeChecks": ListOf(STRING),
        "ServiceChecks": ListOf(MapOf(ANY)),
        "Behavior": STRING,
        "TTL": STRING,
        "Namespace": STRING,
    },
)
