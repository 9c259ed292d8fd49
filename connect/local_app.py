"""The local app's timeouts: what the inbound side allows the app behind the sidecar, from the
keys Consul's Envoy sidecar reads in a proxy's `Config` (Consul agent/xds/config.go
ProxyConfig) and the `service-defaults` fields Consul copies into that map.

    local_connect_timeout_ms: 5000   # dialing the app (Envoy's local_app cluster)
    local_request_timeout_ms: 15000  # Envoy's route timeout of the local_app route; 0: none
    local_idle_timeout_ms: 300000    # Envoy's route idle_timeout; 0: none

Where they come from, as Consul merges them (agent/configentry/resolve.go
ComputeResolvedServiceConfig, then merge_service_config.go MergeServiceConfig, whose
`mergo.Merge` only fills keys the registration left out): the sidecar registration's own
`Proxy.Config` key wins; else the service-defaults entry's `LocalConnectTimeoutMs` /
`LocalRequestTimeoutMs` when positive (Consul copies only positive ones); else the
proxy-defaults entry's `Config` key; else the default. A bad value (negative, not an
integer) is refused with its source and field named, so whoever applies it keeps what was in
force. Pure: the agent's watches hand the three inputs in (agent/sidecar.py), the data plane
takes the result as `SidecarSpec.local_app` (connect/sidecar.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from connect.routes import DEFAULT_REQUEST_TIMEOUT

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_LOCAL_APP",
    "LocalAppTimeouts",
    "effective_local_app",
]

MAX_MILLIS = 315_576_000_000_000
"""The longest duration Envoy accepts (protobuf Duration: 10,000 years), in milliseconds."""

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Consul's `local_connect_timeout_ms` default (5000) for the local_app cluster."""

_CONNECT, _REQUEST, _IDLE = (
    "local_connect_timeout_ms",
    "local_request_timeout_ms",
    "local_idle_timeout_ms",
)
_ENTRY_FIELDS = {_CONNECT: "LocalConnectTimeoutMs", _REQUEST: "LocalRequestTimeoutMs"}
"""The service-defaults fields Consul copies into the proxy's Config (there is no idle one)."""


@dataclass(frozen=True, slots=True)
class LocalAppTimeouts:
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds to connect to the app (HTTP and L4 inbound); then 502 UF, or the connection
    closed at L4."""
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
    """Seconds from the end of the request to the end of the app's answer (Envoy's route
    timeout; an upgrade until its 101); then 504 UT. None: no request timeout."""
    idle_timeout: float | None = None
    """Seconds a request's stream to the app may go without a byte either way (Envoy's route
    idle_timeout). None: only the listener's idle limit (Envoy's stream_idle_timeout, 5 min)."""

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0:
            raise ValueError("LocalAppTimeouts.connect_timeout must be positive")
        for name in ("request_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"LocalAppTimeouts.{name} must be positive or None")


DEFAULT_LOCAL_APP = LocalAppTimeouts()
"""What Consul's Envoy sidecar applies when nothing sets a local app timeout."""


def _millis(value: object, where: str, *, weak: bool = False) -> int:
    """`value` as milliseconds, 0 or more. `weak`: read as Consul reads a proxy's `Config`
    map (ParseProxyConfig decodes it with mapstructure's WeaklyTypedInput): a number is
    truncated to an integer and a string of digits is its number ("" is 0)."""
    if weak and isinstance(value, float) and math.isfinite(value):
        value = int(value)
    elif weak and isinstance(value, str):
        digits = value.strip()
        # ASCII digits only ("²" is a digit to str.isdigit), short enough to stay a number.
        if digits == "" or (digits.isascii() and digits.isdigit() and len(digits) <= 20):
            value = int(digits or "0")
    # bool is an int to Python; a JSON true is no duration.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: must be an integer number of milliseconds, got {value!r:.40}")
    if value < 0:
        raise ValueError(f"{where}: must be 0 or more (milliseconds), got {value}")
    if value > MAX_MILLIS:
        # A JSON integer has no bound: 10**400 would not even divide into seconds.
        raise ValueError(f"{where}: must be at most {MAX_MILLIS} (milliseconds)")
    return value


def _from_config(config: object, where: str) -> dict[str, int]:
    """The local-app keys a proxy `Config` map sets, checked (other keys are not ours)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(config).__name__}")
    out: dict[str, int] = {}
    for key in (_CONNECT, _REQUEST, _IDLE):
        if key in config and config[key] is not None:
            millis = _millis(config[key], f"{where}.{key}", weak=True)
            if key != _CONNECT or millis > 0:  # 0 is unset: Consul makes under 1 ms its 5000
                out[key] = millis
    return out


def _from_entry(entry: object, where: str) -> dict[str, int]:
    """What a service-defaults entry puts into the proxy's Config: its positive fields."""
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(entry).__name__}")
    out: dict[str, int] = {}
    for key, field in _ENTRY_FIELDS.items():
        value = entry.get(field)
        if value is None:
            continue
        millis = _millis(value, f"{where}.{field}")
        if millis > 0:  # Consul copies a positive value only: 0 is "not set"
            out[key] = millis
    return out


def effective_local_app(
    proxy_defaults: object = None, service_defaults: object = None, registration: object = None
) -> LocalAppTimeouts:
    """The timeouts from the proxy-defaults entry's `Config`, the service-defaults entry and
    the sidecar registration's `Proxy.Config`, later ones winning key by key. Raises
    `ValueError` naming the source and field that is wrong."""
    merged = _from_config(proxy_defaults, "proxy-defaults Config")
    merged.update(_from_entry(service_defaults, "service-defaults"))
    merged.update(_from_config(registration, "sidecar registration Proxy.Config"))
    request = merged.get(_REQUEST)
    idle = merged.get(_IDLE)
    return LocalAppTimeouts(
        connect_timeout=merged.get(_CONNECT, int(DEFAULT_CONNECT_TIMEOUT * 1000)) / 1000,
        # Envoy's route timeout and idle_timeout of 0 turn them off.
        request_timeout=DEFAULT_REQUEST_TIMEOUT if request is None else (request / 1000 or None),
        idle_timeout=idle / 1000 if idle else None,
    )
