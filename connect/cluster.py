"""One cluster per upstream target: its endpoints, its balancer and what the proxy has learnt
about them, in one place. Pure: the clock reading and the RNG are passed in.

A `Cluster` reads the current compiled `Balancer` (immutable, swapped whole by the control
plane through an `EndpointSource`) and keeps the mutable state beside it: the balancer's
`Cursor` (round-robin turn, in-flight count per endpoint) and the ejections, by endpoint key so
they survive a new snapshot of the same endpoints.

The contract with its users (the L4 dialer, the HTTP origin) is one loop:

    target = cluster.choose(now, rng, request_hash, avoid)   # None: nothing to try
    ... dial, send ...
    cluster.record(target, outcome, now)                     # exactly once per choose

`choose` counts the endpoint in flight, `record` ends that and applies the `EjectionPolicy`
to the outcome. An outcome reported for an endpoint that has left the set is ignored.

"All ejected" rule (one, for L4 and HTTP): ejected endpoints are skipped unless every endpoint
not in `avoid` is ejected; then the ejections are ignored, since trying one beats a certain
503 (`panic`), except in a cluster that has failover clusters after it: that one then
chooses nothing and the caller goes on to the next (connect.dial.dial_failover).
Endpoints in `avoid` are never chosen: a caller that would rather reuse one (the only
endpoint of a service) asks again without it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from connect.balancer import Balancer, Cursor, Target

__all__ = [
    "WAIT",
    "Cluster",
    "EjectionPolicy",
    "EndpointSource",
    "Outcome",
    "fixed_endpoints",
]


class Outcome(enum.Enum):
    """How one use of an endpoint ended, as far as the endpoint's health goes."""

    SUCCESS = "success"
    """An answer that says nothing against the endpoint (any status but a 5xx), or a relayed
    connection that ended."""
    CONNECT_FAILURE = "connect_failure"
    """Refused, reset or timed out before the mTLS session and identity check completed."""
    REFUSED = "refused"
    """The endpoint's sidecar answered that the request never reached its app
    (x-meshlet-retriable)."""
    SERVER_ERROR = "5xx"
    RESET = "reset"
    """The connection closed before a whole answer came."""
    TIMEOUT = "timeout"
    """No (whole) answer within the request's or the try's time."""
    CANCELLED = "cancelled"
    """The client went away first: nothing learnt about the endpoint."""


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """When an endpoint is skipped, and for how long. A cluster applies one or more.

    `consecutive` outcomes from `on` in a row (a SUCCESS resets the run) eject the endpoint
    for `eject_for` seconds; with `growing`, for `eject_for` times the number of times this
    policy has ejected it (at most `max_eject_for`; a success after an ejection has ended
    takes one off that count), as Envoy's outlier detection does. An ejection that would
    leave more than `max_percent` % of the endpoints ejected (by this cluster's policies)
    does not happen, except that one endpoint may always be ejected.

    The default is what the proxy has always done: one failed connect or one refusal by the
    peer's sidecar skips the endpoint for 10 s. `EjectionPolicy.passive_health_check` is the
    one for Consul's `PassiveHealthCheck`.
    """

    eject_for: float = 10.0
    on: frozenset[Outcome] = frozenset({Outcome.CONNECT_FAILURE, Outcome.REFUSED})
    consecutive: int = 1
    growing: bool = False
    max_eject_for: float = 300.0
    max_percent: int = 100

    def __post_init__(self) -> None:
        if self.eject_for < 0:
            raise ValueError("EjectionPolicy.eject_for must not be negative")
        if self.consecutive < 1:
            raise ValueError("EjectionPolicy.consecutive must be at least 1")
        if not 0 <= self.max_percent <= 100:
            raise ValueError("EjectionPolicy.max_percent must be between 0 and 100")

    @classmethod
    def passive_health_check(
        cls,
        *,
        max_failures: int = 0,
        max_ejection_percent: int = 0,
        base_ejection_time: float = 30.0,
    ) -> EjectionPolicy:
        """Consul's `UpstreamConfig.PassiveHealthCheck` as Envoy applies it: `MaxFailures`
        consecutive 5xx (a reset or timeout counts as one, as Envoy counts locally originated
        errors) eject for `BaseEjectionTime` times the ejections so far, at most
        `MaxEjectionPercent` % of the endpoints at once. Zero means Envoy's default (5 and
        10 %). `Interval` needs no field here (an ejection ends by its time, checked when
        endpoints are chosen); `EnforcingConsecutive5xx` is always 100 %."""
        return cls(
            eject_for=base_ejection_time,
            on=frozenset({Outcome.SERVER_ERROR, Outcome.RESET, Outcome.TIMEOUT}),
            consecutive=max_failures or 5,
            growing=True,
            max_percent=max_ejection_percent or 10,
        )


DEFAULT_EJECTION = EjectionPolicy()


@dataclass(frozen=True, slots=True)
class Limits:
    """Circuit breaking, Consul's `UpstreamConfig.Limits`; 0 means no limit (as in Consul's
    entries, where 0 leaves Envoy's defaults, which meshlet does not impose).

    * `max_concurrent_requests`: uses in flight (HTTP requests; L4 connections);
    * `max_pending_requests`: HTTP requests waiting for a connection to be dialed;
    * `max_connections`: connections open to the cluster (HTTP: pooled and busy; L4: relays).

    A request or connection over a limit is refused at once (HTTP: a 503) and counted in
    `Cluster.overflows` by the limit's name, except that an HTTP request that finds
    `max_connections` reached waits for a connection as a pending request, as Envoy's does
    (`Cluster.admit_dial`), up to `max_pending_requests` (0: Envoy's default, 1024).
    """

    max_connections: int = 0
    max_pending_requests: int = 0
    max_concurrent_requests: int = 0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_requests", "max_concurrent_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"Limits.{name} must not be negative")

    def __bool__(self) -> bool:
        return bool(
            self.max_connections or self.max_pending_requests or self.max_concurrent_requests
        )


NO_LIMITS = Limits()

DEFAULT_MAX_PENDING = 1024
"""Envoy's default `max_pending_requests`: the bound on requests waiting for a connection
when `max_connections` is set and `max_pending_requests` is not."""

WAIT = "wait"
"""`Cluster.admit_dial`: wait for a connection to free up (a pending request)."""


class EndpointSource(Protocol):
    """The current compiled Balancer of a target; the agent swaps it whole on change."""

    def balancer(self) -> Balancer: ...


@dataclass(frozen=True, slots=True)
class _Fixed:
    current: Balancer

    def balancer(self) -> Balancer:
        return self.current


def fixed_endpoints(balancer: Balancer) -> EndpointSource:
    """An EndpointSource that never changes (tests, static upstreams)."""
    return _Fixed(balancer)


_NOTHING: frozenset[int] = frozenset()


class Cluster:
    """One target's endpoints (from `endpoints`) and its balancing and ejection state."""

    __slots__ = (
        "_balancer",
        "_cursor",
        "_failures",
        "_index",
        "_times",
        "active",
        "connections",
        "ejected",
        "ejections",
        "endpoints",
        "limited",
        "limits",
        "overflows",
        "pending",
        "policies",
    )

    def __init__(
        self,
        endpoints: EndpointSource,
        policies: tuple[EjectionPolicy, ...] = (DEFAULT_EJECTION,),
        limits: Limits = NO_LIMITS,
    ) -> None:
        self.endpoints = endpoints
        self.policies = policies
        self.limits = limits
        self.limited = bool(limits)
        """Whether `admit` needs asking (a per-request attribute read when it does not)."""
        self.active = 0
        """Uses chosen and not yet recorded, all endpoints together."""
        self.pending = 0
        """HTTP requests waiting for a dial (kept by the origin)."""
        self.connections = 0
        """Connections open to the cluster (kept by the L4 listener and the HTTP origin)."""
        self.overflows: dict[str, int] = {}
        """Refusals by circuit-breaking limit name."""
        self.ejected: dict[str, float] = {}
        """Endpoint key -> the time its ejection ends."""
        self.ejections = 0
        """Ejections since start (for the metrics)."""
        self._failures: dict[tuple[int, str], int] = {}
        """(policy index, endpoint key) -> outcomes from its `on` in a row (while not zero)."""
        self._times: dict[tuple[int, str], int] = {}
        """(policy index, endpoint key) -> ejections so far, for `growing` policies."""
        self._balancer: Balancer | None = None
        self._cursor = Cursor([])
        self._index: dict[str, int] = {}

    def balancer(self) -> Balancer:
        """The current balancer; a new one gets a cursor that keeps in-flight counts by key."""
        balancer = self.endpoints.balancer()
        if balancer is not self._balancer:
            self._swap(balancer)
        return balancer

    def _swap(self, balancer: Balancer) -> None:
        old_index, old = self._index, self._cursor.inflight
        cursor = Cursor.for_balancer(balancer)
        index = {t.key: i for i, t in enumerate(balancer.targets)}
        for key, i in index.items():
            j = old_index.get(key)
            if j is not None:
                cursor.inflight[i] = old[j]
        self._balancer, self._cursor, self._index = balancer, cursor, index

    def inflight(self, key: str) -> int:
        """Uses of the endpoint `key` chosen and not yet recorded."""
        i = self._index.get(key)
        return 0 if i is None else self._cursor.inflight[i]

    def choose(
        self,
        now: float,
        rng: random.Random,
        request_hash: int | None = None,
        avoid: Collection[str] = (),
        *,
        panic: bool = True,
    ) -> Target | None:
        """The endpoint to use next (counted in flight until `record`), or None when there
        is none outside `avoid`. With `panic` False (a cluster that has failover clusters
        after it) the "all ejected" rule does not apply: None when every endpoint not
        avoided is ejected, so that the caller fails over."""
        balancer = self.endpoints.balancer()
        if balancer is not self._balancer:
            self._swap(balancer)
        targets = balancer.targets
        exclude: Collection[int] = _NOTHING
        if self.ejected or avoid:
            avoided = {i for i, t in enumerate(targets) if t.key in avoid} if avoid else _NOTHING
            ejected = self._ejected_indexes(targets, now)
            if ejected and (not panic or len(ejected | avoided) < len(targets)):
                exclude = ejected | avoided
            else:
                exclude = avoided
        idx = balancer.pick(self._cursor, rng, request_hash, exclude)
        if idx is None:
            return None
        self._cursor.inflight[idx] += 1
        self.active += 1
        return targets[idx]

    def admit(
        self, *, request: bool = True, new_connection: bool = False, dial: bool = False
    ) -> str | None:
        """None when what is asked fits the `limits`, else the name of the limit it would
        exceed (counted in `overflows`). `request`: one more use (asked before `choose`);
        `new_connection`: it opens a connection (L4, or an HTTP request that found no pooled
        one); `dial`: it would wait for that dial (HTTP)."""
        limits = self.limits
        over = ""
        if (
            request
            and limits.max_concurrent_requests
            and self.active >= limits.max_concurrent_requests
        ):
            over = "max_concurrent_requests"
        elif (
            new_connection
            and limits.max_connections
            and (self.connections >= limits.max_connections)
        ):
            over = "max_connections"
        elif dial and limits.max_pending_requests and self.pending >= limits.max_pending_requests:
            over = "max_pending_requests"
        if not over:
            return None
        self.overflows[over] = self.overflows.get(over, 0) + 1
        return over

    def admit_dial(self) -> str | None:
        """For an HTTP request that found no idle connection: None when it may dial one,
        `WAIT` when `max_connections` are open and it may wait for one of them as a pending
        request, else the name of the limit it exceeds (counted in `overflows`). Pending
        requests (waiting for a dial or for a connection: `pending`) are bounded by
        `max_pending_requests`."""
        limits = self.limits
        full = bool(limits.max_connections) and self.connections >= limits.max_connections
        cap = limits.max_pending_requests or (DEFAULT_MAX_PENDING if full else 0)
        if cap and self.pending >= cap:
            over = "max_pending_requests"
            self.overflows[over] = self.overflows.get(over, 0) + 1
            return over
        return WAIT if full else None

    def claim(self, target: Target) -> None:
        """Count a use of `target` in flight without choosing it (a pending request handed
        a connection to it that another request released): `record` ends it as usual."""
        self.balancer()  # (the current one's cursor, as `choose` would use)
        i = self._index.get(target.key)
        if i is not None:
            self._cursor.inflight[i] += 1
        self.active += 1

    def _ejected_indexes(self, targets: tuple[Target, ...], now: float) -> set[int]:
        ejected = self.ejected
        if not ejected:
            return set()
        out: set[int] = set()
        for i, t in enumerate(targets):
            until = ejected.get(t.key)
            if until is not None:
                if until > now:
                    out.add(i)
                else:
                    del ejected[t.key]
        return out

    def record(self, target: Target, outcome: Outcome, now: float) -> None:
        """End one use of `target` (from `choose`) and learn from how it went. (Against the
        balancer last seen: a newer one takes the counts over by key when first used.)"""
        i = self._index.get(target.key)
        if i is not None and self._cursor.inflight[i] > 0:
            self._cursor.inflight[i] -= 1
        if self.active > 0:
            self.active -= 1
        if outcome is not Outcome.SUCCESS or self._failures or self._times:
            self.learn(target.key, outcome, now)

    def learn(self, key: str, outcome: Outcome, now: float) -> None:
        """Apply the ejection policies to an outcome of endpoint `key` (no in-flight change)."""
        for i, policy in enumerate(self.policies):
            run_key = (i, key)
            if outcome in policy.on:
                run = self._failures.get(run_key, 0) + 1
                if run < policy.consecutive:
                    self._failures[run_key] = run
                    continue
                self._failures.pop(run_key, None)
                if self._may_eject(key, policy, now):
                    self._eject(run_key, policy, now)
            elif outcome is Outcome.SUCCESS:
                self._failures.pop(run_key, None)
                times = self._times.get(run_key)
                if times is not None and key not in self.ejected:
                    if times > 1:
                        self._times[run_key] = times - 1
                    else:
                        del self._times[run_key]

    def _may_eject(self, key: str, policy: EjectionPolicy, now: float) -> bool:
        if policy.max_percent >= 100 or key in self.ejected:
            return True
        live = sum(1 for until in self.ejected.values() if until > now)
        total = len(self.balancer().targets)
        return live == 0 or (live + 1) * 100 <= policy.max_percent * total

    def _eject(self, run_key: tuple[int, str], policy: EjectionPolicy, now: float) -> None:
        duration = policy.eject_for
        if policy.growing:
            times = self._times.get(run_key, 0) + 1
            self._times[run_key] = times
            duration = min(policy.eject_for * times, max(policy.max_eject_for, policy.eject_for))
        key = run_key[1]
        self.ejected[key] = max(self.ejected.get(key, 0.0), now + duration)
        self.ejections += 1
