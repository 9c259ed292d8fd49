"""A large answer's incremental decode misses no change, however small, moved or renumbered.

`decode_answer` reuses the endpoint of an entry whose bytes it saw in the last answer and decodes
every other one. Every result here is compared with `json.loads` + `ServiceEntry.from_json` +
`build_snapshot` of the whole answer (an independent decoder), on an answer of ~1.3 MB.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import catalog
from agent.catalog import (
    EMPTY_MEMO,
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
"""Entries of ~1 KB each, as a large upstream's."""


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
    key: WatchKey, raw: list[dict[str, Any]], memo: Memo
) -> tuple[Snapshot | type[Exception], Decoded | None]:
    try:
        decoded = decode_answer(key, body_of(raw), memo)
        return snapshot_of(key, decoded.endpoints, 1, 0.0, in_order=decoded.in_order), decoded
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc), None


@pytest.fixture(scope="module")
def first() -> Decoded:
    return decode_answer(KEY, body_of(answer()), EMPTY_MEMO)


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


def test_a_large_answer_is_parsed_only_where_it_changed(first: Decoded) -> None:
    layout = first.memo.layout
    assert layout is not None and layout.sep == b", " and len(layout.bounds) > 10
    pretty = decode_answer(KEY, json.dumps(answer(), indent=4).encode(), EMPTY_MEMO).memo.layout
    assert pretty is not None and pretty.lead == b"[\n    " and pretty.trail == b"\n]"
    raw = answer()
    raw[517]["Service"]["Port"] = 21001
    body = body_of(raw)
    # Past the changed entry's block, the body is not JSON: only that block is parsed.
    lo, hi = layout.block(517 // 64 + 2)
    broken = body[:lo] + body[lo:hi].replace(b"{", b"[") + body[hi:]
    decoded = decode_answer(KEY, body, first.memo)
    assert decoded.memo.layout is not None and decoded.reused == SIZE - 1
    with pytest.raises(ShapeError):
        decode_answer(KEY, broken, EMPTY_MEMO)
    # The memo's hashes tell the broken block from the last answer's: parsed, refused.
    with pytest.raises(ShapeError):
        decode_answer(KEY, broken, decoded.memo)


def _outcome(key: WatchKey, body: bytes, memo: Memo) -> object:
    try:
        decoded = decode_answer(key, body, memo)
        return snapshot_of(key, decoded.endpoints, 1, 0.0, in_order=decoded.in_order)
    except (ShapeError, SnapshotRejected) as exc:
        return type(exc)


SEPARATORS = [(",", ":"), (", ", ": "), (",", ": "), ("indent", "")]


def render(raw: object, separators: tuple[str, str]) -> bytes:
    """As Consul (compact), Python's json, or ?pretty (and devstack) render an answer."""
    if separators[0] == "indent":
        return json.dumps(raw, indent=4).encode()
    return json.dumps(raw, separators=separators).encode()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(change, min_size=1, max_size=30),
    st.sampled_from(SEPARATORS),
    st.integers(1, 3),
)
def test_span_parsing_gives_what_a_whole_parse_gives(
    changes: list[tuple[Any, ...]], separators: tuple[str, str], block: int
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(catalog, "LAYOUT_FROM", 2)
        patch.setattr(catalog, "_BLOCK", block)
        cluster = Cluster()
        memo: Memo = EMPTY_MEMO
        for op in changes:
            bare = apply(cluster, op)
            raw = cluster.render(indexes=not bare)
            body = render(raw, separators)
            expected = _outcome(KEY, body, EMPTY_MEMO)
            try:
                decoded = decode_answer(KEY, body, memo)
                got: object = snapshot_of(KEY, decoded.endpoints, 1, 0.0, in_order=decoded.in_order)
            except (ShapeError, SnapshotRejected) as exc:
                got = type(exc)
            else:
                memo = decoded.memo
            assert got == expected, op


JSONISH = st.sampled_from([b'"', b"{", b"}", b"[", b"]", b",", b":", b" ", b"\\", b"1", b"x"])


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, 10**9),
    st.integers(0, 40),
    st.lists(JSONISH, max_size=6).map(b"".join),
    st.sampled_from(SEPARATORS),
    st.integers(1, 3),
)
def test_any_splice_into_a_known_answer_reads_as_a_whole_parse_reads_it(
    where: int, width: int, text: bytes, separators: tuple[str, str], block: int
) -> None:
    # Bytes cut and pasted anywhere (a string left open, a bracket unbalanced, the `]`
    # gone, trailing bytes): the span parse accepts exactly what a parse of the whole body
    # accepts, with the same endpoints.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(catalog, "LAYOUT_FROM", 2)
        patch.setattr(catalog, "_BLOCK", block)
        entries = [consul_entry(i) for i in range(6)]
        for entry in entries:
            entry["Node"]["Meta"] = {"rack": "r"}
        body = render(entries, separators)
        memo = decode_answer(KEY, body, EMPTY_MEMO).memo
        assert memo.layout is not None
        at = where % (len(body) + 1)
        spliced = body[:at] + text + body[at + width :]
        assert _outcome(KEY, spliced, memo) == _outcome(KEY, spliced, EMPTY_MEMO)
