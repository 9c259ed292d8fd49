"""Tracing settings: the `tracing` block of a proxy's `Config`, validated and merged.

    tracing:
      otlp_endpoint: http://127.0.0.1:4318/v1/traces   # OTLP/HTTP (protobuf); "" or absent: off
      sampling_percent: 10                              # 0-100, of the traces started here
      propagation: [w3c, b3]                            # which headers are read and written

The mesh-wide block is the `proxy-defaults` entry's `Config.tracing`; a sidecar's own
registration (`Proxy.Config.tracing`) overrides it key by key. A bad value is refused with
the field named, so whoever applies it keeps what was in force. Pure: no OpenTelemetry here
(connect/tracing.py imports the SDK, and only once tracing is on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["B3", "PROPAGATORS", "W3C", "TracingSettings", "effective_tracing", "parse_tracing"]

W3C = "w3c"
"""W3C Trace Context: `traceparent` and `tracestate`."""
B3 = "b3"
"""Zipkin's B3: the single `b3` header and the `x-b3-*` headers (both read and written)."""
PROPAGATORS = (W3C, B3)
_KEYS = frozenset({"otlp_endpoint", "sampling_percent", "propagation"})


@dataclass(frozen=True, slots=True)
class TracingSettings:
    otlp_endpoint: str = ""
    """Where spans are sent (OTLP/HTTP, protobuf); empty: tracing is off."""
    sampling_percent: float = 100.0
    """Of the traces this sidecar starts (no sampling decision came with the request)."""
    propagation: tuple[str, ...] = PROPAGATORS
    """Read in this order (the first valid context wins); all of them are written."""

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint)


def _endpoint(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}.otlp_endpoint: must be a string URL, got {value!r}")
    if not value:
        return ""
    try:
        url = urlsplit(value)
        _ = url.port  # raises for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"{where}.otlp_endpoint: {value!r} is not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(
            f"{where}.otlp_endpoint: {value!r} is not an http(s) URL with a host "
            "(OTLP/HTTP, e.g. http://collector:4318/v1/traces)"
        )
    return value


def _percent(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}.sampling_percent: must be a number 0-100, got {value!r}")
    if not 0.0 <= float(value) <= 100.0:
        raise ValueError(f"{where}.sampling_percent: {value!r} is outside 0-100")
    return float(value)


def _propagation(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"{where}.propagation: must be a non-empty list of {', '.join(PROPAGATORS)}, "
            f"got {value!r}"
        )
    out: list[str] = []
    for item in value:
        name = item.lower() if isinstance(item, str) else item
        if name not in PROPAGATORS:
            raise ValueError(
                f"{where}.propagation: unknown propagator {item!r} "
                f"(known: {', '.join(PROPAGATORS)})"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_tracing(raw: object, where: str = "tracing") -> dict[str, Any]:
    """One `tracing` block, checked: its keys with valid values (a partial block is fine: it
    may override another). Raises `ValueError` naming the field."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})"
        )
    out: dict[str, Any] = {}
    if "otlp_endpoint" in raw:
        out["otlp_endpoint"] = _endpoint(raw["otlp_endpoint"], where)
    if "sampling_percent" in raw:
        out["sampling_percent"] = _percent(raw["sampling_percent"], where)
    if "propagation" in raw:
        out["propagation"] = _propagation(raw["propagation"], where)
    return out


def effective_tracing(mesh: object, service: object = None) -> TracingSettings:
    """The proxy-defaults block with the service's own keys over it. Raises `ValueError`
    naming the block and field that is wrong."""
    merged = parse_tracing(mesh, "proxy-defaults Config.tracing")
    merged.update(parse_tracing(service, "service proxy Config.tracing"))
    return TracingSettings(**merged)
