"""What the discovery chain and the proxy read from `service-defaults` and `proxy-defaults`.

Both kinds are decoded and stored by the control plane; these are typed, frozen views of their
canonical JSON: the protocol, external SNI, mesh-gateway mode and Meta the compiler reads, and
`UpstreamConfig` (connect timeout, circuit-breaker `Limits`, outlier-detection
`PassiveHealthCheck`) with the checks of consul `agent/structs/config_entry.go`
(`UpstreamConfig.validate`, `UpstreamLimits.Validate`, `PassiveHealthCheck.Validate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from traffic.durations import parse_duration
from traffic.entries import FailoverPolicy, multierror
from traffic.errors import InvalidEntry

SERVICE_DEFAULTS = "service-defaults"
PROXY_DEFAULTS = "proxy-defaults"


def _empty_map() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """Circuit-breaker limits; None means unset (the proxy's own default applies)."""

    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True, slots=True)
class PassiveHealthCheck:
    """Outlier detection; None means unset (Envoy's default applies)."""

    interval_ns: int = 0
    max_failures: int = 0
    enforcing_consecutive_5xx: int | None = None
    max_ejection_percent: int | None = None
    base_ejection_time_ns: int | None = None


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One `UpstreamConfig.Defaults` or `.Overrides[]` item (name empty for Defaults)."""

    name: str = ""
    peer: str = ""
    protocol: str = ""
    connect_timeout_ms: int = 0
    limits: UpstreamLimits | None = None
    passive_health_check: PassiveHealthCheck | None = None
    mesh_gateway_mode: str = ""
    balance_outbound_connections: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConfiguration:
    """`service-defaults.UpstreamConfig`: settings a service applies to its upstreams."""

    defaults: UpstreamConfig | None = None
    overrides: tuple[UpstreamConfig, ...] = ()

    def for_upstream(self, name: str, peer: str = "") -> UpstreamConfig | None:
        """The override for `name` if there is one, else the defaults."""
        for override in self.overrides:
            if override.name == name and override.peer == peer:
                return override
        return self.defaults


@dataclass(frozen=True, slots=True)
class ServiceDefaults:
    """The fields of a `service-defaults` entry that routing depends on."""

    name: str
    protocol: str = ""
    external_sni: str = ""
    mesh_gateway_mode: str = ""
    dialed_directly: bool = False
    mutual_tls_mode: str = ""
    meta: Mapping[str, str] = field(default_factory=_empty_map)
    envoy_extensions: tuple[Mapping[str, Any], ...] = ()
    upstream_config: UpstreamConfiguration | None = None


@dataclass(frozen=True, slots=True)
class ProxyDefaults:
    """The fields of the `proxy-defaults` entry (`global`) that routing depends on."""

    protocol: str = ""
    mesh_gateway_mode: str = ""
    dialed_directly: bool = False
    mutual_tls_mode: str = ""
    envoy_extensions: tuple[Mapping[str, Any], ...] = ()
    failover_policy: FailoverPolicy | None = None


def _duration(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidEntry(f"{what}: invalid duration {value!r}")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as err:
            raise InvalidEntry(f"{what}: {err}") from None
    raise InvalidEntry(f"{what}: invalid duration {value!r}")


def _optional_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return None if value is None else int(value)


def _upstream(data: Mapping[str, Any]) -> UpstreamConfig:
    limits = data.get("Limits")
    check = data.get("PassiveHealthCheck")
    base = None if check is None else check.get("BaseEjectionTime")
    return UpstreamConfig(
        name=data.get("Name", ""),
        peer=data.get("Peer", ""),
        # Normalize(): the protocol is lower-cased and a negative connect timeout becomes 0.
        protocol=str(data.get("Protocol", "")).lower(),
        connect_timeout_ms=max(0, int(data.get("ConnectTimeoutMs", 0))),
        limits=None
        if limits is None
        else UpstreamLimits(
            max_connections=_optional_int(limits, "MaxConnections"),
            max_pending_requests=_optional_int(limits, "MaxPendingRequests"),
            max_concurrent_requests=_optional_int(limits, "MaxConcurrentRequests"),
        ),
        passive_health_check=None
        if check is None
        else PassiveHealthCheck(
            interval_ns=_duration(check.get("Interval", 0), "PassiveHealthCheck.Interval"),
            max_failures=int(check.get("MaxFailures", 0)),
            enforcing_consecutive_5xx=_optional_int(check, "EnforcingConsecutive5xx"),
            max_ejection_percent=_optional_int(check, "MaxEjectionPercent"),
            base_ejection_time_ns=None
            if base is None
            else _duration(base, "PassiveHealthCheck.BaseEjectionTime"),
        ),
        mesh_gateway_mode=(data.get("MeshGateway") or {}).get("Mode", ""),
        balance_outbound_connections=data.get("BalanceOutboundConnections", ""),
    )


def upstream_configuration_from_json(data: Mapping[str, Any]) -> UpstreamConfiguration:
    """Read `UpstreamConfig` (canonical keys); InvalidEntry for a duration Go cannot parse."""
    defaults = data.get("Defaults")
    return UpstreamConfiguration(
        defaults=None if defaults is None else _upstream(defaults),
        overrides=tuple(_upstream(o) for o in data.get("Overrides") or ()),
    )


def _upstream_errors(cfg: UpstreamConfig, *, named: bool) -> str | None:
    if named:
        if not cfg.name:
            return "Name is required"
        if cfg.name == "*":
            return "Wildcard name is not supported"
    elif cfg.name:
        return "Name must be empty"
    errors = []
    check = cfg.passive_health_check
    if check is not None:
        if check.interval_ns < 0:
            errors.append("passive health check interval cannot be negative")
        elif check.enforcing_consecutive_5xx is not None and check.enforcing_consecutive_5xx > 100:
            errors.append(
                "passive health check enforcing_consecutive_5xx must be a percentage between "
                "0 and 100"
            )
        elif check.max_ejection_percent is not None and check.max_ejection_percent > 100:
            errors.append(
                "passive health check max_ejection_percent must be a percentage between 0 and 100"
            )
        elif check.base_ejection_time_ns is not None and check.base_ejection_time_ns < 0:
            errors.append("passive health check base_ejection_time cannot be negative")
    limits = cfg.limits
    if limits is not None:
        if limits.max_connections is not None and limits.max_connections < 0:
            errors.append("max connections cannot be negative")
        elif limits.max_pending_requests is not None and limits.max_pending_requests < 0:
            errors.append("max pending requests cannot be negative")
        elif limits.max_concurrent_requests is not None and limits.max_concurrent_requests < 0:
            errors.append("max concurrent requests cannot be negative")
    if cfg.balance_outbound_connections not in ("", "exact_balance"):
        errors.append(
            f"invalid value for balance_outbound_connections: {cfg.balance_outbound_connections}"
        )
    return multierror(errors) if errors else None


def upstream_configuration_errors(cfg: UpstreamConfiguration) -> list[str]:
    """The errors `ServiceConfigEntry.Validate` accumulates for `UpstreamConfig`."""
    errors = []
    for override in cfg.overrides:
        problem = _upstream_errors(override, named=True)
        if problem is not None:
            errors.append(f"error in upstream override for {override.name}: {problem}")
    if cfg.defaults is not None:
        problem = _upstream_errors(cfg.defaults, named=False)
        if problem is not None:
            errors.append(f"error in upstream defaults: {problem}")
    return errors


def _extensions(body: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
    return tuple(MappingProxyType(dict(e)) for e in body.get("EnvoyExtensions") or ())


def service_defaults_from_json(body: Mapping[str, Any]) -> ServiceDefaults:
    """A `service-defaults` entry from its canonical JSON."""
    upstream = body.get("UpstreamConfig")
    return ServiceDefaults(
        name=body.get("Name", ""),
        protocol=str(body.get("Protocol") or "").lower(),
        external_sni=body.get("ExternalSNI", ""),
        mesh_gateway_mode=(body.get("MeshGateway") or {}).get("Mode", ""),
        dialed_directly=bool((body.get("TransparentProxy") or {}).get("DialedDirectly", False)),
        mutual_tls_mode=body.get("MutualTLSMode", ""),
        meta=MappingProxyType(dict(body.get("Meta") or {})),
        envoy_extensions=_extensions(body),
        upstream_config=None if upstream is None else upstream_configuration_from_json(upstream),
    )


def proxy_defaults_from_json(body: Mapping[str, Any]) -> ProxyDefaults:
    """The `proxy-defaults` entry from its canonical JSON (`Config.protocol` weakly decoded)."""
    protocol = (body.get("Config") or {}).get("protocol", "")
    if isinstance(protocol, bool):
        protocol = "1" if protocol else "0"
    elif isinstance(protocol, int | float):
        protocol = str(int(protocol)) if float(protocol).is_integer() else str(protocol)
    elif not isinstance(protocol, str):
        protocol = ""
    policy = body.get("FailoverPolicy")
    return ProxyDefaults(
        protocol=protocol,
        mesh_gateway_mode=(body.get("MeshGateway") or {}).get("Mode", ""),
        dialed_directly=bool((body.get("TransparentProxy") or {}).get("DialedDirectly", False)),
        mutual_tls_mode=body.get("MutualTLSMode", ""),
        envoy_extensions=_extensions(body),
        failover_policy=None
        if policy is None
        else FailoverPolicy(
            mode=policy.get("Mode", ""), regions=tuple(policy.get("Regions") or ())
        ),
    )
