"""A large answer's memo compares entries by their bytes (raw views), and misses no change.

From `KEEP_BODY` bytes on, `decode_answer` keeps the answer's raw entry views in the memo and
finds changed entries by comparing them with the next answer's (a memcmp) instead of hashing
copies. Every result is compared with `json.loads` + `ServiceEntry.from_json` +
`build_snapshot` of the whole answer (an independent decoder).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import Raw

from agent.catalog import (
    EMPTY_MEMO,
    KEEP_BODY,
    Decoded,
    Memo,
    Snapshot,
    SnapshotRejected,
    WatchKey,
    build_snapshot,
    decode_answer,
    snapshot_of,
)
from agent.consul_json import ShapeError
from agent.consul_results import ServiceEntry
from tests.agent.test_agent_incremental import Cluster, apply, change

KEY = WatchKey("api")
WARNING_KEY = WatchKey("api", warning=True)
SIZE = 1100
"""Entries of ~1 KB each: a body past `KEEP_BODY`, as a large upstream's."""


def consul_entry(i: int, *, port: int = 21000, status: str = "passing") -> dict[str, Any]:
    node = f"node-{i:05d}"
    return {
        "Node": {
            "Node": node,
            "Address": f"10.0.{i % 250}.1",
            "Datacenter": "dc1",
            "Meta": {"rack": "r" * 600},
            "ModifyIndex": 5,
        },
        "Service": {
            "Kind": "connect-proxy",
            "ID": f"api-{i:05d}-sidecar-proxy",
            "Service": "api-sidecar-proxy",
            "Tags": ["v1"],
            "Port": port,
            "Weights": {"Passing": 1, "Warning": 1},
            "Proxy": {"DestinationServiceName": "api", "LocalServicePort": 8080},
            "ModifyIndex": 100 + i,
        },
        "Checks": [
            {"Node": node, "CheckID": "serfHealth", "Status": "passing", "ModifyIndex": 3},
            {"Node": node, "CheckID": "ready", "Status": status, "ModifyIndex": 100 + i},
        ],
    }


def answer() -> list[dict[str, Any]]:
    return [consul_entry(i) for i in range(SIZE)]


def body_of(raw: list[dict[str, Any]]) -> bytes:
    return json.dumps(raw).encode()


def reference(key: WatchKey, raw: list[dict[str, Any]]) -> Snapshot | type[Exception]:
    try:
        return build_snapshot(key, [ServiceEntry.from_json(e) for e in raw], 1, 0.0)
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc)


def decoded_snapshot(
    key: WatchKey, raw: list[dict[str, Any]], memo: Memo, keep_body: int = KEEP_BODY
) -> tuple[Snapshot | type[Exception], Decoded | None]:
    try:
        decoded = decode_answer(key, body_of(raw), memo, keep_body=keep_body)
        return snapshot_of(key, decoded.endpoints, 1, 0.0, in_order=decoded.in_order), decoded
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc), None


@pytest.fixture(scope="module")
def first() -> Decoded:
    raw = answer()
    body = body_of(raw)
    assert len(body) >= KEEP_BODY
    decoded = decode_answer(KEY, body, EMPTY_MEMO)
    assert all(isinstance(p, Raw) for p in decoded.memo.prints)
    return decoded


def test_only_a_large_answer_keeps_its_raw_views() -> None:
    small = body_of(answer()[:3])
    assert all(type(p) is int for p in decode_answer(KEY, small, EMPTY_MEMO).memo.prints)
    kept = decode_answer(KEY, small, EMPTY_MEMO, keep_body=0).memo.prints
    assert all(isinstance(p, Raw) for p in kept)


def test_an_unchanged_large_answer_reuses_every_endpoint(first: Decoded) -> None:
    again = decode_answer(KEY, body_of(answer()), first.memo)
    assert again.reused == SIZE and again.endpoints is first.endpoints


@pytest.mark.parametrize(
    ("what", "edit", "key"),
    [
        # One byte each: the port, the port out of range, a tag.
        ("port", lambda e: e["Service"].update(Port=21001), KEY),
        ("bad port", lambda e: e["Service"].update(Port=91000), KEY),
        ("tag", lambda e: e["Service"].update(Tags=["v2"]), KEY),
        # A check's status (no two statuses differ by one byte): the entry is left out, or
        # the answer to ?passing is refused.
        ("status", lambda e: e["Checks"][1].update(Status="critical"), WARNING_KEY),
        ("status ?passing", lambda e: e["Checks"][1].update(Status="critical"), KEY),
        ("status warning", lambda e: e["Checks"][1].update(Status="warning"), WARNING_KEY),
    ],
)
def test_an_entry_changed_by_one_byte_is_decoded(
    first: Decoded, what: str, edit: Any, key: WatchKey
) -> None:
    for i in (0, 517, SIZE - 1):
        raw = answer()
        before = body_of(raw)
        edit(raw[i])
        after = body_of(raw)
        if not what.startswith("status"):
            assert len(after) == len(before), what
            assert sum(a != b for a, b in zip(before, after, strict=True)) == 1, what
        memo = first.memo if key == KEY else decode_answer(key, before, EMPTY_MEMO).memo
        got, decoded = decoded_snapshot(key, raw, memo)
        assert got == reference(key, raw), (what, i)
        if decoded is not None:
            assert decoded.reused == SIZE - 1, (what, i)


def test_a_moved_entry_is_found_and_a_moved_changed_entry_decoded(first: Decoded) -> None:
    raw = answer()
    raw.insert(3, raw.pop(900))
    got, decoded = decoded_snapshot(KEY, raw, first.memo)
    assert got == reference(KEY, raw)
    assert decoded is not None and decoded.reused == SIZE
    raw[3]["Service"]["Port"] = 21001
    got, decoded = decoded_snapshot(KEY, raw, first.memo)
    assert got == reference(KEY, raw)
    assert decoded is not None and decoded.reused == SIZE - 1
    assert isinstance(got, Snapshot)
    assert [e.port for e in got.endpoints if e.service_id == "api-00900-sidecar-proxy"] == [21001]


def test_an_answer_after_an_index_reset_is_compared_by_bytes_not_indexes(first: Decoded) -> None:
    # A restarted Consul renumbers from scratch: the same ModifyIndex may now carry other
    # content, and the same content another ModifyIndex. Both are decoded.
    raw = answer()
    raw[10]["Service"]["Port"] = 21005  # same ModifyIndex as before, other content
    for entry in raw[20:30]:
        entry["Service"]["ModifyIndex"] = 7  # same content, other ModifyIndex
    got, decoded = decoded_snapshot(KEY, raw, first.memo)
    assert got == reference(KEY, raw)
    assert decoded is not None and decoded.reused == SIZE - 11
    assert isinstance(got, Snapshot) and got.endpoints[10].port == 21005


def test_entries_added_and_removed_in_a_large_answer(first: Decoded) -> None:
    raw = answer()
    del raw[100:110]
    raw.append(consul_entry(SIZE))
    got, decoded = decoded_snapshot(KEY, raw, first.memo)
    assert got == reference(KEY, raw)
    assert decoded is not None and decoded.reused == SIZE - 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(change, st.booleans()), min_size=1, max_size=40))
def test_raw_and_fingerprint_memos_give_what_a_full_decode_gives(
    steps: list[tuple[tuple[Any, ...], bool]],
) -> None:
    # Each answer is compared by raw views or by fingerprints at random, so the memo also
    # switches from one kind to the other (an upstream growing past `KEEP_BODY`, shrinking).
    cluster = Cluster()
    memo: Memo = EMPTY_MEMO
    for op, raw_views in steps:
        bare = apply(cluster, op)
        raw = cluster.render(indexes=not bare)
        expected = reference(KEY, copy.deepcopy(raw))
        got, decoded = decoded_snapshot(KEY, raw, memo, 0 if raw_views else KEEP_BODY)
        assert got == expected, op
        if decoded is not None:
            memo = decoded.memo
