"""Decisions of the routing remainder without sockets: split legs with their own header edits,
fault injection and mirroring from a router's meshlet.io Meta keys, the route's IdleTimeout,
generated affinity cookies (CookieConfig), and a request waiting for a connection at
MaxConnections (Envoy's pending request)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from agent.routing import mirror_chain
from connect.balancer import (
    BalancerConfig,
    HashPolicy,
    Target,
    compile_balancer,
    generated_cookie,
    hash_key,
    request_hash,
)
from connect.chain_routes import ChainRejected, ChainRouting, chain_routing, route_extensions
from connect.cluster import WAIT, Cluster, Limits, fixed_endpoints
from connect.routes import Fault, HeaderEdits, Mirror, RouteAction, WeightedCluster, shadow_head
from tests.connect.test_chain_routes import (
    SUBSETS,
    TD,
    V1,
    V2,
    _entries,
    _http,
    _router,
    _routing,
)
from traffic.chain import CompileRequest, compile_chain

LEGS = {
    "Kind": "service-splitter",
    "Name": "api",
    "Splits": [
        {
            "Weight": 50,
            "ServiceSubset": "v1",
            "RequestHeaders": {"Set": {"x-leg": "v1", "x-both": "leg"}, "Remove": ["x-gone"]},
            "ResponseHeaders": {"Add": {"x-from": "v1"}},
        },
        {"Weight": 50, "ServiceSubset": "v2", "RequestHeaders": {"Add": {"x-leg": "v2"}}},
    ],
}


def _select(r: ChainRouting, seed: int, target: bytes = b"/") -> Any:
    return r.table.select(b"GET", target, b"", [], random.Random(seed))


def test_split_legs_keep_their_own_header_edits_and_the_route_set_wins() -> None:
    r = _routing(
        "api",
        _http("api"),
        SUBSETS,
        LEGS,
        _router(
            {
                "Match": {"HTTP": {"PathPrefix": "/r"}},
                "Destination": {"RequestHeaders": {"Set": {"x-both": "route"}}},
            }
        ),
    )
    seen: dict[str, Any] = {}
    for seed in range(40):
        sel = _select(r, seed, b"/r")
        seen[sel.cluster] = sel
    assert set(seen) == {V1, V2}
    v1, v2 = seen[V1], seen[V2]
    sent = v1.request_headers.apply([(b"x-gone", b"1"), (b"x-keep", b"1")])
    # The leg's edits first, then the route's: the route's Set of the same name wins.
    assert sent == [(b"x-keep", b"1"), (b"x-leg", b"v1"), (b"x-both", b"route")]
    assert v1.response_headers.apply([]) == [(b"x-from", b"v1")]
    assert v2.request_headers.apply([]) == [(b"x-both", b"route"), (b"x-leg", b"v2")]
    assert not v2.response_headers
    # The catch-all goes through the same splitter, with the legs' edits alone.
    default = {(s.cluster, s.request_headers) for s in (_select(r, n) for n in range(40))}
    assert (V2, HeaderEdits(add=((b"x-leg", b"v2"),))) in default


def test_header_edits_then_is_one_then_the_other() -> None:
    first = HeaderEdits(add=((b"a", b"1"),), set=((b"s", b"1"),), remove=frozenset({b"r"}))
    later = HeaderEdits(set=((b"a", b"2"),), remove=frozenset({b"s"}))
    fields = [(b"a", b"0"), (b"r", b"0"), (b"s", b"0"), (b"k", b"0")]
    assert sorted(first.then(later).apply(fields)) == sorted(later.apply(first.apply(fields)))


def _meta(**features: str) -> dict[str, str]:
    return {f"meshlet.io/route.0.{k.replace('_', '-')}": v for k, v in features.items()}


def _faulted(meta: dict[str, str]) -> RouteAction:
    r = _routing("api", _http("api"), _router({"Match": {"HTTP": {"PathPrefix": "/f"}}}, meta=meta))
    return r.table.routes[0].action


def test_fault_meta_keys_become_the_routes_fault() -> None:
    action = _faulted(
        {
            "meshlet.io/route.0.fault.abort-status": "503",
            "meshlet.io/route.0.fault.abort-percent": "12.5",
            "meshlet.io/route.0.fault.delay": "1.5s",
        }
    )
    assert action.fault == Fault(abort_status=503, abort_percent=12.5, delay=1.5)
    assert action.needs_shell
    # Percentages unset are 100 (Istio: every request); no fault keys, no fault.
    assert _faulted({"meshlet.io/route.0.fault.delay": "250ms"}).fault == Fault(delay=0.25)
    assert _faulted({}).fault is None


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"fault.abort-status": "99"}, "not an HTTP status"),
        ({"fault.abort-status": "5O3"}, "not an HTTP status"),
        ({"fault.abort-status": "503", "fault.abort-percent": "101"}, "not a percentage"),
        ({"fault.abort-status": "503", "fault.abort-percent": "nan"}, "not a percentage"),
        ({"fault.delay": "soon"}, "fault.delay"),
        ({"fault.delay": "0s"}, "must be positive"),
        ({"fault.delay-percent": "50"}, "without its fault"),
        ({"fault.abortstatus": "503"}, "not a meshlet route key"),
        ({"mirror-percent": "5"}, "without meshlet.io/route.0.mirror"),
        ({"mirror": "api v2"}, "not `service` or `service/subset`"),
        ({"mirror": "shadow"}, "no chain for 'shadow'"),
    ],
)
def test_malformed_extension_keys_reject_the_chain(meta: dict[str, str], words: str) -> None:
    with pytest.raises(ChainRejected, match=words):
        _faulted({f"meshlet.io/route.0.{k}": v for k, v in meta.items()})


def test_a_key_for_a_route_the_router_lacks_rejects_the_chain() -> None:
    # Route 1 is the compiler's catch-all; route 2 does not exist.
    assert _faulted({"meshlet.io/route.1.fault.abort-status": "503"}).fault is None
    with pytest.raises(ChainRejected, match=r"route\.2\.fault\.abort-status names no route"):
        _faulted({"meshlet.io/route.2.fault.abort-status": "503"})
    with pytest.raises(ChainRejected, match="names no route"):
        _faulted({"meshlet.io/route.x.mirror": "api"})


def test_fault_decisions_by_percentage() -> None:
    rng = random.Random(7)
    both = Fault(abort_status=418, abort_percent=10, delay=0.5, delay_percent=30)
    got = Counter(both.decide(rng) for _ in range(10_000))
    delayed = sum(n for (d, _), n in got.items() if d == 0.5)
    aborted = sum(n for (_, s), n in got.items() if s == 418)
    assert 2_700 < delayed < 3_300 and 800 < aborted < 1_200  # independent draws
    assert Fault(abort_status=503).decide(rng) == (0.0, 503)  # 100 % when unset
    assert Fault(abort_status=503, abort_percent=0).decide(rng) == (0.0, 0)
    with pytest.raises(ValueError, match="200-599"):
        Fault(abort_status=600)


def test_mirror_decision_and_shadow_head() -> None:
    rng = random.Random(3)
    assert all(Mirror("m").decide(rng) for _ in range(100))
    assert not any(Mirror("m", 0).decide(rng) for _ in range(100))
    share = sum(Mirror("m", 25).decide(rng) for _ in range(10_000))
    assert 2_200 < share < 2_800
    head = b"POST /p?q=1 HTTP/1.1\r\nhost: api\r\nx-a: 1\r\ncontent-length: 2\r\n\r\n"
    assert shadow_head(head) == (
        b"POST /p?q=1 HTTP/1.1\r\nhost: api-shadow\r\nx-a: 1\r\ncontent-length: 2\r\n"
        b"connection: close\r\n\r\n"
    )
    ported = shadow_head(b"GET / HTTP/1.1\r\nHost: api.local:8080\r\n\r\n")
    assert b"Host: api.local-shadow:8080\r\n" in ported
    v6 = shadow_head(b"GET / HTTP/1.1\r\nhost: [::1]\r\n\r\n")
    assert b"host: [::1]-shadow\r\n" in v6


def test_mirror_cluster_comes_from_the_mirror_chain() -> None:
    entries = _entries(
        _http("api"),
        SUBSETS,
        _router(
            {"Match": {"HTTP": {"PathPrefix": "/m"}}},
            meta=_meta(mirror="api/v2", mirror_percent="10"),
        ),
    )
    chain = compile_chain(CompileRequest("api", TD), entries)
    router = entries.routers["api"]
    mirrored = mirror_chain(entries, "api/v2", trust_domain=TD, datacenter="dc1")
    r = chain_routing(chain, router_meta=router.meta, mirrors={"api/v2": mirrored})
    action = r.table.routes[0].action
    assert action.mirror == Mirror(V2, 10.0)
    assert r.targets[V2].filter == 'Service.Meta.version == "v2"'  # watched like any target
    assert r.clusters[V2] == (V2,)
    assert r.table.default.mirror is None
    with pytest.raises(ChainRejected, match="no subset 'v9'"):
        mirror_chain(entries, "api/v9", trust_domain=TD, datacenter="dc1")


def test_route_extensions_parse_per_route() -> None:
    ext = route_extensions(
        {
            "meshlet.io/route.1.per-try-timeout": "3s",
            "meshlet.io/route.1.mirror": "api",
            "meshlet.io/route.0.fault.abort-status": "bogus",  # another route's: not read
        },
        1,
        "route 1",
    )
    assert (ext.per_try_timeout, ext.fault, ext.mirror, ext.mirror_percent) == (
        3.0,
        None,
        "api",
        100.0,
    )


def test_idle_timeout_is_the_routes() -> None:
    r = _routing(
        "api",
        _http("api"),
        _router({"Match": {"HTTP": {"PathPrefix": "/i"}}, "Destination": {"IdleTimeout": "2s"}}),
    )
    assert r.table.routes[0].action.idle_timeout == 2.0
    assert r.table.routes[0].action.needs_shell
    assert not r.ignored


def _cookie_policy(cookie: dict[str, Any] | None) -> HashPolicy:
    hp: dict[str, Any] = {"Field": "cookie", "FieldValue": "sticky"}
    if cookie is not None:
        hp["CookieConfig"] = cookie
    resolver = {
        "Kind": "service-resolver",
        "Name": "api",
        "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [hp]},
    }
    r = _routing("api", _http("api"), resolver)
    (policy,) = r.targets["api.default.default.dc1"].balancer.hash_policies
    return policy


def test_cookie_config_generates_only_with_ttl_or_session() -> None:
    assert _cookie_policy({"TTL": "1h", "Path": "/app"}).cookie_ttl == 3600.0
    assert _cookie_policy({"TTL": "1h", "Path": "/app"}).cookie_path == "/app"
    assert _cookie_policy({"Session": True}).cookie_ttl == 0.0
    # Consul gives Envoy a ttl only for TTL or Session: Path alone generates nothing.
    assert _cookie_policy({"Path": "/app"}).cookie_ttl is None
    assert _cookie_policy(None).cookie_ttl is None


def test_generated_cookie_and_the_hash_it_gives_later_requests() -> None:
    hp = HashPolicy(field="cookie", field_value="sticky", cookie_ttl=60.0, cookie_path="/a")
    value, field = generated_cookie(hp, "('127.0.0.1', 5000)('127.0.0.1', 15001)")
    assert field == f'sticky="{value}"; Max-Age=60; Path=/a; HttpOnly'.encode()
    session = HashPolicy(field="cookie", field_value="s", cookie_ttl=0.0)
    assert (
        generated_cookie(session, "c")[1]
        == f's="{generated_cookie(session, "c")[0]}"; HttpOnly'.encode()
    )
    out: list[bytes] = []
    first = request_hash([hp], {}, connection="conn-1", set_cookies=out)
    assert out == [generated_cookie(hp, "conn-1")[1]] and first == hash_key(value_of(out[0]))
    # The next request carries the cookie (quoted as set): same hash, no new cookie.
    again: list[bytes] = []
    cookie = out[0].split(b";")[0].decode()
    assert request_hash([hp], {"cookie": cookie}, connection="other", set_cookies=again) == first
    assert again == []
    # Without CookieConfig nothing is generated and the request has no hash.
    plain = HashPolicy(field="cookie", field_value="sticky")
    assert request_hash([plain], {}, connection="conn-1", set_cookies=again) is None
    assert again == []


def value_of(set_cookie: bytes) -> str:
    return set_cookie.split(b";")[0].split(b"=", 1)[1].strip(b'"').decode()


def test_a_request_at_max_connections_waits_up_to_max_pending() -> None:
    balancer = compile_balancer([Target("n/a", "127.0.0.1", 1)], BalancerConfig())
    c = Cluster(fixed_endpoints(balancer), limits=Limits(max_connections=1, max_pending_requests=2))
    assert c.admit_dial() is None  # a connection may be opened
    c.connections = 1
    assert c.admit_dial() == WAIT  # at max_connections: wait for one (Envoy's pending)
    c.pending = 2
    assert c.admit_dial() == "max_pending_requests"
    assert c.overflows == {"max_pending_requests": 1}
    # MaxPendingRequests unset: Envoy's default bound of 1024 pending.
    d = Cluster(fixed_endpoints(balancer), limits=Limits(max_connections=1))
    d.connections, d.pending = 1, 1023
    assert d.admit_dial() == WAIT
    d.pending = 1024
    assert d.admit_dial() == "max_pending_requests"
    # Only MaxPendingRequests: bounds the requests waiting for a dial, as before.
    e = Cluster(fixed_endpoints(balancer), limits=Limits(max_pending_requests=1))
    assert e.admit_dial() is None
    e.pending = 1
    assert e.admit_dial() == "max_pending_requests"
    # A connection handed over to a waiting request counts it in flight like a choice.
    target = balancer.targets[0]
    c.claim(target)
    assert c.inflight("n/a") == 1 and c.active == 1


def test_weighted_cluster_edits_do_not_change_the_split() -> None:
    action = RouteAction(
        (
            WeightedCluster("a", 9000, request_headers=HeaderEdits(set=((b"x", b"a"),))),
            WeightedCluster("b", 1000),
        )
    )
    rng = random.Random(11)
    got = Counter(action.pick(rng) for _ in range(10_000))
    assert 8_800 < got["a"] < 9_200
    assert action.edits(0)[0] == HeaderEdits(set=((b"x", b"a"),))
    assert not action.edits(1)[0]
