"""The control channel between the agent and its data-plane processes (pure).

One unix stream socket per data plane, JSON lines, every message an object with `"v": 1`:

    agent -> data plane   {"v":1,"snapshot":{...}}    everything the data plane serves with,
                                                     whole (`Snapshot`); applied whole or refused
                          {"v":1,"stop":"drain"}      keep serving for the drain period, then stop
                          {"v":1,"stop":"now"}
    data plane -> agent   {"v":1,"hello":{"index":K,"pid":P,"applied":N,"losses":L}}
                                                     on every (re)connect
                          {"v":1,"applied":N} / {"v":1,"refused":{"version":N,"error":"..."}}
                          {"v":1,"ready":bool,"problems":[...]}
                          {"v":1,"stats":{...}}       its proxy counters, as a worker's were
                          {"v":1,"serving":{...}}     its listeners, connections, upstreams and
                                                     the snapshot parts applied (after each
                                                     snapshot, and when they change)

A snapshot carries the inputs, not the agent's objects: the leaf and roots as PEM, the
service-intentions entries that concern this service with the default decision (compiled in
the data plane by intentions.stored, the same pure compiler the agent uses), each upstream's
endpoints and discovery-chain routing, the access-log settings. The spec types travel
through connect.dataplane.codec by their type hints, so fields added to them ride along.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connect.access_log import AccessLogSettings
from connect.balancer import Target
from connect.chain_routes import RoutingSnapshot
from connect.dataplane.codec import from_wire, to_wire
from connect.sidecar import SidecarSpec, UpstreamSpec

__all__ = [
    "WIRE_VERSION",
    "IntentionsSource",
    "PushedLeaf",
    "PushedMaterial",
    "PushedRoots",
    "Snapshot",
    "UpstreamEndpoints",
    "decode_message",
    "decode_snapshot",
    "encode_message",
    "endpoints_key",
]

WIRE_VERSION = 1
MAX_LINE = 64 * 1024 * 1024
"""Longest message either side reads (a snapshot with thousands of upstreams fits)."""


@dataclass(frozen=True, slots=True)
class PushedLeaf:
    cert_pem: str
    """The leaf, then the intermediates a peer may need."""
    key_pem: str = field(repr=False)
    service_uri: str = ""
    not_after: float = 0.0
    """Unix time: past it the data plane fails closed if no agent brings a new one."""


@dataclass(frozen=True, slots=True)
class PushedRoots:
    pem: str
    trust_domain: str
    grace_domains: tuple[str, ...] = ()
    """A CA replaced without cross-signing: its domains, accepted for a bounded grace."""


@dataclass(frozen=True, slots=True)
class PushedMaterial:
    """connect.tls.Material's shape, without the X.509 library the agent parses it with."""

    leaf: PushedLeaf
    bundle: PushedRoots
    generation: int = 0
    """Numbered by the data plane (the agent's numbering starts again when it restarts)."""


@dataclass(frozen=True, slots=True)
class IntentionsSource:
    default_allow: bool
    default_reason: str
    entries: tuple[Mapping[str, Any], ...]
    """The stored service-intentions entries that can decide for this service, as Consul
    returns them."""
    index: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamEndpoints:
    """The instances of one upstream watch (agent.catalog.WatchKey's fields)."""

    name: str
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    targets: tuple[Target, ...] | None = None
    """None: no answer yet (the upstream listener refuses with 503 until one comes)."""
    index: int = 0


def endpoints_key(up: UpstreamSpec | UpstreamEndpoints) -> tuple[str, str, str, str]:
    return (up.name, up.datacenter, up.peer, up.filter)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    """The agent's sequence number of this snapshot (0 is never sent)."""
    service: str
    """The local service's name (what intentions decide for)."""
    spec: SidecarSpec
    material: PushedMaterial
    intentions: IntentionsSource
    endpoints: tuple[UpstreamEndpoints, ...] = ()
    routing: Mapping[str, RoutingSnapshot] = field(default_factory=dict)
    """By upstream name: those driven by their discovery chain, once it is compiled."""
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    log_level: str = "info"


def encode_message(**fields: Any) -> bytes:
    message = {"v": WIRE_VERSION, **{k: to_wire(v) for k, v in fields.items()}}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_message(line: bytes) -> dict[str, Any]:
    """One message of the channel; `ValueError` for anything but an object of this version."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    if value.get("v") != WIRE_VERSION:
        raise ValueError(f"wire version {value.get('v')!r}, expected {WIRE_VERSION}")
    return value


def decode_snapshot(raw: Any) -> Snapshot:
    """A message's `snapshot`, whole; `ValueError` naming the first field that does not fit
    (nothing of it is then applied)."""
    snap: Snapshot = from_wire(Snapshot, raw, "snapshot")
    if snap.version < 1:
        raise ValueError("snapshot.version: must be positive")
    if not snap.material.leaf.cert_pem or not snap.material.leaf.key_pem:
        raise ValueError("snapshot.material.leaf: no certificate or key")
    if not snap.material.bundle.pem:
        raise ValueError("snapshot.material.bundle: no roots")
    wanted = {endpoints_key(up) for up in snap.spec.upstreams}
    missing = wanted - {endpoints_key(e) for e in snap.endpoints}
    if missing:
        raise ValueError(f"snapshot.endpoints: none for upstream {sorted(missing)[0][0]!r}")
    return snap
