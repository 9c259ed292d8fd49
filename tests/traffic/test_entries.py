"""Decoding and validation of the routing kinds, with Consul's texts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from traffic.entries import (
    ServiceResolver,
    ServiceRouter,
    ServiceSplitter,
    entry_from_json,
    load_entry,
    scale_weight,
)
from traffic.errors import EntryDecodeError, InvalidEntry

ROUTER = "service-router"
SPLITTER = "service-splitter"
RESOLVER = "service-resolver"


def _route(**http: Any) -> dict[str, Any]:
    return {"Kind": ROUTER, "Name": "web", "Routes": [{"Match": {"HTTP": http}}]}


def test_snake_case_and_camel_case_decode_to_the_same_router() -> None:
    snake = load_entry(
        {
            "kind": ROUTER,
            "name": "web",
            "routes": [
                {
                    "match": {"http": {"path_prefix": "/admin", "methods": ["get"]}},
                    "destination": {
                        "service_subset": "v2",
                        "request_timeout": "10s",
                        "num_retries": 3,
                        "retry_on": ["5xx"],
                        "retry_on_status_codes": [503],
                        "request_headers": {"set": {"x-a": "1"}},
                    },
                }
            ],
        }
    )
    camel = load_entry(
        {
            "Kind": ROUTER,
            "Name": "web",
            "Routes": [
                {
                    "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
                    "Destination": {
                        "ServiceSubset": "v2",
                        "RequestTimeout": 10_000_000_000,
                        "NumRetries": "3",
                        "RetryOn": "5xx",
                        "RetryOnStatusCodes": [503],
                        "RequestHeaders": {"Set": {"x-a": "1"}},
                    },
                }
            ],
        }
    )
    assert snake == camel
    assert isinstance(camel, ServiceRouter)
    assert camel.to_json()["Routes"] == [
        {
            "Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["GET"]}},
            "Destination": {
                "RequestTimeout": "10s",
                "ServiceSubset": "v2",
                "NumRetries": 3,
                "RetryOn": ["5xx"],
                "RetryOnStatusCodes": [503],
                "RequestHeaders": {"Set": {"x-a": "1"}},
            },
        }
    ]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"Name": "web"},
            "Request decoding failed: Payload does not contain a kind/Kind key at the top level",
        ),
        (
            {"Kind": 7, "Name": "web"},
            "Request decoding failed: Kind value in payload is not a string",
        ),
        # Only "Kind" or "kind" name the kind, as in DecodeConfigEntry.
        (
            {"KIND": ROUTER, "Name": "web"},
            "Request decoding failed: Payload does not contain a kind/Kind key at the top level",
        ),
        (
            {"Kind": ROUTER, "Name": "web", "Bogus": 1},
            'Request decoding failed: 1 error occurred:\n\t* invalid config key "Bogus"\n\n',
        ),
        (
            {"Kind": ROUTER, "Name": "web", "Namespace": "x"},
            'Request decoding failed: 1 error occurred:\n\t* invalid config key "Namespace", '
            "namespaces are a consul enterprise feature\n\n",
        ),
        (
            {"Kind": ROUTER, "Name": "web", "Routes": [{"Match": {"HTTP": {"Pth": "/"}}}]},
            "Request decoding failed: 1 error occurred:\n\t* invalid config key "
            '"Routes[0].Match.HTTP.Pth"\n\n',
        ),
        (
            {"Kind": ROUTER, "Name": "web", "Routes": [{"Destination": {"NumRetries": "x"}}]},
            "Request decoding failed: 1 error(s) decoding:\n\n* cannot parse "
            "'Routes[0].Destination.NumRetries' as uint: strconv.ParseUint: parsing \"x\": "
            "invalid syntax",
        ),
        (
            {"Kind": RESOLVER, "Name": "web", "ConnectTimeout": "5 seconds"},
            "Request decoding failed: 1 error(s) decoding:\n\n* error decoding 'ConnectTimeout': "
            'time: invalid duration "5 seconds"',
        ),
        (
            {"Kind": SPLITTER, "Name": "web", "Splits": {"Weight": {}}},
            "Request decoding failed: 1 error(s) decoding:\n\n* 'Splits[0].Weight' expected type "
            "'float32', got unconvertible type 'map[string]interface {}', value: 'map[]'",
        ),
    ],
)
def test_bodies_consul_cannot_decode(body: dict[str, Any], text: str) -> None:
    with pytest.raises(EntryDecodeError) as err:
        load_entry(body)
    assert str(err.value) == text


ROUTER_CASES = [
    ({"Kind": ROUTER}, "Name is required"),
    (_route(PathExact="x"), "Route[0] PathExact doesn't start with '/': \"x\""),
    (_route(PathPrefix="x"), "Route[0] PathPrefix doesn't start with '/': \"x\""),
    (
        _route(PathExact="/a", PathRegex="/.*"),
        "Route[0] should only contain at most one of PathExact, PathPrefix, or PathRegex",
    ),
    (_route(Header=[{"Exact": "1"}]), "Route[0] Header[0] missing required Name field"),
    (
        _route(Header=[{"Name": "x", "Exact": "1", "Prefix": "a"}]),
        "Route[0] Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex",
    ),
    (
        _route(Header=[{"Name": "x", "Invert": True}]),
        "Route[0] Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex",
    ),
    (_route(QueryParam=[{"Exact": "1"}]), "Route[0] QueryParam[0] missing required Name field"),
    (
        _route(QueryParam=[{"Name": "q", "Present": True, "Regex": "a"}]),
        "Route[0] QueryParam[0] should only contain one of Present, Exact, or Regex",
    ),
    (_route(Methods=["FETCH"]), 'Route[0] Methods contains an invalid method "FETCH"'),
    (_route(Methods=["get", "GET"]), 'Route[0] Methods contains "GET" more than once'),
    (
        {"Kind": ROUTER, "Name": "web", "Routes": [{"Destination": {"PrefixRewrite": "/"}}]},
        "Route[0] cannot make use of PrefixRewrite without configuring either PathExact or "
        "PathPrefix",
    ),
    (
        {"Kind": ROUTER, "Name": "web", "Routes": [{"Destination": {"RetryOn": ["sometimes"]}}]},
        'Route[0] contains an invalid retry condition: "sometimes"',
    ),
    (
        {"Kind": ROUTER, "Name": "web", "Meta": {"k" * 129: "v"}},
        f'1 error occurred:\n\t* Meta key "{"k" * 129}" exceeds maximum length 128\n\n',
    ),
]
SPLITTER_CASES = [
    ({"Kind": SPLITTER, "Name": "web"}, "no splits configured"),
    (
        {
            "Kind": SPLITTER,
            "Name": "web",
            "Splits": [{"Weight": 90, "ServiceSubset": "a"}, {"Weight": 9.99}],
        },
        "the sum of all split weights must be 100, not 99.989998",
    ),
    (
        {
            "Kind": SPLITTER,
            "Name": "web",
            "Splits": [{"Weight": 50}, {"Weight": 50, "Service": "web"}],
        },
        'split destination occurs more than once: service="web", subset="", namespace="", '
        'partition=""',
    ),
]
RESOLVER_CASES = [
    ({"Kind": RESOLVER}, "Name is required"),
    (
        {"Kind": RESOLVER, "Name": "web", "Subsets": {"V1": {}}},
        'Subset "V1" is invalid: must be 63 characters or fewer, begin or end with lower case '
        "alphanumeric characters, and contain lower case alphanumeric characters or '-' in "
        "between",
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "DefaultSubset": "v3"},
        'DefaultSubset "v3" is not a valid subset',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "Redirect": {"Service": "a"},
            "Failover": {"*": {"Datacenters": ["dc2"]}},
        },
        "Redirect and Failover cannot both be set",
    ),
    ({"Kind": RESOLVER, "Name": "web", "Redirect": {}}, "Redirect is empty"),
    (
        {"Kind": RESOLVER, "Name": "web", "Redirect": {"ServiceSubset": "v1"}},
        "Redirect.ServiceSubset defined without Redirect.Service",
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Redirect": {"Service": "web", "ServiceSubset": "v9"}},
        'Redirect.ServiceSubset "v9" is not a valid subset of "web"',
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Redirect": {"Service": "a", "Namespace": "ns"}},
        "Redirect: Setting Namespace requires Consul Enterprise",
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Failover": {"v9": {"Datacenters": ["dc2"]}}},
        'Bad Failover["v9"]: not a valid subset subset',
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Failover": {"*": {}}},
        'Bad Failover["*"]: one of Service, ServiceSubset, Namespace, Targets, or Datacenters is '
        "required",
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "Failover": {"*": {"Datacenters": ["dc2"], "Targets": [{"Datacenter": "dc3"}]}},
        },
        'Bad Failover["*"]: Targets cannot be set with Datacenters',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "Failover": {"*": {"Targets": [{"Peer": "p", "Datacenter": "dc3"}]}},
        },
        'Bad Failover["*"].Targets[0]: Peer cannot be set with Datacenter',
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Failover": {"*": {"Datacenters": [""]}}},
        'Bad Failover["*"].Datacenters: found empty datacenter',
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "ConnectTimeout": "-1s"},
        "Bad ConnectTimeout '-1s', must be >= 0",
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "RequestTimeout": "-2s"},
        "Bad RequestTimeout '-2s', must be >= 0",
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "LoadBalancer": {"Policy": "fastest"}},
        'Bad LoadBalancer policy: "fastest" is not supported',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "LoadBalancer": {"Policy": "least_request", "RingHashConfig": {}},
        },
        "Bad LoadBalancer configuration. RingHashConfig specified for incompatible load balancing "
        'policy "least_request"',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "LoadBalancer": {"Policy": "random", "HashPolicies": [{"SourceIP": True}]},
        },
        "Bad LoadBalancer configuration: HashPolicies specified for non-hash-based Policy: "
        '"random"',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "LoadBalancer": {"Policy": "maglev", "HashPolicies": [{"Field": "header"}]},
        },
        'Bad LoadBalancer HashPolicy[0]: Field "header" was specified without a FieldValue',
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "HashPolicies": [
                    {
                        "Field": "cookie",
                        "FieldValue": "s",
                        "CookieConfig": {"Session": True, "TTL": "1h"},
                    }
                ],
            },
        },
        "Bad LoadBalancer HashPolicy[0]: a session cookie cannot have an associated TTL",
    ),
    (
        {
            "Kind": RESOLVER,
            "Name": "web",
            "LoadBalancer": {
                "Policy": "ring_hash",
                "HashPolicies": [{"SourceIP": True, "Field": "header", "FieldValue": "x"}],
            },
        },
        "Bad LoadBalancer HashPolicy[0]: A single hash policy cannot hash both a source address "
        'and a "header"',
    ),
    (
        {"Kind": RESOLVER, "Name": "web", "Subsets": {"v1": {"Filter": "Service.Meta.version =="}}},
        'Filter for subset "v1" is not a valid expression: bad filter',
    ),
]


@pytest.mark.parametrize(("body", "text"), ROUTER_CASES + SPLITTER_CASES + RESOLVER_CASES)
def test_entries_consul_refuses(body: dict[str, Any], text: str) -> None:
    def check(expr: str) -> str | None:
        return "bad filter" if expr.endswith("==") else None

    with pytest.raises(InvalidEntry) as err:
        load_entry(body, check_filter=check)
    assert str(err.value) == text


def test_weights_are_normalized_to_hundredths_and_sum_exactly() -> None:
    entry = load_entry(
        {
            "Kind": SPLITTER,
            "Name": "web",
            "Splits": [
                {"Weight": 33.333, "ServiceSubset": "a"},
                {"Weight": 33.333, "ServiceSubset": "b"},
                # A string is weakly decoded; 33.339 rounds to 33.34.
                {"Weight": "33.339", "ServiceSubset": "c"},
            ],
        }
    )
    assert isinstance(entry, ServiceSplitter)
    assert [s["Weight"] for s in entry.to_json()["Splits"]] == [33.33, 33.33, 33.34]
    # A weight of 0 keeps a leg warm and is allowed.
    load_entry(
        {"Kind": SPLITTER, "Name": "w", "Splits": [{"Weight": 100}, {"Weight": 0, "Service": "x"}]}
    )


def test_nonfinite_weights_do_not_crash_and_are_refused() -> None:
    with pytest.raises(InvalidEntry, match="the sum of all split weights must be 100"):
        load_entry({"Kind": SPLITTER, "Name": "w", "Splits": [{"Weight": 1e300}]})


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=6))
def test_splits_in_hundredths_pass_exactly_when_they_sum_to_100(parts: list[int]) -> None:
    body = {
        "Kind": SPLITTER,
        "Name": "web",
        "Splits": [{"Weight": p / 100, "Service": f"s{i}"} for i, p in enumerate(parts)],
    }
    if sum(parts) == 10_000:
        entry = load_entry(body)
        assert isinstance(entry, ServiceSplitter)
        assert sum(scale_weight(s.weight) for s in entry.splits) == 10_000
    else:
        with pytest.raises(InvalidEntry, match="the sum of all split weights must be 100"):
            load_entry(body)


def test_resolver_reads_back_as_consul_marshals_it() -> None:
    body = {
        "Kind": RESOLVER,
        "Name": "web",
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"OnlyPassing": True}},
        "Failover": {"*": {"Datacenters": ["dc2", "dc3"]}},
        "ConnectTimeout": "15s",
        "RequestTimeout": 90_000_000_000,
        "LoadBalancer": {
            "Policy": "ring_hash",
            "RingHashConfig": {"MinimumRingSize": 1024},
            "HashPolicies": [
                {"Field": "cookie", "FieldValue": "sid", "CookieConfig": {"TTL": "1h"}}
            ],
        },
    }
    entry = load_entry(body)
    assert isinstance(entry, ServiceResolver)
    rendered = entry.to_json()
    assert rendered == {
        "Kind": RESOLVER,
        "Name": "web",
        "ConnectTimeout": "15s",
        "RequestTimeout": "1m30s",
        "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"OnlyPassing": True}},
        "Failover": {"*": {"Datacenters": ["dc2", "dc3"]}},
        "LoadBalancer": {
            "Policy": "ring_hash",
            "RingHashConfig": {"MinimumRingSize": 1024},
            # CookieConfig.TTL has no custom marshaller: integer nanoseconds.
            "HashPolicies": [
                {"Field": "cookie", "FieldValue": "sid", "CookieConfig": {"TTL": 3_600_000_000_000}}
            ],
        },
    }
    assert entry_from_json(rendered) == entry


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_KEYS = st.sampled_from(
    [
        "Name",
        "Routes",
        "Splits",
        "Match",
        "HTTP",
        "Destination",
        "Header",
        "Weight",
        "Subsets",
        "Failover",
        "Redirect",
        "LoadBalancer",
        "HashPolicies",
        "ConnectTimeout",
        "Targets",
        "Datacenters",
        "Methods",
        "PathPrefix",
        "ServiceSubset",
        "Meta",
        "CookieConfig",
    ]
)
_SHAPED = st.recursive(
    _JSON,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


@given(
    st.sampled_from([ROUTER, SPLITTER, RESOLVER]),
    st.dictionaries(_KEYS, _SHAPED, max_size=5),
)
def test_hostile_bodies_only_ever_raise_consul_errors(kind: str, body: dict[str, Any]) -> None:
    """Whatever the body, the answer is an entry or one of Consul's two error families."""
    try:
        entry = load_entry({**body, "Kind": kind})
    except (EntryDecodeError, InvalidEntry):
        return
    assert entry_from_json(entry.to_json()) == entry
