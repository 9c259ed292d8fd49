"""connect.renewal: the pure renewal schedule (Consul's 60-90 % window, backoff, health)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connect.renewal import (
    Health,
    Policy,
    Validity,
    deadline,
    health,
    renew_at,
    retry_at,
    should_replace,
)

V = Validity(1000.0, 2000.0)


def test_first_attempt_spans_sixty_to_ninety_percent() -> None:
    assert renew_at(V, 0.0) == 1600.0
    assert renew_at(V, 0.5) == 1750.0
    assert renew_at(V, 0.999999) == pytest.approx(1900.0, abs=0.01)


@given(
    start=st.floats(0, 1e9),
    life=st.floats(1, 1e7),
    draw=st.floats(0, 1, exclude_max=True),
    failures=st.integers(1, 60),
    elapsed=st.floats(0, 1),
)
def test_retries_never_skip_past_expiry(
    start: float, life: float, draw: float, failures: int, elapsed: float
) -> None:
    v = Validity(start, start + life)
    assert v.at(0.6) <= renew_at(v, draw) < v.at(0.9) + 1e-6 * life
    now = v.at(0.6 + 0.39 * elapsed)
    nxt = retry_at(v, now, failures, draw)
    assert nxt > now
    # However long the backoff, at least a few more attempts fit before the leaf expires.
    bound = max((v.not_after - now) / 4, 0.05)
    assert nxt - now <= bound + 1e-9 * max(1.0, abs(now))  # float rounding only


def test_backoff_grows_and_is_capped() -> None:
    long = Validity(0, 1e9)
    delays = [retry_at(long, 0, f, 1.0) for f in range(1, 12)]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(delays) == Policy().backoff_cap
    assert retry_at(long, 0, 3, 0.0) == 2.0  # at least half the backoff


def test_health_turns_overdue_before_expiry_and_expired_after() -> None:
    assert health(V, 1500.0) is Health.HEALTHY
    assert deadline(V) == 1950.0
    assert health(V, 1950.0) is Health.RENEWAL_OVERDUE
    assert health(V, 2000.0) is Health.EXPIRED
    short = Validity(0.0, 5.0)
    assert deadline(short) == 4.0  # min_margin wins over 95 % for a 5 s leaf


def test_an_older_leaf_never_replaces_a_newer_one() -> None:
    assert should_replace(None, V)
    assert should_replace(V, Validity(1500, 2500))
    assert not should_replace(V, Validity(500, 1500))


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="soft_min"):
        Policy(soft_min=0.9, soft_max=0.6)
    with pytest.raises(ValueError):
        retry_at(V, 0, 0, 0.5)
