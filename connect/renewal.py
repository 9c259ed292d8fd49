"""When to renew a leaf certificate, pure: every function takes `now` and a random draw.

Consul's schedule (consul:agent/leafcert): the first attempt falls
uniformly in 60-90 % of the certificate's lifetime, which spreads a fleet's renewals. After a
failure, retry with capped exponential backoff and jitter, but never wait so long that the
current leaf could expire between two attempts. The current leaf is never given up while it is
valid; the holder reports unhealthy once it is past the hard deadline (95 % of its lifetime, or
`min_margin` before expiry if that is earlier) and still has no successor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SOFT_MIN = 0.6
SOFT_MAX = 0.9
HARD = 0.95


@dataclass(frozen=True, slots=True)
class Validity:
    """A certificate's validity window, in seconds since the epoch."""

    not_before: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return max(0.0, self.not_after - self.not_before)

    def at(self, fraction: float) -> float:
        return self.not_before + fraction * self.lifetime


@dataclass(frozen=True, slots=True)
class Policy:
    soft_min: float = SOFT_MIN
    soft_max: float = SOFT_MAX
    hard: float = HARD
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    # However short the leaf, report trouble at least this long before it expires.
    min_margin: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.soft_min <= self.soft_max < self.hard < 1:
            raise ValueError("renewal policy needs 0 < soft_min <= soft_max < hard < 1")
        if self.backoff_base <= 0 or self.backoff_cap < self.backoff_base:
            raise ValueError("renewal policy needs 0 < backoff_base <= backoff_cap")


DEFAULT_POLICY = Policy()


class Health(enum.Enum):
    HEALTHY = "healthy"
    # Past the hard deadline without a successor: still serving, but about to stop working.
    RENEWAL_OVERDUE = "renewal overdue"
    EXPIRED = "expired"


def renew_at(validity: Validity, draw: float, policy: Policy = DEFAULT_POLICY) -> float:
    """The first renewal attempt for a leaf, given a uniform `draw` in [0, 1)."""
    fraction = policy.soft_min + (policy.soft_max - policy.soft_min) * draw
    return validity.at(fraction)


def deadline(validity: Validity, policy: Policy = DEFAULT_POLICY) -> float:
    return min(validity.at(policy.hard), validity.not_after - policy.min_margin)


def retry_at(
    validity: Validity, now: float, failures: int, draw: float, policy: Policy = DEFAULT_POLICY
) -> float:
    """The next attempt after `failures` consecutive failures (failures >= 1)."""
    if failures < 1:
        raise ValueError("retry_at is for after a failure")
    backoff = min(policy.backoff_cap, policy.backoff_base * 2.0 ** (failures - 1))
    # "Equal jitter": at least half the backoff, so retries stay spread but never bunch at 0.
    delay = backoff / 2 + backoff / 2 * draw
    remaining = validity.not_after - now
    if remaining > 0:
        # Several more tries must fit before expiry, however long the backoff has grown.
        delay = min(delay, max(remaining / 4, 0.05))
    return now + delay


def health(validity: Validity, now: float, policy: Policy = DEFAULT_POLICY) -> Health:
    if now >= validity.not_after:
        return Health.EXPIRED
    if now >= deadline(validity, policy):
        return Health.RENEWAL_OVERDUE
    return Health.HEALTHY


def should_replace(current: Validity | None, candidate: Validity) -> bool:
    """A fetched leaf replaces the current one only if it is at least as fresh: a source that
    answers with an older certificate (a stale cache) must not roll us back."""
    return current is None or candidate.not_after >= current.not_after
