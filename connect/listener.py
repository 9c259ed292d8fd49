"""The listening socket every sidecar listener (L4 or HTTP, inbound or outbound) owns, and
server-side TLS that reports each failed handshake with the peer and the reason.

A listener that terminates TLS accepts plain TCP and upgrades each connection with
`loop.start_tls(server_side=True)`, so a failed handshake raises to us (with OpenSSL's reason)
while we still know the peer's address. `create_server(ssl=...)` would swallow it: both uvloop
and asyncio only debug-log an `OSError` from a server handshake.

`start_tls` must take the transport over *inside* `connection_made`: uvloop (basetransport.pyx
`_call_connection_made`) and asyncio before 3.12 (CPython gh-103607) start reading right after
`connection_made` returns, even if it paused reading, so a `start_tls` awaited in a task comes
one loop iteration late: the ClientHello has already gone to the plain protocol and the
handshake hangs. `_TLSAccept` therefore runs the `start_tls` coroutine's first step (which only
swaps the transport's protocol for the loop's SSL protocol) synchronously from `connection_made`
and resumes it from its future's callback, as a Task would: no Task per connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

__all__ = ["ListeningSocket", "TLSTerminator"]


class TLSTerminator(Protocol):
    """What a TLS-terminating listener needs (connect.inbound.InboundGate is one)."""

    handshake_timeout: float

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

    __slots__ = ("app", "coro", "eof", "listener", "lost", "peer", "pending", "raw", "terminator")

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        self.peer = transport.get_extra_info("peername")
        self.listener._handshaking.add(self)
        t = self.terminator
        self.coro = asyncio.get_running_loop().start_tls(
            transport,  # type: ignore[arg-type]
            self,
            t.server_context(),
            server_side=True,
            ssl_handshake_timeout=t.handshake_timeout,
        )
        self._step()

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
            for chunk in self.pending:
                app.data_received(chunk)
            self.pending.clear()
        if self.eof:
            app.eof_received()
        if self.lost is not None:
            app.connection_lost(self.lost[0])

    def _failed(self, exc: BaseException) -> None:
        self.coro = None
        self.listener._handshaking.discard(self)
        if self.raw is not None:
            self.raw.abort()  # type: ignore[attr-defined]
        if not self.listener._closing:
            self.terminator.handshake_failed(self.peer, exc)

    # -- as the TLS transport's protocol, between the handshake and the hand-over
    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        if self.app is not None:
            return self.app.eof_received()
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.app is not None:
            self.app.connection_lost(exc)
        else:
            self.lost = (exc,)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


class ListeningSocket:
    """One server socket, its background tasks, and how it starts and stops accepting.

    Subclasses say what to speak (`_protocol`, created per connection, after the handshake
    when terminating TLS) and whether to terminate TLS (`_tls`); they own what happens to
    connections already accepted when they close.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._port = 0
        self._handshaking: set[_TLSAccept] = set()
        self._closing = False

    @property
    def port(self) -> int:
        return self._port

    def _protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _tls(self) -> TLSTerminator | None:
        """Terminate TLS with `start_tls` per connection, reporting each failed handshake."""
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def start(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        terminator = self._tls()
        factory: Callable[[], asyncio.Protocol] = self._protocol
        if terminator is not None:
            factory = lambda: _TLSAccept(self, terminator)  # noqa: E731
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
