"""The admin and metrics listeners on a real socket, as a client that misbehaves would use
them: every attack ends with the listener answering a well-behaved client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from agent.admin import AdminServer
from agent.admin_http import Limits
from agent.metrics import CONTENT_TYPE, MetricsServer, metrics_route

CLOSE = b"\r\nConnection: close\r\n\r\n"

# Every wait has this bound; none of the tests measures how long anything took.
DEADLINE = 20.0


class Source:
    """The admin server's status source (a Protocol it takes by design)."""

    def __init__(self, status: Mapping[str, Any] | None = None) -> None:
        self.ready = False
        self.asked: list[str | None] = []
        self._status = status or {}

    def readiness(self) -> tuple[bool, tuple[str, ...]]:
        return self.ready, () if self.ready else ("upstream api: no snapshot yet",)

    def status(self, upstream: str | None) -> Mapping[str, Any]:
        self.asked.append(upstream)
        return {"asked": upstream, **self._status}


@contextlib.asynccontextmanager
async def serving(
    source: Source | None = None, limits: Limits | None = None
) -> AsyncIterator[tuple[str, int, Source]]:
    source = source or Source()
    admin = AdminServer(
        source,
        "127.0.0.1",
        0,
        extra_routes=[metrics_route(lambda: {"endpoints": {"api": 3}})],
        limits=limits,
    )
    await admin.start()
    host, _, port = admin.address.rpartition(":")
    try:
        yield host, int(port), source
    finally:
        await admin.close()


async def exchange(host: str, port: int, raw: bytes) -> bytes:
    """Sends `raw`, then reads until the server closes (or the deadline)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


async def get(host: str, port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    raw = await exchange(host, port, request.encode())
    return parse(raw)[0]


def parse(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers in `raw`, each framed by its Content-Length."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        out.append((int(lines[0].split()[1]), fields, rest[:length]))
        raw = rest[length:]
    return out


async def live(host: str, port: int) -> None:
    """The listener still serves a well-behaved client."""
    status, fields, body = await get(host, port, "/live")
    assert (status, fields["content-type"], body) == (200, "text/plain; charset=utf-8", b"ok\n")


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (EOF or reset)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), DEADLINE):
            got += chunk
    return got


# ---- what each route answers (as the aiohttp listener did) --------------------------------


async def test_routes_answer_as_before() -> None:
    async with serving() as (host, port, source):
        status, fields, body = await get(host, port, "/ready")
        assert (status, fields["content-type"]) == (503, "application/json; charset=utf-8")
        assert json.loads(body) == {"ready": False, "reasons": ["upstream api: no snapshot yet"]}
        assert body.startswith(b'{\n  "ready": false,\n  "reasons": [\n')  # indented, sorted
        source.ready = True
        assert (await get(host, port, "/ready"))[0] == 200
        status, fields, body = await get(host, port, "/v1/status?upstream=a+b%20c&upstream=z")
        assert (status, body) == (200, b'{\n  "asked": "a b c"\n}\n')
        assert (await get(host, port, "/v1/status"))[2] == b'{\n  "asked": null\n}\n'
        assert (await get(host, port, "/v1/status?upstream="))[2] == b'{\n  "asked": ""\n}\n'
        status, fields, body = await get(host, port, "/metrics")
        assert (status, fields["content-type"]) == (200, CONTENT_TYPE)
        assert b'meshlet_upstream_endpoints{upstream="api"} 3.0' in body
        raw = await exchange(
            host, port, b"HEAD /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert raw.endswith(b"\r\n\r\n") and b"Content-Length: 3\r\n" in raw
        # HTTP/1.1 requires a Host field (RFC 9112 section 3.2).
        raw = await exchange(host, port, b"GET /live HTTP/1.1\r\n\r\n")
        assert raw.split(b" ", 2)[1] == b"400" and b"Host" in raw
        await live(host, port)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (host, port, _):
        raw = await exchange(
            host,
            port,
            b"GET /v1/status?upstream=one HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /v1/status?upstream=two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        answers = parse(raw)
        assert [a[2] for a in answers] == [
            b'{\n  "asked": "one"\n}\n',
            b"ok\n",
            b'{\n  "asked": "two"\n}\n',
        ]


async def test_the_metrics_listener_serves_metrics_only() -> None:
    server = MetricsServer(lambda: {"endpoints": {"api": 1}}, "127.0.0.1:0")
    await server.start()
    try:
        host, _, port = server.address.rpartition(":")
        status, fields, body = await get(host, int(port), "/metrics")
        assert (status, fields["content-type"]) == (200, CONTENT_TYPE)
        assert b'meshlet_upstream_endpoints{upstream="api"} 1.0' in body
        for path in ("/v1/status", "/live", "/ready"):
            assert (await get(host, int(port), path))[0] == 404
    finally:
        await server.close()


# ---- attacks ------------------------------------------------------------------------------


async def test_an_oversized_head_is_refused_431() -> None:
    # 96 fields of 4 KB: under aiohttp's per-field and field-count limits, 384 KB in all.
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4096) for i in range(96))
    async with serving() as (host, port, _):
        raw = await exchange(
            host, port, b"GET /live HTTP/1.1\r\nHost: a\r\n" + fields + b"Connection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
        assert b"request head larger than" in raw
        # A head that never ends (one endless field) is refused as well, not buffered.
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /live HTTP/1.1\r\nHost: a\r\nX-Endless: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(64):
                    writer.write(b"b" * 16384)
                    await writer.drain()
            assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 431 ")
        finally:
            writer.close()
        await live(host, port)


async def test_too_many_header_fields_are_refused_431() -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))
    async with serving() as (host, port, _):
        raw = await exchange(
            host, port, b"GET /live HTTP/1.1\r\nHost: a\r\n" + fields + b"Connection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
        assert b"more than 64 header fields" in raw
        await live(host, port)


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_a_body_on_a_get_is_refused_and_not_read_as_a_request(framing: bytes) -> None:
    # The body is a request of its own: a listener that skipped the framing would answer it.
    smuggled = b"GET /v1/status?upstream=smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    framing = framing.replace(b"hello", smuggled).replace(b"5", b"%x" % len(smuggled), 1)
    if b"Content-Length" in framing:
        framing = framing.replace(b"%x" % len(smuggled), b"%d" % len(smuggled), 1)
    async with serving() as (host, port, source):
        raw = await exchange(
            host, port, b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + framing
        )
        assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
        assert b"a GET request carries no body" in raw
        assert raw.count(b"HTTP/1.1") == 1 and source.asked == []
        await live(host, port)


async def test_a_flood_of_pipelined_requests_is_cut_at_the_pipelining_limit() -> None:
    flood = b"GET /v1/status?upstream=x HTTP/1.1\r\nHost: a\r\n\r\n" * 1999
    flood += b"GET /v1/status?upstream=x HTTP/1.1\r\nHost: a" + CLOSE
    async with serving() as (host, port, source):
        raw = await exchange(host, port, flood)
        # Taken ahead of their answers: at most Limits.max_pipelined; the rest is dropped
        # and the connection closed after the last answer (the client sends them again).
        assert len(parse(raw)) == len(source.asked) == Limits().max_pipelined
        await live(host, port)


async def test_a_slow_head_is_cut_by_the_header_timeout() -> None:
    async with serving(limits=Limits(header_timeout=0.5)) as (host, port, _):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /live HTTP/1.1\r\n")
            await writer.drain()
            got = b""
            with contextlib.suppress(ConnectionError):
                for _ in range(400):  # a byte every 50 ms, for up to 20 s
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if reader.at_eof():
                        break
                got = await closed_by_server(reader)
            assert got == b""  # dropped: no answer to a head that never came
        finally:
            writer.close()
        # A connection that sends nothing at all is cut too.
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert await closed_by_server(reader) == b""
        finally:
            writer.close()
        await live(host, port)


async def test_a_client_that_never_reads_is_dropped_and_holds_little() -> None:
    big = Source({"pad": "p" * (1 << 20)})  # a 1 MB status: the socket buffers fill fast
    limits = Limits(write_timeout=1.0)
    async with serving(big, limits) as (host, port, source):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, port))
            sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: a\r\n\r\n" * 200)
            error = 0
            for _ in range(200):  # never reading, until the server gives up (20 s at most)
                await asyncio.sleep(0.1)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    break
            assert error == errno.ECONNRESET
        # Only the answers the socket buffers could take were built.
        assert len(source.asked) <= limits.max_pipelined
        await live(host, port)


async def test_http_1_0_is_answered_and_closed_and_other_versions_refused() -> None:
    async with serving() as (host, port, _):
        raw = await exchange(host, port, b"GET /live HTTP/1.0\r\n\r\n")
        ((status, fields, body),) = parse(raw)
        assert (status, fields["content-type"], body) == (200, "text/plain; charset=utf-8", b"ok\n")
        assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
        raw = await exchange(
            host,
            port,
            b"GET /live HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /live HTTP/1.0\r\n\r\n",
        )
        assert len(parse(raw)) == 2
        for request in (b"GET /live\r\n\r\n", b"GET /live HTTP/2.0\r\n\r\n"):
            raw = await exchange(host, port, request)
            assert raw.startswith(b"HTTP/1.1 505 "), raw[:200]
        await live(host, port)


@pytest.mark.parametrize(
    "request_line",
    [b"POST /live", b"DELETE /v1/status", b"PUT /nope", b"BREW /live", b"CONNECT 127.0.0.1:1"],
)
async def test_methods_other_than_get_and_head_are_refused_405(request_line: bytes) -> None:
    async with serving() as (host, port, source):
        raw = await exchange(host, port, request_line + b" HTTP/1.1\r\nHost: a" + CLOSE)
        (status, fields, _), *rest = parse(raw)
        allowed = {m.strip() for m in fields["allow"].split(",")}
        assert (status, allowed, rest) == (405, {"GET", "HEAD"}, [])
        assert source.asked == []
        await live(host, port)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../live",
        "/v1/status/..",
        "//live",
        "/live/",
        "/%6Cive",
        "/LIVE",
        "/live;x",
        "/v1/status%00",
        "/../../etc/passwd",
        "*",
    ],
)
async def test_odd_paths_are_not_found(target: str) -> None:
    async with serving() as (host, port, source):
        status, _, body = await get(host, port, target)
        assert status == 404, body
        assert source.asked == []
        await live(host, port)


async def test_connections_beyond_the_cap_are_reset_at_accept() -> None:
    limits = Limits(max_connections=8)
    async with serving(limits=limits) as (host, port, _):
        held = [await asyncio.open_connection(host, port) for _ in range(8)]
        try:
            reader, writer = await asyncio.open_connection(host, port)
            with contextlib.suppress(ConnectionError):
                writer.write(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await closed_by_server(reader) == b""
            writer.close()
            # The held ones are served.
            held[0][1].write(b"GET /live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert parse(await closed_by_server(held[0][0]))[0][2] == b"ok\n"
        finally:
            for _, w in held:
                w.close()
        await asyncio.sleep(0.2)  # the server sees the held ones close
        await live(host, port)


async def test_a_failing_status_source_is_a_500_and_the_listener_goes_on() -> None:
    class Broken(Source):
        def status(self, upstream: str | None) -> Mapping[str, Any]:
            raise RuntimeError("a bug in the status composition")

    async with serving(Broken()) as (host, port, _):
        status, _, body = await get(host, port, "/v1/status")
        assert (status, body) == (500, b"500: internal error (logged by the agent)\n")
        await live(host, port)


async def test_a_request_in_many_small_reads_is_served() -> None:
    async with serving() as (host, port, _):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for byte in b"GET /v1/status?upstream=api HTTP/1.1\r\nHost: a" + CLOSE:
                writer.write(bytes([byte]))
                await writer.drain()
            ((status, _, body),) = parse(await closed_by_server(reader))
            assert (status, body) == (200, b'{\n  "asked": "api"\n}\n')
        finally:
            writer.close()
