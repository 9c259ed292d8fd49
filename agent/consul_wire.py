"""HTTP/1.1 exchanges with one Consul agent over pooled keep-alive connections: an asyncio
Protocol per connection and httptools (llhttp) for the answers.

    pool = Pool(dial, limit=4096, keepalive=10.0)
    answer = await pool.exchange(head, body, max_body=64 << 20)   # Answer or WireError
    pool.close()

Why not aiohttp: a watching agent parks one blocking query per upstream on its own connection
for minutes, and each one held ~14 KB of aiohttp state (request, response, stream reader,
timer contexts, per-connection buffers: bench/agent_scale.py at 1,000 upstreams). Here a
parked query is one connection object with its parser and one future.

An answer is only ever taken for the request it answers: bytes that arrive when no request is
in flight, or a second answer to one request, retire the connection. (aiohttp kept such an
extra answer buffered on the idle connection and handed it to the next request sent on it:
tests/agent/test_consul_wire.py.)

What it does, and no more: one request per connection at a time, sent exactly once (never
retried: the caller's watch loop owns retries); answers framed by Content-Length, chunked, or
(without either) by the server closing; a body larger than `max_body` refused as soon as that
is known; idle connections closed after `keepalive` seconds; at most `limit` connections,
waiting for a free one beyond. Deadlines are the caller's (`asyncio.timeout` around
`exchange`): a connection whose exchange is interrupted is closed, never reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

import httptools


class WireError(Exception):
    """The exchange failed; `kind` says how (the caller words the error)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


NOT_HTTP = "not-http"
"""The peer's bytes are not an HTTP/1.x answer."""
CLOSED = "closed"
"""The peer closed the connection before the answer's head was complete."""
TRUNCATED = "truncated"
"""The peer closed the connection in the middle of the answer's body."""
TOO_LARGE = "too-large"
"""The body is larger than allowed (`detail` says whether it was declared so)."""


class Fields(Mapping[str, str]):
    """An answer's header fields, looked up case-insensitively. A repeated field's values are
    joined with ", " (RFC 9110 §5.3), so a repeated X-Consul-Index is not a number."""

    __slots__ = ("_by_name",)

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        by_name: dict[str, str] = {}
        for raw_name, raw_value in pairs:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            had = by_name.get(name)
            by_name[name] = value if had is None else f"{had}, {value}"
        self._by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Fields({self._by_name!r})"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Fields
    body: bytes


class Connection(asyncio.Protocol):
    """One keep-alive connection: parses the answer to the request in flight."""

    __slots__ = (
        "_body",
        "_done",
        "_fields",
        "_length_known",
        "_max_body",
        "_parser",
        "_size",
        "_status",
        "idle_timer",
        "reusable",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        """False once anything but a complete answer to a request happened on it."""
        self.idle_timer: asyncio.TimerHandle | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._done: asyncio.Future[Answer] | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._max_body = 0
        self._status = 0
        self._length_known = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # Nothing was asked: a server talking out of turn is not one to reuse.
            self._fail(WireError(NOT_HTTP, "bytes received while no request was in flight"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(WireError(NOT_HTTP, "the answer switches protocols"))
        except httptools.HttpParserError as exc:
            self._fail(WireError(NOT_HTTP, str(exc) or type(exc).__name__))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False  # an idle one leaves the pool when its idle timer fires
        done = self._done
        if done is None or done.done():
            return
        if self._status and not self._length_known:
            # Framed by the close (no Content-Length, not chunked): the body is complete.
            self._complete()
        elif self._status:
            self._fail(WireError(TRUNCATED, f"the body ended after {self._size} bytes"))
        else:
            self._fail(WireError(CLOSED, str(exc) if exc else "closed"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        done = self._done
        if done is not None and done.done():
            # A second answer to one request: whatever it is, it answers nothing we asked.
            self._fail(WireError(NOT_HTTP, "more than one answer to a request"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:
            return  # after `_complete`: `on_message_begin` has retired the connection
        self._status = parser.get_status_code()
        self._length_known = False
        for name, value in self._fields:
            lower = name.lower()
            if lower == b"content-length":
                self._length_known = True
                if value.strip().isdigit() and int(value) > self._max_body:
                    self._fail(WireError(TOO_LARGE, f"answer of {int(value)} bytes is"))
                    return
            elif lower == b"transfer-encoding":
                self._length_known = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._fail(WireError(TOO_LARGE, "answer"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete()

    # -- the pool's side ---------------------------------------------------------------------

    def send(self, data: bytes, max_body: int) -> asyncio.Future[Answer]:
        """Write one request; the future gets its answer or a `WireError`."""
        assert self.transport is not None and self._done is None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self._parser = httptools.HttpResponseParser(self)
        self._done = asyncio.get_running_loop().create_future()
        self._fields, self._body, self._size, self._status = [], [], 0, 0
        self._max_body = max_body
        self.transport.write(data)
        return self._done

    def finished(self) -> None:
        """The exchange is over (answered, failed or interrupted): drop its state."""
        done = self._done
        if done is None or not done.done() or done.cancelled() or done.exception() is not None:
            # Failed, or interrupted mid-exchange (the answer may still come): never reused.
            self.reusable = False
        self._done = self._parser = None
        self._fields, self._body = [], []
        if not self.reusable:
            self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        done, parser = self._done, self._parser
        if done is None or done.done() or parser is None:
            return
        if not parser.should_keep_alive():
            self.reusable = False
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        done.set_result(Answer(self._status, Fields(self._fields), body))

    def _fail(self, error: WireError) -> None:
        self.reusable = False
        done = self._done
        if done is not None and not done.done():
            done.set_exception(error)
        if self.transport is not None:
            self.transport.close()


Dial = Callable[[Callable[[], Connection]], Awaitable[tuple[asyncio.BaseTransport, Connection]]]
"""Opens one connection with the given protocol factory (`loop.create_connection` and kin)."""


class Pool:
    def __init__(self, dial: Dial, *, limit: int, keepalive: float) -> None:
        self._dial = dial
        self._slots = asyncio.Semaphore(limit)
        self._keepalive = keepalive
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()

    async def exchange(self, request: bytes, *, max_body: int, connect_timeout: float) -> Answer:
        """Send `request` (head and body) on a pooled or new connection and read its answer.

        Raises `WireError`, `OSError` or `ssl.SSLError` from connecting, TimeoutError when
        connecting takes longer than `connect_timeout`."""
        async with self._slots:
            conn = self._take()
            if conn is None:
                async with asyncio.timeout(connect_timeout):
                    _, conn = await self._dial(Connection)
                self._open.add(conn)
            try:
                return await conn.send(request, max_body)
            finally:
                conn.finished()
                if conn.reusable:
                    self._park(conn)
                else:
                    self._open.discard(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def _take(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used is the least likely closed
            if conn.reusable:
                return conn
            self._open.discard(conn)  # closed by the peer while idle
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
        return None

    def _park(self, conn: Connection) -> None:
        self._idle.append(conn)
        # Close before a server or a load balancer in between is likely to, so a reused
        # connection is rarely a dead one.
        conn.idle_timer = asyncio.get_running_loop().call_later(self._keepalive, self._expire, conn)

    def _expire(self, conn: Connection) -> None:
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
            self._open.discard(conn)
            conn.close()
