"""Entries as Consul's read returns them: the read-side decode, and the fail-closed snapshot.

The read body below has every field `GET /v1/config/service-intentions/<name>` returns
(consul agent/structs/config_entry_intentions.go, `ServiceIntentionsConfigEntry` and
`SourceIntention` as marshalled: `Hash`, the raft indexes, `Precedence`, `Type`, and for an
intention created through `POST /v1/connect/intentions` the four Legacy* fields; Enterprise adds
`Partition`/`Namespace`), Header's newer `Contains`/`IgnoreCase`, a peer source and JWT claims.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from intentions.engine import Identity, http_request
from intentions.entries import load_entry, read_entry
from intentions.errors import EntryDecodeError, InvalidEntry
from intentions.stored import compile_stored, destination_of

LEGACY_ID = "8f2e6a36-1f0b-4d3b-9a43-3f4f3c2c1a10"

READ_BODY: dict[str, Any] = {
    "Kind": "service-intentions",
    "Name": "api",
    "Partition": "default",
    "Namespace": "default",
    "Sources": [
        {
            "Name": "web",
            "Action": "deny",
            "Precedence": 9,
            "LegacyID": LEGACY_ID,
            "Type": "consul",
            "Description": "created with consul intention create -deny web api",
            "LegacyMeta": {"owner": "ops"},
            "LegacyCreateTime": "2026-12-06T07:39:52.713662123Z",
            "LegacyUpdateTime": "2026-12-06T08:01:02Z",
            "Partition": "default",
            "Namespace": "default",
        },
        {
            "Name": "ops",
            "Permissions": [
                {
                    "Action": "allow",
                    "HTTP": {
                        "PathPrefix": "/admin",
                        "Methods": ["GET"],
                        "Header": [{"Name": "X-Team", "Contains": "sre", "IgnoreCase": True}],
                    },
                },
                {"Action": "deny", "HTTP": {"PathRegex": "/.*"}},
            ],
            "Precedence": 9,
            "Type": "consul",
            "Partition": "default",
            "Namespace": "default",
        },
        {"Name": "billing", "Peer": "east", "Action": "allow", "Precedence": 9, "Type": "consul"},
        {"Name": "*", "Action": "allow", "Precedence": 8, "Type": "consul"},
    ],
    "Meta": {"managed-by": "meshlet"},
    "Hash": 14470437632475476431,
    "CreateIndex": 18,
    "ModifyIndex": 25,
}


def test_read_side_accepts_everything_consul_returns() -> None:
    entry = read_entry(copy.deepcopy(READ_BODY))
    web = entry.sources[0]
    assert (web.name, web.action, web.legacy_id) == ("web", "deny", LEGACY_ID)
    assert web.legacy_meta == (("owner", "ops"),)
    assert web.legacy_create_time == "2026-12-06T07:39:52.713662123Z"
    assert [s.precedence for s in entry.sources] == [9, 9, 9, 8]
    assert (entry.create_index, entry.modify_index) == (18, 25)
    assert entry.sources[1].permissions[0].http is not None
    assert entry.sources[1].permissions[0].http.header[0].ignore_case


def test_write_side_keeps_consuls_errors_for_the_same_body() -> None:
    # A config-entry write must omit what only the legacy API sets (Consul answers 500).
    with pytest.raises(InvalidEntry, match=r"Sources\[0\]\.Legacy\w+ must be omitted"):
        load_entry(copy.deepcopy(READ_BODY))


def test_the_read_entry_is_enforced() -> None:
    snap = compile_stored([READ_BODY], default_allow=False, default_reason="default deny")
    api = Identity("api")
    assert snap.broken == {}
    assert not snap.decide_connection(api, Identity("web")).allowed
    assert snap.decide_connection(api, Identity("billing", peer="east")).allowed
    assert snap.decide_connection(api, Identity("anyone")).allowed
    admin = http_request("GET", "/admin/x", "api", {"x-team": "The-SRE-Crew"})
    assert snap.decide_request(api, Identity("ops"), admin).allowed
    other = http_request("GET", "/other", "api", {"x-team": "sre"})
    assert not snap.decide_request(api, Identity("ops"), other).allowed


@pytest.mark.parametrize(
    ("change", "error", "why"),
    [
        (
            lambda b: b["Sources"][1]["Permissions"][0].update(Sentinel="x"),
            EntryDecodeError,
            'invalid config key "Sources[1].Permissions[0].Sentinel"',
        ),
        (
            lambda b: b["Sources"][0].update(Action="maybe"),
            InvalidEntry,
            "Sources[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            lambda b: b["Sources"][1]["Permissions"][1]["HTTP"].update(PathRegex="(/x"),
            None,
            "invalid regular expression '(/x'",
        ),
        (
            lambda b: b.update(JWT={"Providers": [{"Name": "okta"}]}),
            None,
            "JWT requirements are not enforced by meshlet",
        ),
    ],
)
def test_an_entry_that_cannot_be_compiled_denies_only_its_destination(
    change: Any, error: type[Exception] | None, why: str
) -> None:
    bad = copy.deepcopy(READ_BODY)
    change(bad)
    if error is not None:
        with pytest.raises(error):
            read_entry(copy.deepcopy(bad))
    other = {**copy.deepcopy(READ_BODY), "Name": "db"}
    snap = compile_stored([bad, other], default_allow=True, default_reason="default allow")
    assert list(snap.broken) == [("default", "default", "api")]
    broken = snap.broken[("default", "default", "api")]
    assert why in broken.reason
    assert "\n" not in broken.reason
    api = Identity("api")
    for source in (
        Identity("web"),
        Identity("ops"),
        Identity("anyone"),
        Identity("b", peer="east"),
    ):
        got = snap.decide_connection(api, source)
        assert not got.allowed
        assert got.reason.startswith("intentions for api cannot be enforced, denying every")
        assert why in got.reason
        req = http_request("GET", "/admin/x", "api", {"x-team": "sre"})
        assert not snap.decide_request(api, source, req).allowed
    # db's entry (the same sources) is enforced as usual.
    db = Identity("db")
    assert not snap.decide_connection(db, Identity("web")).allowed
    assert snap.decide_connection(db, Identity("anyone")).allowed


def test_a_broken_wildcard_entry_denies_what_falls_through_to_it() -> None:
    star = {"Kind": "service-intentions", "Name": "*", "Sources": [{"Name": "x", "Foo": 1}]}
    api = {
        "Kind": "service-intentions",
        "Name": "api",
        "Sources": [{"Name": "web", "Action": "allow", "Precedence": 9}],
    }
    snap = compile_stored([star, api], default_allow=True, default_reason="default allow")
    assert list(snap.broken) == [("default", "default", "*")]
    assert snap.broken[("default", "default", "*")].display == "*"
    # api's own intention outranks anything the `*` entry could hold...
    assert snap.decide_connection(Identity("api"), Identity("web")).allowed
    # ...but every other decision would have been the wildcard entry's (or the default's).
    assert not snap.decide_connection(Identity("api"), Identity("ops")).allowed
    assert not snap.decide_connection(Identity("db"), Identity("web")).allowed


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"Kind": "service-intentions", "Name": "api"}, ("default", "default", "api")),
        (
            {"Kind": "service-intentions", "Name": "api", "Namespace": "prod", "Partition": "p"},
            ("p", "prod", "api"),
        ),
        ({"Kind": "service-intentions", "Name": 7}, ("default", "*", "*")),
        (["not", "an", "object"], ("default", "*", "*")),
    ],
)
def test_destination_of_a_body_that_does_not_read(body: Any, where: tuple[str, str, str]) -> None:
    assert destination_of(body) == where
    snap = compile_stored([body], default_allow=True, default_reason="d")
    assert list(snap.broken) == [where]
