"""Load-balancer properties: distribution, exclusion, and hash stability under churn."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connect.balancer import (
    BalancerConfig,
    ConfigError,
    Cursor,
    HashPolicy,
    Policy,
    Target,
    compile_balancer,
    hash_key,
    request_hash,
)


def targets(n: int, weight: int = 1, prefix: str = "node") -> list[Target]:
    return [Target(f"{prefix}{i}/svc", "127.0.0.1", 20000 + i, weight) for i in range(n)]


ALL_POLICIES = list(Policy)


@given(n=st.integers(1, 12), policy=st.sampled_from(ALL_POLICIES), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_pick_is_in_range_and_respects_exclude(n: int, policy: Policy, seed: int) -> None:
    bal = compile_balancer(targets(n), BalancerConfig(policy=policy, maglev_table_size=251))
    rng = random.Random(seed)
    cursor = Cursor.for_balancer(bal)
    excluded = set(rng.sample(range(n), rng.randrange(n)))
    for k in range(50):
        idx = bal.pick(cursor, rng, request_hash=hash_key(str(k)), exclude=excluded)
        assert idx is not None
        assert 0 <= idx < n
        assert idx not in excluded
    assert bal.pick(cursor, rng, request_hash=1, exclude=set(range(n))) is None


def test_empty_set_picks_nothing() -> None:
    bal = compile_balancer([], BalancerConfig())
    assert bal.pick(Cursor.for_balancer(bal), random.Random(0)) is None


@given(weights=st.lists(st.integers(1, 9), min_size=1, max_size=8))
def test_round_robin_cycle_matches_weights_exactly(weights: list[int]) -> None:
    ts = [Target(f"n{i}", "h", 1, w) for i, w in enumerate(weights)]
    bal = compile_balancer(ts, BalancerConfig(policy=Policy.ROUND_ROBIN))
    cursor = Cursor.for_balancer(bal)
    cycle = len(bal.schedule)
    counts = Counter(bal.pick(cursor, random.Random(0)) for _ in range(cycle * 3))
    scale = cycle // sum(bal.weights)
    for i, w in enumerate(bal.weights):
        assert counts[i] == 3 * w * scale


def test_round_robin_is_smooth() -> None:
    # 5:1:1 must not send five in a row to the heavy endpoint.
    ts = [Target("a", "h", 1, 5), Target("b", "h", 1, 1), Target("c", "h", 1, 1)]
    bal = compile_balancer(ts, BalancerConfig(policy=Policy.ROUND_ROBIN))
    assert bal.schedule == (0, 0, 1, 0, 2, 0, 0)


@pytest.mark.parametrize("policy", [Policy.RANDOM, Policy.LEAST_REQUEST])
@given(seed=st.integers(0, 2**32))
@settings(max_examples=10, deadline=None)
def test_random_policies_spread_evenly(policy: Policy, seed: int) -> None:
    bal = compile_balancer(targets(4), BalancerConfig(policy=policy))
    cursor = Cursor.for_balancer(bal)
    rng = random.Random(seed)
    counts = Counter(bal.pick(cursor, rng) for _ in range(8000))
    # 2000 expected each; 5 sigma of a binomial(8000, 1/4) is about 194.
    assert all(abs(counts[i] - 2000) < 250 for i in range(4)), counts


def test_random_honours_weights() -> None:
    ts = [Target("a", "h", 1, 3), Target("b", "h", 1, 1)]
    bal = compile_balancer(ts, BalancerConfig(policy=Policy.RANDOM))
    rng = random.Random(7)
    counts = Counter(bal.pick(Cursor.for_balancer(bal), rng) for _ in range(8000))
    assert abs(counts[0] - 6000) < 250


def test_least_request_prefers_the_idle_endpoint() -> None:
    bal = compile_balancer(targets(2), BalancerConfig(policy=Policy.LEAST_REQUEST))
    cursor = Cursor([10, 0])
    rng = random.Random(3)
    picks = Counter(bal.pick(cursor, rng) for _ in range(1000))
    # Both candidates are drawn from two; only a draw of (0, 0) can yield the busy one.
    assert picks[1] > 700
    cursor = Cursor([0, 0, 0, 50])
    bal4 = compile_balancer(targets(4), BalancerConfig(policy=Policy.LEAST_REQUEST))
    picks = Counter(bal4.pick(cursor, rng) for _ in range(4000))
    assert picks[3] < 4000 / 16 + 150  # chosen only when both draws hit it


@pytest.mark.parametrize("policy", [Policy.RING_HASH, Policy.MAGLEV])
@given(n=st.integers(1, 10), keys=st.lists(st.text(max_size=12), min_size=1, max_size=30))
@settings(max_examples=40, deadline=None)
def test_hash_policies_are_deterministic(policy: Policy, n: int, keys: list[str]) -> None:
    config = BalancerConfig(policy=policy, maglev_table_size=251)
    a = compile_balancer(targets(n), config)
    # Same set, different order: same compiled balancer, same answers.
    b = compile_balancer(list(reversed(targets(n))), config)
    ca, cb = Cursor.for_balancer(a), Cursor.for_balancer(b)
    for k in keys:
        h = hash_key(k)
        assert a.pick(ca, random.Random(1), h) == b.pick(cb, random.Random(2), h)


def _owners(policy: Policy, ts: list[Target], keys: range) -> dict[int, str]:
    bal = compile_balancer(ts, BalancerConfig(policy=policy, maglev_table_size=4099))
    cursor = Cursor.for_balancer(bal)
    out = {}
    for k in keys:
        idx = bal.pick(cursor, random.Random(0), hash_key(f"user-{k}"))
        assert idx is not None
        out[k] = bal.targets[idx].key
    return out


@pytest.mark.parametrize(("policy", "slack"), [(Policy.RING_HASH, 2.0), (Policy.MAGLEV, 2.5)])
@given(n=st.integers(2, 12))
@settings(max_examples=12, deadline=None)
def test_adding_one_endpoint_moves_about_one_nth(policy: Policy, slack: float, n: int) -> None:
    keys = range(3000)
    before = _owners(policy, targets(n), keys)
    after = _owners(policy, targets(n + 1), keys)
    moved = [k for k in keys if before[k] != after[k]]
    new_key = targets(n + 1)[n].key
    # Keys only move to the new endpoint (consistency), and about 1/(n+1) of them do.
    if policy is Policy.RING_HASH:
        assert all(after[k] == new_key for k in moved)
    else:
        # Maglev trades perfect consistency for balance; most movers still go to the new one.
        assert sum(after[k] == new_key for k in moved) >= 0.8 * len(moved)
    assert len(moved) <= slack * len(keys) / (n + 1)
    assert len(moved) >= 0.3 * len(keys) / (n + 1)


@pytest.mark.parametrize("policy", [Policy.RING_HASH, Policy.MAGLEV])
def test_hash_policies_spread_keys(policy: Policy) -> None:
    owners = _owners(policy, targets(5), range(10000))
    counts = Counter(owners.values())
    assert all(1300 < c < 2700 for c in counts.values()), counts


def test_ring_hash_failover_walks_to_the_next_endpoint_and_stays_there() -> None:
    bal = compile_balancer(targets(5), BalancerConfig(policy=Policy.RING_HASH))
    cursor = Cursor.for_balancer(bal)
    h = hash_key("session-42")
    first = bal.pick(cursor, random.Random(0), h)
    assert first is not None
    second = bal.pick(cursor, random.Random(0), h, exclude={first})
    assert second is not None and second != first
    assert bal.pick(cursor, random.Random(9), h, exclude={first}) == second


def test_hash_without_value_falls_back_to_random() -> None:
    bal = compile_balancer(targets(3), BalancerConfig(policy=Policy.MAGLEV))
    picks = {bal.pick(Cursor.for_balancer(bal), random.Random(s)) for s in range(50)}
    assert picks == {0, 1, 2}


def test_request_hash_reads_headers_and_cookies() -> None:
    header = HashPolicy(field="header", field_value="X-User")
    cookie = HashPolicy(field="cookie", field_value="sid")
    assert request_hash([header], {"x-user": "alice"}) == hash_key("alice")
    assert request_hash([cookie], {"cookie": "a=1; sid=xyz; b=2"}) == hash_key("xyz")
    assert request_hash([header, cookie], {}) is None
    # A terminal policy that found a value stops the walk.
    terminal = HashPolicy(field="header", field_value="x-user", terminal=True)
    both = request_hash([terminal, cookie], {"x-user": "alice", "cookie": "sid=1"})
    assert both == hash_key("alice")
    assert request_hash([header, cookie], {"x-user": "alice", "cookie": "sid=1"}) != both
    src = HashPolicy(source_ip=True)
    assert request_hash([src], {}, source_ip="10.0.0.1") == hash_key("10.0.0.1")
    query = HashPolicy(field="query_parameter", field_value="u")
    params = {"u": "bob"}
    assert request_hash([query], {}, query=params.get) == hash_key("bob")
    assert request_hash([query], {}) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"choice_count": 1}, "ChoiceCount"),
        ({"minimum_ring_size": 0}, "MinimumRingSize"),
        ({"maglev_table_size": 100}, "prime"),
        (
            {"hash_policies": (HashPolicy(field="query"),)},
            "allowed values are header, cookie, query_parameter",
        ),
        ({"hash_policies": (HashPolicy(field="header"),)}, "FieldValue"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BalancerConfig(**kwargs)  # type: ignore[arg-type]


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        compile_balancer([Target("a", "h", 1), Target("a", "h", 2)], BalancerConfig())
