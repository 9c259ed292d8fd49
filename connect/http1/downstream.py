"""The client side of an HTTP listener: one protocol per client connection, parsing
requests with httptools (llhttp) and serving them in order through the listener's origin.

Parser callbacks stay thin: they collect the head, build the `Exchange` (connect.http1.
exchange) and carry out the actions its decisions return. Bytes are written to the other side
as they are parsed, never gathered into whole bodies; each side's `pause_writing` pauses
reading on the other.

Pipelined requests are answered in order: a request that begins while another is in flight
pauses reading and waits (with at most the rest of one read buffered). llhttp parses that rest
whole, so at most `max_pipelined` requests are taken ahead of their answers; beyond that the
connection closes after the last one taken.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from connect.cluster import Outcome
from connect.http1.exchange import (
    CLOSE,
    FINISH,
    FORWARD,
    Action,
    Answer,
    Exchange,
    Retry,
)
from connect.http1.upstream import UpConn
from connect.http1.wire import (
    CHUNKED_LINE,
    COLON,
    CONNECTION_CLOSE,
    CRLF,
    HTTP11,
    LAST_CHUNK,
    SP,
    UPGRADE_LINE,
    status_line,
)
from connect.http1_headers import (
    BAD_REQUEST,
    HEADERS_TOO_LARGE,
    REQUEST_ID,
    REQUEST_TIMEOUT,
    XFCC,
    ForwardedFields,
    fault_abort,
    new_request_id,
    xfcc_element,
)
from connect.http_target import BadTarget, with_authority
from connect.observe import ExchangeObserver, status_of
from connect.routes import DEFAULT_RETRY
from connect.seams import Peer

if TYPE_CHECKING:
    from connect.http1.listener import HTTPListener

log = logging.getLogger("meshlet.proxy.http")

__all__ = ["Downstream"]


class _HeaderLimit(Exception):
    pass


_REFUSAL_FLAGS = {502: "UF", 503: "UH", 504: "UT"}
"""Envoy's flag for an answer the proxy made because no upstream could take the request
(the origin names overflow, UO, itself)."""

_H2C = b"h2c"
"""The Upgrade token of cleartext HTTP/2 (RFC 7540 §3.2), which the sidecar never tunnels."""

_IDLE_LOOKS = 4
"""A route's idle timeout is watched this many times per period (it fires 1 to 1.25 times
the timeout after the last byte moved; no clock read per byte)."""

_IDLE, _HEAD, _BUSY = 0, 1, 2
"""Only _HEAD matters to the header timeout; the others are for reading the code."""


class Downstream(asyncio.Protocol):
    __slots__ = (
        "active",
        "eof",
        "full",
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
        "upgraded",
        "url",
        "watched",
        "xfcc",
    )

    def __init__(self, listener: HTTPListener, peer: Peer | None) -> None:
        self.listener = listener
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_size = 0
        self.too_large = ""
        """The limit a head being parsed went past (its callback error is then a 431)."""
        self.out: list[bytes] | None = None
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.state = _IDLE
        self.serial = 0
        self.watched = -1
        self.active = False
        self.ticks = 0
        self.timer: asyncio.TimerHandle | None = None
        self.read_paused = False
        self.tunnel: UpConn | None = None
        self.eof = False
        self.full = False
        """Set once `max_pipelined` requests wait for answers and more began: the parser is
        given up, nothing more is read, and the last request taken closes the connection."""
        self.held: bytes | None = None
        """Set once llhttp stops at an upgrade request: what the client sent after its head,
        for the upstream only if it answers 101 (see _upgrade_requested)."""
        self.xfcc = b""
        """This connection's X-Forwarded-Client-Cert line (inbound), built once."""
        self.upgraded: tuple[bytes, bytes, bytes, ForwardedFields] | None = None
        """Inbound: what the last upgrade request was authorized on (method, target, host,
        fields), so that its tunnel can be decided again (InboundHTTP.recheck)."""

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        gate = self.listener.gate
        if gate is not None:
            self.peer = gate.admit(transport)
            if self.peer is None:
                return  # refused and aborted before a byte was read
            if self.listener.by_uri and not self.peer.plaintext:
                # A plaintext caller has no certificate to vouch for: no element at all.
                element = xfcc_element(self.listener.by_uri, self.peer.cert_sha256, self.peer.uri)
                self.xfcc = XFCC + b": " + element + CRLF
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
        if self.full:
            return  # bytes a paused transport had read already: requests not taken
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _PipelineFull):  # httptools chains it so
                self._pipeline_full()
                return
            if self.too_large:
                self._too_large(self.too_large)
            else:
                self._fail(BAD_REQUEST)
            return
        except httptools.HttpParserError:
            self._fail(BAD_REQUEST)
            return
        if self.state == _HEAD:
            # A head still arriving, by its raw bytes: bounds one whose pieces trigger no
            # callback (a long name). Twice the counted limit: the raw bytes also hold the
            # request line, `: `, CRLFs and whitespace, which `head_size` (what the limit
            # means, checked per header) does not count.
            self.head_bytes += len(data)
            if self.head_bytes > 2 * self.listener.limits.max_header_bytes:
                self._too_large("max_header_bytes")

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        tls = self.listener.is_tls and not (peer is not None and peer.plaintext)
        if not self.queue or tls:
            # Nothing owed, or TLS: asyncio closes the transport itself. A plaintext caller
            # (MutualTLSMode permissive) on an inbound listener is plain TCP, as outbound.
            return False
        # TCP cannot tell a half-close from a client that closed and left. One that asked for
        # a persistent connection has no reason to half-close it: it has given up (as Envoy's
        # HTTP/1 codec treats a downstream FIN), so the transport closes and connection_lost
        # closes the upstream connection its request holds (the next hop then lets its app
        # connection go too). One that asked for `Connection: close` (or spoke HTTP/1.0) may
        # half-close after its request: it still gets the answer.
        return not self.queue[0].keep_alive

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.listener.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        observer = self.listener.observer
        for ex in self.queue:
            if ex.route is not None or ex.try_deadline is not None:
                self._stop_timers(ex)
            if ex.start and observer is not None:
                # Cut short: by the client (DC) unless the proxy gave up first (UC, UT).
                self._observed(observer, ex, "DC" if ex.flags == "-" else ex.flags)
            conn = ex.conn
            if conn is not None:
                ex.conn = None
                conn.owner = None
                self.listener.origin.release(conn, reusable=False, outcome=Outcome.CANCELLED)
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
        if len(self.queue) >= self.listener.limits.max_pipelined:
            self.full = True
            raise _PipelineFull

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        limits = self.listener.limits
        if len(headers) > limits.max_headers:
            self.too_large = "max_headers"
            raise _HeaderLimit
        if self.head_size > limits.max_header_bytes:
            self.too_large = "max_header_bytes"
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
        table = listener.fixed_routes
        if table is None and listener.routes is not None:
            table = listener.routes()
        selection = None
        if table is not None:
            # Once per head, before it is serialized: the route may rewrite path and fields.
            selection = table.fixed
            if selection is None:
                path, sep, query = target.partition(b"?")
                selection = table.select(method, path, query, headers, listener.rng)
                if selection.path is not None:
                    target = selection.path + sep + query
                edits = selection.request_headers
                if edits:
                    headers = edits.apply(headers)
        lines = [method, SP, target, HTTP11]
        facts = listener.request_heads.rewrite(headers, lines)
        if facts.hosts > 1:
            raise _BadHead  # RFC 9112 §3.2: so is one with two
        if not facts.host:
            if parser.get_http_version() == "1.1":
                raise _BadHead  # RFC 9112 §3.2: a 1.1 request without Host is a 400
            if listener.default_host:
                # HTTP/1.0 may omit Host; it goes on as 1.1, which must carry one.
                lines += (b"host", COLON, listener.default_host, CRLF)
        if not facts.has_request_id:
            lines += (REQUEST_ID, COLON, new_request_id(), CRLF)
        fields_end = len(lines)
        if self.xfcc:
            lines.append(self.xfcc)
        framing = facts.framing
        if framing.chunked:
            lines.append(CHUNKED_LINE)
        elif framing.length is not None:
            lines.append(framing.length_line)
        upgrade = facts.upgrade if parser.should_upgrade() else b""
        if upgrade and (framing.chunked or framing.length):
            raise _BadHead  # llhttp takes the body for the new protocol's (see _hold): refused
        dropped = bool(upgrade) and listener.authorize is not None and _H2C in upgrade.lower()
        if dropped:
            # Inbound: after a 101 the tunnel would carry HTTP/2 requests no authorization sees.
            # Envoy drops an h2c upgrade and answers the request as HTTP/1.1 (envoy#7981); so
            # do we. Kept only as a declined upgrade would be (_upgrade_requested).
            upgrade = b""
        if upgrade:
            lines.append(UPGRADE_LINE + upgrade + CRLF)
        lines.append(CRLF)
        ex = Exchange(
            method, b"".join(lines), headers, framing, keep_alive and not (upgrade or dropped)
        )
        if selection is not None:
            action = selection.action
            ex.cluster = selection.cluster
            if action.retry is not DEFAULT_RETRY:
                ex.retry = action.retry
                bound = listener.limits.retry_body_bytes
                # A body is kept for a retry only when a route asks for retries and it is
                # small; a 100-continue body is not (the client waits for our word first).
                if action.retry.num_retries and not facts.expect_continue:
                    if framing.chunked or 0 < (framing.length or 0) <= bound:
                        ex.kept = []
                        ex.kept_room = bound
                    elif framing.length:
                        listener.stats.retry_buffer_overflows += 1
            if action.needs_shell:
                ex.route = action
                ex.resp_edits = selection.response_headers
                if action.fault is not None:
                    # Decided now, so that an aborted request is never mirrored.
                    ex.fault_delay, ex.fault_abort = action.fault.decide(listener.rng)
                mirror = action.mirror
                if mirror is not None and not ex.fault_abort and mirror.decide(listener.rng):
                    ex.mirror = mirror.cluster
                    bound = listener.limits.retry_body_bytes
                    # The copy carries a body only if it is kept whole (within the bound).
                    if (
                        ex.kept is None
                        and (framing.chunked or 0 < (framing.length or 0) <= bound)
                        and not facts.expect_continue
                    ):
                        ex.kept = []
                        ex.kept_room = bound
        ex.expect = facts.expect_continue
        ex.upgrade = upgrade
        self.state = _BUSY
        self.head_bytes = 0
        listener.stats.requests += 1
        if listener.observer is not None:
            ex.start = time.monotonic()
        authorize = listener.authorize
        if authorize is not None:
            peer = self.peer
            if peer is None:
                raise _BadHead  # not admitted (refused): nothing is decided for nobody
            # Decided on the Host the app will see: an HTTP/1.0 request without one is
            # forwarded with the listener's default, so that is the authority decided on.
            # Decided on the fields the app will receive (see ForwardedFields).
            fields = ForwardedFields(lines, 4, fields_end)
            host = facts.host or listener.default_host
            verdict = authorize(peer, method, target, host, fields)
            if upgrade:
                self.upgraded = (method, target, host, fields)
            if ex.start:
                ex.verdict = verdict
            if not verdict.allowed:
                ex.denied = True
                listener.stats.requests_denied += 1
        if ex.start:
            observer = listener.observer
            assert observer is not None
            observer.request(ex, self.peer)
        self.parsing = ex
        self.queue.append(ex)
        if len(self.queue) == 1:
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        if ex.start:
            ex.rx += len(body)
        ex.stirred = True
        if ex.denied:
            return
        if ex.kept is not None and not ex.keep(body):
            self.listener.stats.retry_buffer_overflows += 1
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
            conn.transport.writelines((b"%x\r\n" % len(body), body, CRLF))
        else:
            conn.transport.write(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_done = True
        self.state = _IDLE
        if ex.deadline_due:
            ex.deadline_due = False
            assert ex.route is not None and ex.route.request_timeout is not None
            self._arm_deadline(ex, ex.route.request_timeout)
        if ex.try_due:
            ex.try_due = False
            assert ex.route is not None and ex.route.try_timeout is not None
            if ex.conn is not None:
                self._arm_try(ex, ex.route.try_timeout)
        conn = ex.conn
        if conn is not None and conn.transport is not None and ex.framing.chunked:
            conn.transport.write(LAST_CHUNK)
        if ex.mirror:
            self.listener.origin.mirror(ex)
        if ex.denied and self.queue and ex is self.queue[0]:
            # (a denied upgrade is answered and closed already, the queue then empty)
            self._finish(ex)

    # -- exchange lifecycle
    def current_is_head(self) -> bool:
        return bool(self.queue) and self.queue[0].is_head

    def _start(self, ex: Exchange) -> None:
        if ex.denied:
            transport = self.transport
            assert transport is not None
            answer = ex.on_denied().response
            if ex.start:
                ex.status = 403
            transport.write(answer)
            if ex.body_done or not ex.keep_alive:
                self._finish(ex)  # else once the body has been read (on_message_complete)
            return
        route = ex.route
        if route is not None:
            if ex.fault_delay and not ex.faulted:
                # Before anything else, as Envoy's fault filter runs before its router.
                ex.faulted = True
                if ex.start:
                    ex.flags = "DI"
                self._hold_reading()
                ex.try_deadline = asyncio.get_running_loop().call_later(
                    ex.fault_delay, self._delayed, ex
                )
                return
            if ex.fault_abort:
                self._abort(ex, ex.fault_abort)
                return
            if route.idle_timeout is not None and ex.idle is None:
                ex.idle = asyncio.get_running_loop().call_later(
                    route.idle_timeout / _IDLE_LOOKS, self._idle_look, ex, 0
                )
            if route.request_timeout is not None and ex.deadline is None:
                # Envoy's timer starts at the end of the request, so an upload may take
                # longer; an upgrade request is timed from its head, until the 101
                # (envoy#41075).
                if ex.body_done or ex.upgrade:
                    self._arm_deadline(ex, route.request_timeout)
                else:
                    ex.deadline_due = True
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

    def _arm_deadline(self, ex: Exchange, timeout: float) -> None:
        ex.deadline = asyncio.get_running_loop().call_later(timeout, self._timed_out, ex, False)

    def _arm_try(self, ex: Exchange, timeout: float) -> None:
        ex.try_deadline = asyncio.get_running_loop().call_later(timeout, self._timed_out, ex, True)

    def _hold_reading(self) -> None:
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _delayed(self, ex: Exchange) -> None:
        """The route's fault delay is over: on as any request (or its abort)."""
        ex.try_deadline = None
        if self.transport is None or not self.queue or self.queue[0] is not ex:
            return
        self._start(ex)

    def _abort(self, ex: Exchange, status: int) -> None:
        """The route's fault aborts the request: answered without forwarding."""
        if ex.start:
            ex.flags = "FI"
        self.refuse(ex, fault_abort(status))

    def _idle_look(self, ex: Exchange, silent: int) -> None:
        """The route's idle timer, looking `_IDLE_LOOKS` times per idle timeout: the stream
        times out after that many looks in a row saw nothing move either way."""
        ex.idle = None
        transport = self.transport
        if transport is None or not self.queue or self.queue[0] is not ex:
            return
        route = ex.route
        assert route is not None and route.idle_timeout is not None
        silent = 0 if ex.stirred else silent + 1
        ex.stirred = False
        if silent < _IDLE_LOOKS:
            ex.idle = asyncio.get_running_loop().call_later(
                route.idle_timeout / _IDLE_LOOKS, self._idle_look, ex, silent
            )
            return
        action = ex.on_idle()
        if ex.start:
            ex.flags = "SI"  # Envoy's: stream idle timeout
        conn = ex.conn
        if conn is not None:
            if conn.transport is not None:
                conn.transport.abort()
            self._detach(ex, conn, Outcome.TIMEOUT)
        if action is CLOSE:
            transport.abort()
            return
        ex.keep_alive = False
        self._act(ex, action)

    def attach(self, ex: Exchange, conn: UpConn) -> None:
        """Send the request head and what is buffered of its body; then stream the rest."""
        if self.transport is None or not self.queue or self.queue[0] is not ex:
            self.listener.origin.release(conn, reusable=True, outcome=Outcome.CANCELLED)
            return
        ex.conn = conn
        conn.owner = self
        transport = conn.transport
        assert transport is not None
        if ex.pending:
            parts = [ex.head]
            for chunk in ex.pending:
                if ex.framing.chunked:
                    parts += (b"%x\r\n" % len(chunk), chunk, CRLF)
                else:
                    parts.append(chunk)
            ex.pending = None
            if ex.body_done and ex.framing.chunked:
                parts.append(LAST_CHUNK)
            transport.writelines(parts)
        elif ex.tries > 1 and ex.kept is not None:
            # A retry: the kept body goes again (replayable said it was whole).
            parts = [ex.head]
            for chunk in ex.kept:
                parts += (b"%x\r\n" % len(chunk), chunk, CRLF) if ex.framing.chunked else (chunk,)
            if ex.framing.chunked:
                parts.append(LAST_CHUNK)
            transport.writelines(parts)
        else:
            transport.write(ex.head)
            if ex.body_done and ex.framing.chunked:
                transport.write(LAST_CHUNK)
        route = ex.route
        if route is not None and route.try_timeout is not None:
            if ex.body_done or ex.upgrade:
                self._arm_try(ex, route.try_timeout)
            else:
                ex.try_due = True  # once the request is whole (on_message_complete)
        if self.read_paused:  # the check first: this runs for every request
            self._resume()

    def refuse(self, ex: Exchange, response: bytes) -> None:
        """The origin could not serve `ex`: answer for it. The body, if any, is unread, so
        the connection closes unless the request had none."""
        transport = self.transport
        if transport is None or not self.queue or self.queue[0] is not ex:
            return
        if (ex.has_body and not ex.body_done) or ex.upgrade:
            ex.keep_alive = False
        if ex.start:
            ex.status = status_of(response)
            if ex.flags == "-":
                ex.flags = _REFUSAL_FLAGS.get(ex.status, "-")
        transport.write(response)
        self._finish(ex)

    def interim_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        transport = self.transport
        if transport is not None:
            lines = [status_line(status)]
            self.listener.response_heads.rewrite(headers, lines)
            lines.append(CRLF)
            transport.write(b"".join(lines))

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ex = self.queue[0]
        route = ex.route
        if route is not None:
            ex.try_due = False
            if ex.try_deadline is not None:
                ex.try_deadline.cancel()  # a try ends with its answer's head
                ex.try_deadline = None
            ex.stirred = True
            if ex.resp_edits:
                headers = ex.resp_edits.apply(headers)
        if ex.set_cookies:
            headers = headers + [(b"set-cookie", c) for c in ex.set_cookies]
        lines = [status_line(status)]
        facts = self.listener.response_heads.rewrite(headers, lines)
        conn = ex.conn
        key = conn.key if conn is not None else ""
        if ex.on_response_head(status, facts.retriable, self.listener.may_redo, key) is not FORWARD:
            return  # Retry: the answer is swallowed, the request goes again once it ends
        if ex.start:
            ex.status = status
            if conn is not None:
                t = conn.target
                ex.upstream = f"{t.host}:{t.port}" if t is not None else conn.key
            if ex.tries > 1 and status >= 500:
                ex.flags = "URX"  # the retries were spent and it still failed
            observer = self.listener.observer
            if observer is not None:
                ex.response_headers = headers
                observer.response(ex)
                ex.response_headers = None
        framing = facts.framing
        no_body = status in (204, 304) or ex.is_head
        if status == 101:
            lines.append(UPGRADE_LINE + facts.upgrade + CRLF)
        elif framing.length is not None and not framing.chunked:
            lines.append(framing.length_line)
        elif no_body:
            pass
        else:
            # The upstream delimits by close; re-frame as chunked to keep the client.
            ex.resp_until_close = not framing.chunked
            if ex.keep_alive:
                ex.resp_chunked = True
                lines.append(CHUNKED_LINE)
        if not ex.keep_alive and status != 101:
            conn = ex.conn
            if ex.declined_keeps and conn is not None and conn.parser.should_keep_alive():
                ex.keep_alive = True  # see _declined
            else:
                lines.append(CONNECTION_CLOSE)
        lines.append(CRLF)
        out = self.out
        if out is not None:
            out += lines
        elif self.transport is not None:
            self.transport.writelines(lines)

    def response_body(self, body: bytes) -> None:
        ex = self.queue[0]
        ex.stirred = True
        if ex.redo:
            return
        if ex.start:
            ex.tx += len(body)
        out = self.out
        if out is None:
            out = []
            self.out = out
        if ex.resp_chunked:
            out += (b"%x\r\n" % len(body), body, CRLF)
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

    def response_done(self, conn: UpConn, reusable: bool) -> None:
        ex = self.queue[0]
        if ex.conn is not conn:
            return
        if ex.redo:  # only a swallowed answer can end in anything but FINISH
            outcome = ex.outcome
            action = ex.on_response_end(conn.key)
            if action is not FINISH:
                self._detach(ex, conn, outcome)
                self._act(ex, action)
                return
        if ex.resp_chunked:
            if self.out is not None:
                self.out.append(LAST_CHUNK)
            elif self.transport is not None:
                self.transport.write(LAST_CHUNK)
        # A connection whose request body was not fully sent cannot carry another request.
        reusable = reusable and ex.body_done and not ex.upgrade
        ex.conn = None
        self.listener.origin.release(conn, reusable, ex.outcome)
        if not ex.body_done:
            ex.keep_alive = False
        self._finish(ex)

    def upstream_lost(self, conn: UpConn) -> None:
        if self.tunnel is conn:
            self.listener.origin.release(conn, reusable=False)  # the tunnel's use has ended
            if self.transport is not None:
                self.transport.close()
            return
        ex = self.queue[0] if self.queue else None
        if ex is None or ex.conn is not conn:
            return
        action = ex.on_upstream_lost(conn.key, signal_retriable=self.listener.is_tls)
        if action is FINISH:
            self.response_done(conn, reusable=False)
            return
        if action is CLOSE:
            ex.flags = "UC"
            if self.transport is not None:
                self.transport.abort()
            return
        self._detach(ex, conn, ex.outcome)
        if isinstance(action, Answer):
            ex.flags = "UC"
        self._act(ex, action)

    def _detach(self, ex: Exchange, conn: UpConn, outcome: Outcome) -> None:
        ex.conn = None
        conn.owner = None
        ex.try_due = False
        if ex.try_deadline is not None:
            ex.try_deadline.cancel()
            ex.try_deadline = None
        self.listener.origin.release(conn, reusable=False, outcome=outcome)

    def _timed_out(self, ex: Exchange, try_only: bool) -> None:
        """The route's request timeout (`try_only` False) or per-try timeout passed."""
        if try_only:
            ex.try_deadline = None
        else:
            ex.deadline = None
        transport = self.transport
        if transport is None or not self.queue or self.queue[0] is not ex:
            return
        conn = ex.conn
        action = ex.on_timeout(conn.key if conn is not None else None, try_only)
        if ex.start and not isinstance(action, Retry):
            ex.flags = "UT"
        if action is CLOSE:
            transport.abort()
            return
        if conn is not None:
            # Whatever it would still say cannot be told from the next try's answer.
            if conn.transport is not None:
                conn.transport.abort()
            self._detach(ex, conn, Outcome.TIMEOUT)
        if isinstance(action, Answer):
            ex.keep_alive = False  # the 504 says close: the request may still be arriving
        self._act(ex, action)

    def _retry(self, ex: Exchange, avoid: str) -> None:
        ex.try_deadline = None
        if self.transport is None or not self.queue or self.queue[0] is not ex:
            return  # answered (a request timeout) or gone while waiting
        again = self.listener.origin.acquire(self, ex, avoid)
        if again is not None:
            self.attach(ex, again)

    @staticmethod
    def _stop_timers(ex: Exchange) -> None:
        ex.deadline_due = False
        ex.try_due = False
        if ex.deadline is not None:
            ex.deadline.cancel()
            ex.deadline = None
        if ex.idle is not None:
            ex.idle.cancel()
            ex.idle = None
        if ex.try_deadline is not None:
            ex.try_deadline.cancel()
            ex.try_deadline = None

    def _act(self, ex: Exchange, action: Action) -> None:
        """Carry out what the exchange decided once it has no upstream connection."""
        if isinstance(action, Retry):
            delay = ex.retry.delay(ex.tries - 1, self.listener.rng) if ex.retry.backoff else 0.0
            if delay:
                ex.try_deadline = asyncio.get_running_loop().call_later(
                    delay, self._retry, ex, action.avoid
                )
            else:
                self._retry(ex, action.avoid)
        elif isinstance(action, Answer):
            self.refuse(ex, action.response)
        elif self.transport is not None:
            self.transport.abort()

    def upstream_broken(self, conn: UpConn, reason: str) -> None:
        log.warning("upstream %s: %s", conn.key, reason)
        if conn.transport is not None:
            conn.transport.abort()

    def tunnel_open(self, conn: UpConn, rest: bytes) -> None:
        ex = self.queue[0]
        if not ex.upgrade:
            if conn.transport is not None:
                conn.transport.abort()
            return
        conn.tunnel = True
        self.tunnel = conn
        if ex.route is not None:
            self._stop_timers(ex)  # a tunnel lives by the idle limit, not a request's
        self.queue.clear()
        self.state = _BUSY
        held, self.held = self.held, None
        if held and conn.transport is not None:
            conn.transport.write(held)
        if self.transport is not None and rest:
            self.transport.write(rest)
        self._resume()

    def _observed(self, observer: ExchangeObserver, ex: Exchange, flags: str) -> None:
        start, ex.start = ex.start, 0.0  # told once
        duration = time.monotonic() - start
        try:
            ex.flags = flags
            observer.done(ex, self.peer, duration)
        except Exception:
            # Observing must never break the exchange it observes.
            log.exception("exchange observer failed")

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
        if ex.denied or (not ex.upgrade and ex.method == b"CONNECT"):
            ex.keep_alive = False  # a denied upgrade or a CONNECT: the answer ends it all
            return
        # An upgrade, or an h2c one the app was not asked for (on_headers_complete): the
        # latter is answered as HTTP/1.1, and what follows parsed after that answer.
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

    def _finish(self, ex: Exchange) -> None:
        if ex.route is not None or ex.try_deadline is not None:
            self._stop_timers(ex)
        if ex.start:
            observer = self.listener.observer
            if observer is not None:
                self._observed(observer, ex, ex.flags)
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
        if self.read_paused:
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

    def _pipeline_full(self) -> None:
        """More requests began than `max_pipelined` ahead of their answers: those taken are
        answered, the last one with `connection: close`; what followed is dropped unread."""
        if self.queue:
            self.queue[-1].keep_alive = False
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        # Never while bytes after an upgrade request are held: only a 101 resumes those.
        # Nor once the pipeline was full: the parser was given up.
        if self.read_paused and self.transport is not None and self.held is None and not self.full:
            self.read_paused = False
            self.transport.resume_reading()

    def _too_large(self, limit: str) -> None:
        refused = self.listener.stats.requests_refused_limit
        setattr(refused, limit, getattr(refused, limit) + 1)
        self._fail(HEADERS_TOO_LARGE)

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
                if self.queue:
                    action = self.queue[0].on_timeout(None, try_only=False)
                    if isinstance(action, Answer):
                        transport.write(action.response)
                        transport.close()
                    else:
                        transport.abort()  # stalled mid-message: nothing clean to say
                elif self.tunnel is not None:
                    transport.abort()
                else:
                    transport.close()
                return
        self.timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._tick)


class _BadHead(Exception):
    pass


class _PipelineFull(Exception):
    pass
