"""Endpoint snapshots of an upstream, built whole from one Consul answer, and their diff.

Pure: no I/O, no clock (the caller passes `now`). A `Snapshot` is immutable and replaces its
predecessor in one assignment, so a reader that took one keeps a consistent view while the
watcher publishes the next. An answer that does not make sense as a whole (a proxy for another
service, a port of 0, the same instance twice, a failing instance in a `?passing` answer) is
rejected as a whole: half of a list of endpoints is worse than the last good list.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.consul_results import HealthStatus, ServiceEntry


@dataclass(frozen=True, slots=True)
class WatchKey:
    """What one watch asks Consul: a destination, where it lives, and an optional subset."""

    name: str
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    """A Consul filter expression over the health entries: how routing selects a subset."""

    @property
    def label(self) -> str:
        where = f"@{self.datacenter}" if self.datacenter else ""
        where += f"@peer:{self.peer}" if self.peer else ""
        subset = f" [{self.filter}]" if self.filter else ""
        return f"{self.name}{where}{subset}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One dialable instance of an upstream: its sidecar proxy, or a Connect-native instance."""

    node: str
    service_id: str
    address: str
    port: int
    datacenter: str = ""
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> tuple[str, str]:
        """Identity of the instance across snapshots: a service ID is unique per node."""
        return (self.node, self.service_id)

    @property
    def target(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    key: WatchKey
    endpoints: tuple[Endpoint, ...]
    """Sorted by `Endpoint.key`, so equal sets compare equal."""
    index: int
    """The Consul index the endpoints were read at."""
    updated_at: float
    """Unix time at which this snapshot was applied."""


class SnapshotRejected(ValueError):
    """Consul's answer is inconsistent; the message says which entry and why."""


def _address_ok(address: str) -> bool:
    if not address:
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        # A DNS name is legal in Consul; whitespace or a path is not.
        return not any(c in address for c in " /\t\n")
    return True


def endpoint_of(key: WatchKey, entry: ServiceEntry) -> Endpoint:
    """The endpoint an entry of `/v1/health/connect/<key.name>?passing` stands for."""
    where = f"{entry.node}/{entry.service_id}"
    if entry.kind == "connect-proxy":
        dest = entry.proxy.destination_service_name if entry.proxy is not None else ""
        if dest != key.name:
            raise SnapshotRejected(f"{where}: a proxy for {dest!r}, not for {key.name!r}")
    elif not (entry.connect_native and entry.service_name == key.name):
        raise SnapshotRejected(
            f"{where}: neither a connect-proxy for {key.name!r} nor a Connect-native instance"
        )
    if entry.status is not HealthStatus.PASSING:
        raise SnapshotRejected(f"{where}: {entry.status.value} in an answer to ?passing")
    if not 1 <= entry.port <= 65535:
        raise SnapshotRejected(f"{where}: port {entry.port} is not dialable")
    if not _address_ok(entry.address):
        raise SnapshotRejected(f"{where}: address {entry.address!r} is not dialable")
    return Endpoint(
        node=entry.node,
        service_id=entry.service_id,
        address=entry.address,
        port=entry.port,
        datacenter=entry.datacenter,
        weight=entry.weights.passing,
        tags=entry.tags,
        meta=entry.meta,
    )


def build_snapshot(
    key: WatchKey, entries: Sequence[ServiceEntry], index: int, now: float
) -> Snapshot:
    """A snapshot of every entry, or `SnapshotRejected` if any one of them is unusable."""
    endpoints = [endpoint_of(key, e) for e in entries]
    endpoints.sort(key=lambda e: (e.node, e.service_id))
    for prev, cur in itertools.pairwise(endpoints):
        if prev.key == cur.key:
            raise SnapshotRejected(f"{cur.node}/{cur.service_id}: listed twice")
    return Snapshot(key=key, endpoints=tuple(endpoints), index=index, updated_at=now)


@dataclass(frozen=True, slots=True)
class Diff:
    added: tuple[Endpoint, ...] = ()
    removed: tuple[Endpoint, ...] = ()
    changed: tuple[tuple[Endpoint, Endpoint], ...] = ()
    """(old, new) pairs of the same instance whose address, port, weight, tags or meta moved."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self, limit: int = 5) -> str:
        parts: list[str] = []
        for sign, items in (
            ("+", [e.target for e in self.added]),
            ("-", [e.target for e in self.removed]),
            ("~", [f"{old.target}->{new.target}" for old, new in self.changed]),
        ):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{sign}{len(items)} {', '.join(items[:limit])}{more}")
        return "; ".join(parts) or "no change"


def _by_key(endpoints: Iterable[Endpoint]) -> dict[tuple[str, str], Endpoint]:
    return {e.key: e for e in endpoints}


def diff(old: Snapshot | None, new: Snapshot) -> Diff:
    """What changed from `old` (None: nothing known yet) to `new`, for logs and status."""
    if old is None:
        return Diff(added=new.endpoints)
    if old.endpoints == new.endpoints:
        return Diff()
    before, after = _by_key(old.endpoints), _by_key(new.endpoints)
    return Diff(
        added=tuple(e for k, e in after.items() if k not in before),
        removed=tuple(e for k, e in before.items() if k not in after),
        changed=tuple((before[k], e) for k, e in after.items() if k in before and before[k] != e),
    )
