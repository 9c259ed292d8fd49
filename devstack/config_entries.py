"""Config entries as Consul's servers hold them: decoding, validation and the service graph.

Consul decodes `PUT /v1/config` bodies with mapstructure: keys match field names in CamelCase
or snake_case, unknown keys are collected as `invalid config key "X"` (400), and validation
failures are plain errors (500). Writes and deletes that Consul's service-graph validation
refuses are refused: L7 intentions on a non-HTTP protocol, ingress listeners whose protocol
differs from the service's, and any discovery chain that no longer compiles (a router or
splitter on a tcp service, a missing subset, circular redirects or splits, ...).

`service-intentions` entries are decoded and validated by the `intentions` package, and the
routing kinds (`service-router`, `service-splitter`, `service-resolver`) and the chain compiler
by the `traffic` package, so that what the proxy applies and what the control plane accepted
are one reading of an entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from devstack.bexpr import FilterError, check_syntax
from devstack.decode import (
    ACCESS_LOGS,
    ANY,
    BOOL,
    EXPOSE,
    INT,
    MESH_GATEWAY,
    STRING,
    TRANSPARENT_PROXY,
    ListOf,
    MapOf,
    Scalar,
    Spec,
    Struct,
)
from intentions.entries import (
    KIND as INTENTIONS_KIND,
)
from intentions.entries import (
    WILDCARD,
    ServiceIntentions,
    entry_to_json,
    has_l7_permissions,
    l7_protocol_error,
    load_entry,
)
from intentions.errors import EntryDecodeError, InvalidEntry
from traffic import entries as routing
from traffic.chain import ChainEntries
from traffic.chain import validate_graph as validate_chains
from traffic.defaults import (
    proxy_defaults_from_json,
    service_defaults_from_json,
    upstream_configuration_errors,
    upstream_configuration_from_json,
)
from traffic.entries import multierror
from traffic.errors import EntryDecodeError as RoutingDecodeError
from traffic.errors import TrafficError

SERVICE_DEFAULTS = "service-defaults"
PROXY_DEFAULTS = "proxy-defaults"
INGRESS_GATEWAY = "ingress-gateway"
HTTP_PROTOCOLS = ("http", "http2", "grpc")

MESH = "mesh"
MESH_NAME = "mesh"
"""The one mesh entry's name: Consul's `MeshConfigEntry` has no Name field (a body naming one
is refused) and always answers to `mesh`."""

# Kinds Consul CE knows that devstack does not hold yet: refused with a clear error rather
# than stored without the validation Consul would apply.
NOT_YET = (
    "exported-services",
    "terminating-gateway",
    "api-gateway",
    "bound-api-gateway",
    "http-route",
    "tcp-route",
    "inline-certificate",
    "file-system-certificate",
    "jwt-provider",
    "sameness-group",
    "control-plane-request-limit",
)


class ConfigEntryError(Exception):
    """A write Consul refuses; `status` is Consul's (400 decode, 500 validation)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Entry:
    """One stored entry: its canonical JSON (without indexes) and, for intentions, the model."""

    kind: str
    name: str
    body: Mapping[str, Any]
    intentions: ServiceIntentions | None = None
    routing: routing.RoutingEntry | None = None
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.intentions is not None:
            model = dataclasses.replace(
                self.intentions, create_index=self.create_index, modify_index=self.modify_index
            )
            return entry_to_json(model)
        return {**self.body, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


# ---- mapstructure-style decoding -------------------------------------------------------------


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


def _decode(value: Any, spec: Spec, where: str, errors: list[str]) -> Any:
    if isinstance(spec, Struct):
        if not isinstance(value, dict):
            errors.append(f"'{where}' expected a map, got '{type(value).__name__}'")
            return {}
        fields = {_fold(name): name for name in spec.fields}
        out: dict[str, Any] = {}
        for key, item in value.items():
            canonical = fields.get(_fold(str(key)))
            if canonical is None:
                errors.append(f'invalid config key "{where + "." if where else ""}{key}"')
                continue
            if item is not None:
                path = f"{where}.{canonical}" if where else canonical
                out[canonical] = _decode(item, spec.spec_of(canonical), path, errors)
        return out
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            errors.append(f"'{where}': source data must be an array or slice, got {_go(value)}")
            return []
        return [_decode(v, spec.item, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            errors.append(f"'{where}' expected a map, got '{_go(value)}'")
            return {}
        return {str(k): _decode(v, spec.value, f"{where}[{k}]", errors) for k, v in value.items()}
    return _scalar(value, spec, where, errors)


def _go(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return "slice" if isinstance(value, list) else "map"


def _scalar(value: Any, spec: Scalar, where: str, errors: list[str]) -> Any:
    kind = spec.go_type
    ok = (
        kind == "interface {}"
        or (kind == "string" and isinstance(value, str))
        or (kind == "bool" and isinstance(value, bool))
        or (
            kind == "int"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and float(value).is_integer()
        )
    )
    if not ok:
        errors.append(
            f"'{where}' expected type '{kind}', got unconvertible type '{_go(value)}', "
            f"value: '{value}'"
        )
        return None
    return int(value) if kind == "int" else value


def _decode_body(body: Mapping[str, Any], spec: Struct) -> dict[str, Any]:
    errors: list[str] = []
    out = _decode(dict(body), spec, "", errors)
    if errors:
        noun = "error" if len(errors) == 1 else "errors"
        listed = "".join(f"\t* {e}\n" for e in errors)
        raise ConfigEntryError(
            400, f"Request decoding failed: {len(errors)} {noun} occurred:\n{listed}\n"
        )
    result: dict[str, Any] = out
    return result


_COMMON: dict[str, Spec] = {
    "Kind": STRING,
    "Name": STRING,
    "Namespace": STRING,
    "Partition": STRING,
    "Meta": MapOf(STRING),
    "CreateIndex": INT,
    "ModifyIndex": INT,
    "Hash": INT,
}
# structs.UpstreamConfig (CE: no Namespace/Partition). Durations stay as given (Go text or
# nanoseconds) and are read by traffic.defaults, which Consul's checks also live in.
_UPSTREAM_CONFIG = Struct(
    "UpstreamConfig",
    {
        "Name": STRING,
        "Peer": STRING,
        "EnvoyListenerJSON": STRING,
        "EnvoyClusterJSON": STRING,
        "Protocol": STRING,
        "ConnectTimeoutMs": INT,
        "Limits": Struct(
            "UpstreamLimits",
            {"MaxConnections": INT, "MaxPendingRequests": INT, "MaxConcurrentRequests": INT},
        ),
        "PassiveHealthCheck": Struct(
            "PassiveHealthCheck",
            {
                "Interval": ANY,
                "MaxFailures": INT,
                "EnforcingConsecutive5xx": INT,
                "MaxEjectionPercent": INT,
                "BaseEjectionTime": ANY,
            },
        ),
        "MeshGateway": MESH_GATEWAY,
        "BalanceOutboundConnections": STRING,
    },
)
SERVICE_DEFAULTS_SPEC = Struct(
    "ServiceConfigEntry",
    {
        **_COMMON,
        "Protocol": STRING,
        "Mode": STRING,
        "TransparentProxy": TRANSPARENT_PROXY,
        "MutualTLSMode": STRING,
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
        "ExternalSNI": STRING,
        "UpstreamConfig": Struct(
            "UpstreamConfiguration",
            {"Defaults": _UPSTREAM_CONFIG, "Overrides": ListOf(_UPSTREAM_CONFIG)},
        ),
        "Destination": Struct("DestinationConfig", {"Addresses": ListOf(STRING), "Port": INT}),
        "MaxInboundConnections": INT,
        "LocalConnectTimeoutMs": INT,
        "LocalRequestTimeoutMs": INT,
        "BalanceInboundConnections": STRING,
        "RateLimits": MapOf(ANY),
        "EnvoyExtensions": ListOf(MapOf(ANY)),
    },
)

PROXY_DEFAULTS_SPEC = Struct(
    "ProxyConfigEntry",
    {
        **_COMMON,
        "Config": MapOf(ANY),
        "Mode": STRING,
        "TransparentProxy": TRANSPARENT_PROXY,
        "MutualTLSMode": STRING,
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
        "AccessLogs": ACCESS_LOGS,
        "EnvoyExtensions": ListOf(MapOf(ANY)),
        "FailoverPolicy": MapOf(ANY),
        "PrioritizeByLocality": MapOf(ANY),
    },
)

_MESH_TLS_DIRECTION = Struct(
    "MeshDirectionalTLSConfig",
    {"TLSMinVersion": STRING, "TLSMaxVersion": STRING, "CipherSuites": ListOf(STRING)},
)
MESH_SPEC = Struct(
    "MeshConfigEntry",
    {
        "Kind": STRING,
        "Namespace": STRING,
        "Partition": STRING,
        "Meta": MapOf(STRING),
        "CreateIndex": INT,
        "ModifyIndex": INT,
        "Hash": INT,
        "TransparentProxy": Struct("TransparentProxyMeshConfig", {"MeshDestinationsOnly": BOOL}),
        "AllowEnablingPermissiveMutualTLS": BOOL,
        "ValidateClusters": BOOL,
        "TLS": Struct(
            "MeshTLSConfig", {"Incoming": _MESH_TLS_DIRECTION, "Outgoing": _MESH_TLS_DIRECTION}
        ),
        "HTTP": Struct(
            "MeshHTTPConfig",
            {
                "SanitizeXForwardedClientCert": BOOL,
                "Incoming": Struct(
                    "MeshDirectionalHTTPConfig",
                    {
                        "RequestNormalization": Struct(
                            "RequestNormalizationMeshConfig",
                            {
                                "InsecureDisablePathNormalization": BOOL,
                                "MergeSlashes": BOOL,
                                "PathWithEscapedSlashesAction": STRING,
                                "HeadersWithUnderscoresAction": STRING,
                            },
                        )
                    },
                ),
            },
        ),
        "Peering": Struct("PeeringMeshConfig", {"PeerThroughMeshGateways": BOOL}),
    },
)

INGRESS_GATEWAY_SPEC = Struct(
    "IngressGatewayConfigEntry",
    {
        **_COMMON,
        "TLS": MapOf(ANY),
        "Defaults": MapOf(ANY),
        "Listeners": ListOf(
            Struct(
                "IngressListener",
                {
                    "Port": INT,
                    "Protocol": STRING,
                    "TLS": MapOf(ANY),
                    "Services": ListOf(
                        Struct(
                            "IngressService",
                            {
                                "Name": STRING,
                                "Namespace": STRING,
                                "Partition": STRING,
                                "Hosts": ListOf(STRING),
                                "TLS": MapOf(ANY),
                                "RequestHeaders": MapOf(ANY),
                                "ResponseHeaders": MapOf(ANY),
                                "MaxConnections": INT,
                                "MaxPendingRequests": INT,
                                "MaxConcurrentRequests": INT,
                                "PassiveHealthCheck": MapOf(ANY),
                            },
                        )
                    ),
                },
            )
        ),
    },
)


# ---- per-kind rules --------------------------------------------------------------------------


def _invalid(text: str) -> ConfigEntryError:
    return ConfigEntryError(500, text)


def _check_meta(body: Mapping[str, Any]) -> None:
    meta = body.get("Meta") or {}
    if len(meta) > 64:
        raise _invalid("Meta exceeds maximum element count 64")
    for key, value in meta.items():
        if len(key) > 128:
            raise _invalid(f'Meta key "{key}" exceeds maximum length 128')
        if len(value) > 512:
            raise _invalid(f'Meta value for key "{key}" exceeds maximum length 512')


def _mtls_mode(body: Mapping[str, Any]) -> None:
    mode = body.get("MutualTLSMode", "")
    if mode not in ("", "strict", "permissive"):
        raise _invalid(
            f'Invalid MutualTLSMode "{mode}". Must be one of "", "strict", or "permissive".'
        )


def _canonical(body: dict[str, Any], always: tuple[str, ...]) -> dict[str, Any]:
    """Kind and Name first, empty optional fields dropped, non-pointer structs always shown."""
    out = {"Kind": body["Kind"], "Name": body.get("Name", "")}
    for key, value in body.items():
        if key in ("Kind", "Name", "CreateIndex", "ModifyIndex", "Hash"):
            continue
        if value not in ("", 0, None, [], {}, False) or key in always:
            out[key] = value
    for key in always:
        out.setdefault(key, {})
    return out


def _service_defaults(body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("Name", "")
    if not name:
        raise _invalid("Name is required")
    if name == WILDCARD:
        raise _invalid("service-defaults name must be the name of a service, and not a wildcard")
    _check_meta(body)
    _mtls_mode(body)
    if body.get("BalanceInboundConnections", "") not in ("", "exact_balance"):
        raise _invalid(
            f"invalid value for balance_inbound_connections: {body['BalanceInboundConnections']}"
        )
    if body.get("UpstreamConfig") and body.get("Destination"):
        raise _invalid("UpstreamConfig and Destination are mutually exclusive for service defaults")
    if body.get("Protocol"):
        body["Protocol"] = body["Protocol"].lower()
    if "UpstreamConfig" in body:
        _upstream_config(body["UpstreamConfig"])
    return _canonical(body, ("TransparentProxy", "MeshGateway", "Expose"))


def _upstream_config(config: dict[str, Any]) -> None:
    """Normalize (protocol lower case, negative connect timeout 0) and validate in place."""
    for item in [config.get("Defaults"), *(config.get("Overrides") or [])]:
        if item is None:
            continue
        if item.get("Protocol"):
            item["Protocol"] = item["Protocol"].lower()
        if item.get("ConnectTimeoutMs", 0) < 0:
            item["ConnectTimeoutMs"] = 0
    try:
        errors = upstream_configuration_errors(upstream_configuration_from_json(config))
    except TrafficError as err:
        raise _invalid(str(err)) from None
    if errors:
        raise _invalid(multierror(errors))


def _proxy_defaults(body: dict[str, Any]) -> dict[str, Any]:
    name = body.get("Name", "")
    if name != "global":
        raise _invalid(f'invalid name ("{name}"), only "global" is supported')
    _check_meta(body)
    _mtls_mode(body)
    return _canonical(body, ("TransparentProxy", "MeshGateway", "Expose", "AccessLogs"))


_TLS_VERSIONS = ("TLS_AUTO", "TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3")
_CIPHER_SUITE_VERSIONS = ("TLSv1_0", "TLSv1_1", "TLSv1_2")
"""TLS minimum versions whose cipher suites can be configured (TLS 1.3's cannot)."""
_ESCAPED_SLASHES_ACTIONS = (
    "IMPLEMENTATION_SPECIFIC_DEFAULT",
    "KEEP_UNCHANGED",
    "REJECT_REQUEST",
    "UNESCAPE_AND_REDIRECT",
    "UNESCAPE_AND_FORWARD",
)
_UNDERSCORES_ACTIONS = ("ALLOW", "REJECT_REQUEST", "DROP_HEADER")


def _tls_direction_error(cfg: Mapping[str, Any]) -> str | None:
    """Consul's validateTLSConfig for one direction of the mesh entry's TLS block. Cipher
    suite names themselves are not checked (Consul checks them against Envoy's list)."""
    low, high = cfg.get("TLSMinVersion", ""), cfg.get("TLSMaxVersion", "")
    for version in (low, high):
        if version and version not in _TLS_VERSIONS:
            return (
                f"no matching TLS version found for {version}, please specify one of "
                f"[{', '.join(_TLS_VERSIONS)}]"
            )
    concrete = _TLS_VERSIONS[1:]
    if low in concrete and high in concrete and concrete.index(high) < concrete.index(low):
        return (
            f"configuring max version {high} less than the configured min version {low} is invalid"
        )
    if cfg.get("CipherSuites") and low not in _CIPHER_SUITE_VERSIONS:
        return (
            "configuring CipherSuites is only applicable to connections negotiated with TLS "
            f"1.2 or earlier, TLSMinVersion is set to {low}"
        )
    return None


def _mesh(body: dict[str, Any]) -> dict[str, Any]:
    """The mesh entry: no Name (it is always `mesh`), TransparentProxy always shown (not a
    pointer in Consul), the flags omitted when false."""
    _check_meta(body)
    tls = body.get("TLS") or {}
    for direction in ("Incoming", "Outgoing"):
        if direction in tls:
            error = _tls_direction_error(tls[direction])
            if error is not None:
                raise _invalid(f"error in {direction.lower()} TLS configuration: {error}")
    norm = ((body.get("HTTP") or {}).get("Incoming") or {}).get("RequestNormalization") or {}
    for field, allowed in (
        ("PathWithEscapedSlashesAction", _ESCAPED_SLASHES_ACTIONS),
        ("HeadersWithUnderscoresAction", _UNDERSCORES_ACTIONS),
    ):
        value = norm.get(field, "")
        if value and value not in allowed:
            raise _invalid(
                "error in HTTP incoming request normalization configuration: no matching "
                f"{field} value found for {value}, please specify one of "
                f"[{', '.join(allowed)}]"
            )
    out: dict[str, Any] = {
        "Kind": MESH,
        "TransparentProxy": {
            "MeshDestinationsOnly": bool(
                (body.get("TransparentProxy") or {}).get("MeshDestinationsOnly")
            )
        },
    }
    for key in ("AllowEnablingPermissiveMutualTLS", "ValidateClusters", "TLS", "HTTP"):
        if body.get(key):
            out[key] = body[key]
    for key in ("Peering", "Meta"):
        if body.get(key):
            out[key] = body[key]
    out["Name"] = MESH_NAME  # the storage key only: `load` takes it out of the body
    return out


PERMISSIVE_NOT_ALLOWED = (
    "cannot set MutualTLSMode=permissive because AllowEnablingPermissiveMutualTLS=false in the "
    "mesh config entry"
)


def check_mutual_tls_mode(new: Entry, entries: Mapping[tuple[str, str], Entry]) -> None:
    """Consul's checkMutualTLSMode for a service-defaults or proxy-defaults write: *changing*
    MutualTLSMode to permissive needs the mesh entry's AllowEnablingPermissiveMutualTLS; an
    entry that is permissive already stays writable as permissive after the flag is turned
    off (so turning it off breaks nothing that runs)."""
    if new.kind not in (SERVICE_DEFAULTS, PROXY_DEFAULTS):
        return
    if new.body.get("MutualTLSMode") != "permissive":
        return
    current = entries.get((new.kind, new.name))
    if current is not None and current.body.get("MutualTLSMode") == "permissive":
        return
    mesh = entries.get((MESH, MESH_NAME))
    if mesh is None or not mesh.body.get("AllowEnablingPermissiveMutualTLS"):
        raise _invalid(PERMISSIVE_NOT_ALLOWED)


def _ingress_gateway(body: dict[str, Any]) -> dict[str, Any]:
    if not body.get("Name"):
        raise _invalid("Name is required")
    _check_meta(body)
    ports: set[int] = set()
    for listener in body.get("Listeners") or []:
        port = listener.get("Port", 0)
        if port in ports:
            raise _invalid(f"port {port} declared on two listeners")
        ports.add(port)
        protocol = listener.get("Protocol") or "tcp"
        listener["Protocol"] = protocol
        if protocol not in ("tcp", *HTTP_PROTOCOLS):
            raise _invalid(f'protocol must be "tcp", "http", "http2", or "grpc". "{protocol}"')
        services = listener.get("Services") or []
        if protocol == "tcp" and len(services) > 1:
            raise _invalid(
                f"Multiple services per listener are only supported for L7 protocols, "
                f'"http", "grpc" and "http2" (listener on port {port})'
            )
        for svc in services:
            if not svc.get("Name"):
                raise _invalid(f"Service name cannot be blank (listener on port {port})")
    return _canonical(body, ("TLS",))


_RULES: dict[str, tuple[Struct, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    SERVICE_DEFAULTS: (SERVICE_DEFAULTS_SPEC, _service_defaults),
    PROXY_DEFAULTS: (PROXY_DEFAULTS_SPEC, _proxy_defaults),
    INGRESS_GATEWAY: (INGRESS_GATEWAY_SPEC, _ingress_gateway),
    MESH: (MESH_SPEC, _mesh),
}
KINDS = (
    SERVICE_DEFAULTS,
    PROXY_DEFAULTS,
    INTENTIONS_KIND,
    INGRESS_GATEWAY,
    MESH,
    *routing.KINDS,
)


def _filter_syntax(expression: str) -> str | None:
    """bexpr.CreateEvaluator(filter, nil): syntax only, no schema (a resolver subset filter)."""
    try:
        check_syntax(expression)
    except FilterError as err:
        return str(err)
    return None


def check_kind(kind: str) -> None:
    if kind in NOT_YET:
        raise ConfigEntryError(
            500, f'devstack does not hold "{kind}" config entries yet (see docs/devstack.md)'
        )
    if kind not in KINDS:
        raise ConfigEntryError(500, f"invalid config entry kind: {kind}")


def load(body: object) -> Entry:
    """Decode, normalize and validate one `PUT /v1/config` body."""
    if not isinstance(body, dict):
        raise ConfigEntryError(400, "Request decoding failed: body must be a JSON object")
    try:
        kind = routing.kind_of(body)
    except TrafficError as err:
        raise ConfigEntryError(400, str(err)) from None
    if kind not in KINDS and kind not in NOT_YET:
        raise ConfigEntryError(400, f"Request decoding failed: invalid config entry kind: {kind}")
    check_kind(kind)
    if kind in routing.KINDS:
        try:
            routed = routing.load_entry(body, check_filter=_filter_syntax)
        except RoutingDecodeError as err:
            raise ConfigEntryError(400, str(err)) from None
        except TrafficError as err:
            raise ConfigEntryError(500, str(err)) from None
        return Entry(kind, routed.name, routed.to_json(), routing=routed)
    if kind == INTENTIONS_KIND:
        try:
            model = load_entry(body)
        except EntryDecodeError as err:
            raise ConfigEntryError(400, str(err)) from None
        except InvalidEntry as err:
            raise ConfigEntryError(500, str(err)) from None
        return Entry(kind, model.name, entry_to_json(model, with_indexes=False), model)
    spec, rules = _RULES[kind]
    decoded = _decode_body(body, spec)
    decoded["Kind"] = kind
    canonical = rules(decoded)
    if kind == MESH:
        return Entry(kind, canonical.pop("Name"), canonical)
    return Entry(kind, canonical["Name"], canonical)


# ---- the service graph -----------------------------------------------------------------------


def protocol_of(service: str, entries: Mapping[tuple[str, str], Entry]) -> str:
    """service-defaults Protocol > proxy-defaults Config.protocol > tcp."""
    defaults = entries.get((SERVICE_DEFAULTS, service))
    if defaults is not None and defaults.body.get("Protocol"):
        return str(defaults.body["Protocol"])
    proxy = entries.get((PROXY_DEFAULTS, "global"))
    if proxy is not None:
        protocol = (proxy.body.get("Config") or {}).get("protocol")
        if isinstance(protocol, str) and protocol:
            return protocol.lower()
    return "tcp"


def chain_entries(entries: Mapping[tuple[str, str], Entry]) -> ChainEntries:
    """What the discovery-chain compiler reads from the stored entries."""
    models: list[Any] = []
    for entry in entries.values():
        if entry.routing is not None:
            models.append(entry.routing)
        elif entry.kind == SERVICE_DEFAULTS:
            models.append(service_defaults_from_json(entry.body))
        elif entry.kind == PROXY_DEFAULTS:
            models.append(proxy_defaults_from_json(entry.body))
    return ChainEntries.of(models)


def validate_graph(entries: Mapping[tuple[str, str], Entry]) -> None:
    """Refuse a proposed set of entries that Consul's graph validation would refuse."""
    try:
        # The trust domain only shapes SNI, which no graph check reads.
        validate_chains(chain_entries(entries), trust_domain="consul")
    except TrafficError as err:
        raise _invalid(str(err)) from None
    for entry in entries.values():
        model = entry.intentions
        if model is None or model.has_wildcard_destination or not has_l7_permissions(model):
            continue
        error = l7_protocol_error(model.name, protocol_of(model.name, entries))
        if error is not None:
            raise _invalid(error)
    for entry in entries.values():
        if entry.kind != INGRESS_GATEWAY:
            continue
        for listener in entry.body.get("Listeners") or []:
            for svc in listener.get("Services") or []:
                if svc.get("Name") == WILDCARD:
                    continue
                have = protocol_of(svc["Name"], entries)
                want = listener["Protocol"]
                if have != want:
                    raise _invalid(
                        f'service "{svc["Name"]}" has protocol "{have}", which does not match '
                        f'defined listener protocol "{want}"'
                    )
