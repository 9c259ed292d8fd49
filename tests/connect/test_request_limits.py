"""Issue 14 item 4: each HTTP request limit at its value, over real sockets and real mTLS
(the sidecar pair of test_http_proxy): a request exactly at the limit is served; one past it
is refused cleanly (431 and a close for a head, the retry not made for a body), counted by
limit, and the next request is served. The app never sees a refused request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from connect.http1 import HTTPLimits
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_http_proxy import build_mesh, raw, read_response

MAX_HEADERS = 10
MAX_HEAD = 1000
LIMITS = HTTPLimits(max_headers=MAX_HEADERS, max_header_bytes=MAX_HEAD)
# The client names its request id, so neither sidecar adds a header (the outbound one adds
# `x-request-id` when there is none, and the inbound one counts it).
RID = b"x-request-id: limits-test\r\n"


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


def _with_headers(n: int) -> bytes:
    """A GET whose head has `n` headers (Host and the request id among them)."""
    extra = b"".join(b"x-h%d: v\r\n" % i for i in range(n - 2))
    return b"GET /hello HTTP/1.1\r\nhost: api\r\n" + RID + extra + b"\r\n"


def _of_size(size: int) -> bytes:
    """A GET whose head counts `size` bytes: the target, then each header's name and value
    plus 4 (what `max_header_bytes` measures)."""
    fields = ((b"host", b"api"), (b"x-request-id", b"limits-test"), (b"x-pad", b""))
    fixed = len(b"/hello") + sum(len(name) + len(value) + 4 for name, value in fields)
    pad = b"p" * (size - fixed)
    return b"GET /hello HTTP/1.1\r\nhost: api\r\n" + RID + b"x-pad: " + pad + b"\r\n\r\n"


async def _status(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await raw(port, request)
    try:
        status, headers, _ = await asyncio.wait_for(read_response(reader), 10)
        if headers.get(b"connection", b"").lower() == b"close":
            assert await asyncio.wait_for(reader.read(), 10) == b""  # and then the close
        return status.split(b" ")[1], headers.get(b"connection", b"")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("limit", "at", "past"),
    [
        ("max_headers", _with_headers(MAX_HEADERS), _with_headers(MAX_HEADERS + 1)),
        ("max_header_bytes", _of_size(MAX_HEAD), _of_size(MAX_HEAD + 1)),
    ],
)
async def test_a_head_at_the_limit_is_served_one_past_is_431_counted(
    ca: ProxyTestCA, limit: str, at: bytes, past: bytes
) -> None:
    m = await build_mesh(ca, limits=LIMITS)
    try:
        port = m.outbound.port
        assert (await _status(port, at))[0] == b"200"
        seen = len(m.apps[0].seen)
        assert await _status(port, past) == (b"431", b"close")
        refused = m.outbound.stats.requests_refused_limit
        assert getattr(refused, limit) == 1
        assert (refused.max_headers + refused.max_header_bytes) == 1
        assert len(m.apps[0].seen) == seen  # never reached the app
        assert (await _status(port, at))[0] == b"200"  # the listener is unharmed
        # The inbound sidecar, with the same limits, refused nothing it was sent.
        assert m.inbounds[0].stats.requests_refused_limit.max_headers == 0
        assert m.inbounds[0].stats.requests_refused_limit.max_header_bytes == 0
    finally:
        await m.close()


@pytest.mark.parametrize(
    ("limit", "past"),
    [("max_headers", _with_headers(MAX_HEADERS + 1)), ("max_header_bytes", _of_size(MAX_HEAD + 1))],
)
async def test_the_inbound_listener_refuses_past_its_own_limits(
    ca: ProxyTestCA, limit: str, past: bytes
) -> None:
    """A caller's sidecar with the default limits: the callee's refuses past its own (the
    caller forwards the 431), counts it, and serves the next request."""
    m = await build_mesh(ca, inbound_limits=LIMITS)
    try:
        port = m.outbound.port
        assert (await _status(port, past))[0] == b"431"
        assert getattr(m.inbounds[0].stats.requests_refused_limit, limit) == 1
        assert m.outbound.stats.requests_refused_limit.max_headers == 0
        assert m.apps[0].seen == []
        assert (await _status(port, _with_headers(MAX_HEADERS)))[0] == b"200"
    finally:
        await m.close()


async def test_a_head_at_the_limit_that_arrives_in_pieces_is_served(ca: ProxyTestCA) -> None:
    """The raw bytes of a head still arriving (request line, `: ` and CRLFs included) are
    checked too, against a slowly sent huge head; they must not refuse a head the counted
    measure allows."""
    m = await build_mesh(ca, limits=LIMITS)
    try:
        head = _of_size(MAX_HEAD)
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound.port)
        writer.write(head[:-10])
        await writer.drain()
        await asyncio.sleep(0.1)  # (lets the sidecar read the first piece on its own)
        writer.write(head[-10:])
        status, _, _ = await asyncio.wait_for(read_response(reader), 10)
        assert status.split(b" ")[1] == b"200"
        writer.close()
    finally:
        await m.close()
