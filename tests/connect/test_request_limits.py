"""Issue 14 item 4: each HTTP request limit at its value, over real sockets and real mTLS
(the sidecar pair of test_http_proxy): a request exactly at the limit is served; one past it
is refused cleanly (431 and a close for a head, the retry not made for a body), counted by
limit, and the next request is served. The app never sees a refused request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import Limits, fixed_endpoints
from connect.dial import Upstream
from connect.http1 import HTTPLimits, OutboundHTTP
from connect.routes import RetryPolicy, RouteTable
from connect.seams import PeerCache
from tests.connect.proxy_test_ca import ProxyTestCA
from tests.connect.test_http_proxy import build_mesh, raw, read_response
from tests.connect.test_http_routes import build, to

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


RETRY_BUFFER = HTTPLimits().retry_body_bytes


@pytest.mark.parametrize(
    ("size", "statuses", "overflows"),
    [(RETRY_BUFFER, [200, 200], 0), (RETRY_BUFFER + 1, [200, 504], 2)],
)
async def test_a_body_that_fits_the_retry_buffer_is_retried_one_byte_more_is_not(
    ca: ProxyTestCA, size: int, statuses: list[int], overflows: int
) -> None:
    """Round robin over a stalled instance and a good one, with a per-try timeout and
    retries: a body exactly the buffer's size is kept and sent again to the good instance;
    one byte more is sent unkept, so its stalled try is answered 504; each such request (of
    a route with retries) is counted."""
    retry = RetryPolicy(num_retries=2, on_timeout=True)
    m = await build(ca, RouteTable((), to("both", try_timeout=0.3, retry=retry)), stall_in=("s0",))
    try:
        got = []
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # one of the two goes to the stalled instance first
                async with session.post(m.url + "/upload", data=b"x" * size) as resp:
                    got.append(resp.status)
                    if resp.status == 200:
                        assert await resp.text() == str(size)  # the whole body reached v1
        assert sorted(got) == statuses
        assert m.outbound.stats.retry_buffer_overflows == overflows
        async with (
            aiohttp.ClientSession() as session,  # the listener is unharmed
            session.post(m.url + "/upload", data=b"x") as resp,  # (retried if it stalls)
        ):
            assert resp.status == 200
    finally:
        await m.close()


class _HeldDoor:
    """A TCP hop in front of a sidecar that holds every connection it accepts until
    `release()`, then relays it: dials through it wait (pending) for as long as the test
    says, and then complete for real."""

    def __init__(self, to_port: int) -> None:
        self.to_port = to_port
        self.released = asyncio.Event()
        self.held = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held += 1
        await self.released.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def release(self) -> None:
        self.released.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_pending_requests_at_the_cap_wait_one_more_is_503_counted(ca: ProxyTestCA) -> None:
    """max_pending_requests 2: two requests wait for their dials (held at the door), the
    third is answered 503 at once and counted; once the dials go through, the two waiting
    ones are answered, and so is the next."""
    m = await build_mesh(ca)
    door = _HeldDoor(m.inbounds[0].port)
    port = await door.start()
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n0/api-sidecar", "127.0.0.1", port)], BalancerConfig())
        ),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        connect_timeout=30,
        limits=Limits(max_pending_requests=2),
    )
    outbound = OutboundHTTP(upstream)
    await outbound.start()
    try:
        waiting = [await raw(outbound.port, _with_headers(2)) for _ in range(2)]
        for _ in range(1000):  # bounded: until both dials are held at the door
            if door.held == 2:
                break
            await asyncio.sleep(0.01)
        assert door.held == 2
        status, _ = await _status(outbound.port, _with_headers(2))
        assert status == b"503"
        assert upstream.cluster.overflows == {"max_pending_requests": 1}
        assert door.held == 2  # refused without a dial
        door.release()
        for reader, writer in waiting:
            head, _, _ = await asyncio.wait_for(read_response(reader), 10)
            assert head.split(b" ")[1] == b"200"
            writer.close()
        assert (await _status(outbound.port, _with_headers(2)))[0] == b"200"
        assert upstream.cluster.overflows == {"max_pending_requests": 1}
    finally:
        await outbound.close(grace=0)
        await door.close()
        await m.close()
