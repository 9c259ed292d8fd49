"""Istio networking and PeerAuthentication -> Consul config entries, without I/O: the shared
examples translate to the entries written out here, every refusal names the resource and the
field, and the output does not depend on input order."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from traffic.from_istio import (
    RoutesError,
    TranslateOptions,
    Translation,
    format_duration,
    load_resources,
    parse_duration,
    translate,
    translate_texts,
)

# Copies of the shared examples (../shared/examples), so the repository tests itself.
EXAMPLES = Path(__file__).parent / "istio-examples"


def _tr(text: str, **options: Any) -> Translation:
    return translate(load_resources(text, "t.yaml"), TranslateOptions(**options))


def _entries(text: str, **options: Any) -> list[dict[str, Any]]:
    return list(_tr(text, **options).entries)


def _problems(text: str, **options: Any) -> list[str]:
    with pytest.raises(RoutesError) as info:
        _tr(text, **options)
    return list(info.value.problems)


def _vs(http: str, hosts: str = "[api]", extra: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: api}}\nspec:\n  hosts: {hosts}\n{extra}  http:\n{http}"
    )


def _dr(spec: str, host: str = "api") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: api}}\nspec:\n  host: {host}\n{spec}"
    )


def _pa(spec: str, namespace: str = "default") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: pa, namespace: {namespace}}}\nspec:\n{spec}"
    )


# ---- the shared examples, entry by entry ----------------------------------------------------


def _example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def test_canary_virtualservice() -> None:
    t = _tr(_example("canary-virtualservice.yaml"))
    assert list(t.entries) == [
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 90, "Service": "api", "ServiceSubset": "v1"},
                {"Weight": 10, "Service": "api", "ServiceSubset": "v2"},
            ],
        },
        {
            "Kind": "service-router",
            "Name": "api",
            "Routes": [
                {
                    "Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "true"}]}},
                    "Destination": {"Service": "api", "ServiceSubset": "v2"},
                }
                # The 90/10 catch-all is Consul's own last route to api, through its splitter.
            ],
        },
    ]
    # Without the DestinationRule the subsets are Consul's to know: said, not refused.
    assert any("subset 'v2' of 'api'" in w for w in t.warnings)


def test_payment_virtualservice_carries_the_per_try_timeout_in_meta() -> None:
    t = _tr(_example("payment-virtualservice.yaml"))
    assert list(t.entries) == [
        {
            "Kind": "service-router",
            "Name": "payment-service",
            "Meta": {"meshlet.io/route.0.per-try-timeout": "3s"},
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/"}},
                    "Destination": {
                        "Service": "payment-service",
                        "RequestTimeout": "10s",
                        "NumRetries": 3,
                        "RetryOn": ["gateway-error", "connect-failure", "retriable-4xx"],
                    },
                }
            ],
        }
    ]
    assert t.warnings == (
        "VirtualService/default/payment-service: per-try-timeout of route 0 is carried in "
        "service-router payment-service Meta meshlet.io/route.0.per-try-timeout=3s: meshlet's "
        "proxy honours it, other Consul proxies (Envoy) ignore it",
    )


def test_payment_virtualservice_strict_refuses_the_per_try_timeout() -> None:
    assert _problems(_example("payment-virtualservice.yaml"), strict=True) == [
        "VirtualService/default/payment-service: spec.http[0].retries.perTryTimeout: not "
        "translated: a per-try timeout has no Consul field; meshlet carries it in a meshlet.io/ "
        "Meta key that other Consul proxies ignore, and --strict refuses those"
    ]


def test_api_destinationrule_with_its_caller() -> None:
    t = _tr(_example("api-destinationrule.yaml"), callers=("web",))
    assert list(t.entries) == [
        {
            "Kind": "service-defaults",
            "Name": "web",
            "UpstreamConfig": {
                "Overrides": [
                    {
                        "Name": "api",
                        "Limits": {"MaxConnections": 100, "MaxPendingRequests": 50},
                        "PassiveHealthCheck": {
                            "Interval": "10s",
                            "MaxFailures": 5,
                            "BaseEjectionTime": "30s",
                            "MaxEjectionPercent": 50,
                        },
                    }
                ]
            },
        },
        {
            "Kind": "service-resolver",
            "Name": "api",
            "Subsets": {
                "v1": {"Filter": 'Service.Meta.version == "v1"'},
                "v2": {"Filter": 'Service.Meta.version == "v2"'},
            },
            "LoadBalancer": {"Policy": "least_request"},
        },
    ]
    assert t.warnings == ()
    scopes = {(s.kind, s.name): s.items for s in t.scopes}
    assert scopes == {
        ("service-defaults", "web"): frozenset({"UpstreamConfig.Overrides[api]"}),
        ("service-resolver", "api"): None,
    }


def test_api_destinationrule_without_callers_is_refused() -> None:
    assert _problems(_example("api-destinationrule.yaml")) == [
        "DestinationRule/default/api: spec.trafficPolicy.connectionPool: not translated: Consul "
        "holds upstream limits and outlier detection per calling service (service-defaults "
        "UpstreamConfig.Overrides of each caller): name the callers with --callers"
    ]


def test_peerauthentication_strict_namespace_wide() -> None:
    # Consul CE's one namespace stands for production: the namespace-wide policy is mesh-wide.
    t = _tr(_example("peerauthentication-strict.yaml"), single_namespace="production")
    assert list(t.entries) == [
        {"Kind": "proxy-defaults", "Name": "global", "MutualTLSMode": "strict"}
    ]
    assert [(s.kind, s.name, s.items) for s in t.scopes] == [
        ("proxy-defaults", "global", frozenset({"MutualTLSMode"}))
    ]
    assert _problems(_example("peerauthentication-strict.yaml")) == [
        "PeerAuthentication/production/default: spec.selector: not translated: a namespace-wide "
        "policy for 'production' has no Consul entry (MutualTLSMode is per service or "
        "mesh-wide): add selector.matchLabels.app, or pass --single-namespace production if "
        "Consul's one namespace stands for it"
    ]


def test_all_examples_together_in_write_order() -> None:
    files = [
        "peerauthentication-strict.yaml",
        "payment-virtualservice.yaml",
        "canary-virtualservice.yaml",
        "api-destinationrule.yaml",
    ]
    # The PeerAuthentication is in production: route everything from there.
    texts = [
        (f, _example(f).replace("name: api\n", "name: api\n  namespace: production\n"))
        for f in files
    ]
    texts = [
        (
            f,
            t.replace(
                "name: payment-service\n", "name: payment-service\n  namespace: production\n"
            ),
        )
        for f, t in texts
    ]
    t = translate_texts(texts, TranslateOptions(callers=("web",), single_namespace="production"))
    assert [(e["Kind"], e["Name"]) for e in t.entries] == [
        ("proxy-defaults", "global"),
        ("service-defaults", "web"),
        ("service-resolver", "api"),
        ("service-splitter", "api"),
        ("service-router", "api"),
        ("service-router", "payment-service"),
    ]
    # The DestinationRule defines the subsets the VirtualService uses: no warning about them.
    assert not any("subset" in w for w in t.warnings)


# ---- determinism ----------------------------------------------------------------------------


def _shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def test_output_does_not_depend_on_key_or_file_order() -> None:
    files = [
        "canary-virtualservice.yaml",
        "api-destinationrule.yaml",
        "payment-virtualservice.yaml",
    ]
    options = TranslateOptions(callers=("web", "checkout"))
    want = translate_texts([(f, _example(f)) for f in files], options)
    rng = random.Random(7)
    for _ in range(5):
        order = files[:]
        rng.shuffle(order)
        texts = [(f, yaml.safe_dump(_shuffled(yaml.safe_load(_example(f)), rng))) for f in order]
        got = translate_texts(texts, options)
        assert json.dumps(got.entries) == json.dumps(want.entries)
        assert got.scopes == want.scopes
        assert sorted(got.warnings) == sorted(want.warnings)


# ---- VirtualService features ----------------------------------------------------------------


def test_every_matcher_becomes_consul_match_fields_in_order() -> None:
    http = """\
  - match:
    - uri: {prefix: /api}
      ignoreUriCase: true
      method: {exact: POST}
      headers:
        x-a: {prefix: "pre"}
        x-b: {regex: "v[0-9]+"}
        x-c: {}
      withoutHeaders:
        x-debug: {exact: "1"}
      queryParams:
        q: {exact: "1"}
        r: {regex: "\\\\d+"}
        s: {}
    - uri: {regex: "/v[0-9]/.*"}
      method: {regex: "GET|HEAD"}
    route:
    - destination: {host: api, subset: v2}
"""
    (router,) = _entries(_vs(http))
    assert router["Routes"] == [
        {
            "Match": {
                "HTTP": {
                    "PathPrefix": "/api",
                    "CaseInsensitive": True,
                    "Methods": ["POST"],
                    "Header": [
                        {"Name": "x-a", "Prefix": "pre"},
                        {"Name": "x-b", "Regex": "v[0-9]+"},
                        {"Name": "x-c", "Present": True},
                        {"Name": "x-debug", "Exact": "1", "Invert": True},
                    ],
                    "QueryParam": [
                        {"Name": "q", "Exact": "1"},
                        {"Name": "r", "Regex": "\\d+"},
                        {"Name": "s", "Present": True},
                    ],
                }
            },
            "Destination": {"Service": "api", "ServiceSubset": "v2"},
        },
        # Istio's match list is OR: one Consul route per block, same destination, same place.
        {
            "Match": {"HTTP": {"PathRegex": "/v[0-9]/.*", "Methods": ["GET", "HEAD"]}},
            "Destination": {"Service": "api", "ServiceSubset": "v2"},
        },
    ]


def test_rewrite_headers_retries_and_durations() -> None:
    http = """\
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new}
    timeout: 90s
    retries: {attempts: 2}
    headers:
      request: {set: {x-route: canary}, remove: [x-debug]}
      response: {add: {x-served-by: meshlet}}
    route:
    - destination: {host: api.default.svc.cluster.local}
      headers: {request: {set: {x-route: dest, x-dest: "1"}}}
  - route:
    - destination: {host: web.service.consul}
    retries: {attempts: 1, retryOn: "5xx,503,retriable-status-codes,reset"}
"""
    (router,) = _entries(_vs(http))
    assert router["Routes"] == [
        {
            "Match": {"HTTP": {"PathPrefix": "/old"}},
            "Destination": {
                "Service": "api",
                "RequestTimeout": "1m30s",
                # attempts without retryOn: Istio's default conditions and 503.
                "NumRetries": 2,
                "RetryOn": ["connect-failure", "refused-stream", "unavailable", "cancelled"],
                "RetryOnStatusCodes": [503],
                # The route's Set wins over the destination's, as in Envoy.
                "RequestHeaders": {
                    "Set": {"x-dest": "1", "x-route": "canary"},
                    "Remove": ["x-debug"],
                },
                "ResponseHeaders": {"Add": {"x-served-by": "meshlet"}},
                "PrefixRewrite": "/new",
            },
        },
        {
            "Match": {"HTTP": {"PathPrefix": "/"}},
            "Destination": {
                "Service": "web",
                "NumRetries": 1,
                "RetryOn": ["5xx", "reset"],
                "RetryOnStatusCodes": [503],
            },
        },
    ]


def test_fault_and_mirror_are_meshlet_meta_keys_with_warnings() -> None:
    http = """\
  - match: [{uri: {exact: /x}}]
    fault:
      delay: {fixedDelay: 1500ms, percentage: {value: 0.5}}
      abort: {httpStatus: 503}
    mirror: {host: api, subset: shadow}
    mirrorPercentage: {value: 25.0}
    route:
    - destination: {host: api, subset: v1}
  - route:
    - destination: {host: api}
    mirrors:
    - destination: {host: web}
"""
    t = _tr(_vs(http))
    (router,) = t.entries
    assert router["Meta"] == {
        "meshlet.io/route.0.fault.abort-percent": "100",
        "meshlet.io/route.0.fault.abort-status": "503",
        "meshlet.io/route.0.fault.delay": "1.5s",
        "meshlet.io/route.0.fault.delay-percent": "0.5",
        "meshlet.io/route.0.mirror": "api/shadow",
        "meshlet.io/route.0.mirror-percent": "25",
        "meshlet.io/route.1.mirror": "web",
        "meshlet.io/route.1.mirror-percent": "100",
    }
    # The last route is kept although it is a catch-all to api: its Meta index must exist.
    assert len(router["Routes"]) == 2
    assert len(t.warnings) == 8 + 1  # one per key, and the subsets no DestinationRule defines
    assert all("other Consul proxies (Envoy) ignore it" in w for w in t.warnings if "Meta" in w)
    problems = _problems(_vs(http), strict=True)
    assert problems == [
        "VirtualService/default/api: spec.http[0].fault: not translated: fault injection has no "
        "Consul field; meshlet carries it in a meshlet.io/ Meta key that other Consul proxies "
        "ignore, and --strict refuses those",
        "VirtualService/default/api: spec.http[0].mirror: not translated: mirroring has no "
        "Consul field; meshlet carries it in a meshlet.io/ Meta key that other Consul proxies "
        "ignore, and --strict refuses those",
        "VirtualService/default/api: spec.http[1].mirrors[0].destination: not translated: "
        "mirroring has no Consul field; meshlet carries it in a meshlet.io/ Meta key that other "
        "Consul proxies ignore, and --strict refuses those",
    ]


def test_weights_split_across_services_are_exact() -> None:
    http = """\
  - route:
    - destination: {host: api}
      weight: 33
    - destination: {host: api-next}
      weight: 67
      headers: {response: {set: {x-next: "1"}}}
"""
    entries = _entries(_vs(http))
    assert entries == [
        {
            "Kind": "service-splitter",
            "Name": "api",
            "Splits": [
                {"Weight": 33, "Service": "api"},
                {"Weight": 67, "Service": "api-next", "ResponseHeaders": {"Set": {"x-next": "1"}}},
            ],
        }
    ]


def test_one_virtualservice_for_two_hosts_routes_both() -> None:
    http = "  - route:\n    - destination: {host: api, subset: v1}\n"
    entries = _entries(_vs(http, hosts="[api, api.default.svc.cluster.local, web]"))
    assert [(e["Kind"], e["Name"]) for e in entries] == [
        ("service-router", "api"),
        ("service-router", "web"),
    ]


def test_namespaces_follow_the_options() -> None:
    http = "  - route:\n    - destination: {host: api.shop.svc.cluster.local}\n      weight: 100\n"
    # Enterprise namespace mirroring: the router lives in the VirtualService's namespace and
    # its destination names the other one.
    (router,) = _entries(_vs(http, hosts="[web]"))
    assert router["Routes"][0]["Destination"] == {"Service": "api", "Namespace": "shop"}
    assert "Namespace" not in router
    assert _problems(_vs(http, hosts="[web]"), single_namespace="default") == [
        "VirtualService/default/api: spec.http[0].route[0].destination.host: not translated: "
        "namespace 'shop' is not 'default', the one Istio namespace Consul's single namespace "
        "stands for (--single-namespace)"
    ]


def test_load_balancer_variants() -> None:
    def lb(spec: str) -> Any:
        (resolver,) = _entries(_dr(f"  trafficPolicy:\n    loadBalancer:\n{spec}"))
        return resolver["LoadBalancer"]

    assert lb("      simple: ROUND_ROBIN\n") == {"Policy": "round_robin"}
    assert lb("      simple: RANDOM\n") == {"Policy": "random"}
    assert lb("      consistentHash: {httpHeaderName: x-user}\n") == {
        "Policy": "ring_hash",
        "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}],
    }
    assert lb(
        "      consistentHash:\n        httpCookie: {name: s, ttl: 0s, path: /}\n"
        "        ringHash: {minimumRingSize: 2048}\n"
    ) == {
        "Policy": "ring_hash",
        "RingHashConfig": {"MinimumRingSize": 2048},
        "HashPolicies": [
            {"Field": "cookie", "FieldValue": "s", "CookieConfig": {"Session": True, "Path": "/"}}
        ],
    }
    assert lb("      consistentHash: {useSourceIp: true, maglev: {}}\n") == {
        "Policy": "maglev",
        "HashPolicies": [{"SourceIP": True}],
    }
    assert lb("      consistentHash: {httpQueryParameterName: u}\n")["HashPolicies"] == [
        {"Field": "query_parameter", "FieldValue": "u"}
    ]


def test_connect_timeout_and_disabled_5xx_ejection() -> None:
    spec = """\
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms}
      http: {http2MaxRequests: 10}
    outlierDetection: {consecutive5xxErrors: 0}
"""
    entries = _entries(_dr(spec), callers=("web", "admin"))
    assert entries == [
        {
            "Kind": "service-defaults",
            "Name": "admin",
            "UpstreamConfig": {
                "Overrides": [
                    {
                        "Name": "api",
                        "Limits": {"MaxConcurrentRequests": 10},
                        "PassiveHealthCheck": {"EnforcingConsecutive5xx": 0},
                    }
                ]
            },
        },
        {
            "Kind": "service-defaults",
            "Name": "web",
            "UpstreamConfig": {
                "Overrides": [
                    {
                        "Name": "api",
                        "Limits": {"MaxConcurrentRequests": 10},
                        "PassiveHealthCheck": {"EnforcingConsecutive5xx": 0},
                    }
                ]
            },
        },
        {"Kind": "service-resolver", "Name": "api", "ConnectTimeout": "250ms"},
    ]


def test_peerauthentication_per_service_and_unset() -> None:
    strict = _pa("  selector: {matchLabels: {app: api}}\n  mtls: {mode: PERMISSIVE}\n")
    assert _entries(strict) == [
        {"Kind": "service-defaults", "Name": "api", "MutualTLSMode": "permissive"}
    ]
    # UNSET inherits: no entry to write, but the field is in scope (apply removes meshlet's).
    unset = _tr(_pa("  selector: {matchLabels: {app: api}}\n  mtls: {mode: UNSET}\n"))
    assert unset.entries == ()
    assert [(s.kind, s.name, s.items) for s in unset.scopes] == [
        ("service-defaults", "api", frozenset({"MutualTLSMode"}))
    ]
    mesh = _entries(_pa("  mtls: {mode: STRICT}\n", namespace="istio-system"))
    assert mesh == [{"Kind": "proxy-defaults", "Name": "global", "MutualTLSMode": "strict"}]


# ---- refusals, each with its resource and field ---------------------------------------------

VS = "VirtualService/default/api"
DR = "DestinationRule/default/api"
PA = "PeerAuthentication/default/pa"

REFUSALS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "redirect",
        _vs("  - redirect: {uri: /new}\n"),
        {},
        f"{VS}: spec.http[0].redirect: not translated: Consul has no HTTP redirect response "
        "(its resolver Redirect is a service redirect)",
    ),
    (
        "cors",
        _vs(
            "  - corsPolicy: {allowOrigins: [{exact: x}]}\n"
            "    route: [{destination: {host: api}}]\n"
        ),
        {},
        f"{VS}: spec.http[0].corsPolicy: not translated: Consul has no CORS policy",
    ),
    (
        "gateway",
        _vs("  - route: [{destination: {host: api}}]\n", extra="  gateways: [ingress]\n"),
        {},
        f"{VS}: spec.gateways: not translated: gateways are not translated; only the mesh "
        "gateway is",
    ),
    (
        "wildcard host",
        _vs("  - route: [{destination: {host: api}}]\n", hosts="['*.example.com']"),
        {},
        f"{VS}: spec.hosts[0]: not translated: '*.example.com': a wildcard host names no single "
        "Consul service",
    ),
    (
        "external host",
        _vs("  - route: [{destination: {host: api.example.com}}]\n"),
        {},
        f"{VS}: spec.http[0].route[0].destination.host: not translated: 'api.example.com' is not "
        "a mesh service: expected NAME, NAME.NAMESPACE.svc.cluster.local or NAME.service.consul "
        "(external hosts, other cluster domains and ServiceEntry hosts have no Consul service to "
        "route)",
    ),
    (
        "tcp routes",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: [api]\n  tcp: [{route: [{destination: {host: api}}]}]\n",
        {},
        f"{VS}: spec.tcp: not translated: Consul routes only HTTP (service-router); TCP and TLS "
        "routes have no Consul entry",
    ),
    (
        "weights not 100",
        _vs(
            "  - route:\n    - {destination: {host: api, subset: a}, weight: 90}\n"
            "    - {destination: {host: api, subset: b}, weight: 5}\n"
        ),
        {},
        f"{VS}: spec.http[0].route: weights must be given for every destination and sum to "
        "exactly 100 (Consul splits are exact to 0.01 and must sum to 100)",
    ),
    (
        "weight missing",
        _vs(
            "  - route:\n    - {destination: {host: api, subset: a}, weight: 100}\n"
            "    - {destination: {host: api, subset: b}}\n"
        ),
        {},
        f"{VS}: spec.http[0].route: weights must be given for every destination and sum to "
        "exactly 100 (Consul splits are exact to 0.01 and must sum to 100)",
    ),
    (
        "two different splits",
        _vs(
            "  - match: [{uri: {prefix: /a}}]\n    route:\n"
            "    - {destination: {host: api, subset: a}, weight: 50}\n"
            "    - {destination: {host: api, subset: b}, weight: 50}\n"
            "  - route:\n    - {destination: {host: api, subset: a}, weight: 90}\n"
            "    - {destination: {host: api, subset: b}, weight: 10}\n"
        ),
        {},
        f"{VS}: spec.http[1].route: not translated: a second weighted split for 'api': Consul "
        "has one service-splitter per service, so every route that splits it must split it alike",
    ),
    (
        "plain route through the splitter",
        _vs(
            "  - match: [{uri: {prefix: /all}}]\n    route: [{destination: {host: api}}]\n"
            "  - route:\n    - {destination: {host: api, subset: a}, weight: 90}\n"
            "    - {destination: {host: api, subset: b}, weight: 10}\n"
        ),
        {},
        f"{VS}: spec.http[0].route: not translated: this route sends to 'api' without a subset, "
        "but Consul would pass it through the service-splitter 'api' the weighted route needs",
    ),
    (
        "unknown retry condition",
        _vs(
            "  - route: [{destination: {host: api}}]\n"
            "    retries: {attempts: 2, retryOn: retriable-headers}\n"
        ),
        {},
        f"{VS}: spec.http[0].retries.retryOn: not translated: 'retriable-headers' is not a retry "
        "condition Consul accepts",
    ),
    (
        "no timeout",
        _vs("  - route: [{destination: {host: api}}]\n    timeout: 0s\n"),
        {},
        f"{VS}: spec.http[0].timeout: not translated: 0s (no timeout) has no Consul field: "
        "RequestTimeout 0 means Consul's 15s",
    ),
    (
        "rewrite authority",
        _vs("  - route: [{destination: {host: api}}]\n    rewrite: {authority: x}\n"),
        {},
        f"{VS}: spec.http[0].rewrite.authority: not translated: Consul rewrites only the matched "
        "path prefix",
    ),
    (
        "rewrite without path match",
        _vs(
            "  - match: [{headers: {x: {exact: y}}}]\n    rewrite: {uri: /n}\n"
            "    route: [{destination: {host: api}}]\n"
        ),
        {},
        f"{VS}: spec.http[0].rewrite.uri: not translated: match[0] has no uri prefix or exact: "
        "Consul's PrefixRewrite needs one",
    ),
    (
        "source labels",
        _vs("  - match: [{sourceLabels: {app: web}}]\n    route: [{destination: {host: api}}]\n"),
        {},
        f"{VS}: spec.http[0].match[0].sourceLabels: not translated: Consul routers route every "
        "caller alike",
    ),
    (
        "relative path",
        _vs("  - match: [{uri: {prefix: api}}]\n    route: [{destination: {host: api}}]\n"),
        {},
        f"{VS}: spec.http[0].match[0].uri.prefix: not translated: 'api': Consul paths start with /",
    ),
    (
        "query prefix",
        _vs(
            "  - match: [{queryParams: {q: {prefix: a}}}]\n"
            "    route: [{destination: {host: api}}]\n"
        ),
        {},
        f"{VS}: spec.http[0].match[0].queryParams.q.prefix: not translated: Consul matches query "
        "parameters by exact, regex or presence",
    ),
    (
        "misspelt field",
        _vs("  - mtach: [{uri: {prefix: /a}}]\n    route: [{destination: {host: api}}]\n"),
        {},
        f"{VS}: spec.http[0].mtach: unknown field",
    ),
    (
        "snake_case field",
        _vs(
            "  - route: [{destination: {host: api}}]\n"
            "    retries: {attempts: 1, per_try_timeout: 1s}\n"
        ),
        {},
        f"{VS}: spec.http[0].retries.per_try_timeout: unknown field (Istio's YAML spells it "
        "perTryTimeout)",
    ),
    (
        "grpc abort",
        _vs(
            "  - route: [{destination: {host: api}}]\n"
            "    fault: {abort: {grpcStatus: UNAVAILABLE}}\n"
        ),
        {},
        f"{VS}: spec.http[0].fault.abort.grpcStatus: not translated: only httpStatus aborts are "
        "carried",
    ),
    (
        "hosts not a list",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
        "spec:\n  hosts: api\n  http: [{route: [{destination: {host: api}}]}]\n",
        {},
        f"{VS}: spec.hosts: expected a list, got a string",
    ),
    (
        "weight as a string",
        _vs(
            "  - route:\n    - {destination: {host: api, subset: a}, weight: '90'}\n"
            "    - {destination: {host: api, subset: b}, weight: 10}\n"
        ),
        {},
        f"{VS}: spec.http[0].route[0].weight: expected an integer, got a string",
    ),
    (
        "bad duration",
        _vs("  - route: [{destination: {host: api}}]\n    timeout: 10 seconds\n"),
        {},
        f"{VS}: spec.http[0].timeout: '10 seconds' is not a duration (e.g. 10s, 1.5s, 300ms, 1m)",
    ),
    (
        "subset per-subset policy",
        _dr(
            "  subsets:\n  - name: v1\n    labels: {version: v1}\n"
            "    trafficPolicy: {loadBalancer: {simple: RANDOM}}\n"
        ),
        {},
        f"{DR}: spec.subsets[0].trafficPolicy: not translated: Consul's load balancing and "
        "limits are per service, not per subset",
    ),
    (
        "locality lb",
        _dr("  trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}}\n"),
        {},
        f"{DR}: spec.trafficPolicy.loadBalancer.localityLbSetting: not translated: Consul CE's "
        "resolver has no such setting",
    ),
    (
        "tls simple",
        _dr("  trafficPolicy: {tls: {mode: SIMPLE}}\n"),
        {},
        f"{DR}: spec.trafficPolicy.tls: not translated: Consul's mesh always uses its own mTLS "
        "(ISTIO_MUTUAL); other modes have no Consul field",
    ),
    (
        "gateway errors",
        _dr("  trafficPolicy: {outlierDetection: {consecutiveGatewayErrors: 3}}\n"),
        {"callers": ("web",)},
        f"{DR}: spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors: not translated: "
        "Consul's PassiveHealthCheck counts consecutive 5xx only",
    ),
    (
        "max retries",
        _dr("  trafficPolicy: {connectionPool: {http: {maxRetries: 5}}}\n"),
        {"callers": ("web",)},
        f"{DR}: spec.trafficPolicy.connectionPool.http.maxRetries: not translated: Consul has no "
        "such upstream setting",
    ),
    (
        "label with a dash",
        _dr("  subsets:\n  - name: v1\n    labels: {app.kubernetes.io/version: v1}\n"),
        {},
        f"{DR}: spec.subsets[0].labels.app.kubernetes.io/version: not translated: not "
        "addressable as Service.Meta.<key> in a Consul filter",
    ),
    (
        "subset the DestinationRule lacks",
        _vs("  - route: [{destination: {host: api, subset: v3}}]\n")
        + "\n---\n"
        + _dr("  subsets:\n  - name: v1\n    labels: {version: v1}\n"),
        {},
        f"{VS}: subset 'v3' of 'api' is not defined by {DR}",
    ),
    (
        "second VirtualService for a host",
        _vs("  - route: [{destination: {host: api}}]\n")
        + "\n---\n"
        + _vs("  - route: [{destination: {host: api}}]\n").replace("name: api}", "name: api2}"),
        {},
        f"VirtualService/default/api2: spec.hosts: not translated: service 'api' is also routed "
        f"by {VS}",
    ),
    (
        "disable",
        _pa("  mtls: {mode: DISABLE}\n  selector: {matchLabels: {app: api}}\n"),
        {},
        f"{PA}: spec.mtls.mode: not translated: DISABLE: Consul's mesh has no plaintext-only "
        "mode (permissive accepts both)",
    ),
    (
        "port level",
        _pa("  selector: {matchLabels: {app: api}}\n  portLevelMtls: {8080: {mode: DISABLE}}\n"),
        {},
        f"{PA}: spec.portLevelMtls: not translated: Consul's MutualTLSMode is per service, not "
        "per port",
    ),
    (
        "other selector labels",
        _pa("  selector: {matchLabels: {app: api, version: v1}}\n  mtls: {mode: STRICT}\n"),
        {},
        f"{PA}: spec.selector.matchLabels: not translated: Consul's MutualTLSMode is per "
        "service: select with app only",
    ),
]


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refusal_names_resource_and_field(text: str, options: dict[str, Any], message: str) -> None:
    assert message in _problems(text, **options)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [b", "t.yaml: not valid YAML:"),
        ("- 1\n- 2\n", "t.yaml: document 1: expected a mapping, got a list"),
        (
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
            "t.yaml: document 1: kind 'Gateway' is not translated (expected VirtualService, "
            "DestinationRule or PeerAuthentication)",
        ),
        (
            "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: g}\n"
            "spec: {}\n",
            "t.yaml: document 1: VirtualService apiVersion 'networking.istio.io/v2': expected one "
            "of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: {}\n",
            "t.yaml: document 1: VirtualService needs metadata.name",
        ),
    ],
)
def test_malformed_documents_are_refused(text: str, message: str) -> None:
    with pytest.raises(RoutesError) as info:
        load_resources(text, "t.yaml")
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once() -> None:
    text = _vs(
        "  - redirect: {uri: /x}\n  - route: [{destination: {host: '*'}}]\n    timeout: 0s\n"
    )
    assert len(_problems(text)) == 3


def test_the_same_resource_twice_is_refused() -> None:
    text = _vs("  - route: [{destination: {host: api}}]\n")
    with pytest.raises(RoutesError) as info:
        translate_texts([("a.yaml", text), ("b.yaml", text)])
    assert info.value.problems == (f"{VS}: defined twice (a.yaml and b.yaml)",)


def test_durations_round_trip_in_gos_form() -> None:
    for text, want in [
        ("10s", "10s"),
        ("90s", "1m30s"),
        ("1.5s", "1.5s"),
        ("1500ms", "1.5s"),
        ("250ms", "250ms"),
        ("1h", "1h0m0s"),
        ("2m", "2m0s"),
    ]:
        assert format_duration(parse_duration(text)) == want
    for bad in ("", "10", "s", "-1s", "1d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# ---- hostile and malformed input ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            _vs(
                "  - match: [{headers: {1: {exact: a}, b: {exact: c}}}]\n"
                "    route: [{destination: {host: api}}]\n"
            ),
            f"{VS}: spec.http[0].match[0].headers.1: not translated: pseudo-headers and empty "
            "names are not matched by Consul",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
            "spec: &s\n  hosts: [api]\n  http: [{route: *s}]\n",
            f"{VS}: spec.http[0].route: expected a list, got a mapping",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: api}\n"
            "spec:\n  hosts: [api]\n  http: &h [*h]\n",
            f"{VS}: spec.http[0]: expected a mapping, got a list",
        ),
        (
            _vs("  - route: [{destination: {host: api}}]\n", hosts="[api-sidecar-proxy]"),
            f"{VS}: spec.hosts[0]: not translated: 'api-sidecar-proxy' is a sidecar proxy or "
            "Consul itself: name the service",
        ),
        (
            _vs("  - route: [{destination: {host: consul.default.svc.cluster.local}}]\n"),
            f"{VS}: spec.http[0].route[0].destination.host: not translated: "
            "'consul.default.svc.cluster.local' is a sidecar proxy or Consul itself: name the "
            "service",
        ),
        (
            _vs("  - match: [{method: {exact: get}}]\n    route: [{destination: {host: api}}]\n"),
            f"{VS}: spec.http[0].match[0].method: not translated: Consul matches a list of exact "
            "upper-case methods (exact, or a regex like GET|HEAD)",
        ),
        (
            _vs(
                "  - route:\n    - {destination: {host: api, subset: a}, weight: 90.5}\n"
                "    - {destination: {host: api, subset: b}, weight: 9.5}\n"
            ),
            f"{VS}: spec.http[0].route[0].weight: expected an integer, got a number",
        ),
        (
            _vs(
                "  - route: [{destination: {host: api}}]\n"
                "    retries: {attempts: 99999999999999999999}\n"
            ),
            f"{VS}: spec.http[0].retries.attempts: 99999999999999999999 is out of range",
        ),
        (
            _vs(
                "  - route: [{destination: {host: api}}]\n"
                "    mirror: {host: web.shop.svc.cluster.local}\n"
            ),
            f"{VS}: spec.http[0].mirror: not translated: meshlet's mirror key names a service in "
            "the router's own namespace",
        ),
        (
            _vs("  - route: [{destination: {host: api}}]\n    timeout: 1e999s\n"),
            f"{VS}: spec.http[0].timeout: '1e999s' is not a duration",
        ),
    ],
    ids=[
        "non-string header",
        "recursive alias",
        "self-containing list",
        "proxy host",
        "consul host",
        "lower-case method",
        "fractional weight",
        "huge integer",
        "cross-namespace mirror",
        "exponent duration",
    ],
)
def test_hostile_input_is_refused_cleanly(text: str, message: str) -> None:
    assert any(p.startswith(message) for p in _problems(text)), _problems(text)


def test_python_tags_are_not_constructed() -> None:
    with pytest.raises(RoutesError) as info:
        load_resources("!!python/object/apply:os.system [echo pwned]\n", "t.yaml")
    assert info.value.problems[0].startswith("t.yaml: not valid YAML:")


def test_header_names_and_values_stay_data_in_json_and_hcl() -> None:
    from intentions.render import body_hcl

    http = (
        "  - route: [{destination: {host: api}}]\n"
        "    headers:\n      request:\n        set: {'x\"} = evil': '${file(\"/etc/passwd\")}'}\n"
    )
    (router,) = _entries(_vs(http))
    assert router["Routes"][0]["Destination"]["RequestHeaders"] == {
        "Set": {'x"} = evil': '${file("/etc/passwd")}'}
    }
    hcl = body_hcl(router)
    assert '"x\\"} = evil" = "$${file(\\"/etc/passwd\\")}"' in hcl


def test_more_meta_keys_than_consul_holds_are_refused() -> None:
    route = (
        "  - match: [{{uri: {{exact: /r{n}}}}}]\n    route: [{{destination: {{host: api}}}}]\n"
        "    retries: {{attempts: 1, perTryTimeout: 1s}}\n"
    )
    text = _vs("".join(route.format(n=n) for n in range(62)))
    assert _problems(text) == [
        f"{VS}: spec.http: not translated: 62 meshlet.io/route.* Meta keys for 'api': Consul "
        "allows 64 Meta keys per entry and apply needs 3, so at most 61"
    ]
    text = _vs("".join(route.format(n=n) for n in range(61)))
    assert len(_entries(text)[0]["Meta"]) == 61


def test_names_that_are_not_kubernetes_names_or_services_are_refused() -> None:
    with pytest.raises(RoutesError) as info:
        load_resources(
            _vs("  - route: [{destination: {host: api}}]\n").replace("name: api}", "name: 'a,b'}"),
            "t.yaml",
        )
    assert info.value.problems == (
        "t.yaml: document 1: metadata.name 'a,b' is not a Kubernetes object name",
    )
    assert _problems(_pa("  selector: {matchLabels: {app: api-sidecar-proxy}}\n")) == [
        f"{PA}: spec.selector.matchLabels: not translated: 'api-sidecar-proxy' is a sidecar "
        "proxy or Consul itself: select the service"
    ]
