"""Endpoint snapshots of an upstream, built whole from one Consul answer, and their diff.

Pure: no I/O, no clock (the caller passes `now`). A `Snapshot` is immutable and replaces its
predecessor in one assignment, so a reader that took one keeps a consistent view while the
watcher publishes the next. An answer that does not make sense as a whole (a proxy for another
service, a port of 0, the same instance twice, a failing instance in a `?passing` answer) is
rejected as a whole: half of a list of endpoints is worse than the last good list.

Two ways to build a snapshot from the same answer, with the same result:

- `build_snapshot(key, entries, ...)`: from decoded `ServiceEntry`s, every one validated.
- `decode_answer(key, body, memo)` + `snapshot_of(...)`: from the answer's bytes, as the
  watcher does it. The body is decoded into lean `health_entries.HealthEntry`s (only the
  fields an endpoint needs; a shape error anywhere rejects the answer). An entry equal to one
  of the previous accepted answer (compared by value, first at the same position, then by
  hash) is the same data, so its already validated `Endpoint` is reused; every other entry is
  validated in full. The memo is the caller's to keep or drop.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar

from agent.consul_results import HealthStatus, ServiceEntry
from agent.health_entries import (
    CheckFields,
    ConnectFields,
    HealthEntry,
    NodeFields,
    ProxyFields,
    ServiceFields,
    WeightsFields,
    decode_entries,
)


@dataclass(frozen=True, slots=True)
class WatchKey:
    """What one watch asks Consul: a destination, where it lives, and an optional subset."""

    name: str
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    """A Consul filter expression over the health entries: how routing selects a subset."""
    warning: bool = False
    """Instances in `warning` are used too (a resolver subset's `OnlyPassing: false`, as
    Consul's Envoy config has it): asked without `?passing`, critical ones left out here."""

    @property
    def label(self) -> str:
        where = f"@{self.datacenter}" if self.datacenter else ""
        where += f"@peer:{self.peer}" if self.peer else ""
        subset = f" [{self.filter}]" if self.filter else ""
        return f"{self.name}{where}{subset}{' +warning' if self.warning else ''}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One dialable instance of an upstream: its sidecar proxy, or a Connect-native instance.

    Only what the proxy dials and balances with (and status shows): a snapshot of a large
    upstream holds thousands of these. Tags, meta and the datacenter of an instance are not
    kept; subsets are selected by Consul (`WatchKey.filter`), not here."""

    node: str
    service_id: str
    address: str
    port: int
    weight: int = 1

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


def _validated(
    key: WatchKey,
    *,
    node: str,
    service_id: str,
    kind: str,
    destination: str,
    native: bool,
    service_name: str,
    status: HealthStatus,
    address: str,
    port: int,
    weight: int,
) -> Endpoint:
    where = f"{node}/{service_id}"
    if kind == "connect-proxy":
        if destination != key.name:
            raise SnapshotRejected(f"{where}: a proxy for {destination!r}, not for {key.name!r}")
    elif not (native and service_name == key.name):
        raise SnapshotRejected(
            f"{where}: neither a connect-proxy for {key.name!r} nor a Connect-native instance"
        )
    if status is not HealthStatus.PASSING:
        if key.warning:
            if status is not HealthStatus.WARNING:
                return UNHEALTHY  # critical or in maintenance: never used
        else:
            raise SnapshotRejected(f"{where}: {status.value} in an answer to ?passing")
    if not 1 <= port <= 65535:
        raise SnapshotRejected(f"{where}: port {port} is not dialable")
    if not _address_ok(address):
        raise SnapshotRejected(f"{where}: address {address!r} is not dialable")
    # Node names and addresses repeat across instances and upstreams: one copy of each. Every
    # kept value is a copy (`_own`), never an object of the decoded answer (see `_own`).
    return Endpoint(
        node=_shared(node),
        service_id=_own(service_id),
        address=_shared(address),
        port=_PORTS.setdefault(port, _own_int(port)),
        weight=_own_int(weight),
    )


UNHEALTHY = Endpoint(node="", service_id="", address="", port=0, weight=0)
"""What a critical instance of an answer without `?passing` (`WatchKey.warning`) stands for:
left out of the snapshot."""


def endpoint_of(key: WatchKey, entry: ServiceEntry) -> Endpoint:
    """The endpoint an entry of `/v1/health/connect/<key.name>?passing` stands for."""
    return _validated(
        key,
        node=entry.node,
        service_id=entry.service_id,
        kind=entry.kind,
        destination=entry.proxy.destination_service_name if entry.proxy is not None else "",
        native=entry.connect_native,
        service_name=entry.service_name,
        status=entry.status,
        address=entry.address,
        port=entry.port,
        weight=entry.weights.passing,
    )


def endpoint_of_entry(key: WatchKey, entry: HealthEntry) -> Endpoint:
    """`endpoint_of` for a lean entry, with `ServiceEntry.from_json`'s defaults for nulls."""
    node, svc = entry.node, entry.service
    kind = svc.kind or ""
    proxy = svc.proxy if kind else None  # only proxies and gateways own a Proxy (as from_json)
    weights = svc.weights
    passing = weights.passing if weights is not None else None
    return _validated(
        key,
        node=node.name,
        service_id=svc.id,
        kind=kind,
        destination=(proxy.destination_service_name or "") if proxy is not None else "",
        native=bool(svc.connect is not None and svc.connect.native),
        service_name=svc.service,
        status=entry.aggregate(),
        address=svc.address or node.address,
        port=svc.port or 0,
        weight=1 if passing is None else passing,
    )


def _own(text: str) -> str:
    """A copy of `text` that is not an object of the decoded answer.

    Decoding a 10,000-instance answer spreads its objects over many memory pools; keeping
    even one string or int of it per pool pins the pool (and its arena) after the rest of the
    answer is freed, so the process keeps the answer's peak as RSS. Values kept in snapshots
    and the memo are therefore copies, allocated apart from the answer (measured with
    `json.loads`: 40 MB of RSS growth for 1,001 answers with 20,000 entries kept as parsed,
    14 MB copied).
    """
    return (text + " ")[:-1]


_PORTS: dict[int, int] = {}
"""One copy of each dialable port in use (at most 65,535 entries): ports repeat across
instances, and an int above 256 is an object of its own."""


def _own_int(value: int) -> int:
    """A copy of `value` (small ints are shared by Python anyway); see `_own`."""
    return value + 0


def _shared(text: str) -> str:
    """The one interned copy of a value that repeats (node, address, service name, kind)."""
    return sys.intern(_own(text))


_sort_key = attrgetter("node", "service_id")


def snapshot_of(key: WatchKey, endpoints: list[Endpoint], index: int, now: float) -> Snapshot:
    """The snapshot of already validated endpoints (sorted here, in place), or
    `SnapshotRejected` if one instance is listed twice."""
    if key.warning:
        endpoints = [e for e in endpoints if e is not UNHEALTHY]
    # One pass over the keys (in C) when the answer is already in order without repeats, as
    # Consul lists instances; otherwise sort, and a repeat is then next to its twin.
    keys = list(map(_sort_key, endpoints))
    if not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
        endpoints.sort(key=_sort_key)
        keys = list(map(_sort_key, endpoints))
        twins = itertools.compress(keys, map(operator.eq, keys, itertools.islice(keys, 1, None)))
        for node, service_id in twins:
            raise SnapshotRejected(f"{node}/{service_id}: listed twice")
    return Snapshot(key=key, endpoints=tuple(endpoints), index=index, updated_at=now)


def build_snapshot(
    key: WatchKey, entries: Sequence[ServiceEntry], index: int, now: float
) -> Snapshot:
    """A snapshot of every entry, or `SnapshotRejected` if any one of them is unusable."""
    return snapshot_of(key, [endpoint_of(key, e) for e in entries], index, now)


@dataclass(frozen=True, slots=True)
class Memo:
    """The last accepted answer's entries, in the answer's order, and their endpoints.

    The entries are copies made of shared and copied values (`_kept`), not the decoded
    answer's objects, so a memo holds one small struct per instance plus what repeats once."""

    entries: tuple[HealthEntry, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    def by_entry(self) -> dict[HealthEntry, tuple[HealthEntry, Endpoint]]:
        return {e: (e, ep) for e, ep in zip(self.entries, self.endpoints, strict=True)}


EMPTY_MEMO = Memo()


_T = TypeVar("_T")


def _one(shared: dict[Any, Any], value: _T) -> _T:
    found: _T = shared.setdefault(value, value)
    return found


def _kept(entry: HealthEntry, endpoint: Endpoint, shared: dict[Any, Any]) -> HealthEntry:
    """An entry equal to `entry`, made of the values its `endpoint` already holds, of copies
    (see `_own`), and of parts (node, weights, proxy, checks) shared with equal parts of the
    other entries kept in this pass."""
    node, svc = entry.node, entry.service
    weights, proxy, connect, checks = svc.weights, svc.proxy, svc.connect, entry.checks
    if weights is not None:
        passing = weights.passing
        weights = _one(
            shared, WeightsFields(passing=None if passing is None else _own_int(passing))
        )
    if proxy is not None:
        dest = proxy.destination_service_name
        proxy = _one(
            shared,
            ProxyFields(destination_service_name=None if dest is None else _shared(dest)),
        )
    if connect is not None:
        connect = _one(shared, ConnectFields(native=connect.native))
    if checks is not None:
        checks = _one(
            shared,
            tuple(
                _one(shared, CheckFields(check_id=_shared(c.check_id), status=c.status))
                for c in checks
            ),
        )
    return HealthEntry(
        node=_one(shared, NodeFields(name=_shared(node.name), address=_shared(node.address))),
        service=ServiceFields(
            id=endpoint.service_id,  # equal: the endpoint was made of this entry
            service=_shared(svc.service),
            kind=None if svc.kind is None else _shared(svc.kind),
            address=None if svc.address is None else _shared(svc.address),
            port=endpoint.port,  # equal: a null or missing port is never a valid endpoint
            weights=weights,
            proxy=proxy,
            connect=connect,
        ),
        checks=checks,
    )


@dataclass(frozen=True, slots=True)
class Decoded:
    """One answer's endpoints, validated but not yet a snapshot, and the memo it leaves."""

    endpoints: list[Endpoint]
    """In the answer's order (`snapshot_of` sorts them)."""
    memo: Memo
    reused: int
    """How many entries were unchanged since the previous answer (not validated again)."""


def decode_answer(key: WatchKey, body: bytes, memo: Memo) -> Decoded:
    """The endpoints of a `/v1/health/connect/<key.name>?passing` answer's body.

    Raises `ShapeError` if any entry is not shaped as Consul documents (the whole body is
    decoded before any content check), then `SnapshotRejected` if any entry is unusable.
    Entries equal to one in `memo` reuse its endpoint; the rest are validated in full.
    """
    entries = decode_entries(body)
    old = memo.entries
    # Most answers repeat the previous one with a few entries changed in place: compare by
    # position first (`map` runs in C), then look the others up by value.
    same = list(map(operator.eq, entries, old))
    if len(entries) == len(old) and all(same):
        return Decoded(list(memo.endpoints), memo, len(entries))
    kept = list(old[: len(entries)])
    endpoints = list(memo.endpoints[: len(entries)])
    changed = itertools.chain(
        itertools.compress(range(len(same)), map(operator.not_, same)),
        range(len(same), len(entries)),
    )
    kept.extend(entries[len(kept) :])
    endpoints.extend([None] * (len(entries) - len(endpoints)))  # type: ignore[list-item]
    known: dict[HealthEntry, tuple[HealthEntry, Endpoint]] | None = None
    shared: dict[object, object] = {}
    validated = 0
    for i in changed:
        entry = entries[i]
        if known is None:
            known = memo.by_entry()
        hit = known.get(entry)
        if hit is not None:
            kept[i], endpoints[i] = hit
            continue
        endpoint = endpoints[i] = endpoint_of_entry(key, entry)
        kept[i] = _kept(entry, endpoint, shared)
        validated += 1
    return Decoded(endpoints, Memo(tuple(kept), tuple(endpoints)), len(entries) - validated)


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
    before_eps, after_eps = old.endpoints, new.endpoints
    if len(before_eps) == len(after_eps):
        # The usual update: instances changed in place (both tuples are sorted by key, so
        # an instance that stayed is at the same position). Only positions holding another
        # object are looked at.
        moved = list(
            itertools.compress(range(len(after_eps)), map(operator.is_not, before_eps, after_eps))
        )
        if all(before_eps[i].key == after_eps[i].key for i in moved):
            return Diff(
                changed=tuple(
                    (before_eps[i], after_eps[i]) for i in moved if before_eps[i] != after_eps[i]
                )
            )
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
