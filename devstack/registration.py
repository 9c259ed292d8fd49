"""Turning agent service and check definitions into catalog records, with Consul's rules.

Validation texts are Consul's (agent/agent_endpoint.go, agent/structs/structs.go,
agent/structs/check_type.go, agent/sidecar_service.go).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from devstack.durations import format_duration
from devstack.store import STATUSES, Check

SIDECAR_SUFFIX = "-sidecar-proxy"
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
SERVICE_KINDS = (
    "",
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
    "destination",
)
_INTERVAL_KINDS = ("Args", "ScriptArgs", "HTTP", "TCP", "UDP", "GRPC", "H2PING", "OSService")


class InvalidRegistration(ValueError):
    """A definition Consul refuses with 400; str() is the response body."""


def validate_meta(meta: dict[str, str]) -> None:
    if len(meta) > 64:
        raise InvalidRegistration(
            "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        if key == "":
            raise InvalidRegistration("Invalid Service Meta: Key cannot be blank")
        if not _META_KEY.match(key):
            raise InvalidRegistration(
                f"Invalid Service Meta: Key contains invalid characters: {key}"
            )
        if len(key) > 128:
            raise InvalidRegistration(
                f"Invalid Service Meta: Key is too long (limit: 128 characters): {key}"
            )
        if key.startswith("consul-"):
            raise InvalidRegistration(
                f"Invalid Service Meta: Key prefix 'consul-' is reserved for internal use: {key}"
            )
        if len(value) > 512:
            raise InvalidRegistration(
                f"Invalid Service Meta: Value is too long (limit: 512 characters): {value}"
            )


def validate_weights(weights: dict[str, int] | None) -> None:
    if not weights:
        return
    passing, warning = weights.get("Passing", 0), weights.get("Warning", 0)
    if passing <= 0:
        raise InvalidRegistration("Invalid Weights: Passing must be greater than 0")
    if warning < 0:
        raise InvalidRegistration("Invalid Weights: Warning must be greater or equal than 0")
    if passing > 65535 or warning > 65535:
        raise InvalidRegistration("Invalid Weights: DNS Weight must be between 0 and 65535")


def check_kind(defn: dict[str, Any]) -> str:
    """Consul's check type name (HealthCheck.Type)."""
    if defn.get("Args") or defn.get("ScriptArgs"):
        return "docker" if defn.get("DockerContainerID") else "script"
    for key, kind in (
        ("HTTP", "http"),
        ("TCP", "tcp"),
        ("UDP", "udp"),
        ("GRPC", "grpc"),
        ("H2PING", "h2ping"),
        ("OSService", "os_service"),
    ):
        if defn.get(key):
            return kind
    if defn.get("AliasService") or defn.get("AliasNode"):
        return "alias"
    return "ttl"


def validate_check(defn: dict[str, Any]) -> None:
    interval, ttl = defn.get("Interval", 0), defn.get("TTL", 0)
    interval_check = any(defn.get(k) for k in _INTERVAL_KINDS)
    alias = bool(defn.get("AliasService") or defn.get("AliasNode"))
    if interval > 0 and ttl > 0:
        raise InvalidRegistration("Interval and TTL cannot both be specified")
    if interval_check and interval <= 0:
        raise InvalidRegistration(
            "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
        )
    if alias:
        if ttl > 0:
            raise InvalidRegistration("TTL must be not be set for Alias checks")
        if interval > 0:
            raise InvalidRegistration("Interval cannot be set for Alias checks")
    if not interval_check and not alias and ttl <= 0:
        raise InvalidRegistration("TTL must be > 0 for TTL checks")
    if defn.get("OutputMaxSize", 0) < 0:
        raise InvalidRegistration("MaxOutputMaxSize must be positive")
    if defn.get("FailuresBeforeWarning", 0) > defn.get("FailuresBeforeCritical", 0) > 0:
        raise InvalidRegistration(
            "FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
        )


def check_status(defn: dict[str, Any], error: str) -> str:
    status = defn.get("Status") or "critical"
    if status not in STATUSES:
        raise InvalidRegistration(error)
    return str(status)


_DEFINITION_KEYS = (
    "HTTP",
    "Header",
    "Method",
    "Body",
    "TLSServerName",
    "TLSSkipVerify",
    "TCP",
    "TCPUseTLS",
    "UDP",
    "GRPC",
    "GRPCUseTLS",
    "OSService",
    "H2PING",
    "AliasNode",
    "AliasService",
)


def make_check(
    defn: dict[str, Any],
    *,
    node: str,
    check_id: str,
    name: str,
    service_id: str = "",
    service_name: str = "",
    service_tags: Iterable[str] = (),
) -> Check:
    definition = {k: defn[k] for k in _DEFINITION_KEYS if defn.get(k)}
    for key in ("Interval", "Timeout", "DeregisterCriticalServiceAfter"):
        if defn.get(key):
            definition[key] = format_duration(defn[key])
    return Check(
        node=node,
        check_id=check_id,
        name=name,
        status=check_status(defn, "Status for checks must 'passing', 'warning', 'critical'"),
        service_id=service_id,
        service_name=service_name,
        service_tags=list(service_tags),
        notes=defn.get("Notes", ""),
        output="",
        type=check_kind(defn),
        interval=format_duration(defn["Interval"]) if defn.get("Interval") else "",
        timeout=format_duration(defn["Timeout"]) if defn.get("Timeout") else "",
        definition=definition,
        runner=dict(defn),
        local=True,
    )


def service_checks(defn: dict[str, Any], service: dict[str, Any], node: str) -> list[Check]:
    """The checks declared inside a service definition, with Consul's IDs and names."""
    raw = ([defn["Check"]] if defn.get("Check") else []) + list(defn.get("Checks") or [])
    raw = [c for c in raw if c]
    out = []
    for n, c in enumerate(raw, start=1):
        validate_check(c)
        check_status(c, "Status for checks must 'passing', 'warning', 'critical'")
        sid = service["ID"]
        default_id = f"service:{sid}" if len(raw) == 1 else f"service:{sid}:{n}"
        out.append(
            make_check(
                c,
                node=node,
                check_id=c.get("CheckID") or c.get("ID") or default_id,
                name=c.get("Name") or f"Service '{service['Service']}' check",
                service_id=sid,
                service_name=service["Service"],
                service_tags=service.get("Tags") or [],
            )
        )
    return out


def node_service(defn: dict[str, Any]) -> dict[str, Any]:
    """A ServiceDefinition as the catalog's NodeService data, after Consul's checks."""
    name = defn.get("Name", "")
    if not name:
        raise InvalidRegistration("Missing service name")
    if defn.get("Address") in ("0.0.0.0", "::", "[::]"):
        raise InvalidRegistration("Invalid service address")
    validate_weights(defn.get("Weights"))
    validate_meta(defn.get("Meta") or {})
    data: dict[str, Any] = {
        "Kind": defn.get("Kind", ""),
        "ID": defn.get("ID") or name,
        "Service": name,
        "Tags": list(defn.get("Tags") or []),
        "Address": defn.get("Address", ""),
        "Meta": dict(defn.get("Meta") or {}),
        "Port": defn.get("Port", 0),
        "Weights": defn.get("Weights") or {"Passing": 1, "Warning": 1},
        "EnableTagOverride": bool(defn.get("EnableTagOverride")),
    }
    for key in ("SocketPath", "TaggedAddresses", "Locality", "Proxy"):
        if defn.get(key):
            data[key] = defn[key]
    connect = defn.get("Connect") or {}
    if connect.get("Native"):
        data["Connect"] = {"Native": True}
    errors = validate_node_service(data)
    if errors:
        raise InvalidRegistration("Validation failed: " + _multierror(errors))
    return data


def _multierror(errors: list[str]) -> str:
    # hashicorp/go-multierror's format, which Consul's Validate() returns.
    noun = "error" if len(errors) == 1 else "errors"
    items = "".join(f"\t* {e}\n" for e in errors)
    return f"{len(errors)} {noun} occurred:\n{items}\n"


def validate_node_service(data: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    proxy = data.get("Proxy") or {}
    if data.get("Kind") == "connect-proxy":
        if not data.get("Port") and not data.get("SocketPath"):
            errors.append("Port or SocketPath must be set for a connect-proxy")
        dest = proxy.get("DestinationServiceName", "")
        if not dest:
            errors.append(
                "Proxy.DestinationServiceName must be non-empty for Connect proxy services"
            )
        elif dest == "*":
            errors.append(
                "Proxy.DestinationServiceName must not be a wildcard for Connect proxy services"
            )
        if (data.get("Connect") or {}).get("Native"):
            errors.append("A Proxy cannot also be Connect Native, only typical services")
        errors.extend(_validate_upstreams(proxy.get("Upstreams") or []))
    elif data.get("Kind", "") not in SERVICE_KINDS:
        errors.append(f'Invalid service kind: "{data["Kind"]}"')
    if (
        (data.get("Connect") or {}).get("Native")
        and not data.get("Port")
        and not data.get("SocketPath")
    ):
        errors.append("Port or SocketPath must be set for a Connect native service.")
    return errors


def _validate_upstreams(upstreams: list[dict[str, Any]]) -> list[str]:
    errors: list[str] = []
    seen_dest: set[tuple[str, ...]] = set()
    seen_bind: set[str] = set()
    for u in upstreams:
        kind = u.get("DestinationType") or "service"
        name = u.get("DestinationName", "")
        if kind not in ("service", "prepared_query"):
            errors.append(f'unknown upstream destination type: "{kind}"')
        if not name:
            errors.append("upstream destination name cannot be empty")
        elif name == "*":
            errors.append("upstream destination name cannot be a wildcard")
        port, sock = u.get("LocalBindPort", 0), u.get("LocalBindSocketPath", "")
        if not port and not sock:
            errors.append(
                "upstream local bind port or local socket path must be defined and nonzero"
            )
        if port and sock:
            errors.append(
                "only one of upstream local bind port or local socket path can be defined "
                "and nonzero"
            )
        if u.get("DestinationPeer") and u.get("Datacenter"):
            errors.append("upstream cannot specify both destination peer and datacenter")
        ident = (kind, name, u.get("Datacenter", ""), u.get("DestinationPeer", ""))
        if ident in seen_dest:
            errors.append(
                f"upstreams cannot contain duplicates of [type={kind}, name={name}, "
                f"dc={ident[2]}, peer={ident[3]}]"
            )
        seen_dest.add(ident)
        bind = sock or f"{u.get('LocalBindAddress') or '127.0.0.1'}:{port}"
        if bind in seen_bind:
            errors.append(
                "upstreams cannot contain duplicates by local bind address and port or unix "
                f'path; "{bind}" is specified twice'
            )
        seen_bind.add(bind)
    return errors


def sidecar_definition(
    parent_defn: dict[str, Any], parent: dict[str, Any], port: int
) -> dict[str, Any]:
    """Expand Connect.SidecarService into a full connect-proxy definition."""
    side = dict((parent_defn.get("Connect") or {}).get("SidecarService") or {})
    if side.get("ID"):
        raise InvalidRegistration(
            "Invalid SidecarService: A SidecarService cannot specify an ID as this is managed "
            "by the agent"
        )
    if (side.get("Connect") or {}).get("SidecarService"):
        raise InvalidRegistration(
            "Invalid SidecarService: A SidecarService cannot have a nested SidecarService"
        )
    side["ID"] = parent["ID"] + SIDECAR_SUFFIX
    side.setdefault("Name", parent["Service"] + SIDECAR_SUFFIX)
    side.setdefault("Kind", "connect-proxy")
    if not side.get("Address"):
        side["Address"] = parent.get("Address", "")
    if not side.get("Tags"):
        side["Tags"] = list(parent.get("Tags") or [])
    if not side.get("Meta"):
        side["Meta"] = dict(parent.get("Meta") or {})
    if not side.get("Locality") and parent.get("Locality"):
        side["Locality"] = parent["Locality"]
    proxy = dict(side.get("Proxy") or {})
    proxy["DestinationServiceName"] = parent["Service"]
    proxy["DestinationServiceID"] = parent["ID"]
    if not proxy.get("LocalServiceSocketPath"):
        if parent.get("SocketPath") and not proxy.get("LocalServicePort"):
            proxy["LocalServiceSocketPath"] = parent["SocketPath"]
        else:
            proxy.setdefault("LocalServiceAddress", "127.0.0.1")
            if not proxy.get("LocalServiceAddress"):
                proxy["LocalServiceAddress"] = "127.0.0.1"
            if proxy.get("LocalServicePort", 0) < 1:
                proxy["LocalServicePort"] = parent.get("Port", 0)
    side["Proxy"] = proxy
    if not side.get("Port"):
        side["Port"] = port
    if not side.get("Check") and not side.get("Checks"):
        address = side.get("Address") or proxy.get("LocalServiceAddress") or "127.0.0.1"
        side["Checks"] = [
            {
                "Name": "Connect Sidecar Listening",
                "TCP": f"{address}:{side['Port']}",
                "Interval": 10_000_000_000,
            },
            {"Name": f"Connect Sidecar Aliasing {parent['ID']}", "AliasService": parent["ID"]},
        ]
    return side
