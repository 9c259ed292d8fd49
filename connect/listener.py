"""The listening socket every sidecar listener (L4 or HTTP, inbound or outbound) owns, and
server-side TLS that reports each failed handshake with the peer and the reason.

A listener that terminates TLS accepts plain TCP and upgrades each connection with
`loop.start_tls(server_side=True)`, so a failed handshake raises to us (with OpenSSL's reason)
while we still know the peer's address. `create_server(ssl=...)` would swallow it: both uvloop
and asyncio only debug-log an `OSError` from a server handshake.

`start_tls` must take the transport over synchronously, inside a protocol callback: uvloop
(basetransport.pyx `_call_connection_made`) and asyncio before 3.12 (CPython gh-103607) start
reading right after `connection_made` returns, even if it paused reading, so a `start_tls`
awaited in a task comes one loop iteration late: the ClientHello has already gone to the plain
protocol and the handshake hangs. `_TLSAccept` therefore runs the `start_tls` coroutine's first
step (which only swaps the transport's protocol for the loop's SSL protocol) synchronously and
resumes it from its future's callback, as a Task would: no Task per connection.

It does so when the client's first bytes arrive, not at accept, and hands those bytes to the
SSL protocol (as its transport would: `get_buffer`/`buffer_updated`) before it reads anything
else. Starting TLS at accept cost each silent connection what the loop's SSL protocol and
OpenSSL allocate up front: about 55 KiB of heap (OpenSSL 3.0's first `do_handshake`
without data allocates ~47 KiB, the SSL object ~9 KiB; uvloop adds a mostly untouched 256 KiB
read buffer), so 2,000 idle connections added ~80 MB of RSS. A silent connection now holds a
plain transport and a timer (about 1 KiB) until `handshake_timeout`, which runs from accept.

MutualTLSMode permissive (`TLSTerminator.permissive`): the first byte decides. 0x16 is the
content type of a TLS handshake record, which every ClientHello starts with, and no plaintext
protocol a mesh carries starts with that control byte; so 0x16 goes to TLS exactly as in strict
mode (garbage after it fails the handshake), anything else hands the plain transport to the
listener's protocol as it is, with the bytes read so far. The terminator's `admit` then sees a
connection without a TLS session and treats it as plaintext (connect.inbound). A silent
connection is closed at `handshake_timeout` in either mode.

Admission: each listener caps its connections (`ConnectionLimits`): beyond `max_connections`
open ones, or `max_pending_handshakes` accepted but not yet through the TLS handshake, a new
connection is reset at accept (before any TLS work) and counted in
`ProxyStats.connections_refused_limit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

from connect.stats import ProxyStats

log = logging.getLogger("meshlet.proxy.listener")

__all__ = ["ConnectionLimits", "ListeningSocket", "TLSTerminator"]

# SO_LINGER on, 0 s: close() resets the connection. A refused client learns at once, and the
# refusing side keeps no TIME_WAIT entry per refusal.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listener admits (per process: each `sidecar.workers` process has its own)."""

    max_connections: int = 4096
    """Open downstream connections, handshaking ones included; beyond it new ones are reset."""
    max_pending_handshakes: int = 512
    """Connections accepted but not yet through the TLS handshake (unauthenticated): the cheap
    way to hold memory and CPU without a certificate. TLS-terminating listeners only."""
    refusal_log_interval: float = 10.0
    """At most one warning per listener and cap in this many seconds (with the count)."""


class _BufferedProtocol(Protocol):
    """The loops' SSL protocols are buffered protocols (asyncio.BufferedProtocol's methods;
    uvloop's is a Cython class that does not subclass it)."""

    def get_buffer(self, sizehint: int, /) -> Any: ...

    def buffer_updated(self, nbytes: int, /) -> None: ...


def _feed(protocol: _BufferedProtocol, data: bytes) -> None:
    """Deliver `data` to a buffered protocol as its transport would."""
    view = memoryview(data)
    while view:
        buf = protocol.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


_TLS_HANDSHAKE_RECORD = 0x16


class TLSTerminator(Protocol):
    """What a TLS-terminating listener needs (connect.inbound.InboundGate is one)."""

    handshake_timeout: float
    permissive: bool
    """Also accept plaintext (a first byte that cannot start a TLS record); read per connection
    when its first bytes arrive."""

    def server_context(self) -> ssl.SSLContext:
        """The context for the handshake of a connection accepted now."""
        ...

    def handshake_failed(self, peername: Any, exc: BaseException) -> None:
        """A server handshake failed (`exc` as `start_tls` raised it); the transport is closed."""
        ...


class _TLSAccept(asyncio.Protocol):
    """Owns one accepted connection until its server handshake ends, then hands the TLS
    transport to a protocol from the listener's `_protocol()` (created only on success).

    It is also the TLS transport's protocol until then: asyncio's SSL protocol may deliver
    data (and EOF, loss) that came with the handshake before `start_tls` returns; those are
    held and replayed, and later callbacks bound to this object are forwarded."""

    __slots__ = (
        "app",
        "coro",
        "deadline",
        "eof",
        "listener",
        "lost",
        "peer",
        "pending",
        "raw",
        "started",
        "terminator",
        "timer",
    )

    def __init__(self, listener: ListeningSocket, terminator: TLSTerminator) -> None:
        self.listener = listener
        self.terminator = terminator
        self.raw: asyncio.BaseTransport | None = None
        self.peer: Any = None
        self.coro: Coroutine[Any, Any, asyncio.Transport | None] | None = None
        self.app: asyncio.Protocol | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None
        self.started = False
        """TLS has started: callbacks now come from the TLS transport."""
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.peer = transport.get_extra_info("peername")
        self.listener._handshaking.add(self)
        loop = asyncio.get_running_loop()
        timeout = self.terminator.handshake_timeout
        self.deadline = loop.time() + timeout
        self.timer = loop.call_later(timeout, self._silent)

    def _start(self, first: bytes) -> None:
        """The client's first bytes: start TLS, and hand them to the SSL protocol ahead of
        anything it reads (it only buffers them until its own `connection_made`, which
        `start_tls` schedules, begins the handshake)."""
        self.started = True
        self._cancel_timer()
        raw = cast("asyncio.Transport", self.raw)
        loop = asyncio.get_running_loop()
        t = self.terminator
        self.coro = loop.start_tls(
            raw,
            self,
            t.server_context(),
            server_side=True,
            ssl_handshake_timeout=max(self.deadline - loop.time(), 0.001),
        )
        self._step()
        if self.coro is not None and not raw.is_closing():
            _feed(cast(_BufferedProtocol, raw.get_protocol()), first)

    def _cancel_timer(self) -> None:
        # The handle refers back to us: drop it so nothing outlives the connection in a cycle.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _silent(self) -> None:
        """No byte within the handshake timeout."""
        self.timer = None
        self._failed(TimeoutError("no TLS handshake started within the handshake timeout"))

    def _step(self, _: object = None) -> None:
        coro = self.coro
        assert coro is not None
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self._handshaken(done.value)
        except Exception as exc:  # each one is reported, and the connection closed
            self._failed(exc)
        else:
            # The Task protocol: a yielded future resumes us when done; a bare yield, soon.
            if waiting is None:
                asyncio.get_running_loop().call_soon(self._step)
            else:
                waiting._asyncio_future_blocking = False
                waiting.add_done_callback(self._step)

    def _handshaken(self, tls: asyncio.Transport | None) -> None:
        self.coro = None
        assert tls is not None  # start_tls returns None only for a closed loop
        listener = self.listener
        listener._handshaking.discard(self)
        if listener._closing:
            tls.abort()
            return
        app = listener._protocol()
        self.app = app
        tls.set_protocol(app)
        app.connection_made(tls)
        if self.pending:
            # Not to a connection its protocol refused (aborted) in `connection_made`: that
            # protocol has no peer, and what it parsed would be decided for nobody.
            if not tls.is_closing():
                for chunk in self.pending:
                    app.data_received(chunk)
            self.pending.clear()
        if self.eof:
            app.eof_received()
        if self.lost is not None:
            app.connection_lost(self.lost[0])

    def _failed(self, exc: BaseException) -> None:
        self.coro = None
        self._cancel_timer()
        listener = self.listener
        if self not in listener._handshaking:
            return  # already reported
        listener._handshaking.discard(self)
        if self.raw is not None:
            self.raw.abort()  # type: ignore[attr-defined]
        if not listener._closing:
            self.terminator.handshake_failed(self.peer, exc)
        # start_tls's frame (transport, SSL protocol, its waiter holding `exc`) is in the
        # traceback: without it, refcounting frees the lot now instead of the cycle collector.
        exc.__traceback__ = None

    # -- the plain transport's protocol until TLS starts; then the TLS transport's until the
    # -- handshake ends and the connection is handed over
    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)
        elif not self.started:
            if data[0] != _TLS_HANDSHAKE_RECORD and self.terminator.permissive:
                self._plaintext(data)
            else:
                self._start(data)
        else:
            self.pending.append(data)

    def _plaintext(self, first: bytes) -> None:
        """Permissive mode, not TLS: the listener's protocol takes the plain transport now and
        gets `first` as its first read (its admission decides who may talk)."""
        self._cancel_timer()
        listener = self.listener
        listener._handshaking.discard(self)
        raw = cast("asyncio.Transport", self.raw)
        if listener._closing:
            raw.abort()
            return
        app = listener._protocol()
        self.app = app
        raw.set_protocol(app)
        app.connection_made(raw)
        if not raw.is_closing():
            app.data_received(first)

    def eof_received(self) -> bool | None:
        if self.app is not None:
            return self.app.eof_received()
        if not self.started:
            self._failed(ConnectionResetError("closed before the TLS handshake started"))
            return False
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is not None:
            self.app.connection_lost(exc)
        elif not self.started:
            self._failed(exc or ConnectionResetError("closed before the TLS handshake started"))
        else:
            self.lost = (exc,)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


class _Refused(asyncio.Protocol):
    """The protocol of a connection refused at accept: reset it, read nothing."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # OSError: the peer is gone already, and a plain close is as good.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        transport.abort()  # type: ignore[attr-defined]


_REFUSED = _Refused()


class ListeningSocket:
    """One server socket, its background tasks, and how it starts and stops accepting.

    Subclasses say what to speak (`_protocol`, created per connection, after the handshake
    when terminating TLS), whether to terminate TLS (`_tls`) and how many connections they
    hold (`_live`); they own what happens to connections already accepted when they close.
    """

    stats: ProxyStats
    """Set by each subclass (refusals at accept are counted here)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._port = 0
        self._handshaking: set[_TLSAccept] = set()
        self._closing = False
        self.connection_limits = ConnectionLimits()
        self.peak_connections = 0
        """The most connections open at once since the last `reset_peak` (for HeapTrimmer)."""
        self.accepted_connections = 0
        """Connections admitted since the start."""
        self._refusals_unlogged: dict[str, int] = {}
        self._refusal_logged_at: dict[str, float] = {}

    @property
    def port(self) -> int:
        return self._port

    @property
    def pending_handshakes(self) -> int:
        return len(self._handshaking)

    @property
    def open_connections(self) -> int:
        """Connections this listener holds now, handshaking ones included."""
        return self._live() + len(self._handshaking)

    def reset_peak(self) -> None:
        self.peak_connections = self.open_connections

    def _protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _live(self) -> int:
        """Accepted connections past the handshake that are still open."""
        raise NotImplementedError

    def _tls(self) -> TLSTerminator | None:
        """Terminate TLS with `start_tls` per connection, reporting each failed handshake."""
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _admit(self, tls: bool) -> str:
        """The cap a connection accepted now would exceed ("" when it is admitted)."""
        limits = self.connection_limits
        pending = len(self._handshaking)
        open_now = self._live() + pending
        if open_now >= limits.max_connections:
            return "max_connections"
        if tls and pending >= limits.max_pending_handshakes:
            return "max_pending_handshakes"
        self.accepted_connections += 1
        if open_now >= self.peak_connections:
            self.peak_connections = open_now + 1
        return ""

    def _refuse(self, cap: str) -> asyncio.Protocol:
        refusals = self.stats.connections_refused_limit
        setattr(refusals, cap, getattr(refusals, cap) + 1)
        count = self._refusals_unlogged.get(cap, 0) + 1
        now = asyncio.get_running_loop().time()
        last = self._refusal_logged_at.get(cap)
        if last is None or now - last >= self.connection_limits.refusal_log_interval:
            self._refusal_logged_at[cap] = now
            log.warning(
                "listener on port %d: %s (%d) reached, refusing new connections "
                "(%d refused since the last warning)",
                self._port, cap, getattr(self.connection_limits, cap), count,
            )  # fmt: skip
            count = 0
        self._refusals_unlogged[cap] = count
        return _REFUSED

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        reuse_port: bool = False,
        limits: ConnectionLimits | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        if limits is not None:
            self.connection_limits = limits
        terminator = self._tls()
        factory: Callable[[], asyncio.Protocol]
        if terminator is not None:
            tls = terminator

            def factory() -> asyncio.Protocol:
                cap = self._admit(True)
                return _TLSAccept(self, tls) if not cap else self._refuse(cap)

        else:

            def factory() -> asyncio.Protocol:
                cap = self._admit(False)
                return self._protocol() if not cap else self._refuse(cap)

        self.server = await loop.create_server(factory, host, port, reuse_port=reuse_port or None)
        self._port = int(self.server.sockets[0].getsockname()[1])

    async def _stop_accepting(self) -> None:
        """Close the socket to new connections, end handshakes in progress and cancel the
        listener's own tasks."""
        self._closing = True
        if self.server is not None:
            self.server.close()
        for accept in list(self._handshaking):
            if accept.raw is not None:
                accept.raw.abort()  # type: ignore[attr-defined]
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)

    async def _closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()
