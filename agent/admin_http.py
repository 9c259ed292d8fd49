"""The HTTP/1.1 server under the agent's read-only endpoints (the admin API, the metrics-only
listener): an asyncio Protocol per connection, httptools (llhttp) for the requests.

    server = HTTPServer([Route("/live", live), ...], "127.0.0.1", 19000)
    await server.start()          # server.address: "127.0.0.1:19000"
    await server.close()

Why not aiohttp: these endpoints are a handful of GETs answered from memory, and aiohttp's
server (with the yarl, multidict and attrs it brings) was ~12 MB of a node agent's RSS.

What it serves, and no more: GET and HEAD of exact paths (no normalisation: `/v1/../live` and
`//live` are not `/live`), each answered by a synchronous handler from the query's
parameters; keep-alive and pipelining (answers in order). The parser is the framing
boundary: a request it refuses is answered 400 and the connection closed. Everything a
client can make this process hold is bounded (`Limits`): the head's size and field count
(431), requests taken ahead of their answers (the rest is dropped and the connection closed
after the last one taken, RFC 9112 §9.3.2), the time to send a head (slowloris), to read an
answer (a client that never reads), and the number of connections (beyond it, reset at
accept). A request with a body, a method other than GET or HEAD (405), or an HTTP version
other than 1.0 and 1.1 (505) is answered and the connection closed, its body unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn, cast
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger("meshlet.agent")

TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    close: bool = False
    """Close the connection once this answer is sent (a refused request)."""
    allow: str = ""
    """The Allow field of a 405."""


Query = Mapping[str, str]
"""The query's parameters, percent-decoded; the first of a repeated one wins."""

Handler = Callable[[Query], Reply]


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    """Matched exactly against the request target's path."""
    handler: Handler


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = 16 * 1024
    """Request line plus header fields; beyond it, 431."""
    max_headers: int = 64
    max_pipelined: int = 16
    """Requests taken from a connection ahead of their answers."""
    header_timeout: float = 10.0
    """From accepting the connection, or from the first byte of a later request, to the end
    of its head."""
    idle_timeout: float = 60.0
    """Keep-alive: how long a connection may wait for the first byte of its next request."""
    write_timeout: float = 30.0
    """How long an answer may sit unread beyond `high_water` bytes (a client that never reads)."""
    high_water: int = 256 * 1024
    max_connections: int = 128


_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, for 0 s: close() resets the connection."""


def _refusal(status: int, why: str, *, allow: str = "") -> Reply:
    return Reply(status, f"{status}: {why}\n".encode(), close=True, allow=allow)


def _not_found(path: str) -> Reply:
    return Reply(404, f"404: no such path: {path!r}\n".encode())


@dataclass(frozen=True, slots=True)
class _Request:
    path: str
    query: str
    head_only: bool
    keep_alive: bool
    version: str


_Item = _Request | Reply
"""What a connection owes answers to, in order: requests taken, or a refusal (last)."""


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the reply is on the connection."""


class _Connection(asyncio.Protocol):
    """One client connection: parses its requests and writes their answers in order."""

    __slots__ = (
        "_bad_body",
        "_fields",
        "_head_bytes",
        "_head_size",
        "_hosts",
        "_in_head",
        "_lingering",
        "_owed",
        "_parser",
        "_peer_done",
        "_refusal",
        "_refused",
        "_server",
        "_stopped",
        "_timer",
        "_url",
        "_write_paused",
        "transport",
    )

    def __init__(self, server: HTTPServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._owed: deque[_Item] = deque()
        self._url: list[bytes] = []
        self._fields = 0
        self._hosts = 0
        self._head_size = 0
        """The request line's target and the header fields, as the parser hands them over."""
        self._head_bytes = 0
        """Bytes received since the last head ended (the parser buffers a field's name until
        its value ends, so callbacks alone do not bound what it holds)."""
        self._in_head = True
        self._bad_body = False
        self._refused = False
        self._refusal: Reply | None = None
        """Set with `_refused`: the answer that ends the connection (None: no answer, the
        rest of the read is dropped)."""
        self._stopped = False
        """No more requests are taken from this connection (refused, or closing)."""
        self._write_paused = False
        self._peer_done = False
        self._lingering = False
        """Answered and shut for writing: what the client still sends is read and dropped
        until it closes (closing with unread bytes would reset the connection, and a reset
        can destroy the answers before the client reads them)."""
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        self.transport = cast(asyncio.Transport, transport)
        if not self._server.admit(self):
            self._stopped = True
            self.transport.abort()
            return
        self.transport.set_write_buffer_limits(high=self._server.limits.high_water)
        self._arm(self._server.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopped = True
        self._owed.clear()
        self._disarm()
        self._server.release(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # lingering, or a refused request's unread rest
        limits = self._server.limits
        if self._in_head:
            if self._head_bytes == 0 and not self._owed:
                # The first byte of a request after a keep-alive wait: its head is due now.
                self._arm(limits.header_timeout)
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if not self._refused:
                raise  # a bug in a callback, not the client's doing
            self._stop(self._refusal)
        except httptools.HttpParserInvalidMethodError:
            self._stop(_refusal(405, "method not allowed", allow="GET, HEAD"))
        except httptools.HttpParserUpgrade:
            # CONNECT or an Upgrade: the message was taken (or refused) in full; nothing
            # after it is HTTP/1.1 this server speaks.
            self._stop(None)
        except httptools.HttpParserError as exc:
            self._stop(_refusal(400, f"malformed request: {exc}"))
        else:
            if self._in_head and self._head_bytes > limits.max_head_bytes:
                self._stop(_refusal(431, f"request head larger than {limits.max_head_bytes} bytes"))
        self._answer()

    def eof_received(self) -> bool | None:
        if self._lingering:
            return False  # the client has read the answers and closed: close
        # The client is done sending: answer what it asked, then close.
        self._peer_done = True
        self._stopped = True
        self._answer()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._arm(self._server.limits.write_timeout)

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._lingering:
            self._disarm()
            self._answer()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._fields = 0
        self._hosts = 0
        self._head_size = 0
        self._bad_body = False

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._server.limits
        self._grow(len(name) + len(value) + 4)
        self._fields += 1
        if self._fields > limits.max_headers:
            self._refuse(_refusal(431, f"more than {limits.max_headers} header fields"))
        lower = name.lower()
        if lower == b"host":
            self._hosts += 1
        elif lower == b"transfer-encoding" or (
            lower == b"content-length" and value.strip() != b"0"
        ):
            self._bad_body = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        method = parser.get_method()
        if method not in (b"GET", b"HEAD"):
            self._refuse(_refusal(405, "method not allowed", allow="GET, HEAD"))
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._refuse(_refusal(505, f"HTTP/{version} is not supported"))
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            # RFC 9112 section 3.2: exactly one.
            self._refuse(_refusal(400, f"{self._hosts} Host fields: an HTTP/1.1 request has one"))
        if self._bad_body:
            self._refuse(_refusal(400, f"a {method.decode()} request carries no body"))
        try:
            url = httptools.parse_url(b"".join(self._url))
        except httptools.HttpParserInvalidURLError:
            self._refuse(_refusal(400, "malformed request target"))
        self._owed.append(
            _Request(
                path=(url.path or b"").decode("latin-1"),
                query=(url.query or b"").decode("latin-1"),
                head_only=method == b"HEAD",
                keep_alive=parser.should_keep_alive(),
                version=version,
            )
        )

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        max_pipelined = self._server.limits.max_pipelined
        if len(self._owed) >= max_pipelined:
            # Whatever else this read holds is dropped; the client sends it again.
            self._refuse(None)

    # -- answering ---------------------------------------------------------------------------

    def _grow(self, size: int) -> None:
        self._head_size += size
        limit = self._server.limits.max_head_bytes
        if self._head_size > limit:
            self._refuse(_refusal(431, f"request head larger than {limit} bytes"))

    def _refuse(self, reply: Reply | None) -> NoReturn:
        self._refused = True
        self._refusal = reply
        raise _Refused

    def _stop(self, reply: Reply | None) -> None:
        """Take no more requests: answer those taken (and `reply`, if any), then close."""
        self._stopped = True
        if reply is not None:
            self._owed.append(reply)
        if self.transport is not None:
            self.transport.pause_reading()

    def _answer(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        server = self._server
        while self._owed and not self._write_paused:
            item = self._owed.popleft()
            if isinstance(item, Reply):
                transport.write(_render(item, "1.1", head_only=False, keep_alive=False))
                self._close()
                return
            reply = server.reply(item)
            keep = item.keep_alive and not reply.close
            transport.write(_render(reply, item.version, item.head_only, keep_alive=keep))
            if not keep:
                self._close()
                return
        if self._owed or self._write_paused:
            transport.pause_reading()  # nothing more is taken until these are read
        elif self._stopped:
            self._close()
        else:
            transport.resume_reading()
            if self._in_head and self._head_bytes == 0:
                self._arm(server.limits.idle_timeout)

    def _close(self) -> None:
        """Send what is written, then close: lingering until the client closes, for at
        most `write_timeout`."""
        self._stopped = True
        self._owed.clear()
        transport = self.transport
        if transport is None or self._lingering:
            return
        self._lingering = True
        self._arm(self._server.limits.write_timeout)
        if not self._peer_done and transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
        else:
            transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            # A reset, not a FIN queued behind answers the client never reads: the kernel
            # drops them now instead of keeping them for an orphaned socket.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.abort()

    def abort(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.abort()


def _render(reply: Reply, version: str, head_only: bool, *, keep_alive: bool) -> bytes:
    try:
        phrase = HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = ""
    fields = [
        f"HTTP/{'1.0' if version == '1.0' else '1.1'} {reply.status} {phrase}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
    ]
    if reply.allow:
        fields.append(f"Allow: {reply.allow}")
    if not keep_alive:
        fields.append("Connection: close")
    elif version == "1.0":
        fields.append("Connection: keep-alive")
    head = ("\r\n".join(fields) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + reply.body


class HTTPServer:
    """Serves `routes` on host:port until closed."""

    def __init__(
        self,
        routes: Iterable[Route],
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
    ) -> None:
        self._routes: dict[str, Handler] = {}
        for route in routes:
            if route.path in self._routes:
                raise ValueError(f"two handlers for {route.path}")
            self._routes[route.path] = route.handler
        self._host = host
        self._port = port
        self.limits = limits if limits is not None else Limits()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.refused = 0
        """Connections reset at accept because `limits.max_connections` were open."""
        self.address = ""
        """host:port actually bound (the port is chosen by the OS when configured as 0)."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self._host, self._port, reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.address = f"{host}:{bound[1]}"

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._connections):
            conn.abort()
        await server.wait_closed()

    # -- for the connections -----------------------------------------------------------------

    def admit(self, conn: _Connection) -> bool:
        if len(self._connections) >= self.limits.max_connections:
            self.refused += 1
            return False
        self._connections.add(conn)
        return True

    def release(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    def reply(self, request: _Request) -> Reply:
        handler = self._routes.get(request.path)
        if handler is None:
            return _not_found(request.path)
        query = dict(reversed(parse_qsl(request.query, keep_blank_values=True)))
        try:
            return handler(query)
        except Exception:
            # A bug in one answer must not take the listener (or the agent) down.
            log.exception("admin: answering %s failed", request.path)
            return Reply(500, b"500: internal error (logged by the agent)\n")
