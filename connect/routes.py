"""Routes: what an outbound HTTP listener does with a request, chosen once per request head,
before the head is serialized. Pure: the standard library only (no I/O, nothing of connect's
protocols), so a compiler of Consul's discovery chain can build these values anywhere.

The types, all immutable:

* `RouteTable(routes, default)`: `routes` are tried in order and the first whose `match`
  matches wins (Consul's service-router semantics, not most-specific); `default` applies when
  none does (Consul's implicit catch-all route to the chain's start node).
  `RouteTable.select(method, path, query, headers, rng) -> Selection`.
* `Route(match, action)`.
* `RouteMatch`: every field given must match (an empty one matches everything):
  `methods` (upper-case bytes; empty: any), one of `path_exact` / `path_prefix` /
  `path_regex` (against the path without its query; a regex must match all of it),
  `headers` (`HeaderMatch`es), `query` (`QueryMatch`es).
* `HeaderMatch(name, exact=..., prefix=..., suffix=..., regex=..., present=..., invert=...)`:
  `name` lower-case; exactly one of the conditions, or none for "present"; `invert` negates.
  Repeated fields are matched on their values joined with ",".
* `QueryMatch(name, exact=..., regex=..., present=...)`: the first value of the parameter,
  percent-decoded as sent (`+` stays `+`).
* `RouteAction`: `destinations` (one or more `WeightedCluster(cluster, weight)`: weights in
  Consul's 0.01 % units, i.e. out of 10,000 for a splitter; any positive integers work, the
  split is by share of the total), `prefix_rewrite` (replaces the matched `path_prefix`, the
  whole path for `path_exact`, the leading "/" without a path match; refused with
  `path_regex`, as Consul refuses it), `request_headers` and
  `response_headers` (`HeaderEdits`: `add` appends, `set` replaces every field of that name,
  `remove` drops; names lower-case), `retry` (`RetryPolicy`), `request_timeout` (Envoy's route
  `timeout`: seconds from the end of the request to the response's last byte, retries
  included; `DEFAULT_REQUEST_TIMEOUT`, Envoy's 15 s, unless given; None: only the listener's
  idle limit),
  `try_timeout` (seconds for each try, until the response head; None: none),
  `idle_timeout` (seconds the stream may be silent both ways), `fault` (`Fault`: delay and
  abort, decided per request) and `mirror` (`Mirror`: a copy to another cluster).
  `needs_shell` says whether the exchange must carry the action (precomputed).
  A `WeightedCluster` may carry header edits of its own (a splitter leg's), applied before
  the route's; the `Selection` carries the edits of the leg chosen.
* `RetryPolicy`: when a request is sent again and how often (see its docstring).
* `Selection(action, cluster, path)`: what `select` returns: the route's action, the cluster
  its split chose, and the request path to send instead (without the query), or None when
  it is the request's own. `RouteTable.fixed` is the one selection of a table whose answer
  never depends on the request (no routes, one destination, no rewrite).

A cluster is named by a plain string; the listener maps names to its upstream clusters
(connect.cluster via connect.dial.Upstream). `default_table(cluster)` is the table every
outbound HTTP listener has had so far: one route to its upstream's one cluster, one retry
after a reset or a peer sidecar's refusal, Envoy's default request timeout.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "Fault",
    "HeaderEdits",
    "HeaderMatch",
    "Mirror",
    "QueryMatch",
    "RetryPolicy",
    "Route",
    "RouteAction",
    "RouteMatch",
    "RouteTable",
    "Selection",
    "WeightedCluster",
    "default_table",
    "shadow_head",
]

Headers = Sequence[tuple[bytes, bytes]]

GATEWAY_ERRORS = frozenset({502, 503, 504})

DEFAULT_REQUEST_TIMEOUT = 15.0
"""Envoy's route `timeout` when none is set, which is what Consul leaves an http upstream
whose discovery chain says `RequestTimeout` 0 (and its filter, datacenter and peer upstreams)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a request is sent again, and how often.

    Only a replayable request is ever retried: no body (nothing of it is kept), and no
    upgrade. Each retry goes to another endpoint of the cluster where one exists.

    * `num_retries`: retries after the first try (Consul's `NumRetries`).
    * `on_reset`: the upstream closed before any byte of an answer (a pooled connection it
      had closed, an instance killed mid-request); idempotent requests only (RFC 9110
      §9.2.2), since the upstream may have acted on it.
    * `on_refused`: a peer sidecar answered with x-meshlet-retriable (its app was never
      reached, or closed before answering an idempotent request); honoured by outbound
      listeners only.
    * `on_status`: these response statuses (`RetryOnStatusCodes`); `on_5xx` any 5xx,
      `on_gateway_error` 502/503/504 (Envoy's `RetryOn` values of those names).
    * `on_timeout`: a try whose `try_timeout` passed before the response head.
    * `backoff`: the base of the wait before a retry (seconds); 0, the default, retries at
      once. Retry n waits a random time in [0, min(max_backoff, backoff * (2**n - 1))]
      (Envoy's fully jittered exponential back-off; Envoy's base is 25 ms).

    A failed connect is not a try: the dialer goes on to the next endpoint by itself before
    a request was sent (connect.dial).
    """

    num_retries: int = 1
    on_reset: bool = True
    on_refused: bool = True
    on_status: frozenset[int] = frozenset()
    on_5xx: bool = False
    on_gateway_error: bool = False
    on_timeout: bool = False
    backoff: float = 0.0
    max_backoff: float = 0.25

    statuses: frozenset[int] = field(init=False, repr=False, compare=False)
    """Every status that is retried (on_status, on_5xx, on_gateway_error), compiled once."""

    def __post_init__(self) -> None:
        if self.num_retries < 0:
            raise ValueError("RetryPolicy.num_retries must not be negative")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("RetryPolicy.backoff and max_backoff must not be negative")
        statuses = set(self.on_status)
        if self.on_5xx:
            statuses.update(range(500, 600))
        if self.on_gateway_error:
            statuses.update(GATEWAY_ERRORS)
        object.__setattr__(self, "statuses", frozenset(statuses))

    def retries_status(self, status: int) -> bool:
        return status in self.statuses

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        if not self.backoff:
            return 0.0
        return rng.uniform(0.0, min(self.max_backoff, self.backoff * (2**retry - 1)))


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: bytes
    exact: bytes | None = None
    prefix: bytes | None = None
    suffix: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    present: bool = False
    invert: bool = False

    def __post_init__(self) -> None:
        if self.name != self.name.lower():
            raise ValueError(f"HeaderMatch.name {self.name!r} must be lower-case")
        given = [self.exact, self.prefix, self.suffix, self.regex]
        if sum(c is not None for c in given) + self.present > 1:
            raise ValueError(f"HeaderMatch {self.name!r}: at most one condition")

    def matches(self, headers: Headers) -> bool:
        values = [v for n, v in headers if n.lower() == self.name]
        if not values:
            return self.invert
        value = b",".join(values)
        if self.exact is not None:
            hit = value == self.exact
        elif self.prefix is not None:
            hit = value.startswith(self.prefix)
        elif self.suffix is not None:
            hit = value.endswith(self.suffix)
        elif self.regex is not None:
            hit = self.regex.fullmatch(value) is not None
        else:
            hit = True
        return hit != self.invert


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: bytes
    exact: bytes | None = None
    regex: re.Pattern[bytes] | None = None
    present: bool = False

    def __post_init__(self) -> None:
        if sum((self.exact is not None, self.regex is not None, self.present)) > 1:
            raise ValueError(f"QueryMatch {self.name!r}: at most one condition")

    def matches(self, params: dict[bytes, bytes]) -> bool:
        value = params.get(self.name)
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True


@dataclass(frozen=True, slots=True)
class RouteMatch:
    methods: frozenset[bytes] = frozenset()
    path_exact: bytes | None = None
    path_prefix: bytes | None = None
    path_regex: re.Pattern[bytes] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()

    def __post_init__(self) -> None:
        paths = (self.path_exact, self.path_prefix, self.path_regex)
        if sum(p is not None for p in paths) > 1:
            raise ValueError("RouteMatch: at most one of path_exact, path_prefix, path_regex")

    def matches(self, method: bytes, path: bytes, query: bytes, headers: Headers) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        for h in self.headers:
            if not h.matches(headers):
                return False
        if self.query:
            params = _query_params(query)
            for q in self.query:
                if not q.matches(params):
                    return False
        return True


def _query_params(query: bytes) -> dict[bytes, bytes]:
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        params.setdefault(unquote_to_bytes(name), unquote_to_bytes(value))
    return params


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    add: tuple[tuple[bytes, bytes], ...] = ()
    set: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        for name, value in (*self.add, *self.set):
            _check_name(name)
            if _BAD_VALUE.search(value):
                raise ValueError(f"HeaderEdits: the value of {name!r} has CR, LF or NUL")
        for name in self.remove:
            _check_name(name)

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)

    def apply(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        """A new field list: removed and set names dropped, then set and add appended."""
        gone = self.remove | {n for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in gone] if gone else list(headers)
        out += self.set
        out += self.add
        return out

    def then(self, later: HeaderEdits) -> HeaderEdits:
        """One edit that does what `self` then `later` do: what `later` sets or removes
        replaces what `self` set or added under that name (so the later `set` wins)."""
        if not later:
            return self
        if not self:
            return later
        gone = later.remove | {n for n, _ in later.set}
        return HeaderEdits(
            add=tuple(f for f in self.add if f[0] not in gone) + later.add,
            set=tuple(f for f in self.set if f[0] not in gone) + later.set,
            remove=self.remove | later.remove,
        )


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\r\n\0]")
FRAMING = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"trailer",
    }
)
"""Fields a route may not edit: the proxy frames messages itself (RFC 9112 §6-7), and an
edited length or connection field would make the head disagree with the bytes that follow."""


def _check_name(name: bytes) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"HeaderEdits: {name!r} is not a lower-case field name")
    if name in FRAMING:
        raise ValueError(
            f"HeaderEdits: {name.decode()!r} frames the message; routes cannot edit it"
        )


NO_EDITS = HeaderEdits()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """One leg of a split. `request_headers` / `response_headers` are the leg's own edits
    (a splitter's `Splits[].RequestHeaders/ResponseHeaders`), applied before the route's, as
    Envoy applies weighted-cluster edits before route-level ones: a route `set` of the same
    name wins."""

    cluster: str
    weight: int = 10_000
    request_headers: HeaderEdits = NO_EDITS
    response_headers: HeaderEdits = NO_EDITS

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"WeightedCluster {self.cluster!r}: weight must not be negative")


def _fraction(percent: float, name: str) -> float:
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"{name} must be between 0 and 100, not {percent}")
    return percent / 100.0


@dataclass(frozen=True, slots=True)
class Fault:
    """Istio's HTTPFaultInjection, as Envoy's fault filter applies it: a request is delayed
    by `delay` seconds with probability `delay_percent` %, and (independently, once the delay
    is over) answered `abort_status` instead of being forwarded with probability
    `abort_percent` %. `abort_status` 0: no abort; `delay` 0: no delay."""

    abort_status: int = 0
    abort_percent: float = 100.0
    delay: float = 0.0
    delay_percent: float = 100.0
    _abort: float = field(init=False, repr=False, compare=False)
    _delay: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.abort_status and not 200 <= self.abort_status <= 599:
            raise ValueError(f"Fault.abort_status {self.abort_status} is not in 200-599")
        if self.delay < 0:
            raise ValueError("Fault.delay must not be negative")
        abort = _fraction(self.abort_percent, "Fault.abort_percent") if self.abort_status else 0
        delay = _fraction(self.delay_percent, "Fault.delay_percent") if self.delay else 0
        object.__setattr__(self, "_abort", abort)
        object.__setattr__(self, "_delay", delay)

    def decide(self, rng: random.Random) -> tuple[float, int]:
        """(seconds to delay the request, status to answer instead of forwarding it or 0)."""
        delay = self.delay if self._delay and rng.random() < self._delay else 0.0
        status = self.abort_status if self._abort and rng.random() < self._abort else 0
        return delay, status


@dataclass(frozen=True, slots=True)
class Mirror:
    """Istio's `mirror` / `mirrorPercentage`, as Envoy's request mirror policy: a copy of
    `percent` % of the requests goes to `cluster` (fire and forget, the answer discarded)."""

    cluster: str
    percent: float = 100.0
    _fraction: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fraction", _fraction(self.percent, "Mirror.percent"))

    def decide(self, rng: random.Random) -> bool:
        share = self._fraction
        return share >= 1.0 or (share > 0.0 and rng.random() < share)


def shadow_head(head: bytes) -> bytes:
    """The serialized request head of a mirrored copy: `-shadow` appended to the Host (before
    its port, if any), as Envoy does for shadowed requests, and `connection: close` (the copy
    gets a connection of its own and nothing else). `head` is a head as the listener
    serialized it: one Host field, no Connection field (hop-by-hop fields are not
    forwarded)."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip()
            bracket = host.rfind(b"]")
            colon = host.rfind(b":")
            if colon > bracket:
                host = host[:colon] + b"-shadow" + host[colon:]
            else:
                host += b"-shadow"
            out.append(name + b": " + host)
        elif not (sep and name.strip().lower() == b"connection"):
            out.append(line)
    out += (b"connection: close", b"", b"")
    return b"\r\n".join(out)


@dataclass(frozen=True, slots=True)
class RouteAction:
    destinations: tuple[WeightedCluster, ...]
    prefix_rewrite: bytes | None = None
    request_headers: HeaderEdits = NO_EDITS
    response_headers: HeaderEdits = NO_EDITS
    retry: RetryPolicy = DEFAULT_RETRY
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT
    try_timeout: float | None = None
    idle_timeout: float | None = None
    """Envoy's route `idle_timeout` (Consul's `IdleTimeout`): seconds the request's stream
    may go without a byte either way, from its head on; then a 408 if no response head has
    come, else the client connection is reset."""
    fault: Fault | None = None
    mirror: Mirror | None = None
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _legs: tuple[tuple[HeaderEdits, HeaderEdits], ...] = field(
        init=False, repr=False, compare=False
    )
    """Per destination: (request, response) edits, the leg's then the route's, compiled."""
    needs_shell: bool = field(init=False, repr=False, compare=False)
    """Timeouts, response header edits, a fault or a mirror: the exchange must carry the
    action along."""

    def __post_init__(self) -> None:
        if not self.destinations:
            raise ValueError("RouteAction: at least one destination")
        acc, cumulative = 0, []
        for d in self.destinations:
            acc += d.weight
            cumulative.append(acc)
        if acc <= 0:
            raise ValueError("RouteAction: destination weights sum to zero")
        for name in ("request_timeout", "try_timeout", "idle_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"RouteAction.{name} must be positive")
        object.__setattr__(self, "_cumulative", tuple(cumulative))
        legs = tuple(
            (
                d.request_headers.then(self.request_headers),
                d.response_headers.then(self.response_headers),
            )
            for d in self.destinations
        )
        object.__setattr__(self, "_legs", legs)
        shell = bool(
            self.request_timeout
            or self.try_timeout
            or self.idle_timeout
            or self.fault
            or self.mirror
            or any(resp for _, resp in legs)
        )
        object.__setattr__(self, "needs_shell", shell)

    @property
    def leg_edits(self) -> bool:
        """Some leg edits headers of its own (the edits then depend on the pick)."""
        return any(d.request_headers or d.response_headers for d in self.destinations)

    def pick_leg(self, rng: random.Random) -> int:
        """The index of the destination, by weight."""
        if len(self.destinations) == 1:
            return 0
        cum = self._cumulative
        return bisect.bisect_right(cum, rng.randrange(cum[-1]))

    def pick(self, rng: random.Random) -> str:
        """The destination cluster, by weight."""
        return self.destinations[self.pick_leg(rng)].cluster

    def edits(self, leg: int) -> tuple[HeaderEdits, HeaderEdits]:
        """(request, response) edits of destination `leg`: its own, then the route's."""
        return self._legs[leg]


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    action: RouteAction

    def __post_init__(self) -> None:
        if self.action.prefix_rewrite is not None and self.match.path_regex is not None:
            raise ValueError("Route: prefix_rewrite needs path_exact or path_prefix, not a regex")


@dataclass(frozen=True, slots=True)
class Selection:
    action: RouteAction
    cluster: str
    path: bytes | None
    """The path to send instead (without the query), or None: the request's, unchanged."""
    request_headers: HeaderEdits = NO_EDITS
    """The request edits to apply: the chosen leg's, then the route's."""
    response_headers: HeaderEdits = NO_EDITS
    """The response edits to apply: the chosen leg's, then the route's."""


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: tuple[Route, ...]
    default: RouteAction
    fixed: Selection | None = field(init=False, repr=False, compare=False)
    """What `select` returns for every request, when that does not depend on the request
    (no routes, one destination, no rewrite, no request header edits): the shell then need
    not split the target nor look at the edits."""

    def __post_init__(self) -> None:
        default = self.default
        fixed = None
        if (
            not self.routes
            and len(default.destinations) == 1
            and default.prefix_rewrite is None
            and not default.edits(0)[0]
        ):
            fixed = Selection(default, default.destinations[0].cluster, None, *default.edits(0))
        object.__setattr__(self, "fixed", fixed)

    def select(
        self, method: bytes, path: bytes, query: bytes, headers: Headers, rng: random.Random
    ) -> Selection:
        """The first route whose match matches, else the default; its cluster by weight."""
        if self.fixed is not None:
            return self.fixed
        for route in self.routes:
            match = route.match
            if match.matches(method, path, query, headers):
                action = route.action
                rewritten = None
                if action.prefix_rewrite is not None:
                    rewritten = _rewrite(action.prefix_rewrite, match, path)
                leg = action.pick_leg(rng)
                return Selection(
                    action, action.destinations[leg].cluster, rewritten, *action.edits(leg)
                )
        action = self.default
        rewritten = None
        if action.prefix_rewrite is not None:
            rewritten = _rewrite(action.prefix_rewrite, _EVERYTHING, path)
        leg = action.pick_leg(rng)
        return Selection(action, action.destinations[leg].cluster, rewritten, *action.edits(leg))


_EVERYTHING = RouteMatch()


def _rewrite(rewrite: bytes, match: RouteMatch, path: bytes) -> bytes:
    if match.path_exact is not None:
        return rewrite
    # Without a path match a route matches the prefix "/" (as Consul's routes do).
    prefix = match.path_prefix if match.path_prefix is not None else b"/"
    return rewrite + path[len(prefix) :] if path.startswith(prefix) else path


def default_table(cluster: str, retry: RetryPolicy = DEFAULT_RETRY) -> RouteTable:
    """One route to `cluster`, the proxy's behaviour before routes existed."""
    return RouteTable((), RouteAction((WeightedCluster(cluster),), retry=retry))
