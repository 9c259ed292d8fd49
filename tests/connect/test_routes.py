"""connect.routes without sockets: first match wins, every matcher, splits by weight,
rewrites and header edits, and the values a table refuses."""

from __future__ import annotations

import random
import re

import pytest

from connect.routes import (
    DEFAULT_REQUEST_TIMEOUT,
    HeaderEdits,
    HeaderMatch,
    QueryMatch,
    RetryPolicy,
    Route,
    RouteAction,
    RouteMatch,
    RouteTable,
    WeightedCluster,
    default_table,
)

RNG = random.Random(3)


def to(cluster: str, **kwargs: object) -> RouteAction:
    return RouteAction((WeightedCluster(cluster),), **kwargs)  # type: ignore[arg-type]


def select(table: RouteTable, path: bytes = b"/", **kw: object) -> str:
    method = kw.get("method", b"GET")
    query = kw.get("query", b"")
    headers = kw.get("headers", [])
    return table.select(method, path, query, headers, RNG).cluster  # type: ignore[arg-type]


def test_default_table_sends_everything_to_its_cluster_unchanged() -> None:
    table = default_table("api")
    sel = table.select(b"POST", b"/a/b", b"x=1", [(b"Host", b"api")], RNG)
    assert (sel.cluster, sel.path, sel.action.retry) == ("api", None, RetryPolicy())
    assert table.fixed is sel  # the same for every request
    assert sel.action.try_timeout is None


def test_every_route_has_envoys_default_15_s_request_timeout() -> None:
    # Envoy's route `timeout` is 15 s unless set; Consul leaves it unset for an http upstream
    # whose chain says 0, and so for the filter/datacenter/peer upstreams (default_table).
    assert DEFAULT_REQUEST_TIMEOUT == 15.0
    assert default_table("api").default.request_timeout == 15.0
    assert to("api").request_timeout == 15.0
    assert to("api", request_timeout=None).request_timeout is None


def test_first_match_wins_and_the_default_is_last() -> None:
    table = RouteTable(
        (
            Route(RouteMatch(path_prefix=b"/api"), to("broad")),
            Route(RouteMatch(path_prefix=b"/api/v2"), to("narrow")),  # never reached
        ),
        to("default"),
    )
    assert select(table, b"/api/v2/x") == "broad"
    assert select(table, b"/other") == "default"


@pytest.mark.parametrize(
    ("match", "path", "hit"),
    [
        (RouteMatch(path_exact=b"/a"), b"/a", True),
        (RouteMatch(path_exact=b"/a"), b"/a/", False),
        (RouteMatch(path_prefix=b"/a"), b"/ab", True),
        (RouteMatch(path_prefix=b"/a"), b"/b", False),
        (RouteMatch(path_regex=re.compile(rb"/v[0-9]+/.*")), b"/v12/x", True),
        (RouteMatch(path_regex=re.compile(rb"/v[0-9]+")), b"/v12/x", False),  # whole path
        (RouteMatch(methods=frozenset({b"GET", b"HEAD"})), b"/", True),
    ],
)
def test_path_and_method_matchers(match: RouteMatch, path: bytes, hit: bool) -> None:
    table = RouteTable((Route(match, to("hit")),), to("miss"))
    assert (select(table, path) == "hit") is hit


def test_method_mismatch() -> None:
    table = RouteTable((Route(RouteMatch(methods=frozenset({b"POST"})), to("hit")),), to("miss"))
    assert select(table, method=b"GET") == "miss"
    assert select(table, method=b"POST") == "hit"


@pytest.mark.parametrize(
    ("header", "sent", "hit"),
    [
        (HeaderMatch(b"x-canary", exact=b"true"), [(b"X-Canary", b"true")], True),
        (HeaderMatch(b"x-canary", exact=b"true"), [(b"x-canary", b"TRUE")], False),
        (HeaderMatch(b"x-canary", exact=b"true"), [], False),
        (HeaderMatch(b"x-v", prefix=b"2."), [(b"x-v", b"2.1")], True),
        (HeaderMatch(b"x-v", suffix=b"-beta"), [(b"x-v", b"2-beta")], True),
        (HeaderMatch(b"x-v", regex=re.compile(rb"[0-9]+")), [(b"x-v", b"12a")], False),
        (HeaderMatch(b"x-v", present=True), [(b"x-v", b"")], True),
        (HeaderMatch(b"x-v", present=True, invert=True), [(b"x-v", b"1")], False),
        (HeaderMatch(b"x-v", exact=b"1", invert=True), [], True),
        (HeaderMatch(b"x-v", exact=b"1,2"), [(b"x-v", b"1"), (b"X-V", b"2")], True),
    ],
)
def test_header_matchers(header: HeaderMatch, sent: list[tuple[bytes, bytes]], hit: bool) -> None:
    table = RouteTable((Route(RouteMatch(headers=(header,)), to("hit")),), to("miss"))
    assert (select(table, headers=sent) == "hit") is hit


@pytest.mark.parametrize(
    ("query_match", "query", "hit"),
    [
        (QueryMatch(b"v", exact=b"2"), b"a=1&v=2", True),
        (QueryMatch(b"v", exact=b"2"), b"v=3&v=2", False),  # the first value counts
        (QueryMatch(b"v", exact=b"a b"), b"v=a%20b", True),
        (QueryMatch(b"v", regex=re.compile(rb"[0-9]")), b"v=7", True),
        (QueryMatch(b"v", present=True), b"v", True),
        (QueryMatch(b"v", present=True), b"w=1", False),
    ],
)
def test_query_matchers(query_match: QueryMatch, query: bytes, hit: bool) -> None:
    table = RouteTable((Route(RouteMatch(query=(query_match,)), to("hit")),), to("miss"))
    assert (select(table, query=query) == "hit") is hit


def test_split_by_weight_in_consul_units() -> None:
    action = RouteAction((WeightedCluster("v1", 9000), WeightedCluster("v2", 1000)))
    rng = random.Random(11)
    picks = [action.pick(rng) for _ in range(10_000)]
    assert 800 <= picks.count("v2") <= 1200
    assert RouteAction((WeightedCluster("v1", 10000), WeightedCluster("v2", 0))).pick(rng) == "v1"


def test_prefix_rewrite() -> None:
    table = RouteTable(
        (
            Route(RouteMatch(path_prefix=b"/old/"), to("a", prefix_rewrite=b"/new/")),
            Route(RouteMatch(path_exact=b"/exact"), to("a", prefix_rewrite=b"/other")),
            Route(RouteMatch(methods=frozenset({b"PUT"})), to("a", prefix_rewrite=b"/v2/")),
        ),
        to("a"),
    )
    assert table.select(b"PUT", b"/x?", b"", [], RNG).path == b"/v2/x?"
    assert table.select(b"GET", b"/old/x/y", b"", [], RNG).path == b"/new/x/y"
    assert table.select(b"GET", b"/exact", b"", [], RNG).path == b"/other"
    assert table.select(b"GET", b"/keep", b"", [], RNG).path is None


def test_header_edits() -> None:
    edits = HeaderEdits(
        add=((b"x-added", b"1"),), set=((b"x-set", b"new"),), remove=frozenset({b"x-gone"})
    )
    headers = [(b"X-Set", b"old"), (b"X-Gone", b"a"), (b"x-keep", b"k"), (b"x-set", b"old2")]
    assert edits.apply(headers) == [(b"x-keep", b"k"), (b"x-set", b"new"), (b"x-added", b"1")]
    assert not HeaderEdits()


@pytest.mark.parametrize(
    ("edits", "problem"),
    [
        (lambda: HeaderEdits(set=((b"content-length", b"0"),)), "frames the message"),
        (lambda: HeaderEdits(add=((b"transfer-encoding", b"chunked"),)), "frames the message"),
        (lambda: HeaderEdits(remove=frozenset({b"connection"})), "frames the message"),
        (lambda: HeaderEdits(add=((b"x-a", b"1\r\nx-b: 2"),)), "CR, LF or NUL"),
        (lambda: HeaderEdits(add=((b"X-Upper", b"1"),)), "lower-case field name"),
        (lambda: HeaderEdits(add=((b"x a", b"1"),)), "lower-case field name"),
        (lambda: RouteAction(()), "at least one destination"),
        (lambda: RouteAction((WeightedCluster("a", 0),)), "sum to zero"),
        (lambda: WeightedCluster("a", -1), "must not be negative"),
        (lambda: to("a", request_timeout=0), "request_timeout must be positive"),
        (lambda: RouteMatch(path_exact=b"/", path_prefix=b"/"), "at most one of"),
        (lambda: HeaderMatch(b"X-A"), "lower-case"),
        (
            lambda: Route(RouteMatch(path_regex=re.compile(b"/")), to("a", prefix_rewrite=b"/")),
            "not a regex",
        ),
        (lambda: HeaderMatch(b"x-a", exact=b"1", present=True), "at most one condition"),
    ],
)
def test_refused_values_name_the_problem(edits: object, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        edits()  # type: ignore[operator]


def test_retry_backoff_is_fully_jittered_and_capped() -> None:
    assert RetryPolicy().delay(1, RNG) == 0.0  # the built-in policy retries at once
    policy = RetryPolicy(num_retries=5, backoff=0.025, max_backoff=0.25)
    rng = random.Random(1)
    first = [policy.delay(1, rng) for _ in range(200)]
    assert all(0.0 <= d <= 0.025 for d in first) and max(first) > 0.02
    third = [policy.delay(3, rng) for _ in range(200)]
    assert all(0.0 <= d <= 0.175 for d in third) and max(third) > 0.15
    assert all(d <= 0.25 for d in (policy.delay(8, rng) for _ in range(200)))
    with pytest.raises(ValueError, match="backoff"):
        RetryPolicy(backoff=-1)
