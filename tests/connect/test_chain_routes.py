"""The chain -> routes compile without sockets: every matcher, precedence, splits, failover,
retry conditions, timeouts, load balancing, limits and ejection, and the Istio examples'
translations through the same compile."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from connect.balancer import Policy
from connect.chain_routes import (
    RETRY_ON,
    ChainRejected,
    ChainRouting,
    chain_routing,
    merge_upstream_config,
)
from connect.cluster import DEFAULT_EJECTION, Limits, Outcome
from traffic.chain import ChainEntries, CompileRequest, compile_chain
from traffic.defaults import service_defaults_from_json
from traffic.entries import RETRY_CONDITIONS, load_entry
from traffic.from_istio import TranslateOptions, translate_texts

TD = "11111111-2222-3333-4444-555555555555.consul"
EXAMPLES = Path(__file__).parent.parent / "traffic" / "istio-examples"
HTTP = {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}


def _entries(*bodies: dict[str, Any]) -> ChainEntries:
    models: list[Any] = []
    for body in bodies:
        if body["Kind"] == "service-defaults":
            models.append(service_defaults_from_json(body))
        else:
            models.append(load_entry(body))
    return ChainEntries.of(models)


def _http(name: str) -> dict[str, Any]:
    return {"Kind": "service-defaults", "Name": name, "Protocol": "http"}


def _routing(service: str, *bodies: dict[str, Any], caller: str = "web") -> ChainRouting:
    entries = _entries(*bodies)
    chain = compile_chain(CompileRequest(service, TD), entries)
    router = entries.routers.get(service)
    defaults = entries.services.get(caller)
    cfg = None
    if defaults is not None and defaults.upstream_config is not None:
        uc = defaults.upstream_config
        over = next((o for o in uc.overrides if o.name == service), None)
        cfg = merge_upstream_config(uc.defaults, over)
    return chain_routing(chain, upstream_config=cfg, router_meta=router.meta if router else None)


def _pick(r: ChainRouting, method: str = "GET", target: str = "/", **headers: str) -> str:
    path, _, query = target.encode().partition(b"?")
    heads = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return r.table.select(method.encode(), path, query, heads, random.Random(1)).cluster


V1 = "v1.api.default.default.dc1"
V2 = "v2.api.default.default.dc1"
API = "api.default.default.dc1"
SUBSETS = {
    "Kind": "service-resolver",
    "Name": "api",
    "Subsets": {
        "v1": {"Filter": 'Service.Meta.version == "v1"'},
        "v2": {"Filter": 'Service.Meta.version == "v2"', "OnlyPassing": True},
    },
}


def _router(*routes: dict[str, Any], meta: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"Kind": "service-router", "Name": "api", "Routes": list(routes)}
    if meta:
        body["Meta"] = meta
    return body


def _to(subset: str, **extra: Any) -> dict[str, Any]:
    return {"Service": "api", "ServiceSubset": subset, **extra}


def test_tcp_chain_is_one_cluster_with_the_default_policy() -> None:
    r = _routing("api")
    assert r.protocol == "tcp"
    assert r.start == API
    assert r.clusters == {API: (API,)}
    t = r.targets[API]
    assert (t.service, t.datacenter, t.filter, t.only_passing) == ("api", "dc1", "", False)
    assert t.connect_timeout == 5.0
    assert t.balancer.policy is Policy.LEAST_REQUEST
    assert t.limits == Limits()
    assert t.ejection == (DEFAULT_EJECTION,)
    assert r.table.routes == ()
    assert _pick(r) == API


@pytest.mark.parametrize(
    ("match", "hit", "miss"),
    [
        ({"PathExact": "/a"}, {"target": "/a"}, {"target": "/a/b"}),
        ({"PathPrefix": "/a"}, {"target": "/a/b"}, {"target": "/b"}),
        ({"PathRegex": "/a/[0-9]+"}, {"target": "/a/12"}, {"target": "/a/12x"}),
        ({"Header": [{"Name": "X-Canary", "Exact": "true"}]}, {"x_canary": "true"}, {}),
        ({"Header": [{"Name": "x-v", "Prefix": "be"}]}, {"x_v": "beta1"}, {"x_v": "alpha"}),
        ({"Header": [{"Name": "x-v", "Suffix": "-rc"}]}, {"x_v": "1-rc"}, {"x_v": "1"}),
        ({"Header": [{"Name": "x-v", "Regex": "[0-9]+"}]}, {"x_v": "12"}, {"x_v": "1a"}),
        ({"Header": [{"Name": "x-v", "Present": True}]}, {"x_v": ""}, {}),
        (
            {"Header": [{"Name": "x-v", "Exact": "1", "Invert": True}]},
            {"x_v": "2"},
            {"x_v": "1"},
        ),
        ({"QueryParam": [{"Name": "q", "Exact": "1"}]}, {"target": "/?q=1"}, {"target": "/?q=2"}),
        ({"QueryParam": [{"Name": "q", "Regex": "a+"}]}, {"target": "/?q=aa"}, {"target": "/?q=b"}),
        ({"QueryParam": [{"Name": "q", "Present": True}]}, {"target": "/?q"}, {"target": "/?r"}),
        ({"Methods": ["POST", "PUT"]}, {"method": "PUT"}, {"method": "GET"}),
    ],
)
def test_every_matcher(match: dict[str, Any], hit: dict[str, str], miss: dict[str, str]) -> None:
    r = _routing(
        "api",
        _http("api"),
        SUBSETS,
        _router({"Match": {"HTTP": match}, "Destination": _to("v2")}),
    )
    assert _pick(r, **hit) == V2
    assert _pick(r, **miss) == API


def test_first_match_wins_not_the_most_specific() -> None:
    r = _routing(
        "api",
        _http("api"),
        SUBSETS,
        _router(
            {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": _to("v1")},
            {"Match": {"HTTP": {"PathExact": "/special"}}, "Destination": _to("v2")},
        ),
    )
    assert _pick(r, target="/special") == V1


def test_all_conditions_of_one_match_must_hold() -> None:
    r = _routing(
        "api",
        _http("api"),
        SUBSETS,
        _router(
            {
                "Match": {
                    "HTTP": {
                        "PathPrefix": "/x",
                        "Methods": ["GET"],
                        "Header": [{"Name": "a", "Exact": "1"}],
                    }
                },
                "Destination": _to("v2"),
            }
        ),
    )
    assert _pick(r, target="/x", a="1") == V2
    assert _pick(r, target="/x") == API
    assert _pick(r, method="POST", target="/x", a="1") == API


def test_canary_and_split_examples_compile_and_split_90_10() -> None:
    texts = [
        (p.name, p.read_text())
        for p in (EXAMPLES / "canary-virtualservice.yaml", EXAMPLES / "api-destinationrule.yaml")
    ]
    translation = translate_texts(texts, TranslateOptions(callers=("web",)))
    r = _routing("api", _http("api"), *translation.entries)
    assert _pick(r, x_canary="true") == V2
    action = r.table.default
    weights = {d.cluster: d.weight for d in action.destinations}
    assert weights == {V1: 9000, V2: 1000}
    rng = random.Random(7)
    got = Counter(action.pick(rng) for _ in range(20_000))
    assert abs(got[V1] / 20_000 - 0.9) < 0.01
    # The DestinationRule's pool and outlier detection, on the caller's service-defaults.
    t = r.targets[V1]
    assert t.filter == 'Service.Meta.version == "v1"'
    assert t.limits == Limits(max_connections=100, max_pending_requests=50)
    phc = t.ejection[1]
    assert (phc.consecutive, phc.eject_for, phc.max_percent, phc.growing) == (5, 30.0, 50, True)
    assert Outcome.SERVER_ERROR in phc.on
    assert t.balancer.policy is Policy.LEAST_REQUEST


def test_payment_example_timeout_retries_and_per_try_timeout() -> None:
    text = (EXAMPLES / "payment-virtualservice.yaml").read_text()
    translation = translate_texts([("payment", text)], TranslateOptions())
    r = _routing("payment-service", _http("payment-service"), *translation.entries)
    (route,) = r.table.routes
    a = route.action
    assert a.request_timeout == 10.0
    assert a.try_timeout == 3.0
    assert a.retry.num_retries == 3
    assert a.retry.on_gateway_error and a.retry.on_reset and a.retry.on_timeout
    assert a.retry.retries_status(409)  # retriable-4xx
    assert a.retry.retries_status(503) and not a.retry.retries_status(500)


def test_splits_use_the_flattened_hundredths_and_their_total() -> None:
    r = _routing(
        "api",
        _http("api"),
        SUBSETS,
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 33.33, "ServiceSubset": "v1"},
                {"Weight": 66.67, "ServiceSubset": "v2"},
            ],
        },
    )
    assert {d.cluster: d.weight for d in r.table.default.destinations} == {V1: 3333, V2: 6667}


@pytest.mark.parametrize("condition", sorted(RETRY_CONDITIONS))
def test_every_retry_on_value_is_mapped(condition: str) -> None:
    assert condition in RETRY_ON
    r = _routing(
        "api",
        _http("api"),
        _router(
            {
                "Match": {"HTTP": {"PathPrefix": "/"}},
                "Destination": {"NumRetries": 2, "RetryOn": [condition]},
            },
            meta={"meshlet.io/route.0.per-try-timeout": "1s"},
        ),
    )
    retry = r.table.routes[0].action.retry
    assert retry.num_retries == 2
    expected = {
        "5xx": (True, False, True, True),
        "gateway-error": (False, True, True, True),
        "reset": (False, False, True, True),
    }.get(condition, (False, False, True, False))
    assert (retry.on_5xx, retry.on_gateway_error, retry.on_reset, retry.on_timeout) == expected
    assert retry.retries_status(409) == (condition == "retriable-4xx")
    assert retry.on_refused


def test_status_codes_and_connect_failure_and_default_num_retries() -> None:
    r = _routing(
        "api",
        _http("api"),
        _router(
            {"Match": {"HTTP": {"PathPrefix": "/a"}}, "Destination": {"RetryOnStatusCodes": [429]}},
            {
                "Match": {"HTTP": {"PathPrefix": "/b"}},
                "Destination": {"RetryOnConnectFailure": True},
            },
            {"Match": {"HTTP": {"PathPrefix": "/c"}}, "Destination": {"PrefixRewrite": "/z"}},
        ),
    )
    a, b, c = (route.action for route in r.table.routes)
    assert a.retry.num_retries == 1 and a.retry.retries_status(429)  # Envoy's default 1
    assert not a.retry.retries_status(503) and not a.retry.on_timeout
    assert b.retry.num_retries == 1 and not b.retry.statuses
    assert c.retry.num_retries == 1 and c.retry.backoff == 0.0  # the proxy's own default
    sel = r.table.select(b"GET", b"/c/d", b"", [], random.Random(1))
    assert sel.path == b"/z/d"


def test_header_edits_timeouts_and_resolver_request_timeout() -> None:
    r = _routing(
        "api",
        _http("api"),
        {"Kind": "service-resolver", "Name": "api", "RequestTimeout": "7s"},
        _router(
            {
                "Match": {"HTTP": {"PathPrefix": "/e"}},
                "Destination": {
                    "RequestTimeout": "2s",
                    "IdleTimeout": "9s",
                    "RequestHeaders": {"Add": {"X-A": "1"}, "Set": {"x-s": "2"}, "Remove": ["x-r"]},
                    "ResponseHeaders": {"Set": {"x-from": "api"}},
                },
            }
        ),
    )
    e = r.table.routes[0].action
    assert e.request_timeout == 2.0
    assert e.request_headers.add == ((b"x-a", b"1"),)
    assert e.request_headers.set == ((b"x-s", b"2"),)
    assert e.request_headers.remove == frozenset({b"x-r"})
    assert e.response_headers.set == ((b"x-from", b"api"),)
    assert r.table.default.request_timeout == 7.0  # the resolver's, on the catch-all
    assert e.idle_timeout == 9.0  # the route's stream idle timeout
    assert r.table.default.idle_timeout is None
    assert not r.ignored


def test_no_request_timeout_anywhere_is_envoys_default_15_s() -> None:
    # Consul sets the route's `timeout` only for a RequestTimeout > 0; Envoy's default is 15 s.
    bare = _routing("api", _http("api"))
    assert bare.table.default.request_timeout == 15.0
    routed = _routing("api", _http("api"), _router({"Match": {"HTTP": {"PathPrefix": "/e"}}}))
    assert routed.table.routes[0].action.request_timeout == 15.0
    assert routed.table.default.request_timeout == 15.0


def test_failover_targets_in_order_and_redirect() -> None:
    r = _routing(
        "api",
        {
            "Kind": "service-resolver",
            "Name": "api",
            "ConnectTimeout": "2s",
            "Failover": {"*": {"Targets": [{"Service": "api-b"}, {"Service": "api-c"}]}},
        },
    )
    assert r.clusters[API] == (API, "api-b.default.default.dc1", "api-c.default.default.dc1")
    assert r.targets["api-b.default.default.dc1"].service == "api-b"
    assert r.targets[API].connect_timeout == 2.0
    redirected = _routing(
        "api", {"Kind": "service-resolver", "Name": "api", "Redirect": {"Service": "other"}}
    )
    assert redirected.start == "other.default.default.dc1"


def test_load_balancer_policy_and_hash_policies() -> None:
    r = _routing(
        "api",
        _http("api"),
        {
            "Kind": "service-resolver",
            "Name": "api",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "RingHashConfig": {"MinimumRingSize": 2048},
                "HashPolicies": [
                    {"Field": "header", "FieldValue": "x-user"},
                    {"Field": "query_parameter", "FieldValue": "u"},
                    {"SourceIP": True},
                ],
            },
        },
    )
    b = r.targets[API].balancer
    assert b.policy is Policy.RING_HASH and b.minimum_ring_size == 2048
    assert [(h.field, h.field_value, h.source_ip) for h in b.hash_policies] == [
        ("header", "x-user", False),
        ("query_parameter", "u", False),
        ("", "", True),
    ]


def test_unsupported_fields_reject_the_chain_whole() -> None:
    with pytest.raises(ChainRejected, match="per-try-timeout"):
        _routing(
            "api",
            _http("api"),
            _router(
                {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"NumRetries": 1}},
                meta={"meshlet.io/route.0.per-try-timeout": "soon"},
            ),
        )


def test_upstream_config_override_merges_over_defaults() -> None:
    r = _routing(
        "api",
        {
            "Kind": "service-defaults",
            "Name": "web",
            "UpstreamConfig": {
                "Defaults": {"Limits": {"MaxConnections": 10, "MaxConcurrentRequests": 5}},
                "Overrides": [{"Name": "api", "Limits": {"MaxConnections": 3}}],
            },
        },
    )
    assert r.targets[API].limits == Limits(max_connections=3, max_concurrent_requests=5)
