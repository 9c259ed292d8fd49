"""The pure header rewriting of the HTTP path: what is forwarded, what is dropped, facts."""

from __future__ import annotations

import re

from connect.http1_headers import HeadRewriter, RequestHead, new_request_id

Headers = list[tuple[bytes, bytes]]


def rewrite(headers: Headers, drop: frozenset[bytes] = frozenset()) -> tuple[RequestHead, bytes]:
    out: list[bytes] = []
    facts = HeadRewriter(drop).rewrite(headers, out)
    return facts, b"".join(out)


def test_hop_by_hop_fields_are_removed_and_ordinary_ones_kept_in_order() -> None:
    facts, lines = rewrite(
        [
            (b"Host", b"api"),
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Trailer", b"X-Sum"),
            (b"Accept", b"*/*"),
            (b"Content-Length", b"5"),
        ]
    )
    assert lines == b"Host: api\r\nAccept: */*\r\n"
    assert facts.host == b"api"
    assert facts.framing.length == 5
    assert facts.framing.length_line == b"content-length: 5\r\n"


def test_fields_named_in_connection_are_hop_by_hop_too() -> None:
    facts, lines = rewrite(
        [(b"Connection", b"close, X-Secret"), (b"x-secret", b"1"), (b"X-Kept", b"2")]
    )
    assert lines == b"X-Kept: 2\r\n"
    assert facts.connection_tokens == {b"close", b"x-secret"}


def test_drop_removes_any_case_of_the_name_and_the_name_cache_does_not_leak_roles() -> None:
    rewriter = HeadRewriter(frozenset({b"x-forwarded-client-cert"}), cache_size=2)
    for _ in range(3):  # the second and third passes go through the cache (or past it)
        out: list[bytes] = []
        rewriter.rewrite(
            [
                (b"X-Forwarded-Client-Cert", b"forged"),
                (b"x-forwarded-client-cert", b"forged"),
                (b"X-A", b"1"),
                (b"X-B", b"2"),
            ],
            out,
        )
        assert b"".join(out) == b"X-A: 1\r\nX-B: 2\r\n"


def test_drop_prefixes_remove_every_case_of_a_family_and_keep_the_retriable_fact() -> None:
    rewriter = HeadRewriter(drop_prefixes=(b"x-meshlet-",), cache_size=3)
    for _ in range(3):  # through the cache and past it
        out: list[bytes] = []
        facts = rewriter.rewrite(
            [
                (b"X-Meshlet-Reason", b"forged"),
                (b"x-MESHLET-anything", b"forged"),
                (b"X-Meshlet-Retriable", b"any"),
                (b"X-Meshlets", b"kept: not the prefix"),
                (b"X-A", b"1"),
            ],
            out,
        )
        assert b"".join(out) == b"X-Meshlets: kept: not the prefix\r\nX-A: 1\r\n"
        assert facts.retriable == b"any"  # still read (responses), never forwarded


def test_framing_and_request_facts() -> None:
    facts, lines = rewrite(
        [
            (b"Transfer-Encoding", b"gzip, chunked"),
            (b"Expect", b"100-Continue"),
            (b"X-Request-Id", b"abc"),
            (b"Upgrade", b"websocket"),
        ]
    )
    assert facts.framing.chunked
    assert facts.expect_continue
    assert facts.has_request_id
    assert facts.upgrade == b"websocket"
    assert lines == b"Expect: 100-Continue\r\nX-Request-Id: abc\r\n"


def test_request_ids_are_uuid_shaped_and_unique() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    pattern = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(pattern.fullmatch(i) for i in ids)
