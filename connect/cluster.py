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
503. Endpoints in `avoid` are never chosen: a caller that would rather reuse one (the only
endpoint of a service) asks again without it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from connect.balancer import Balancer, Cursor, Target

__all__ = ["Cluster", "EjectionPolicy", "EndpointSource", "Outcome", "fixed_endpoints"]


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
    """When an endpoint is skipped, and for how long.

    `consecutive` outcomes from `on` in a row (a SUCCESS resets the run) eject the endpoint
    for `eject_for` seconds. The default is what the proxy has always done: one failed
    connect or one refusal by the peer's sidecar skips the endpoint for 10 s.
    """

    eject_for: float = 10.0
    on: frozenset[Outcome] = frozenset({Outcome.CONNECT_FAILURE, Outcome.REFUSED})
    consecutive: int = 1

    def __post_init__(self) -> None:
        if self.eject_for < 0:
            raise ValueError("EjectionPolicy.eject_for must not be negative")
        if self.consecutive < 1:
            raise ValueError("EjectionPolicy.consecutive must be at least 1")


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

    __slots__ = ("_balancer", "_cursor", "_failures", "_index", "ejected", "endpoints", "policy")

    def __init__(self, endpoints: EndpointSource, policy: EjectionPolicy | None = None) -> None:
        self.endpoints = endpoints
        self.policy = policy or EjectionPolicy()
        self.ejected: dict[str, float] = {}
        """Endpoint key -> the time its ejection ends."""
        self._failures: dict[str, int] = {}
        """Endpoint key -> outcomes from `policy.on` in a row (only while not zero)."""
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
    ) -> Target | None:
        """The endpoint to use next (counted in flight until `record`), or None when there
        is none outside `avoid`."""
        balancer = self.endpoints.balancer()
        if balancer is not self._balancer:
            self._swap(balancer)
        targets = balancer.targets
        exclude: Collection[int] = _NOTHING
        if self.ejected or avoid:
            avoided = {i for i, t in enumerate(targets) if t.key in avoid} if avoid else _NOTHING
            ejected = self._ejected_indexes(targets, now)
            if ejected and len(ejected | avoided) < len(targets):
                exclude = ejected | avoided
            else:
                exclude = avoided
        idx = balancer.pick(self._cursor, rng, request_hash, exclude)
        if idx is None:
            return None
        self._cursor.inflight[idx] += 1
        return targets[idx]

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
        if outcome is not Outcome.SUCCESS or self._failures:
            self.learn(target.key, outcome, now)

    def learn(self, key: str, outcome: Outcome, now: float) -> None:
        """Apply the ejection policy to an outcome of endpoint `key` (no in-flight change)."""
        policy = self.policy
        if outcome in policy.on:
            run = self._failures.get(key, 0) + 1
            if run >= policy.consecutive:
                self._failures.pop(key, None)
                self.ejected[key] = now + policy.eject_for
            else:
                self._failures[key] = run
        elif outcome is Outcome.SUCCESS and self._failures:
            self._failures.pop(key, None)
