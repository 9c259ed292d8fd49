"""The HTTP/1.1 sidecar path: httptools (llhttp) framing, keep-alive both sides, streamed
bodies, per-request authorization, pooled upstream connections.

One `_Downstream` protocol per client connection parses requests; an `_Exchange` is one
request/response; an `_UpConn` protocol per upstream connection parses responses and lives
in a per-endpoint pool between exchanges. Bytes are written to the other side as they are
parsed, never gathered into whole bodies; each side's `pause_writing` pauses reading on the
other, so a connection holds at most about a high-water mark per direction.

An `_Origin` says where requests go: `AppOrigin` (inbound: the local app, plain TCP) or
`MeshOrigin` (outbound: a balanced, mTLS-dialed, identity-checked upstream sidecar). The
listeners (`InboundHTTP`, `OutboundHTTP`) add what differs: the inbound side authorizes each
request against the peer's identity, removes every X-Forwarded-Client-Cert and x-meshlet-*
field the caller sent and writes its own X-Forwarded-Client-Cert (Envoy's SANITIZE_SET),
whatever listener the caller used; the outbound side removes any X-Forwarded-Client-Cert the
app sent.

Pipelined requests are answered in order: a request that begins while another is in flight
pauses reading and waits (with at most the rest of one read buffered).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools

from connect.balancer import request_hash
from connect.http1_headers import (
    BAD_REQUEST,
    FORBIDDEN,
    FORBIDDEN_CLOSE,
    GATEWAY_TIMEOUT,
    HEADERS_TOO_LARGE,
    MESHLET_PREFIX,
    REQUEST_ID,
    REQUEST_TIMEOUT,
    RETRY_ANY,
    RETRY_IDEMPOTENT,
    XFCC,
    Framing,
    HeadRewriter,
    bad_gateway,
    new_request_id,
    unavailable,
    xfcc_element,
)
from connect.http_target import BadTarget, TargetParser, with_authority
from connect.identity import IdentityError, parse_service
from connect.inbound import InboundGate
from connect.listener import ListeningSocket, TLSTerminator
from connect.proxy import (
    DialFailed,
    Peer,
    ProxyStats,
    RequestAuthorizer,
    Upstream,
    dial_target,
)
from intentions.path_normalization import PathNormalization

log = logging.getLogger("meshlet.proxy.http")

__all__ = ["AppOrigin", "HTTPLimits", "InboundHTTP", "MeshOrigin", "OutboundHTTP"]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_STATUS_LINES = {
    int(s): b"HTTP/1.1 " + str(int(s)).encode() + b" " + s.phrase.encode() + b"\r\n"
    for s in HTTPStatus
}
_CRLF = b"\r\n"
_COLON = b": "
_SP = b" "
_HTTP11 = b" HTTP/1.1\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_UPGRADE = b"connection: upgrade\r\nupgrade: "


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    max_header_bytes: int = 64 * 1024
    """Request line plus headers; beyond it, 431."""
    max_headers: int = 100
    header_timeout: float = 10.0
    """A request head must arrive within one to two of these (slowloris)."""
    idle_timeout: float = 300.0
    """Keep-alive idle, and a stalled body or response."""
    high_water: int = 256 * 1024
    max_idle_per_endpoint: int = 64
    connect_timeout: float = 5.0


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 " + str(status).encode() + b" Unknown\r\n"


class _HeaderLimit(Exception):
    pass


# ---- exchanges -------------------------------------------------------------------------------


class _Exchange:
    """One request and its response. Only what every request needs is set per instance;
    the rest are class defaults an exchange overrides when it gets there (cheaper than
    eighteen slot stores per request)."""

    body_done = False
    conn: _UpConn | None = None
    declined_keeps = False
    """An upgrade request whose client would keep the connection: it is kept after all if
    the upstream declines the upgrade (any answer but 101) and keeps its own."""
    denied = False
    expect = False
    pending: list[bytes] | None = None
    """Body bytes read before an upstream connection was attached."""
    redo = False
    """A peer sidecar answered that the request never reached its app: its answer is
    swallowed and the request goes to another instance once that answer ends."""
    resp_chunked = False
    resp_started = False
    resp_until_close = False
    retried = False
    upgrade = b""

    def __init__(
        self,
        method: bytes,
        head: bytes,
        headers: list[tuple[bytes, bytes]],
        framing: Framing,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.head = head
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive
        self.idempotent = method in IDEMPOTENT
        self.is_head = method == b"HEAD"

    @property
    def has_body(self) -> bool:
        return self.framing.chunked or bool(self.framing.length)


# ---- upstream connections ----------------------------------------------------------------


class _UpConn(asyncio.Protocol):
    """One upstream connection; `owner` is the downstream it currently serves."""

    __slots__ = (
        "headers",
        "interim",
        "key",
        "owner",
        "parser",
        "pool",
        "skip_body",
        "slot",
        "transport",
        "tunnel",
        "upgrading",
    )

    def __init__(self, pool: _Pool, key: str, slot: int) -> None:
        self.pool = pool
        self.key = key
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.owner: _Downstream | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.interim = False
        self.skip_body = False
        self.tunnel = False
        self.upgrading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.pool.high_water)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # An idle pooled connection must say nothing; if it does, it is not reusable.
            assert self.transport is not None
            self.transport.abort()
            return
        owner.active = True
        if self.tunnel:
            assert owner.transport is not None
            owner.transport.write(data)
            return
        # Everything one read produces for the client (status line, headers, body, last
        # chunk) goes out as one write: one TLS record and one syscall instead of several.
        owner.out = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            owner.flush()
            owner.tunnel_open(self, data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as err:
            owner.flush()
            owner.upstream_broken(self, f"bad response: {err}")
            return
        owner.flush()
        if self.skip_body:
            # llhttp cannot be told a response answers HEAD; its parser now expects a body
            # that will never come, so take a fresh one for the next exchange.
            self.skip_body = False
            self.parser = httptools.HttpResponseParser(self)
            owner.response_done(self, reusable=True)

    # httptools callbacks (only those defined are called: no on_message_begin, the
    # headers list is handed over and replaced when the head is complete)
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        owner = self.owner
        assert owner is not None
        headers, self.headers = self.headers, []
        if 100 <= status < 200 and status != 101:
            self.interim = True
            owner.interim_response(status, headers)
            return
        self.upgrading = status == 101
        owner.response_head(status, headers)
        if owner.current_is_head() and status not in (204, 304):
            self.skip_body = True

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None and not self.skip_body:
            owner.response_body(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.skip_body or self.upgrading:
            return  # HEAD: finished after feed_data; 101: HttpParserUpgrade follows
        owner = self.owner
        if owner is not None:
            owner.response_done(self, reusable=self.parser.should_keep_alive())

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None and owner.transport is not None:
            owner.transport.pause_reading()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None and owner.transport is not None:
            owner.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        owner = self.owner
        if owner is not None:
            owner.upstream_lost(self)


class _Pool:
    """Idle keep-alive connections per endpoint key, newest first (warm TLS sessions)."""

    def __init__(self, high_water: int, max_idle: int) -> None:
        self.high_water = high_water
        self.max_idle = max_idle
        self.idle: dict[str, list[_UpConn]] = {}

    def take(self, key: str) -> _UpConn | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: _UpConn) -> None:
        conn.owner = None
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            transport.close()
            return
        conns.append(conn)

    def forget(self, conn: _UpConn) -> None:
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()


class _Origin:
    """Where requests go. `acquire` answers at once from the pool, or starts a dial and
    later calls `down.attach(conn)` or `down.refuse(response)`."""

    def __init__(self, limits: HTTPLimits) -> None:
        self.limits = limits
        self.pool = _Pool(limits.high_water, limits.max_idle_per_endpoint)
        self.tasks: set[asyncio.Task[None]] = set()

    def acquire(self, down: _Downstream, ex: _Exchange, avoid: str | None) -> _UpConn | None:
        raise NotImplementedError

    def mark_failed(self, key: str) -> None:
        """The endpoint `key` could not serve a request (only mesh endpoints are marked)."""

    def release(self, conn: _UpConn, reusable: bool) -> None:
        if reusable:
            self.pool.put(conn)
        else:
            conn.owner = None
            if conn.transport is not None:
                conn.transport.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        self.pool.close()


class AppOrigin(_Origin):
    """The local application, over plain TCP on loopback (inbound side)."""

    def __init__(self, host: str, port: int, limits: HTTPLimits) -> None:
        super().__init__(limits)
        self.host = host
        self.port = port
        self.key = f"{host}:{port}"

    def acquire(self, down: _Downstream, ex: _Exchange, avoid: str | None) -> _UpConn | None:
        # A retry (avoid set) dials afresh: the other pooled connections to an app that just
        # dropped one are likely dead too, and their close may not have been read yet.
        conn = self.pool.take(self.key) if avoid is None else None
        if conn is not None:
            return conn
        self._spawn(self._dial(down, ex))
        return None

    async def _dial(self, down: _Downstream, ex: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _UpConn(self.pool, self.key, -1), self.host, self.port
                ),
                self.limits.connect_timeout,
            )
        except (OSError, TimeoutError) as err:
            reason = f"local app: {type(err).__name__}"
            down.refuse(ex, bad_gateway(reason, close=True, retriable=RETRY_ANY))
            return
        down.attach(ex, conn)


class MeshOrigin(_Origin):
    """A balanced upstream service, dialed with mTLS per endpoint (outbound side)."""

    def __init__(self, upstream: Upstream, limits: HTTPLimits, stats: ProxyStats) -> None:
        super().__init__(limits)
        self.upstream = upstream
        self.stats = stats

    def acquire(self, down: _Downstream, ex: _Exchange, avoid: str | None) -> _UpConn | None:
        up = self.upstream
        balancer = up.endpoints.balancer()
        cursor = up.cursor_for(balancer)
        exclude: set[int] = _NOTHING
        if up.has_marks or avoid is not None:
            # Off the common path: get_running_loop() costs a getpid() syscall on 3.11.
            exclude = up.ejected_indexes(balancer, asyncio.get_running_loop().time())
            if avoid is not None:
                exclude |= {i for i, t in enumerate(balancer.targets) if t.key == avoid}
            if exclude and len(exclude) >= len(balancer.targets) and avoid is None:
                exclude = _NOTHING
        h = None
        if balancer.uses_hash and balancer.config.hash_policies:
            h = request_hash(balancer.config.hash_policies, _HeaderLookup(ex.headers))
        idx = balancer.pick(cursor, up.rng, h, exclude)
        if idx is None and avoid is not None:
            idx = balancer.pick(cursor, up.rng, h)  # the only endpoint: a new connection
        if idx is None:
            self.stats.no_endpoint += 1
            down.refuse(ex, unavailable("no healthy endpoint", close=False))
            return None
        target = balancer.targets[idx]
        conn = self.pool.take(target.key)
        if conn is not None:
            cursor.inflight[idx] += 1
            conn.slot = idx
            return conn
        self._spawn(self._dial(down, ex, idx, set(exclude), h))
        return None

    async def _dial(
        self, down: _Downstream, ex: _Exchange, idx: int, exclude: set[int], h: int | None
    ) -> None:
        up = self.upstream
        balancer = up.endpoints.balancer()
        cursor = up.cursor_for(balancer)
        loop = asyncio.get_running_loop()
        reason = "no healthy endpoint"
        current: int | None = idx
        while current is not None:
            target = balancer.targets[current]
            slot = current
            try:
                _, conn = await dial_target(up, target, self._factory(target.key, slot))
            except DialFailed as err:
                reason = str(err)
                self.stats.upstream_failures += 1
                up.mark_failed(target, loop.time())
                exclude.add(current)
                current = balancer.pick(cursor, up.rng, h, exclude)
                continue
            if balancer is up.endpoints.balancer():
                cursor.inflight[current] += 1
            down.attach(ex, conn)
            return
        self.stats.no_endpoint += 1
        down.refuse(ex, unavailable(reason, close=False))

    def mark_failed(self, key: str) -> None:
        up = self.upstream
        for target in up.endpoints.balancer().targets:
            if target.key == key:
                self.stats.upstream_failures += 1
                up.mark_failed(target, asyncio.get_running_loop().time())
                return

    def _factory(self, key: str, slot: int) -> Callable[[], _UpConn]:
        return lambda: _UpConn(self.pool, key, slot)

    def release(self, conn: _UpConn, reusable: bool) -> None:
        up = self.upstream
        cursor = up._cursor
        if 0 <= conn.slot < len(cursor.inflight) and cursor.inflight[conn.slot] > 0:
            cursor.inflight[conn.slot] -= 1
        super().release(conn, reusable)


_NOTHING: set[int] = set()
"""Shared and never mutated: the exclusion set of a request with nothing to avoid."""


class _HeaderLookup:
    """Lower-case header lookup for hash policies, decoded only when a policy asks."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def __call__(self, name: str) -> str | None:
        wanted = name.encode()
        values = [v.decode("latin-1") for n, v in self.headers if n.lower() == wanted]
        return ",".join(values) if values else None


# ---- downstream connections --------------------------------------------------------------


_IDLE, _HEAD, _BUSY = 0, 1, 2
"""Only _HEAD matters to the header timeout; the others are for reading the code."""


class _Downstream(asyncio.Protocol):
    __slots__ = (
        "active",
        "eof",
        "head_bytes",
        "head_size",
        "headers",
        "held",
        "listener",
        "out",
        "parser",
        "parsing",
        "peer",
        "queue",
        "read_paused",
        "serial",
        "state",
        "ticks",
        "timer",
        "too_large",
        "transport",
        "tunnel",
        "url",
        "watched",
        "xfcc",
    )

    def __init__(self, listener: _HTTPListener, peer: Peer | None) -> None:
        self.listener = listener
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_size = 0
        self.too_large = False
        self.out: list[bytes] | None = None
        self.queue: deque[_Exchange] = deque()
        self.parsing: _Exchange | None = None
        self.state = _IDLE
        self.serial = 0
        self.watched = -1
        self.active = False
        self.ticks = 0
        self.timer: asyncio.TimerHandle | None = None
        self.read_paused = False
        self.tunnel: _UpConn | None = None
        self.eof = False
        self.held: bytes | None = None
        """Set once llhttp stops at an upgrade request: what the client sent after its head,
        for the upstream only if it answers 101 (see _upgrade_requested)."""
        self.xfcc = b""
        """This connection's X-Forwarded-Client-Cert line (inbound), built once."""

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        gate = self.listener.gate
        if gate is not None:
            self.peer = gate.admit(transport)
            if self.peer is None:
                return  # refused and aborted before a byte was read
            if self.listener.by_uri:
                element = xfcc_element(self.listener.by_uri, self.peer.cert_sha256, self.peer.uri)
                self.xfcc = XFCC + b": " + element + _CRLF
        self.transport = transport
        transport.set_write_buffer_limits(high=self.listener.limits.high_water)
        self.listener.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(
            self.listener.limits.header_timeout, self._tick
        )

    def data_received(self, data: bytes) -> None:
        self.active = True
        tunnel = self.tunnel
        if tunnel is not None:
            if tunnel.transport is not None:
                tunnel.transport.write(data)
            return
        if self.held is not None:
            self._hold(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError:
            self._fail(HEADERS_TOO_LARGE if self.too_large else BAD_REQUEST)
            return
        except httptools.HttpParserError:
            self._fail(BAD_REQUEST)
            return
        if self.state == _HEAD:
            self.head_bytes += len(data)
            if self.head_bytes > self.listener.limits.max_header_bytes:
                self._fail(HEADERS_TOO_LARGE)

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the answer.
        self.eof = True
        return bool(self.queue) and not self.listener.is_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.listener.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for ex in self.queue:
            conn = ex.conn
            if conn is not None:
                ex.conn = None
                conn.owner = None
                self.listener.origin.release(conn, reusable=False)
        self.queue.clear()
        tunnel = self.tunnel
        if tunnel is not None and tunnel.transport is not None:
            tunnel.transport.close()

    def pause_writing(self) -> None:
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None and conn.transport is not None:
                conn.transport.pause_reading()
        elif self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.queue:
            conn = self.queue[0].conn
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()
        elif self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.resume_reading()

    # -- request parsing callbacks
    def on_message_begin(self) -> None:
        self.state = _HEAD
        self.serial += 1
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.head_size = 0
        if self.queue and not self.read_paused and self.transport is not None:
            # Pipelining: hold the next request until this one is answered.
            self.read_paused = True
            self.transport.pause_reading()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        limits = self.listener.limits
        if len(headers) > limits.max_headers or self.head_size > limits.max_header_bytes:
            self.too_large = True  # the callback error is then a 431, not a 400
            raise _HeaderLimit

    def on_headers_complete(self) -> None:
        listener = self.listener
        parser = self.parser
        method = parser.get_method()
        headers = self.headers
        keep_alive = parser.should_keep_alive()
        target = self.url
        targets = listener.targets
        if targets is not None:
            # One normalized origin-form target: what is authorized is what the app receives.
            try:
                target, authority = targets(method, target)
            except BadTarget as err:
                log.debug("request target refused: %s", err)
                raise _BadHead from None
            if authority:
                headers, sent_host = with_authority(headers, authority)
                if not sent_host and parser.get_http_version() == "1.1":
                    raise _BadHead
        lines = [method, _SP, target, _HTTP11]
        facts = listener.request_heads.rewrite(headers, lines)
        if facts.hosts > 1:
            raise _BadHead  # RFC 9112 §3.2: so is one with two
        if not facts.host:
            if parser.get_http_version() == "1.1":
                raise _BadHead  # RFC 9112 §3.2: a 1.1 request without Host is a 400
            if listener.default_host:
                # HTTP/1.0 may omit Host; it goes on as 1.1, which must carry one.
                lines += (b"host", _COLON, listener.default_host, _CRLF)
        if not facts.has_request_id:
            lines += (REQUEST_ID, _COLON, new_request_id(), _CRLF)
        if self.xfcc:
            lines.append(self.xfcc)
        framing = facts.framing
        if framing.chunked:
            lines.append(_CHUNKED)
        elif framing.length is not None:
            lines.append(framing.length_line)
        upgrade = facts.upgrade if parser.should_upgrade() else b""
        if upgrade and (framing.chunked or framing.length):
            raise _BadHead  # llhttp takes the body for the new protocol's (see _hold): refused
        if upgrade:
            lines.append(_UPGRADE + upgrade + _CRLF)
        lines.append(_CRLF)
        ex = _Exchange(method, b"".join(lines), headers, framing, keep_alive and not upgrade)
        ex.expect = facts.expect_continue
        ex.upgrade = upgrade
        self.state = _BUSY
        self.head_bytes = 0
        listener.stats.requests += 1
        authorize = listener.authorize
        if authorize is not None and self.peer is not None:
            verdict = authorize(self.peer, method, target, facts.host, headers)
            if not verdict.allowed:
                ex.denied = True
                listener.stats.requests_denied += 1
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.denied:
            return
        conn = ex.conn
        if conn is None or conn.transport is None:
            if ex.pending is None:
                ex.pending = []
            ex.pending.append(body)
            if not self.read_paused and self.transport is not None:
                self.read_paused = True
                self.transport.pause_reading()
            return
        if ex.framing.chunked:
            conn.transport.writelines((b"%x\r\n" % len(body), body, _CRLF))
        else:
            conn.transport.write(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_done = True
        self.state = _IDLE
        conn = ex.conn
        if conn is not None and conn.transport is not None and ex.framing.chunked:
            conn.transport.write(_LAST_CHUNK)
        if ex.denied and self.queue and ex is self.queue[0]:
            # (a denied upgrade is answered and closed already, the queue then empty)
            self._finish(ex)

    # -- exchange lifecycle
    def current_is_head(self) -> bool:
        return bool(self.queue) and self.queue[0].is_head

    def _start(self, ex: _Exchange) -> None:
        if ex.denied:
            transport = self.transport
            assert transport is not None
            if (ex.expect and ex.has_body) or ex.upgrade:
                # The client may be holding its body for a 100 we will not send: close.
                ex.keep_alive = False
                transport.write(FORBIDDEN_CLOSE)
            else:
                transport.write(FORBIDDEN)
            if ex.body_done or not ex.keep_alive:
                self._finish(ex)
            return
        conn = self.listener.origin.acquire(self, ex, None)
        if conn is not None:
            self.attach(ex, conn)
        elif (
            self.queue
            and self.queue[0] is ex
            and self.transport is not None
            and not ex.body_done
            and not self.read_paused
        ):
            self.read_paused = True
            self.transport.pause_reading()

    def attach(self, ex: _Exchange, conn: _UpConn) -> None:
        """Send the request head and what is buffered of its body; then stream the rest."""
        if self.transport is None or not self.queue or self.queue[0] is not ex:
            self.listener.origin.release(conn, reusable=True)
            return
        ex.conn = conn
        conn.owner = self
        transport = conn.transport
        assert transport is not None
        if ex.pending:
            parts = [ex.head]
            for chunk in ex.pending:
                if ex.framing.chunked:
                    parts += (b"%x\r\n" % len(chunk), chunk, _CRLF)
                else:
                    parts.append(chunk)
            ex.pending = None
            if ex.body_done and ex.framing.chunked:
                parts.append(_LAST_CHUNK)
            transport.writelines(parts)
        else:
            transport.write(ex.head)
            if ex.body_done and ex.framing.chunked:
                transport.write(_LAST_CHUNK)
        self._resume()

    def refuse(self, ex: _Exchange, response: bytes) -> None:
        """The origin could not serve `ex`: answer for it. The body, if any, is unread, so
        the connection closes unless the request had none."""
        transport = self.transport
        if transport is None or not self.queue or self.queue[0] is not ex:
            return
        if (ex.has_body and not ex.body_done) or ex.upgrade:
            ex.keep_alive = False
        transport.write(response)
        self._finish(ex)

    def interim_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        transport = self.transport
        if transport is not None:
            lines = [_status_line(status)]
            self.listener.response_heads.rewrite(headers, lines)
            lines.append(_CRLF)
            transport.write(b"".join(lines))

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.queue[0]
        lines = [_status_line(status)]
        facts = self.listener.response_heads.rewrite(headers, lines)
        retriable = facts.retriable
        if (
            retriable
            and self.listener.may_redo
            and self._replayable(ex)
            and (retriable == RETRY_ANY or (retriable == RETRY_IDEMPOTENT and ex.idempotent))
        ):
            ex.redo = True
            return
        ex.resp_started = True
        framing = facts.framing
        no_body = status in (204, 304) or ex.is_head
        if status == 101:
            lines.append(_UPGRADE + facts.upgrade + _CRLF)
        elif framing.length is not None and not framing.chunked:
            lines.append(framing.length_line)
        elif no_body:
            pass
        else:
            # The upstream delimits by close; re-frame as chunked to keep the client.
            ex.resp_until_close = not framing.chunked
            if ex.keep_alive:
                ex.resp_chunked = True
                lines.append(_CHUNKED)
        if not ex.keep_alive and status != 101:
            conn = ex.conn
            if ex.declined_keeps and conn is not None and conn.parser.should_keep_alive():
                ex.keep_alive = True  # see _declined
            else:
                lines.append(_CLOSE)
        lines.append(_CRLF)
        out = self.out
        if out is not None:
            out += lines
        elif self.transport is not None:
            self.transport.writelines(lines)

    def response_body(self, body: bytes) -> None:
        if self.queue[0].redo:
            return
        out = self.out
        if out is None:
            out = []
            self.out = out
        if self.queue[0].resp_chunked:
            out += (b"%x\r\n" % len(body), body, _CRLF)
        else:
            out.append(body)

    def flush(self) -> None:
        """Write what this read produced for the client, and stop batching."""
        out = self.out
        self.out = None
        transport = self.transport
        if not out or transport is None:
            return
        if len(out) == 1:
            transport.write(out[0])
        elif sum(map(len, out)) <= 65536:
            transport.write(b"".join(out))
        else:
            transport.writelines(out)

    def response_done(self, conn: _UpConn, reusable: bool) -> None:
        ex = self.queue[0]
        if ex.conn is not conn:
            return
        if ex.redo:
            self._redo(ex, conn)
            return
        if ex.resp_chunked:
            if self.out is not None:
                self.out.append(_LAST_CHUNK)
            elif self.transport is not None:
                self.transport.write(_LAST_CHUNK)
        # A connection whose request body was not fully sent cannot carry another request.
        reusable = reusable and ex.body_done and not ex.upgrade
        ex.conn = None
        self.listener.origin.release(conn, reusable)
        if not ex.body_done:
            ex.keep_alive = False
        self._finish(ex)

    def upstream_lost(self, conn: _UpConn) -> None:
        if self.tunnel is conn:
            if self.transport is not None:
                self.transport.close()
            return
        ex = self.queue[0] if self.queue else None
        if ex is None or ex.conn is not conn:
            return
        if ex.resp_started:
            if ex.resp_until_close:
                self.response_done(conn, reusable=False)  # the close delimited it
            elif self.transport is not None:
                self.transport.abort()
            return
        if ex.redo:
            self._redo(ex, conn)
            return
        ex.conn = None
        conn.owner = None
        self.listener.origin.release(conn, reusable=False)
        if ex.idempotent and self._replayable(ex):
            # Nothing of the response came back and the request can be repeated: a pooled
            # connection the upstream closed, or an instance killed mid-request.
            self._again(ex, conn.key)
            return
        # An inbound sidecar tells the caller's sidecar an idempotent request may go to
        # another instance: its app closed before answering, even after one more try here.
        retriable = b""
        if self.listener.is_tls and ex.idempotent and not ex.has_body and not ex.upgrade:
            retriable = RETRY_IDEMPOTENT
        self.refuse(ex, bad_gateway("upstream connection closed", close=True, retriable=retriable))

    @staticmethod
    def _replayable(ex: _Exchange) -> bool:
        """Can be sent again as it is: nothing of it is lost (no body) and it was not already
        sent twice; an upgrade is never repeated."""
        return not ex.has_body and not ex.retried and not ex.upgrade

    def _again(self, ex: _Exchange, avoid: str) -> None:
        ex.retried = True
        again = self.listener.origin.acquire(self, ex, avoid)
        if again is not None:
            self.attach(ex, again)

    def _redo(self, ex: _Exchange, conn: _UpConn) -> None:
        """The peer sidecar could not reach its app: mark that endpoint, try another."""
        ex.redo = False
        ex.conn = None
        conn.owner = None
        origin = self.listener.origin
        origin.release(conn, reusable=False)
        origin.mark_failed(conn.key)
        self._again(ex, conn.key)

    def upstream_broken(self, conn: _UpConn, reason: str) -> None:
        log.warning("upstream %s: %s", conn.key, reason)
        if conn.transport is not None:
            conn.transport.abort()

    def tunnel_open(self, conn: _UpConn, rest: bytes) -> None:
        ex = self.queue[0]
        if not ex.upgrade:
            if conn.transport is not None:
                conn.transport.abort()
            return
        conn.tunnel = True
        self.tunnel = conn
        self.queue.clear()
        self.state = _BUSY
        held, self.held = self.held, None
        if held and conn.transport is not None:
            conn.transport.write(held)
        if self.transport is not None and rest:
            self.transport.write(rest)
        self._resume()

    def _upgrade_requested(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request (or a CONNECT). What follows is the new
        protocol only once the upstream has answered 101; until then it may as well be a
        second request that authorization never saw, which the app would take as one if it
        declines the upgrade. So it is held here, neither parsed nor forwarded, and reading
        stops: a 101 sends it into the tunnel (tunnel_open); any other answer leaves the
        connection HTTP/1.1, and it is parsed then as what follows that answer (_declined)."""
        self.held = b""
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        ex = self.queue[-1] if self.queue else None
        if ex is None:
            # Already answered (denied, or refused at once): nothing will switch protocols.
            if self.transport is not None:
                self.transport.close()
            return
        if not ex.upgrade or ex.denied:
            ex.keep_alive = False  # a denied upgrade or a CONNECT: the answer ends it all
            return
        # The client's own choice, for when the upstream declines (parser still knows it).
        ex.declined_keeps = self.parser.should_keep_alive()
        self._hold(rest)

    def _hold(self, data: bytes) -> None:
        held = self.held
        assert held is not None
        held += data
        # A client sends nothing of the new protocol before the 101 (RFC 6455 §4.1, RFC 7540
        # §3.2) and reading is paused: only what reads already under way bring is held.
        if len(held) > self.listener.limits.high_water:
            self.held = b""
            self._fail(BAD_REQUEST)
            return
        self.held = held

    def _finish(self, ex: _Exchange) -> None:
        if self.out:
            # Batched bytes of this response must precede a close or the next response.
            pending, self.out = self.out, []
            if self.transport is not None:
                self.transport.write(b"".join(pending))
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        transport = self.transport
        if transport is None:
            return
        if not ex.keep_alive:
            transport.close()
            return
        if self.queue:
            self._start(self.queue[0])
        elif self.held is not None:
            self._declined()
            return
        elif self.eof:
            transport.close()  # the client half-closed and has had every answer
            return
        self._resume()

    def _declined(self) -> None:
        """The upstream answered an upgrade request without switching protocols: the
        connection stays HTTP/1.1 (RFC 9110 §7.8), so what the client sent after that request
        is parsed now, by a fresh parser (llhttp's stopped at the upgrade), and each request in
        it goes the way of any other (authorization, rewrite, XFCC)."""
        held, self.held = self.held, None
        self.parser = httptools.HttpRequestParser(self)
        self._resume()
        if held:
            self.data_received(held)
        if self.eof and not self.queue and self.transport is not None:
            self.transport.close()

    def _resume(self) -> None:
        # Never while bytes after an upgrade request are held: only a 101 resumes those.
        if self.read_paused and self.transport is not None and self.held is None:
            self.read_paused = False
            self.transport.resume_reading()

    def _fail(self, response: bytes) -> None:
        self.listener.stats.bad_requests += 1
        transport = self.transport
        if transport is None:
            return
        if self.queue and self.queue[0].resp_started:
            transport.abort()
            return
        transport.write(response)
        transport.close()

    def _tick(self) -> None:
        transport = self.transport
        if transport is None:
            return
        limits = self.listener.limits
        if self.state == _HEAD and self.watched == self.serial:
            self._fail(REQUEST_TIMEOUT)
            return
        self.watched = self.serial if self.state == _HEAD else -1
        if self.active:
            self.active = False
            self.ticks = 0
        else:
            self.ticks += 1
            if self.ticks * limits.header_timeout >= limits.idle_timeout:
                if self.queue and not self.queue[0].resp_started:
                    transport.write(GATEWAY_TIMEOUT)
                    transport.close()
                elif self.queue or self.tunnel is not None:
                    transport.abort()  # stalled mid-message: nothing clean to say
                else:
                    transport.close()
                return
        self.timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._tick)


class _BadHead(Exception):
    pass


# ---- listeners -----------------------------------------------------------------------------


class _HTTPListener(ListeningSocket):
    targets: TargetParser | None = None
    """Inbound: parses and normalizes each request target; outbound forwards it as sent."""
    default_host = b""
    """Outbound: the Host given to an HTTP/1.0 request that has none (the upstream's name)."""

    def __init__(
        self,
        origin: _Origin,
        limits: HTTPLimits,
        stats: ProxyStats,
        *,
        authorize: RequestAuthorizer | None,
        by_uri: str,
        drop: frozenset[bytes],
        drop_prefixes: tuple[bytes, ...] = (),
        is_tls: bool,
    ) -> None:
        super().__init__()
        self.origin = origin
        self.limits = limits
        self.stats = stats
        self.authorize = authorize
        self.by_uri = by_uri
        self.drop = drop
        self.is_tls = is_tls
        self.connections: set[_Downstream] = set()
        self.gate: InboundGate | None = None
        self.request_heads = HeadRewriter(drop, drop_prefixes=drop_prefixes)
        self.response_heads = HeadRewriter()
        self.may_redo = not is_tls
        """Outbound only: an inbound sidecar's app answers are never a peer's refusal."""

    def _live(self) -> int:
        return len(self.connections)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones get `grace`."""
        await self._stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            busy = [c for c in self.connections if c.queue or c.tunnel is not None]
            for conn in list(self.connections):
                if conn not in busy and conn.transport is not None:
                    conn.transport.close()
            if not busy or loop.time() >= deadline:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await self.origin.close()
        await self._closed()


class OutboundHTTP(_HTTPListener):
    """Plain HTTP from the local app to one upstream service over pooled mTLS."""

    def __init__(
        self,
        upstream: Upstream,
        limits: HTTPLimits | None = None,
        stats: ProxyStats | None = None,
    ) -> None:
        limits = limits or HTTPLimits()
        stats = stats or ProxyStats()
        super().__init__(
            MeshOrigin(upstream, limits, stats),
            limits,
            stats,
            authorize=None,
            by_uri="",
            # The app cannot forge client-certificate details for the next hop.
            drop=frozenset({XFCC}),
            is_tls=False,
        )
        self.default_host = upstream.name.encode()

    def _protocol(self) -> asyncio.Protocol:
        return _Downstream(self, None)


class InboundHTTP(_HTTPListener):
    """mTLS from mesh peers, authorized per request, to the local app over pooled TCP."""

    def __init__(
        self,
        gate: InboundGate,
        app_host: str,
        app_port: int,
        *,
        authorize: RequestAuthorizer,
        local_uri: str,
        limits: HTTPLimits | None = None,
        path_normalization: PathNormalization = "base",
    ) -> None:
        limits = limits or HTTPLimits()
        super().__init__(
            AppOrigin(app_host, app_port, limits),
            limits,
            gate.stats,
            authorize=authorize,
            by_uri=local_uri,
            # What a caller says about its certificate or speaks as a sidecar is not believed,
            # whichever listener it came through (a tcp upstream relays bytes as they are, and
            # any mesh leaf can connect here directly): the app sees this sidecar's word only.
            drop=frozenset({XFCC}),
            drop_prefixes=(MESHLET_PREFIX,),
            is_tls=True,
        )
        self.gate = gate
        self.inbound_gate = gate
        self.targets = TargetParser(path_normalization)
        # An HTTP/1.0 caller may omit Host; the app gets HTTP/1.1, which must carry one: the
        # name this sidecar serves is the host the caller reached.
        try:
            self.default_host = parse_service(local_uri).service.encode()
        except IdentityError:
            self.default_host = b""  # no service name to give: forwarded without Host

    def _protocol(self) -> asyncio.Protocol:
        return _Downstream(self, None)

    def _tls(self) -> TLSTerminator:
        return self.inbound_gate
