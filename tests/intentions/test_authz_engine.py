"""The compiled decision engine: precedence, permissions, matchers, normalization, speed."""

from __future__ import annotations

from typing import Any

import pytest

from intentions.engine import (
    Identity,
    compile_snapshot,
    http_request,
    identity_from_consul_uri,
    normalize_path,
)
from intentions.entries import load_entry
from intentions.errors import BadRequest


def entry(name: str, *sources: dict[str, Any], **extra: Any) -> Any:
    return load_entry(
        {"Kind": "service-intentions", "Name": name, "Sources": list(sources), **extra}
    )


API = Identity("api")
WEB = Identity("web")


def test_default_applies_without_intentions() -> None:
    allow = compile_snapshot([], default_allow=True)
    deny = compile_snapshot(
        [], default_allow=False, default_reason="Default behavior configured by ACLs"
    )
    assert allow.decide_connection(API, WEB).allowed
    decision = deny.decide_connection(API, WEB)
    assert not decision.allowed
    assert decision.reason == "Default behavior configured by ACLs"


def test_exact_source_beats_wildcard_and_exact_destination_beats_wildcard() -> None:
    snap = compile_snapshot(
        [
            entry("api", {"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}),
            entry("*", {"Name": "db", "Action": "allow"}, {"Name": "*", "Action": "deny"}),
        ],
        default_allow=True,
    )
    assert snap.decide_connection(API, WEB).allowed
    assert not snap.decide_connection(API, Identity("db")).allowed  # `* => api` (8) beats 6
    assert snap.decide_connection(Identity("other"), Identity("db")).allowed
    assert not snap.decide_connection(Identity("other"), WEB).allowed
    assert snap.decide_connection(API, WEB).reason == "Matched L4 intention: web => api (allow)"


def test_l7_unmatched_falls_to_default_not_to_lower_precedence() -> None:
    snap = compile_snapshot(
        [
            entry(
                "api",
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/ok"}}]},
                {"Name": "*", "Action": "allow"},
            )
        ],
        default_allow=False,
    )
    assert snap.decide_request(API, WEB, http_request("GET", "/ok")).allowed
    miss = snap.decide_request(API, WEB, http_request("GET", "/other"))
    assert not miss.allowed
    assert "no permission" in miss.reason
    # The L4 view of an L7 intention is deny (Consul's authorize/check rule).
    assert not snap.decide_connection(API, WEB).allowed
    assert snap.decide_connection(API, WEB).reason.startswith("Matched L7 intention: web => api")


def test_permissions_are_first_match() -> None:
    snap = compile_snapshot(
        [
            entry(
                "api",
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                        {"Action": "allow", "HTTP": {"PathPrefix": "/"}},
                    ],
                },
            )
        ],
        default_allow=False,
    )
    admin = snap.decide_request(API, WEB, http_request("GET", "/administrator"))
    assert (admin.allowed, admin.permission) == (False, 0)
    assert snap.decide_request(API, WEB, http_request("GET", "/x")).permission == 1


@pytest.mark.parametrize(
    ("header", "headers", "want"),
    [
        ({"Name": "x", "Exact": "a", "Invert": True}, {}, False),  # absent: inverted fails too
        ({"Name": "x", "Present": True, "Invert": True}, {}, True),
        ({"Name": "x", "Present": True}, {"X": ""}, True),
        ({"Name": "x", "Exact": "a,b"}, {"x": ["a", "b"]}, True),  # repeated headers joined
        ({"Name": "x", "Prefix": "AB", "IgnoreCase": True}, {"x": "abc"}, True),
        ({"Name": "x", "Suffix": "C"}, {"x": "abc"}, False),
        ({"Name": "x", "Contains": "b"}, {"x": "abc"}, True),
        ({"Name": "x", "Regex": "a.c"}, {"x": "abcd"}, False),  # regex is a full match
        ({"Name": ":authority", "Exact": "h"}, {}, True),
    ],
)
def test_header_matchers_follow_envoy(
    header: dict[str, Any], headers: dict[str, Any], want: bool
) -> None:
    snap = compile_snapshot(
        [
            entry(
                "api",
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"Header": [header]}}]},
            )
        ],
        default_allow=False,
    )
    assert snap.decide_request(API, WEB, http_request("GET", "/", "h", headers)).allowed is want


def test_path_matchers_ignore_query_and_methods_are_case_sensitive() -> None:
    snap = compile_snapshot(
        [
            entry(
                "api",
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathRegex": "/a/[0-9]+", "Methods": ["GET"]}}
                    ],
                },
            )
        ],
        default_allow=False,
    )
    assert snap.decide_request(API, WEB, http_request("GET", "/a/12?x=y")).allowed
    assert not snap.decide_request(API, WEB, http_request("PUT", "/a/12")).allowed
    assert not snap.decide_request(API, WEB, http_request("GET", "/a/12/x")).allowed


def test_namespaces_partitions_and_peers_are_distinct_keys() -> None:
    snap = compile_snapshot(
        [
            entry(
                "api",
                {"Name": "web", "Namespace": "dev", "Action": "deny"},
                {"Name": "*", "Namespace": "dev", "Action": "allow"},
                {"Name": "web", "Peer": "east", "Action": "allow"},
                {"Name": "*", "Namespace": "*", "Action": "deny"},
                Namespace="prod",
            )
        ],
        default_allow=True,
    )
    dest = Identity("api", "prod")
    assert not snap.decide_connection(dest, Identity("web", "dev")).allowed
    assert snap.decide_connection(dest, Identity("x", "dev")).allowed
    assert not snap.decide_connection(dest, Identity("web", "prod")).allowed
    assert snap.decide_connection(dest, Identity("web", peer="east")).allowed
    assert snap.decide_connection(Identity("api"), Identity("web", "dev")).allowed  # other ns


def test_unsupported_content_fails_closed_for_its_destination() -> None:
    """Content meshlet cannot enforce exactly denies everything to that destination (the
    other destinations stay enforced); see test_authz_stored.py for the read path."""
    jwt = entry("api", {"Name": "web", "Action": "allow"}, JWT={"Providers": [{"Name": "okta"}]})
    bad_regex = entry(
        "db", {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "(("}}]}
    )
    fine = entry("cache", {"Name": "web", "Action": "deny"})
    snap = compile_snapshot([jwt, bad_regex, fine], default_allow=True)
    assert set(snap.broken) == {("default", "default", "api"), ("default", "default", "db")}
    assert "JWT" in snap.broken[("default", "default", "api")].reason
    assert "regular expression" in snap.broken[("default", "default", "db")].reason
    for dest in ("api", "db"):
        for source in ("web", "other"):
            got = snap.decide_connection(Identity(dest), Identity(source))
            assert not got.allowed
            assert f"intentions for {dest} cannot be enforced" in got.reason
            req = http_request("GET", "/", "x")
            assert not snap.decide_request(Identity(dest), Identity(source), req).allowed
    assert not snap.decide_connection(Identity("cache"), WEB).allowed
    assert snap.decide_connection(Identity("cache"), Identity("other")).allowed
    assert snap.decide_connection(Identity("elsewhere"), WEB).allowed


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/public/../admin", "/admin"),
        ("/%61dmin?x=%61", "/admin?x=%61"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/../..", "/"),
        ("\\admin\\x", "/admin/x"),
        ("//admin", "//admin"),
        ("/%2Fadmin", "/%2Fadmin"),
        ("/%2e%2e/admin", "/admin"),
        ("*", "*"),
    ],
)
def test_normalize_path_base(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


def test_nul_is_rejected() -> None:
    with pytest.raises(BadRequest):
        normalize_path("/a%00b")


def test_lower_case_methods_are_rejected_before_authorization() -> None:
    with pytest.raises(BadRequest, match="upper-case"):
        http_request("get", "/")
    assert http_request("PROPFIND", "/").method == "PROPFIND"


def test_consul_spiffe_identities() -> None:
    assert identity_from_consul_uri("spiffe://1111.consul/ns/default/dc/dc1/svc/web") == WEB
    assert identity_from_consul_uri("spiffe://t.consul/ap/p1/ns/n/dc/dc1/svc/web") == Identity(
        "web", "n", "p1"
    )
    assert identity_from_consul_uri("spiffe://t.consul/agent/client/dc/dc1/id/x") is None


def test_decisions_with_ten_thousand_intentions() -> None:
    """Correctness at scale; the cost is measured by bench/intentions_engine.py."""
    entries = []
    for i in range(1000):
        sources: list[dict[str, Any]] = [
            {"Name": f"src{j}", "Action": "allow" if j % 2 else "deny"} for j in range(9)
        ]
        sources.append(
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Methods": ["POST"]}},
                    {"Action": "allow", "HTTP": {"Header": [{"Name": "x-env", "Exact": "prod"}]}},
                    {"Action": "allow", "HTTP": {"PathRegex": "/api/v[0-9]+/.*"}},
                ],
            }
        )
        entries.append(entry(f"svc{i}", *sources))
    assert sum(len(e.sources) for e in entries) == 10_000
    snap = compile_snapshot(entries, default_allow=False)
    request = http_request("GET", "/api/v2/items?x=1", "svc", {"x-env": "dev"})
    dest = Identity("svc500")
    assert snap.decide_request(dest, WEB, request).allowed
    assert snap.decide_connection(dest, Identity("src3")).allowed
    assert not snap.decide_connection(dest, Identity("src4")).allowed
    # An L7 intention answers a connection-level question with deny.
    assert not snap.decide_connection(dest, WEB).allowed
    admin = http_request("POST", "/admin/x", "svc", {})
    assert not snap.decide_request(dest, WEB, admin).allowed
