"""service-intentions decoding, normalization and validation, with Consul's texts."""

from __future__ import annotations

from typing import Any

import pytest

from intentions.entries import (
    decode_entry,
    entry_to_json,
    intention_display,
    load_entry,
    normalize,
    precedence,
    validate,
)
from intentions.errors import EntryDecodeError, InvalidEntry


def entry(*sources: dict[str, Any], name: str = "api", **extra: Any) -> dict[str, Any]:
    return {"Kind": "service-intentions", "Name": name, "Sources": list(sources), **extra}


def test_keys_match_case_insensitively_and_in_snake_case() -> None:
    e = load_entry(
        {
            "kind": "service-intentions",
            "name": "api",
            "sources": [
                {
                    "name": "web",
                    "permissions": [
                        {"action": "allow", "http": {"path_prefix": "/v1", "methods": ["get"]}}
                    ],
                },
                {"Name": "db", "Action": "deny", "legacy_id": ""},
            ],
        }
    )
    web = e.sources[0]
    assert web.permissions[0].http is not None
    assert web.permissions[0].http.path_prefix == "/v1"
    assert web.permissions[0].http.methods == ("GET",)  # upper-cased on write


def test_unknown_keys_are_all_reported_like_consul() -> None:
    with pytest.raises(EntryDecodeError) as err:
        decode_entry(entry({"Name": "web", "Action": "allow", "Foo": 1}, Bar=2))
    assert str(err.value) == (
        "Request decoding failed: 2 errors occurred:\n"
        '\t* invalid config key "Bar"\n'
        '\t* invalid config key "Sources[0].Foo"\n\n'
    )


def test_missing_and_wrong_kind() -> None:
    with pytest.raises(EntryDecodeError, match="Payload does not contain a kind/Kind key"):
        decode_entry({"Name": "x"})
    with pytest.raises(EntryDecodeError, match="invalid config entry kind: service-router"):
        decode_entry({"Kind": "service-router", "Name": "x"})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (entry(name=""), "Name is required"),
        (
            entry({"Name": "web", "Action": "allow"}, name="a*"),
            "Name: wildcard character '*' cannot be used with partial values",
        ),
        (entry(), "At least one source is required"),
        (entry({"Name": ""}), "Sources[0].Name is required"),
        (
            entry({"Name": "*", "Namespace": "*x", "Action": "allow"}),
            "Sources[0].Namespace: wildcard character '*' cannot be used with partial values",
        ),
        (
            entry({"Name": "web", "Namespace": "*", "Action": "allow"}),
            "Sources[0].Name: exact value cannot follow wildcard namespace",
        ),
        (
            entry({"Name": "web", "Peer": "p*", "Action": "allow"}),
            "Sources[0].Peer: cannot use wildcard '*' in peer",
        ),
        (
            entry({"Name": "web", "Peer": "p", "Partition": "x", "Action": "allow"}),
            "Sources[0].Peer: cannot set Peer and Partition at the same time.",
        ),
        (entry({"Name": "web"}), "Sources[0].Action must be set to 'allow' or 'deny'"),
        (
            entry(
                {
                    "Name": "web",
                    "Action": "allow",
                    "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}],
                }
            ),
            "Sources[0].Action must be omitted if Permissions are specified",
        ),
        (
            entry(
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}]},
                name="*",
            ),
            "Sources[0].Permissions cannot be specified on intentions with wildcarded destinations",
        ),
        (
            entry({"Name": "web", "Action": "allow", "Type": "external"}),
            "Sources[0].Type must be set to 'consul'",
        ),
        (
            entry({"Name": "web", "Permissions": [{"HTTP": {"PathExact": "/"}}]}),
            "Sources[0].Permissions[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            entry({"Name": "web", "Permissions": [{"Action": "allow"}]}),
            "Sources[0].Permissions[0].HTTP is required",
        ),
        (
            entry({"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]}),
            "Sources[0].Permissions[0].HTTP should not be empty",
        ),
        (
            entry(
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]}
            ),
            "Sources[0].Permissions[0].HTTP.PathExact doesn't start with '/': \"x\"",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathExact": "/x", "PathRegex": ".*"}}
                    ],
                }
            ),
            "Sources[0].Permissions[0].HTTP should only contain at most one of PathExact, "
            "PathPrefix, or PathRegex",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Header": [{"Exact": "x"}]}}],
                }
            ),
            "Sources[0].Permissions[0].HTTP.Header[0] missing required Name field",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [
                        {
                            "Action": "allow",
                            "HTTP": {"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]},
                        }
                    ],
                }
            ),
            "Sources[0].Permissions[0].HTTP.Header[0] should only contain one of Present, Exact, "
            "Prefix, Suffix, Contains, or Regex",
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["FETCH"]}}],
                }
            ),
            'Sources[0].Permissions[0].HTTP.Methods contains an invalid method "FETCH"',
        ),
        (
            entry(
                {
                    "Name": "web",
                    "Permissions": [{"Action": "allow", "HTTP": {"Methods": ["get", "GET"]}}],
                }
            ),
            'Sources[0].Permissions[0].HTTP.Methods contains "GET" more than once',
        ),
        (
            entry({"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}),
            'Sources[1] defines "default/default/web" more than once',
        ),
        (
            entry({"Name": "web", "Action": "allow", "LegacyMeta": {"k": "v"}}),
            "Sources[0].LegacyMeta must be omitted",
        ),
        (
            entry({"Name": "web", "Action": "allow", "Description": "x" * 513}),
            "Sources[0].Description exceeds maximum length 512",
        ),
        (
            entry({"Name": "web", "Action": "allow"}, Meta={"k" * 129: "v"}),
            f'Meta key "{"k" * 129}" exceeds maximum length 128',
        ),
    ],
)
def test_validation_messages(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidEntry) as err:
        load_entry(body)
    assert str(err.value) == message


def test_validation_indexes_refer_to_precedence_order() -> None:
    # Consul validates after sorting sources by precedence, so the bad `*` source written
    # second is reported as Sources[1] only if it sorts there: exact (9) before `*` (8).
    with pytest.raises(InvalidEntry, match=r"^Sources\[1\]\.Action"):
        load_entry(entry({"Name": "*"}, {"Name": "web", "Action": "allow"}))


def test_normalize_sorts_and_computes_precedence() -> None:
    e = load_entry(
        entry(
            {"Name": "*", "Namespace": "*", "Action": "deny"},
            {"Name": "*", "Action": "deny"},
            {"Name": "web", "Action": "allow"},
        )
    )
    assert [(s.name, s.namespace, s.precedence) for s in e.sources] == [
        ("web", "default", 9),
        ("*", "default", 8),
        ("*", "*", 7),
    ]
    assert all(s.type == "consul" for s in e.sources)


@pytest.mark.parametrize(
    ("dst", "src", "want"),
    [
        (("a", "b"), ("c", "d"), 9),
        (("a", "b"), ("c", "*"), 8),
        (("a", "b"), ("*", "*"), 7),
        (("a", "*"), ("c", "d"), 6),
        (("a", "*"), ("c", "*"), 5),
        (("a", "*"), ("*", "*"), 4),
        (("*", "*"), ("c", "d"), 3),
        (("*", "*"), ("c", "*"), 2),
        (("*", "*"), ("*", "*"), 1),
    ],
)
def test_precedence_table(dst: tuple[str, str], src: tuple[str, str], want: int) -> None:
    assert precedence(dst[0], dst[1], src[0], src[1]) == want


def test_json_round_trip_is_a_fixed_point() -> None:
    body = entry(
        {
            "Name": "web",
            "Permissions": [
                {
                    "Action": "deny",
                    "HTTP": {
                        "PathRegex": "/a.*",
                        "Header": [{"Name": "x", "Present": True, "Invert": True}],
                    },
                },
                {"Action": "allow", "HTTP": {"Methods": ["GET"]}},
            ],
        },
        {"Name": "*", "Action": "deny", "Description": "rest"},
        Meta={"k": "v"},
    )
    first = load_entry(body)
    assert load_entry(entry_to_json(first)) == first
    out = entry_to_json(first)
    assert out["Sources"][0]["Precedence"] == 9
    assert "Namespace" not in out  # CE-style: the default namespace is not rendered


def test_intention_display() -> None:
    e = load_entry(
        entry(
            {"Name": "web", "Action": "allow"},
            {"Name": "db", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}]},
        )
    )
    assert [intention_display(e, s) for s in e.sources] == [
        "web => api (allow)",
        "db => api (1 permission)",
    ]


def test_a_config_entry_write_drops_the_legacy_bookkeeping() -> None:
    # Consul's non-legacy Normalize clears LegacyID and the timestamps (and keeps LegacyMeta,
    # which Validate refuses when non-empty); validate alone still names each field.
    body = entry(
        {
            "Name": "web",
            "Action": "allow",
            "LegacyID": "x",
            "LegacyCreateTime": "2026-12-06T07:39:52Z",
            "LegacyUpdateTime": "2026-12-06T07:39:52Z",
        }
    )
    src = load_entry(body).sources[0]
    assert (src.legacy_id, src.legacy_create_time, src.legacy_update_time) == ("", None, None)
    with pytest.raises(InvalidEntry, match=r"Sources\[0\]\.LegacyCreateTime must be omitted"):
        validate(normalize(decode_entry(body)))
