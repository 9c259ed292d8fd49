"""The local service's effective MutualTLSMode, resolved from Consul's config entries as
Consul resolves it for a sidecar: the service-defaults entry's when it sets one, else the
proxy-defaults entry's, else strict (Consul's "" is strict).

Pure: the agent's watches hand the entries in (agent/sidecar.py), the data plane takes the
result as `InboundSpec.mutual_tls_mode` (connect/sidecar.py). A value meshlet does not know
(Consul refuses one on write, so only a hostile or newer answer has it) resolves to strict, and
the reason is reported: accepting plaintext is never the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connect.sidecar import MutualTLSMode

__all__ = ["ResolvedMode", "entry_mode", "resolve"]

_KNOWN: dict[str, MutualTLSMode] = {"": "strict", "strict": "strict", "permissive": "permissive"}


def entry_mode(entries: Sequence[Mapping[str, Any]], name: str) -> object:
    """The MutualTLSMode field of the entry named `name` among `entries` (one kind's listing),
    as Consul answered it; "" when there is no such entry or it sets none."""
    for entry in entries:
        if entry.get("Name") == name:
            return entry.get("MutualTLSMode", "")
    return ""


@dataclass(frozen=True, slots=True)
class ResolvedMode:
    mode: MutualTLSMode
    source: str
    """Where it came from: `service-defaults/<name>`, `proxy-defaults/global` or `default`."""
    problem: str = ""
    """Set when an entry's value could not be used (the mode is then strict)."""


def resolve(service: str, service_mode: object, proxy_mode: object) -> ResolvedMode:
    """service-defaults' mode when set, else proxy-defaults', else strict."""
    for value, source in (
        (service_mode, f"service-defaults/{service}"),
        (proxy_mode, "proxy-defaults/global"),
    ):
        if value == "" or value is None:
            continue
        known = _KNOWN.get(value) if isinstance(value, str) else None
        if known is None:
            return ResolvedMode(
                "strict",
                source,
                f'{source}: MutualTLSMode {value!r} is not one of "", "strict", '
                '"permissive": strict is applied',
            )
        return ResolvedMode(known, source)
    return ResolvedMode("strict", "default")
