"""Endpoint snapshots of an upstream, built whole from one Consul answer, and their diff.

Pure: no I/O, no clock (the caller passes `now`). A `Snapshot` is immutable and replaces its
predecessor in one assignment, so a reader that took one keeps a consistent view while the
watcher publishes the next. An answer that does not make sense as a whole (a proxy for another
service, a port of 0, the same instance twice, a failing instance in a `?passing` answer) is
rejected as a whole: half of a list of endpoints is worse than the last good list.

Two ways to build a snapshot from the same answer, with the same result:

- `build_snapshot(key, entries, ...)`: from decoded `ServiceEntry`s, every one validated.
- `decode_answer(key, body, memo)` + `snapshot_of(...)`: from the answer's bytes, as the
  watcher does it. The body is parsed whole but split into its entries' raw JSON without
  building them (`health_entries.split_entries`). An entry whose bytes are those of an entry
  of the previous accepted answer (compared by fingerprint, first at the same position, then
  among all) is the same data, already decoded and validated, so its `Endpoint` is reused;
  every other entry is decoded into a lean `health_entries.HealthEntry` (a shape error
  rejects the answer) and validated in full. The memo is the caller's to keep or drop.

Why bytes and not Consul's ModifyIndexes: an unchanged index says nothing about an entry that
is malformed or was altered on the way, and after a control-plane restart the same index may
name other content. Parsing a 10,000-instance answer (9.5 MB) whole costs ~6.5 ms CPU and
hashing copies of its entries ~3.5 ms more; after a large answer (`Layout`), keyed hashes of
blocks of ~64 entries (~2.4 ms) find the span that changed, and only that span is parsed:
~5 ms per update in all (bench/agent_scale.py), and no body is held. (Holding the last body to
compare entries by memcmp was measured: +8 MB of RSS at start, +28 MB after updates, with
1,001 upstreams.)
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import operator
import os
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter

from msgspec import Raw

from agent.consul_json import ShapeError
from agent.consul_results import HealthStatus, ServiceEntry
from agent.health_entries import HealthEntry, decode_entry, split_entries


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
    warning_weight: int,
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
            # An instance in warning weighs Weights.Warning, and one weighing nothing is left
            # out, as Consul's calculateEndpointHealthAndWeight does for Envoy.
            weight = warning_weight
            if weight < 1:
                return UNHEALTHY
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
        warning_weight=entry.weights.warning,
    )


def endpoint_of_entry(key: WatchKey, entry: HealthEntry) -> Endpoint:
    """`endpoint_of` for a lean entry, with `ServiceEntry.from_json`'s defaults for nulls."""
    node, svc = entry.node, entry.service
    kind = svc.kind or ""
    proxy = svc.proxy if kind else None  # only proxies and gateways own a Proxy (as from_json)
    weights = svc.weights
    passing = weights.passing if weights is not None else None
    warning = weights.warning if weights is not None else None
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
        warning_weight=1 if warning is None else warning,
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


def _strictly_ordered(endpoints: Sequence[Endpoint]) -> bool:
    """Sorted by key without repeats: one pass over the keys, in C."""
    keys = list(map(_sort_key, endpoints))
    return all(map(operator.lt, keys, itertools.islice(keys, 1, None)))


def snapshot_of(
    key: WatchKey,
    endpoints: Sequence[Endpoint],
    index: int,
    now: float,
    *,
    in_order: bool = False,
) -> Snapshot:
    """The snapshot of already validated endpoints, or `SnapshotRejected` if one instance is
    listed twice. `in_order`: the caller knows they are sorted by key without repeats
    (`Decoded.in_order`), so they are not looked at again."""
    if key.warning:
        # Leaving out instances keeps the others in order.
        endpoints = [e for e in endpoints if e is not UNHEALTHY]
    # Consul lists instances in order, so sorting is rarely needed; after a sort a repeat is
    # next to its twin.
    if in_order or _strictly_ordered(endpoints):
        return Snapshot(key=key, endpoints=tuple(endpoints), index=index, updated_at=now)
    ordered = sorted(endpoints, key=_sort_key)
    keys = list(map(_sort_key, ordered))
    twins = itertools.compress(keys, map(operator.eq, keys, itertools.islice(keys, 1, None)))
    for node, service_id in twins:
        raise SnapshotRejected(f"{node}/{service_id}: listed twice")
    return Snapshot(key=key, endpoints=tuple(ordered), index=index, updated_at=now)


def build_snapshot(
    key: WatchKey, entries: Sequence[ServiceEntry], index: int, now: float
) -> Snapshot:
    """A snapshot of every entry, or `SnapshotRejected` if any one of them is unusable."""
    return snapshot_of(key, [endpoint_of(key, e) for e in entries], index, now)


def hash_key_is_secret(environ: Mapping[str, str], *, ignore_environment: bool) -> bool:
    """Whether `hash()` of bytes is keyed with a random secret of this process: unless
    PYTHONHASHSEED fixes the key (which then anyone may know, and use to make two entries'
    fingerprints collide)."""
    return ignore_environment or environ.get("PYTHONHASHSEED", "") in ("", "random")


# SipHash with a 64-bit result is CPython's default; a build with another string hash (FNV)
# gets byte fingerprints too.
_HASH_IS_SECRET = (
    hash_key_is_secret(os.environ, ignore_environment=bool(sys.flags.ignore_environment))
    and sys.hash_info.algorithm.startswith("siphash")
    and sys.hash_info.hash_bits >= 64
)

Fingerprint = int | bytes


def fingerprints(raws: Sequence[Raw], *, hashed: bool = _HASH_IS_SECRET) -> tuple[Fingerprint, ...]:
    """What identifies each entry's bytes in a memo: their hash (SipHash, keyed with this
    process's random secret: a collision of two different entries is a 2^-64 accident nobody
    can arrange), or, when PYTHONHASHSEED fixes that key, the bytes themselves (exact too, but
    the memo then holds a copy of every entry's bytes: ~1 KB per instance)."""
    if hashed:
        return tuple(map(hash, map(bytes, raws)))
    return tuple(map(bytes, raws))


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a large answer's entries lie in its bytes, and keyed hashes of blocks of them.

    The answer is exactly `lead` entry (`sep` entry)* `trail` (the same spacing between any
    two entries), so entry i ends at `ends[i]` and block b covers the bytes from the end of
    the entry before `bounds[b]` (or from the `[`) to the end of its last entry: the blocks
    tile the body but its trail.
    A block of the next answer found with the same hash at the same place (or as far from
    the end) holds the same entries, already parsed: only the span between the unchanged
    blocks at the start and at the end is parsed (`_decode_span`). No bytes are kept."""

    lead: bytes
    """From the body's `[` to its first entry."""
    sep: bytes
    trail: bytes
    """From the end of the last entry to the body's end, `]` included."""
    ends: array[int]
    bounds: tuple[int, ...]
    hashes: tuple[int, ...]

    def block(self, b: int) -> tuple[int, int]:
        """The bytes [lo, hi) of block `b`."""
        first = self.bounds[b]
        last = self.bounds[b + 1] - 1 if b + 1 < len(self.bounds) else len(self.ends) - 1
        return (self.ends[first - 1] if first else 0), self.ends[last]


_BLOCK = 64
"""Entries per block: ~60 KB of a Consul answer, so a block's hash is mostly SipHash over
bytes (9.5 MB in blocks: ~2.4 ms with the copies) and a changed entry costs a parse of its
block only."""

_JSON_SPACE = b" \t\n\r"
_EDGE = 64
"""At most this many bytes of the body's start and end are looked at for its `[` and `]`."""

LAYOUT_FROM = 512
"""From this many entries on, an answer's layout is kept (~8 bytes per entry)."""


def _hash_blocks(
    body: bytes, ends: Sequence[int], bounds: Sequence[int], first: int, stop: int
) -> list[int]:
    """The hashes of blocks `first` to `stop - 1`. Of copies of their bytes: a memoryview's
    hash first hashes all of the bytes it views (2 ms more for 9.5 MB)."""
    out = []
    for b in range(first, stop):
        lo = ends[bounds[b] - 1] if bounds[b] else 0
        last = bounds[b + 1] - 1 if b + 1 < len(bounds) else len(ends) - 1
        out.append(hash(body[lo : ends[last]]))
    return out


def layout_of(body: bytes, raws: Sequence[Raw]) -> Layout | None:
    """The layout of an answer rendered as Consul (`,`) or Python's json (`, `) render a
    list, or None: for a small answer, a hash key others may know (PYTHONHASHSEED), or any
    other spacing. Every entry and separator is checked at its place: the layout is exact."""
    n = len(raws)
    if n < max(LAYOUT_FROM, 2) or not _HASH_IS_SECRET:
        return None
    # Consul renders `[{..},{..}]`; with ?pretty (and devstack) `[\n    {..},\n    {..}\n]`.
    head, back = body[:_EDGE], body[-_EDGE:]
    lead = head[: len(head) - len(head[1:].lstrip(_JSON_SPACE))]
    trail = back[len(back[:-1].rstrip(_JSON_SPACE)) :]
    lens = list(map(len, raws))
    extra = len(body) - len(lead) - len(trail) - sum(lens)
    if lead.strip() != b"[" or trail.strip() != b"]" or extra <= 0 or extra % (n - 1):
        return None
    step = extra // (n - 1)
    starts = list(itertools.accumulate(map(step.__add__, lens[:-1]), initial=len(lead)))
    ends = list(map(operator.add, starts, lens))
    sep = body[ends[0] : ends[0] + step]
    if not (
        sep.strip(_JSON_SPACE) == b","
        and body.endswith(trail)
        and ends[-1] + len(trail) == len(body)
        and all(map(body.startswith, raws, starts))
        and all(map(body.startswith, itertools.repeat(sep), ends[:-1]))
    ):
        return None
    bounds = tuple(range(0, n, _BLOCK))
    hashes = _hash_blocks(body, ends, bounds, 0, len(bounds))
    return Layout(lead, sep, trail, array("q", ends), bounds, tuple(hashes))


@dataclass(frozen=True, slots=True)
class Memo:
    """The last accepted answer: its entries' fingerprints and endpoints, in the answer's order.

    No entry is kept: an entry whose bytes are those of an entry of the last answer is the same
    data, already decoded and validated, so its endpoint is reused."""

    prints: tuple[Fingerprint, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    ordered: bool = True
    """`endpoints` are sorted by key without repeats (as Consul lists instances)."""
    layout: Layout | None = None
    """Where the entries lie in the last answer's bytes, for a large answer (`Layout`)."""


EMPTY_MEMO = Memo()

_FEW = 64
"""Up to this many changed positions, an answer's order is checked around them only, and (when
the answer is as long as the last one) a changed entry is decoded without looking for it
elsewhere in the last answer."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """One answer's endpoints, validated but not yet a snapshot, and the memo it leaves."""

    endpoints: tuple[Endpoint, ...]
    """In the answer's order (`snapshot_of` sorts them unless `in_order`)."""
    memo: Memo
    reused: int
    """How many entries were unchanged since the previous answer (not decoded again)."""
    in_order: bool = False
    """`endpoints` are known to be sorted by key without repeats."""


def decode_answer(key: WatchKey, body: bytes, memo: Memo) -> Decoded:
    """The endpoints of a `/v1/health/connect/<key.name>?passing` answer's body.

    The body is parsed whole (`ShapeError` unless it is a JSON list) without building its
    entries, or, after a large answer, only the span where it differs from it (`Layout`).
    An entry whose bytes are those of an entry in `memo` reuses its endpoint; every
    other one is decoded (`ShapeError` if any is not shaped as Consul documents: all are
    decoded before any is validated) and then validated in full (`SnapshotRejected`).
    """
    if memo.layout is not None:
        span = _decode_span(key, body, memo, memo.layout)
        if span is not None:
            return span
    raws = split_entries(body)
    decoded = _decode_raws(key, raws, fingerprints(raws), memo)
    if decoded.memo is memo:
        return decoded
    layout = layout_of(body, raws)
    if layout is None:
        return decoded
    return replace(decoded, memo=replace(decoded.memo, layout=layout))


def _decode_span(key: WatchKey, body: bytes, memo: Memo, layout: Layout) -> Decoded | None:
    """`decode_answer` parsing only the span of `body` between the blocks it shares with the
    last answer at its start and at its end, or None if that cannot be done.

    Why parsing the span alone is parsing the body: the body is `head + span + tail`, where
    `head` and `tail` are the last answer's bytes (keyed hashes equal) up to the end of an
    entry and from a separator before one (or the final `]`). That answer parsed, so after
    `head` a parser is inside the top-level list right after a value, as after `[{}`; and
    from wherever `span` leaves it, `tail` (separators, whole JSON values, `]`) parses
    exactly when `,{}]` does (a string left open would swallow `tail` but fails on `,{}]`,
    and then the whole body is parsed instead). So `[{}` + span + `,{}]` parses exactly when
    the body does, into the same values between the two placeholders.
    """
    ends, bounds, hashes = layout.ends, layout.bounds, layout.hashes
    n, blocks, size = len(ends), len(bounds), ends[-1] + len(layout.trail)
    shift = len(body) - size
    if not body.endswith(layout.trail):
        return None
    head = 0
    while head < blocks:
        lo, hi = layout.block(head)
        if hi > len(body) or hash(body[lo:hi]) != hashes[head]:
            break
        head += 1
    if head == blocks and shift == 0:
        return Decoded(memo.endpoints, memo, n, memo.ordered)  # the same bytes
    k = bounds[head] if head < blocks else n
    start = ends[k - 1] if k else 0
    tail = blocks
    # The first block starts with `[`, not with a separator: it is never part of the tail.
    while tail > max(head, 1):
        lo, hi = layout.block(tail - 1)
        if lo + shift < start or hash(body[lo + shift : hi + shift]) != hashes[tail - 1]:
            break
        tail -= 1
    m = bounds[tail] if tail < blocks else n
    stop = ends[m - 1] + shift if m < n else len(body) - 1  # before the `]`
    if stop < start:
        return None
    span = body[start:stop]
    try:
        parsed = split_entries((b"[{}" if k else b"") + span + (b",{}]" if m < n else b"]"))
    except ShapeError:
        return None  # the whole body is parsed: its error names the entry
    if len(parsed) < (k > 0) + (m < n):
        return None
    inner = parsed[(1 if k else 0) : len(parsed) - (1 if m < n else 0)]
    part = _decode_raws(
        key, inner, fingerprints(inner), Memo(memo.prints[k:m], memo.endpoints[k:m]), base=k
    )
    r = len(inner)
    done = (*memo.endpoints[:k], *part.endpoints, *memo.endpoints[m:])
    prints = (*memo.prints[:k], *part.memo.prints, *memo.prints[m:])
    # The entries before and after the span were in order in the last answer.
    in_order = memo.ordered and _strictly_ordered(done[max(k - 1, 0) : k + r + 1])
    new_layout = _span_layout(
        body,
        layout,
        inner=inner,
        k=k,
        m=m,
        start=start,
        stop=stop,
        shift=shift,
        head=head,
        tail=tail,
    )
    memo_out = Memo(prints, done, in_order, new_layout)
    return Decoded(done, memo_out, n - (m - k) + part.reused, in_order)


def _span_layout(
    body: bytes,
    layout: Layout,
    *,
    inner: Sequence[Raw],
    k: int,
    m: int,
    start: int,
    stop: int,
    shift: int,
    head: int,
    tail: int,
) -> Layout | None:
    """The layout of `body`: the last one's, with the span's entries (checked at their place,
    or None) in blocks of their own."""
    sep = layout.sep
    mid_ends: list[int] = []
    at = start
    for j, raw in enumerate(inner):
        gap = layout.lead if k == 0 and j == 0 else sep
        if not body.startswith(gap, at):
            return None
        at += len(gap)
        if not body.startswith(raw, at):
            return None
        at += len(raw)
        mid_ends.append(at)
    end = stop if m < len(layout.ends) else len(body) - len(layout.trail)
    if at != end or (k == 0 and not inner):
        return None
    r = len(inner)
    ends = array("q", layout.ends[:k])
    ends.extend(mid_ends)
    ends.extend(map(shift.__add__, layout.ends[m:]))
    mid_bounds = tuple(range(k, k + r, _BLOCK))
    moved = k + r - m
    bounds = (
        *layout.bounds[:head],
        *mid_bounds,
        *(b + moved for b in layout.bounds[tail:]),
    )
    hashes = (
        *layout.hashes[:head],
        *_hash_blocks(body, ends, bounds, head, head + len(mid_bounds)),
        *layout.hashes[tail:],
    )
    return Layout(layout.lead, sep, layout.trail, ends, bounds, hashes)


def _decode_raws(
    key: WatchKey, raws: Sequence[Raw], prints: tuple[Fingerprint, ...], memo: Memo, base: int = 0
) -> Decoded:
    """`decode_answer` of entries `base`, `base + 1`, ... of an answer, already split."""
    old = memo.prints
    if prints == old:
        return Decoded(memo.endpoints, memo, len(prints), memo.ordered)
    n = len(prints)
    # Most answers repeat the previous one with a few entries changed in place: compare by
    # position first (in C), then look the others up among the last answer's entries.
    changed = list(itertools.compress(range(n), map(operator.ne, prints, old)))
    changed.extend(range(len(old), n))
    endpoints: list[Endpoint | None] = [*memo.endpoints[:n], *[None] * (n - len(old))]
    known: dict[Fingerprint, Endpoint] = {}
    if n != len(old) or len(changed) > _FEW:
        # Entries inserted or removed shift the rest: find them by fingerprint.
        known = dict(zip(old, memo.endpoints, strict=True))
    fresh: list[int] = []
    for i in changed:
        hit = known.get(prints[i])
        if hit is None:
            fresh.append(i)
        endpoints[i] = hit
    if len(fresh) <= _FEW:
        entries = [decode_entry(raws[i], base + i) for i in fresh]
        for i, entry in zip(fresh, entries, strict=True):
            endpoints[i] = endpoint_of_entry(key, entry)
    else:
        # Every shape is checked before any content, without holding thousands of decoded
        # entries at once: the endpoints kept are then not spread among thousands of dead
        # entries that would pin their memory pools (a first answer of 10,000 instances
        # leaves 3.8 MB of RSS instead of 11.4, for a second decode of each entry).
        for i in fresh:
            decode_entry(raws[i], base + i)
        for i in fresh:
            endpoints[i] = endpoint_of_entry(key, decode_entry(raws[i], base + i))
    done: tuple[Endpoint, ...] = tuple(endpoints)  # type: ignore[arg-type]  # no None left
    if memo.ordered and len(changed) <= _FEW:
        # The pairs of neighbours both unchanged were in order in the last answer.
        in_order = all(
            (i == 0 or _sort_key(done[i - 1]) < _sort_key(done[i]))
            and (i + 1 >= n or _sort_key(done[i]) < _sort_key(done[i + 1]))
            for i in changed
        )
    else:
        in_order = _strictly_ordered(done)
    return Decoded(done, Memo(prints, done, in_order), n - len(fresh), in_order)


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
