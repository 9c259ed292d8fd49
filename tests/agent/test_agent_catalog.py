"""Pure cores of the agent: endpoint snapshots, their diff, the retry schedule, drift."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.catalog import SnapshotRejected, WatchKey, build_snapshot, diff
from agent.config import parse
from agent.consul_results import AgentService, HealthCheck, ServiceEntry
from agent.registration import alias_check_id, app_check_id, desired, drift, ready_check_id
from agent.watch import backoff_delay

KEY = WatchKey("api")


def entry(
    sid: str,
    port: int = 21000,
    *,
    node: str = "n1",
    address: str = "10.0.0.1",
    dest: str = "api",
    kind: str = "connect-proxy",
    status: str = "passing",
) -> ServiceEntry:
    raw: dict[str, Any] = {
        "Node": {"Node": node, "Address": address, "Datacenter": "dc1"},
        "Service": {
            "ID": sid,
            "Service": f"{dest}-sidecar-proxy",
            "Kind": kind,
            "Port": port,
            "Address": "",
            "Proxy": {"DestinationServiceName": dest},
        },
        "Checks": [{"CheckID": "c", "Status": status}],
    }
    return ServiceEntry.from_json(raw)


def test_snapshot_is_sorted_and_carries_index_and_time() -> None:
    snap = build_snapshot(KEY, [entry("b", node="n2"), entry("a")], 7, now=100.0)
    assert [e.key for e in snap.endpoints] == [("n1", "a"), ("n2", "b")]
    assert snap.index == 7 and snap.updated_at == 100.0
    assert snap.endpoints[0].target == "10.0.0.1:21000"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (entry("x", dest="db"), "n1/x: a proxy for 'db', not for 'api'"),
        (entry("x", kind=""), "neither a connect-proxy for 'api' nor a Connect-native"),
        (entry("x", port=0), "n1/x: port 0 is not dialable"),
        (entry("x", address=""), "address '' is not dialable"),
        (entry("x", status="critical"), "n1/x: critical in an answer to ?passing"),
        (entry("a"), "n1/a: listed twice"),
    ],
)
def test_one_bad_entry_rejects_the_whole_answer(bad: ServiceEntry, message: str) -> None:
    with pytest.raises(SnapshotRejected, match=message.replace("?", r"\?")):
        build_snapshot(KEY, [entry("a"), bad], 3, now=0.0)


def test_diff_names_added_removed_and_changed() -> None:
    old = build_snapshot(KEY, [entry("a"), entry("b"), entry("c")], 1, now=0.0)
    new = build_snapshot(KEY, [entry("a"), entry("b", port=21001), entry("d")], 2, now=1.0)
    d = diff(old, new)
    assert [e.service_id for e in d.added] == ["d"]
    assert [e.service_id for e in d.removed] == ["c"]
    assert [(o.port, n.port) for o, n in d.changed] == [(21000, 21001)]
    assert d.describe() == (
        "+1 10.0.0.1:21000; -1 10.0.0.1:21000; ~1 10.0.0.1:21000->10.0.0.1:21001"
    )
    assert not diff(
        new,
        build_snapshot(
            KEY, list(reversed([entry("a"), entry("b", port=21001), entry("d")])), 3, now=2.0
        ),
    )
    assert diff(None, new).added == new.endpoints


ids = st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8)


@given(ids, ids)
def test_diff_applied_to_old_gives_new(before: list[str], after: list[str]) -> None:
    old = build_snapshot(KEY, [entry(s) for s in before], 1, now=0.0)
    new = build_snapshot(KEY, [entry(s) for s in after], 2, now=0.0)
    d = diff(old, new)
    result = {e.key for e in old.endpoints} - {e.key for e in d.removed} | {e.key for e in d.added}
    assert result == {e.key for e in new.endpoints}
    assert bool(d) == (set(before) != set(after))


@given(st.integers(1, 200), st.integers(0, 2**32))
def test_backoff_is_capped_jittered_and_never_zero(failures: int, seed: int) -> None:
    delay = backoff_delay(failures, random.Random(seed), 0.2, 5.0)
    ceiling = min(5.0, 0.2 * 2 ** (failures - 1))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_grows_exponentially() -> None:
    rng = random.Random(1)
    ceilings = [max(backoff_delay(n, rng, 0.1, 100.0) for _ in range(50)) for n in (1, 2, 3, 4)]
    assert all(b > a for a, b in itertools.pairwise(ceilings))
    assert backoff_delay(0, rng, 0.1, 1.0) == 0.0


CFG = parse(
    {
        "service": {"name": "web", "port": 8080, "check": {"ttl": "30s"}, "tags": ["v1"]},
        "sidecar": {"port": 21000, "upstreams": [{"name": "api", "local_bind_port": 9191}]},
    },
    {},
)


def _as_agent(cfg_body: dict[str, Any]) -> AgentService:
    return AgentService.from_json(cfg_body)


def _consul_view() -> tuple[dict[str, AgentService], dict[str, HealthCheck]]:
    """What a Consul agent reports after `desired(CFG)` was registered."""
    services = {
        "web": _as_agent(
            {"ID": "web", "Service": "web", "Port": 8080, "Tags": ["v1"], "Address": ""}
        ),
        "web-sidecar-proxy": _as_agent(
            {
                "ID": "web-sidecar-proxy",
                "Service": "web-sidecar-proxy",
                "Kind": "connect-proxy",
                "Port": 21000,
                "Address": "",
                "Proxy": {
                    "DestinationServiceName": "web",
                    "LocalServicePort": 8080,
                    "Config": {"protocol": "tcp"},
                    "Upstreams": [
                        {
                            "DestinationName": "api",
                            "LocalBindAddress": "127.0.0.1",
                            "LocalBindPort": 9191,
                        }
                    ],
                },
            }
        ),
    }
    checks = {
        c: HealthCheck.from_json({"CheckID": c, "Status": "passing"})
        for c in (app_check_id("web"), ready_check_id("web"), alias_check_id("web"))
    }
    return services, checks


def test_no_drift_when_consul_holds_the_desired_registration() -> None:
    services, checks = _consul_view()
    assert drift(CFG, services, checks) == ()


def test_drift_names_each_difference() -> None:
    services, checks = _consul_view()
    assert drift(CFG, {}, checks) == ("service 'web' is not registered",)
    del checks[ready_check_id("web")]
    services["web"] = _as_agent({"ID": "web", "Service": "web", "Port": 9, "Tags": ["v1"]})
    assert drift(CFG, services, checks) == (
        "service port is 9, want 8080",
        "check 'service:web-sidecar-proxy:ready' is missing",
    )
    services, checks = _consul_view()
    del services["web-sidecar-proxy"]
    assert drift(CFG, services, checks) == ("sidecar 'web-sidecar-proxy' is not registered",)


def test_without_a_proxy_the_service_is_registered_alone() -> None:
    body = desired(CFG, sidecar=False).to_json()
    assert "Connect" not in body
    services, checks = _consul_view()
    del checks[ready_check_id("web")], checks[alias_check_id("web")]
    # A sidecar left by an earlier `meshlet sidecar`: its ready check nothing would pass.
    assert drift(CFG, services, checks, sidecar=False) == (
        "sidecar 'web-sidecar-proxy' is registered, but no proxy runs for it",
    )
    del services["web-sidecar-proxy"]
    assert drift(CFG, services, checks, sidecar=False) == ()
    del checks[app_check_id("web")]
    assert drift(CFG, services, checks, sidecar=False) == ("check 'service:web' is missing",)


def test_desired_registration_body() -> None:
    body = desired(CFG).to_json()
    side = body["Connect"]["SidecarService"]
    assert body["Checks"] == [
        {"CheckID": "service:web", "Name": "web application check", "TTL": "30s"}
    ]
    assert side["Port"] == 21000
    assert side["Proxy"]["LocalServicePort"] == 8080
    assert side["Proxy"]["Config"] == {"protocol": "tcp"}
    assert side["Proxy"]["Upstreams"] == [
        {"DestinationName": "api", "LocalBindAddress": "127.0.0.1", "LocalBindPort": 9191}
    ]
    assert [c.get("TTL") or c.get("AliasService") for c in side["Checks"]] == ["15s", "web"]


def test_readiness_note_stays_short_with_many_listeners_down() -> None:
    from agent.readiness import Readiness

    many = Readiness(False, tuple(f"listener 127.0.0.1:{p}: refused" for p in range(1000)))
    assert many.note.endswith("(+997 more)")
    assert len(many.note) <= 512
    assert Readiness(True).note == "listeners up, valid leaf held"
