"""Endpoint snapshots of an upstream, built whole from one Consul answer, and their diff.

Pure: no I/O, no clock (the caller passes `now`). A `Snapshot` is immutable and replaces its
predecessor in one assignment, so a reader that took one keeps a consistent view while the
watcher publishes the next. An answer that does not make sense as a whole (a proxy for another
service, a port of 0, the same instance twice, a failing instance in a `?passing` answer) is
rejected as a whole: half of a list of endpoints is worse than the last good list.

Two ways to build a snapshot from the same answer, with the same result:

- `build_snapshot(key, entries, ...)`: from decoded `ServiceEntry`s, every one validated.
- `decode_answer(key, raw, memo)` + `snapshot_of(...)`: from Consul's parsed JSON, as the
  watcher does it. An entry whose `fingerprint` (node and service ID, the node's and the
  service's `ModifyIndex`, each check's ID, status and `ModifyIndex`) is the same as in the
  previous accepted answer is the same data (Consul bumps an object's `ModifyIndex` on every
  write to it), so its already validated `Endpoint` is reused; every other entry is decoded
  and validated in full with `ServiceEntry.from_json` and `endpoint_of`. Entries without
  those indexes are always decoded in full. The memo is the caller's to keep or drop.
"""

from __future__ import annotations

import functools
import ipaddress
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from types import MappingProxyType
from typing import Any

from agent.consul_json import as_list
from agent.consul_results import HealthStatus, ServiceEntry

_EMPTY_META: Mapping[str, str] = MappingProxyType({})


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


@functools.lru_cache(maxsize=8192)
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
    # Node names, addresses, the datacenter and tags repeat across instances and upstreams:
    # one copy of each. Every kept value is a copy (`_own`), never an object of the parsed
    # answer (see `_own`).
    return Endpoint(
        node=_shared(entry.node),
        service_id=_own(entry.service_id),
        address=_shared(entry.address),
        port=_own_int(entry.port),
        datacenter=_shared(entry.datacenter),
        weight=_own_int(entry.weights.passing),
        tags=tuple(map(_shared, entry.tags)) if entry.tags else (),
        meta=(
            MappingProxyType({_shared(k): _own(v) for k, v in entry.meta.items()})
            if entry.meta
            else _EMPTY_META
        ),
    )


def _own(text: str) -> str:
    """A copy of `text` that is not an object of the parsed JSON answer.

    `json.loads` of a 10,000-instance answer spreads ~30 MB of small objects over every
    memory arena; keeping even one string or int of it per memory pool pins the whole arena
    after the answer is freed, so the process keeps the answer's peak as RSS. Values kept in
    snapshots and the memo are therefore copies, allocated apart from the answer (measured:
    40 MB of RSS growth for 1,001 answers with 20,000 entries kept as parsed, 14 MB copied).
    """
    return (text + " ")[:-1]


def _own_int(value: int) -> int:
    """A copy of `value` (small ints are shared by Python anyway); see `_own`."""
    return value + 0


def _shared(text: str) -> str:
    """The one interned copy of a value that repeats (node, address, datacenter, tag)."""
    return sys.intern(_own(text))


_sort_key = attrgetter("node", "service_id")


def snapshot_of(key: WatchKey, endpoints: list[Endpoint], index: int, now: float) -> Snapshot:
    """The snapshot of already validated endpoints (sorted here, in place), or
    `SnapshotRejected` if one instance is listed twice."""
    endpoints.sort(key=_sort_key)
    keys = list(map(_sort_key, endpoints))
    if len(set(keys)) != len(keys):
        seen: set[tuple[str, str]] = set()
        for node, service_id in keys:
            if (node, service_id) in seen:
                raise SnapshotRejected(f"{node}/{service_id}: listed twice")
            seen.add((node, service_id))
    return Snapshot(key=key, endpoints=tuple(endpoints), index=index, updated_at=now)


def build_snapshot(
    key: WatchKey, entries: Sequence[ServiceEntry], index: int, now: float
) -> Snapshot:
    """A snapshot of every entry, or `SnapshotRejected` if any one of them is unusable."""
    return snapshot_of(key, [endpoint_of(key, e) for e in entries], index, now)


Fingerprint = tuple[str, str, int, int, tuple[tuple[str, str, int], ...]]
"""(Node.Node, Service.ID, Node.ModifyIndex, Service.ModifyIndex,
((CheckID, Status, ModifyIndex), ...)) of one raw health entry."""

Memo = Mapping[Fingerprint, tuple[Fingerprint, Endpoint]]
"""Endpoints of the last accepted answer by fingerprint (the value keeps the first key object,
so a reused entry does not retain a fresh copy of its strings)."""


def _modify_index(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("ModifyIndex")
    # `type is int`: True and 1.0 compare equal to 1 but are not indexes.
    return value if type(value) is int and value > 0 else None


def fingerprint(raw: object) -> Fingerprint | None:
    """What identifies one version of a raw `/v1/health/connect` entry, or None when the entry
    does not carry Consul's indexes (or is not shaped like an entry at all): then it must be
    decoded in full."""
    if type(raw) is not dict:
        return None
    node, svc, checks = raw.get("Node"), raw.get("Service"), raw.get("Checks")
    if type(node) is not dict or type(svc) is not dict:
        return None
    name, service_id = node.get("Node"), svc.get("ID")
    node_index, service_index = _modify_index(node), _modify_index(svc)
    if (
        type(name) is not str
        or type(service_id) is not str
        or node_index is None
        or service_index is None
    ):
        return None
    parts: list[tuple[str, str, int]] = []
    if checks is not None:
        if type(checks) is not list:
            return None
        for check in checks:
            if type(check) is not dict:
                return None
            check_id, status, check_index = (
                check.get("CheckID"),
                check.get("Status"),
                _modify_index(check),
            )
            if type(check_id) is not str or type(status) is not str or check_index is None:
                return None
            parts.append((check_id, status, check_index))
    return (name, service_id, node_index, service_index, tuple(parts))


def _kept(fp: Fingerprint, endpoint: Endpoint) -> Fingerprint:
    """`fp` made of the endpoint's own strings and of copies (see `_own`), for the memo."""
    _, _, node_index, service_index, checks = fp
    return (
        endpoint.node,
        endpoint.service_id,
        _own_int(node_index),
        _own_int(service_index),
        tuple((_shared(c), _shared(s), _own_int(i)) for c, s, i in checks),
    )


@dataclass(frozen=True, slots=True)
class Decoded:
    """One answer's endpoints, validated but not yet a snapshot, and the memo it leaves."""

    endpoints: list[Endpoint]
    memo: Memo
    reused: int
    """How many entries were unchanged since the previous answer (not decoded again)."""


def decode_answer(key: WatchKey, raw: object, memo: Memo) -> Decoded:
    """The endpoints of a parsed `/v1/health/connect/<key.name>?passing` answer.

    Raises `ShapeError` if any entry is not shaped as Consul documents (checked for every
    entry before any content check, as when the whole answer is decoded first), then
    `SnapshotRejected` if any entry is unusable. Entries whose fingerprint is in `memo` reuse
    its endpoint; the rest go through `ServiceEntry.from_json` and `endpoint_of`.
    """
    items = as_list(raw, "response")
    endpoints: list[Endpoint] = []
    kept: dict[Fingerprint, tuple[Fingerprint, Endpoint]] = {}
    decoded = 0
    rejected: SnapshotRejected | None = None
    for item in items:
        fp = fingerprint(item)
        hit = memo.get(fp) if fp is not None else None
        if hit is not None:
            kept[hit[0]] = hit
            endpoints.append(hit[1])
            continue
        # Each typed entry is garbage as soon as its endpoint exists: the peak stays one entry.
        entry = ServiceEntry.from_json(item)
        decoded += 1
        if rejected is not None:
            continue  # the answer is lost already; only a shape error could still win
        try:
            endpoint = endpoint_of(key, entry)
        except SnapshotRejected as exc:
            rejected = exc
            continue
        if fp is not None:
            own = _kept(fp, endpoint)
            kept[own] = (own, endpoint)
        endpoints.append(endpoint)
    if rejected is not None:
        raise rejected
    return Decoded(endpoints=endpoints, memo=kept, reused=len(items) - decoded)


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


def diff(old: Snapshot | None, new: Snapshot) -> Diff:
    """What changed from `old` (None: nothing known yet) to `new`, for logs and status.

    Endpoints present as the very same object in both snapshots (reused from the memo) are
    unchanged; only the others are compared by key, so a one-instance change to a large
    upstream costs set operations, not a Python loop over every endpoint.
    """
    if old is None:
        return Diff(added=new.endpoints)
    if old.endpoints == new.endpoints:
        return Diff()
    old_ids = dict(zip(map(id, old.endpoints), old.endpoints, strict=True))
    new_ids = dict(zip(map(id, new.endpoints), new.endpoints, strict=True))
    before = {e.key: e for e in map(old_ids.__getitem__, old_ids.keys() - new_ids.keys())}
    after = {e.key: e for e in map(new_ids.__getitem__, new_ids.keys() - old_ids.keys())}
    return Diff(
        added=tuple(sorted((e for k, e in after.items() if k not in before), key=_sort_key)),
        removed=tuple(sorted((e for k, e in before.items() if k not in after), key=_sort_key)),
        changed=tuple(
            sorted(
                ((before[k], e) for k, e in after.items() if k in before and before[k] != e),
                key=lambda pair: _sort_key(pair[1]),
            )
        ),
    )
