"""connect.cluster without sockets: choose/record, in-flight counts, ejections, the one
"all ejected" rule, and a new endpoint snapshot carrying state over by key."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from connect.balancer import Balancer, BalancerConfig, Policy, Target, compile_balancer
from connect.cluster import Cluster, EjectionPolicy, Limits, Outcome, fixed_endpoints


def targets(n: int) -> list[Target]:
    return [Target(f"n{i}/api", "127.0.0.1", 20000 + i) for i in range(n)]


def cluster(n: int, policy: Policy = Policy.ROUND_ROBIN, **ejection: object) -> Cluster:
    balancer = compile_balancer(targets(n), BalancerConfig(policy=policy))
    return Cluster(fixed_endpoints(balancer), (EjectionPolicy(**ejection),))  # type: ignore[arg-type]


RNG = random.Random(7)


def test_choose_counts_in_flight_until_record() -> None:
    c = cluster(2)
    a = c.choose(0.0, RNG)
    assert a is not None
    assert c.inflight(a.key) == 1
    c.record(a, Outcome.SUCCESS, 0.0)
    assert c.inflight(a.key) == 0
    c.record(a, Outcome.SUCCESS, 0.0)  # a stray second record never goes negative
    assert c.inflight(a.key) == 0


def test_least_request_sees_what_is_in_flight() -> None:
    c = cluster(2, Policy.LEAST_REQUEST)
    first = c.choose(0.0, RNG)
    assert first is not None
    # With one use of `first` open, power of two choices takes it only when both draws are
    # it (a quarter of the time with two endpoints), never when it compares it with the other.
    picks = []
    for _ in range(200):
        t = c.choose(0.0, RNG)
        assert t is not None
        picks.append(t.key)
        c.record(t, Outcome.SUCCESS, 0.0)
    assert picks.count(first.key) < 80


def test_connect_failure_ejects_for_the_policy_time() -> None:
    c = cluster(3, eject_for=10.0)
    bad = Target("n0/api", "127.0.0.1", 20000)
    c.choose(0.0, RNG)
    c.record(bad, Outcome.CONNECT_FAILURE, 100.0)
    assert c.ejected == {"n0/api": 110.0}
    chosen = {c.choose(105.0, RNG).key for _ in range(9)}  # type: ignore[union-attr]
    assert "n0/api" not in chosen
    chosen = {c.choose(110.0, RNG).key for _ in range(9)}  # type: ignore[union-attr]
    assert "n0/api" in chosen and not c.ejected


@pytest.mark.parametrize(
    "outcome", [Outcome.SUCCESS, Outcome.SERVER_ERROR, Outcome.RESET, Outcome.CANCELLED]
)
def test_default_policy_ejects_only_on_connect_failure_and_refusal(outcome: Outcome) -> None:
    c = cluster(2)
    c.learn("n0/api", outcome, 0.0)
    assert not c.ejected
    c.learn("n0/api", Outcome.REFUSED, 0.0)
    assert "n0/api" in c.ejected


def test_consecutive_failures_eject_and_a_success_resets_the_run() -> None:
    c = cluster(2, on=frozenset({Outcome.SERVER_ERROR}), consecutive=3, eject_for=1.0)
    for outcome in (Outcome.SERVER_ERROR, Outcome.SERVER_ERROR, Outcome.SUCCESS):
        c.learn("n1/api", outcome, 0.0)
    c.learn("n1/api", Outcome.SERVER_ERROR, 0.0)
    c.learn("n1/api", Outcome.SERVER_ERROR, 0.0)
    assert not c.ejected
    c.learn("n1/api", Outcome.SERVER_ERROR, 0.0)
    assert c.ejected == {"n1/api": 1.0}


def test_all_ejected_means_ejections_are_ignored() -> None:
    c = cluster(2)
    c.learn("n0/api", Outcome.CONNECT_FAILURE, 0.0)
    c.learn("n1/api", Outcome.CONNECT_FAILURE, 0.0)
    assert c.choose(1.0, RNG) is not None


def test_avoid_is_never_chosen_and_counts_against_all_ejected() -> None:
    c = cluster(3)
    c.learn("n0/api", Outcome.CONNECT_FAILURE, 0.0)
    # n1 avoided, n0 ejected: n2 is the one left.
    picks = {c.choose(1.0, RNG, avoid=("n1/api",)).key for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"n2/api"}
    # n1, n2 avoided, n0 ejected: every endpoint not avoided is ejected, so n0 is tried.
    assert c.choose(1.0, RNG, avoid=("n1/api", "n2/api")).key == "n0/api"  # type: ignore[union-attr]
    assert c.choose(1.0, RNG, avoid=("n0/api", "n1/api", "n2/api")) is None


def test_choose_with_avoid_skips_it() -> None:
    c = cluster(3)
    for _ in range(6):
        t = c.choose(0.0, RNG, avoid=("n1/api",))
        assert t is not None and t.key != "n1/api"


def test_empty_cluster_chooses_nothing() -> None:
    assert cluster(0).choose(0.0, RNG) is None


@dataclass
class Swappable:
    current: Balancer

    def balancer(self) -> Balancer:
        return self.current


def test_new_snapshot_keeps_in_flight_and_ejections_by_key() -> None:
    config = BalancerConfig(policy=Policy.ROUND_ROBIN)
    source = Swappable(compile_balancer(targets(2), config))
    c = Cluster(source)
    held = [c.choose(0.0, RNG) for _ in range(2)]
    c.learn("n1/api", Outcome.CONNECT_FAILURE, 0.0)
    # n0 leaves, n2 joins; n1 stays (with another weight, so a different Target object).
    source.current = compile_balancer(
        [Target("n1/api", "127.0.0.1", 20001, weight=3), Target("n2/api", "127.0.0.1", 20002)],
        config,
    )
    c.balancer()
    assert c.inflight("n1/api") == 1 and c.inflight("n0/api") == 0
    assert "n1/api" in c.ejected
    assert {c.choose(1.0, RNG).key for _ in range(4)} == {"n2/api"}  # type: ignore[union-attr]
    for t in held:
        assert t is not None
        c.record(t, Outcome.SUCCESS, 1.0)  # n0 is gone: ignored
    assert c.inflight("n1/api") == 0


def test_ejection_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        EjectionPolicy(consecutive=0)
    with pytest.raises(ValueError, match="eject_for"):
        EjectionPolicy(eject_for=-1)


def test_passive_health_check_ejects_after_consecutive_5xx_for_growing_times() -> None:
    balancer = compile_balancer(targets(10), BalancerConfig(policy=Policy.ROUND_ROBIN))
    phc = EjectionPolicy.passive_health_check(max_failures=3, base_ejection_time=30.0)
    c = Cluster(fixed_endpoints(balancer), (EjectionPolicy(), phc))
    for _ in range(3):
        c.learn("n0/api", Outcome.SERVER_ERROR, 0.0)
    assert c.ejected == {"n0/api": 30.0}
    # Back after its time; ejected again, for twice as long.
    for _ in range(3):
        c.learn("n0/api", Outcome.SERVER_ERROR, 40.0)
    assert c.ejected == {"n0/api": 100.0}
    # The connection-failure policy still ejects at once, for its own 10 s.
    c.learn("n1/api", Outcome.CONNECT_FAILURE, 40.0)
    assert c.ejected["n1/api"] == 50.0


def test_passive_health_check_defaults_and_max_ejection_percent() -> None:
    phc = EjectionPolicy.passive_health_check()
    assert (phc.consecutive, phc.max_percent, phc.eject_for) == (5, 10, 30.0)
    balancer = compile_balancer(targets(10), BalancerConfig(policy=Policy.ROUND_ROBIN))
    c = Cluster(fixed_endpoints(balancer), (phc,))
    for key in ("n0/api", "n1/api"):
        for _ in range(5):
            c.learn(key, Outcome.SERVER_ERROR, 0.0)
    # 10 % of 10 endpoints: the second would be 20 %, so it stays in.
    assert list(c.ejected) == ["n0/api"]


def test_a_success_after_an_ejection_shortens_the_next_one() -> None:
    balancer = compile_balancer(targets(2), BalancerConfig(policy=Policy.ROUND_ROBIN))
    phc = EjectionPolicy.passive_health_check(max_failures=1, max_ejection_percent=100)
    c = Cluster(fixed_endpoints(balancer), (phc,))
    c.learn("n0/api", Outcome.SERVER_ERROR, 0.0)  # 30 s
    c.learn("n0/api", Outcome.SERVER_ERROR, 31.0)  # 60 s
    assert c.ejected["n0/api"] == 91.0
    c.choose(100.0, RNG)  # expires the ejection
    c.learn("n0/api", Outcome.SUCCESS, 100.0)
    c.learn("n0/api", Outcome.SERVER_ERROR, 101.0)  # back to twice, not three times
    assert c.ejected["n0/api"] == 161.0


def test_a_cluster_with_failover_after_it_chooses_nothing_when_all_are_ejected() -> None:
    c = cluster(2)
    c.learn("n0/api", Outcome.CONNECT_FAILURE, 0.0)
    c.learn("n1/api", Outcome.CONNECT_FAILURE, 0.0)
    assert c.choose(1.0, RNG, panic=False) is None
    assert c.choose(1.0, RNG) is not None  # the last cluster of a chain still tries one
    c.learn("n0/api", Outcome.SUCCESS, 0.0)
    assert c.choose(20.0, RNG, panic=False) is not None  # ejections over


def test_limits_admit_and_count_overflows() -> None:
    balancer = compile_balancer(targets(2), BalancerConfig(policy=Policy.ROUND_ROBIN))
    limits = Limits(max_connections=1, max_pending_requests=1, max_concurrent_requests=2)
    c = Cluster(fixed_endpoints(balancer), limits=limits)
    assert c.limited and not Cluster(fixed_endpoints(balancer)).limited
    a = c.choose(0.0, RNG)
    assert c.admit() is None
    b = c.choose(0.0, RNG)
    assert c.admit() == "max_concurrent_requests"
    assert c.admit(request=False, new_connection=True) is None
    c.connections = 1
    assert c.admit(request=False, new_connection=True) == "max_connections"
    c.pending = 1
    assert c.admit(request=False, dial=True) == "max_pending_requests"
    assert c.overflows == {
        "max_concurrent_requests": 1,
        "max_connections": 1,
        "max_pending_requests": 1,
    }
    for t in (a, b):
        assert t is not None
        c.record(t, Outcome.SUCCESS, 0.0)
    assert c.active == 0 and c.admit() is None
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=-1)
