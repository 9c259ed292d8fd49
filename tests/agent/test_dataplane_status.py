"""agent/dataplane_status.py: the `proxy` section says what the data planes serve."""

from __future__ import annotations

from typing import Any

from agent.dataplane_status import merge_proxy_status

AGENT: dict[str, Any] = {
    "leaf": {"generation": 3, "uri": "spiffe://t/ns/default/dc/dc1/svc/web"},
    "intentions": {"loaded": True, "index": 40, "version": 5},
    "listeners": {"inbound :21000": False, "upstream api 127.0.0.1:9191": False},
    "routing": {"rejected_total": 0, "upstreams": {"api": {"applied": 12, "routed": True}}},
    "upstreams": {"api": {"index": 9, "endpoints": 2, "protocol": "http", "bind": "x"}},
    "connections": {},
    "heap_trims": 0,
    "tracing": {"on": False, "spans": {"exported": 0, "dropped": 0}},
    "mutual_tls": {"mode": "permissive", "source": "service-defaults", "problem": ""},
    "stats": {"requests": 0},
}


def _serving(version: int, endpoints: int, intentions: int, routing: int) -> dict[str, Any]:
    return {
        "version": version,
        "listeners": {"inbound :21000": True, "upstream api 127.0.0.1:9191": True},
        "connections": {"inbound :21000": {"open": 2, "handshaking": 1}},
        "upstreams": {"api": {"index": 8, "endpoints": endpoints, "protocol": "http", "bind": "x"}},
        "intentions_index": intentions,
        "mutual_tls_mode": "permissive" if version > 6 else "strict",
        "routing": {"api": {"applied": routing, "targets": [f"t{version}"]}},
        "heap_trims": 1,
    }


def test_before_any_data_plane_reports_nothing_is_served() -> None:
    out = merge_proxy_status(AGENT, [], {}, {"requests": 0})
    assert out["listeners"] == {"inbound :21000": False, "upstream api 127.0.0.1:9191": False}
    assert out["upstreams"] == {} and out["connections"] == {}
    # What the agent holds is not yet enforced anywhere.
    assert out["intentions"]["loaded"] is False and out["intentions"]["index"] == 0
    assert out["leaf"]["generation"] == 0 and out["leaf"]["uri"] == ""
    assert out["routing"]["upstreams"]["api"]["applied"] == 0
    assert out["routing"]["upstreams"]["api"]["targets"] == []
    assert out["tracing"]["spans"] == {"exported": 0, "dropped": 0}
    assert AGENT["intentions"]["index"] == 40  # the agent's view is not changed


def test_several_data_planes_show_the_oldest_applied_and_the_sums() -> None:
    reports = [
        (7, _serving(7, endpoints=3, intentions=41, routing=12), {"tracing": {"exported": 2}}),
        (6, _serving(6, endpoints=2, intentions=40, routing=11), {"tracing": {"exported": 1}}),
    ]
    leaves = {
        v: {"generation": v - 4, "uri": f"spiffe://t{v}/web", "trust_domain": f"t{v}"}
        for v in (6, 7)
    }
    out = merge_proxy_status(AGENT, reports, leaves, {"requests": 9})
    assert all(out["listeners"].values())
    assert out["connections"] == {"inbound :21000": {"open": 4, "handshaking": 2}}
    assert out["upstreams"]["api"]["endpoints"] == 2  # snapshot 6's: both serve it
    assert out["intentions"] == {"loaded": True, "index": 40, "version": 5}
    assert out["leaf"] == {"generation": 2, "uri": "spiffe://t6/web", "trust_domain": "t6"}
    assert out["routing"]["upstreams"]["api"] == {"applied": 11, "routed": True, "targets": ["t6"]}
    assert out["heap_trims"] == 2
    assert out["mutual_tls"]["mode"] == "strict"
    assert out["tracing"]["spans"] == {"exported": 3, "dropped": 0}
    assert out["stats"] == {"requests": 9}
