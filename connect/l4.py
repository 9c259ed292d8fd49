"""The L4 relay: two asyncio Protocols that hand bytes to each other's transport.

No streams and no per-connection coroutine on the data path: `data_received` writes the bytes
object the loop handed over straight to the other transport (no Python-level copy), and
flow control is coupled both ways (our write buffer above its high-water mark pauses reading
on the other leg), so a connection holds at most about two high-water marks per direction.

Half-close travels where the receiving leg can carry it (`write_eof` on plain TCP). Over TLS
it cannot: the loop's TLS transports (asyncio's and uvloop's) have no `write_eof`, and the one
that receives a close_notify closes itself, although TLS 1.3 and OpenSSL allow writing on after
it. So an EOF that must cross a TLS leg ends the relay: what was read is flushed (the far
sidecar hands it to the app, then an EOF), and both legs close. A client that half-closes and
waits for the reply (Envoy carries that) gets none: docs/proxy.md.

Idle connections are cut by one timer per connection that checks an activity flag, so the
data path pays one attribute store per chunk and never reads the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from connect.balancer import Target
from connect.cluster import Cluster, Outcome
from connect.dial import DialFailed, Upstream, dial_failover
from connect.inbound import InboundGate
from connect.listener import ListeningSocket, TLSTerminator
from connect.local_app import LocalAppTimeouts
from connect.observe import ConnectionObserver
from connect.seams import Peer
from connect.stats import ProxyStats

log = logging.getLogger("meshlet.proxy.l4")

__all__ = ["InboundL4", "OutboundL4", "RelayLimits"]


@dataclass(frozen=True, slots=True)
class RelayLimits:
    high_water: int = 256 * 1024
    """Write-buffer bytes per transport before the other leg stops reading."""
    idle_timeout: float = 300.0
    connect_timeout: float = 5.0


class _Relay:
    """The state both legs share: activity for the idle timer, and teardown."""

    __slots__ = (
        "a",
        "active",
        "b",
        "closed",
        "flags",
        "idle_handle",
        "limits",
        "linked",
        "on_done",
        "peer",
        "start",
        "upstream",
    )

    def __init__(self, limits: RelayLimits, on_done: Callable[[_Relay], None]) -> None:
        self.a = _Leg(self)
        self.b = _Leg(self)
        self.a.other = self.b
        self.b.other = self.a
        self.limits = limits
        self.active = True
        self.closed = False
        self.linked = False
        self.on_done = on_done
        self.idle_handle: asyncio.TimerHandle | None = None
        self.start = 0.0
        """Wall-clock time it was accepted, set only while the listener has an observer."""
        self.flags = "-"
        """Envoy's response flags for how it ended (connect.observe)."""
        self.peer: Peer | None = None
        self.upstream = ""
        """host:port it was relayed to."""

    def start_idle_timer(self) -> None:
        self.idle_handle = asyncio.get_running_loop().call_later(
            self.limits.idle_timeout, self._check_idle
        )

    def _check_idle(self) -> None:
        if self.closed:
            return
        if self.active:
            self.active = False
            self.start_idle_timer()
            return
        self.abort()

    def close(self) -> None:
        """Flush what is buffered, then close both legs."""
        if self.closed:
            return
        self._finish()
        for leg in (self.a, self.b):
            if leg.transport is not None:
                leg.transport.close()

    def abort(self) -> None:
        if self.closed:
            return
        self._finish()
        for leg in (self.a, self.b):
            if leg.transport is not None:
                leg.transport.abort()

    def _finish(self) -> None:
        self.closed = True
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        self.on_done(self)


class _Leg(asyncio.Protocol):
    __slots__ = ("eof", "is_tls", "nbytes", "other", "pending", "relay", "transport")

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.other: _Leg
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.is_tls = False
        self.pending: list[bytes] = []
        self.nbytes = 0
        """Bytes read on this leg (what the observer reports when the relay ends)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self.is_tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(high=self.relay.limits.high_water)
        if self.other.transport is None:
            # Nothing may be read before the other leg exists; `link` resumes.
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.relay.active = True
        self.nbytes += len(data)
        other = self.other.transport
        if other is None:
            # start_tls hands over decrypted bytes that arrived with the handshake before
            # it returns: hold them (at most one read) until the other leg exists.
            self.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        other.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other.eof:
            self.relay.close()
            return False
        if other.transport is not None:
            if other.transport.can_write_eof():
                other.transport.write_eof()
            else:
                # The EOF cannot cross the TLS leg (see the module's docstring): finish once
                # what was read is flushed. Holding it instead held both sidecars' sockets and
                # the app's connection until the idle timeout whenever a client closed first.
                self.relay.close()
                return False
        # asyncio's TLS transport closes itself on EOF (and warns if asked to stay open).
        return not self.is_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        relay = self.relay
        # Before linking, a lost leg is the dialer's business (failover, or the app gave up).
        if relay.closed or not relay.linked:
            return
        if exc is None:
            relay.close()
        else:
            relay.abort()

    def pause_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other.transport is not None:
            self.other.transport.resume_reading()


def _link(relay: _Relay) -> bool:
    """Join the legs and start relaying; False (and everything closed) if one is gone."""
    if relay.closed or relay.a.transport is None or relay.b.transport is None:
        relay.abort()
        return False
    relay.linked = True
    for leg in (relay.a, relay.b):
        if leg.pending:
            assert leg.other.transport is not None
            leg.other.transport.writelines(leg.pending)
            leg.pending.clear()
    for leg in (relay.a, relay.b):
        transport = leg.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
    relay.start_idle_timer()
    return True


class _AcceptedLeg(_Leg):
    """The accepted side of a relay (created after the TLS handshake on an inbound
    listener); it hands itself to its listener once connected."""

    __slots__ = ("listener",)

    def __init__(self, relay: _Relay, listener: _Listener) -> None:
        super().__init__(relay)
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # pauses reading: the other leg is not there yet
        self.listener.accepted(self)


class _Listener(ListeningSocket):
    """Owns one listening socket and the relays it started (Consul's `Listener`)."""

    def __init__(self, limits: RelayLimits, stats: ProxyStats | None) -> None:
        super().__init__()
        self.limits = limits
        self.stats = stats if stats is not None else ProxyStats()
        self.relays: set[_Relay] = set()
        self._drained: asyncio.Event | None = None

    observer: ConnectionObserver | None = None
    """Told when a relay opens and closes (connect.observe)."""

    def _done(self, relay: _Relay) -> None:
        self.relays.discard(relay)
        observer = self.observer
        if relay.start and observer is not None:
            start, relay.start = relay.start, 0.0
            try:
                observer.closed(
                    relay.peer,
                    received=relay.a.nbytes,
                    sent=relay.b.nbytes,
                    flags=relay.flags,
                    start=start,
                    upstream=relay.upstream,
                )
            except Exception:
                log.exception("connection observer failed")
        if not self.relays and self._drained is not None:
            self._drained.set()

    def _live(self) -> int:
        return len(self.relays)

    def _protocol(self) -> asyncio.Protocol:
        relay = _Relay(self.limits, self._done)
        leg = _AcceptedLeg(relay, self)
        relay.a = leg
        leg.other = relay.b
        relay.b.other = leg
        return leg

    def accepted(self, leg: _AcceptedLeg) -> None:
        raise NotImplementedError

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let relays finish for `grace` seconds, then abort the rest."""
        await self._stop_accepting()
        if self.relays:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
            for relay in list(self.relays):
                relay.abort()
        await self._closed()


class OutboundL4(_Listener):
    """Plaintext from the local app, carried over mTLS to an upstream's sidecar; to the
    `failover` upstreams, in order, when `upstream` has no endpoint left to try
    (connect.dial.dial_failover)."""

    def __init__(
        self,
        upstream: Upstream,
        limits: RelayLimits | None = None,
        stats: ProxyStats | None = None,
        *,
        failover: Sequence[Upstream] = (),
    ) -> None:
        super().__init__(limits or RelayLimits(), stats)
        self.upstream = upstream
        self.chain = (upstream, *failover)
        self.dialed: dict[_Relay, tuple[Cluster, Target]] = {}
        """The endpoint each relay went to: in flight in its cluster until the relay ends
        (so least_request sees connections)."""

    def accepted(self, leg: _AcceptedLeg) -> None:
        self.relays.add(leg.relay)
        self.stats.connections += 1
        if self.observer is not None:
            leg.relay.start = time.time()
            self.observer.opened(None)
        self._spawn(self._dial(leg.relay))

    async def _dial(self, relay: _Relay) -> None:
        primary = self.upstream.cluster
        if primary.limited:
            over = primary.admit(new_connection=True)
            if over is not None:
                log.warning("upstream %s: circuit breaker: %s", self.upstream.name, over)
                relay.flags = "UO"
                relay.abort()
                return
        try:
            _, _, upstream, target = await dial_failover(self.chain, lambda target: relay.b)
        except DialFailed as err:
            self.stats.no_endpoint += 1
            log.warning("upstream %s: %s", self.upstream.name, err)
            relay.flags = "UF"
            relay.abort()
            return
        if relay.closed:
            # The client went away during the dial (its relay has ended): drop what we got.
            upstream.cluster.record(target, Outcome.CANCELLED, asyncio.get_running_loop().time())
            if relay.b.transport is not None:
                relay.b.transport.abort()
            return
        upstream.cluster.connections += 1
        self.dialed[relay] = (upstream.cluster, target)
        relay.upstream = f"{target.host}:{target.port}"
        _link(relay)

    def _done(self, relay: _Relay) -> None:
        dialed = self.dialed.pop(relay, None)
        if dialed is not None:
            self._ended(dialed)
        super()._done(relay)

    @staticmethod
    def _ended(dialed: tuple[Cluster, Target]) -> None:
        # How a relayed connection ends says nothing about the endpoint's health.
        cluster, target = dialed
        cluster.connections -= 1
        cluster.record(target, Outcome.SUCCESS, asyncio.get_running_loop().time())


class InboundL4(_Listener):
    """mTLS from a mesh peer, authorized per connection at the handshake and again, for the
    connections still open, whenever the decision's inputs change (`recheck`)."""

    def __init__(
        self,
        gate: InboundGate,
        app_host: str,
        app_port: int,
        limits: RelayLimits | None = None,
    ) -> None:
        super().__init__(limits or RelayLimits(), gate.stats)
        self.gate = gate
        self.app_host = app_host
        self.app_port = app_port
        self.peers: dict[_Relay, Peer] = {}
        """Who is on the other end of each open relay: what `recheck` decides on again."""

    def set_local_app(self, timeouts: LocalAppTimeouts) -> None:
        """The local app's connect timeout (`local_connect_timeout_ms`), for dials from now
        on; a relay has no request to time (its idle limit stays the listener's)."""
        self.limits = replace(self.limits, connect_timeout=timeouts.connect_timeout)

    def _tls(self) -> TLSTerminator:
        return self.gate

    def accepted(self, leg: _AcceptedLeg) -> None:
        assert leg.transport is not None
        peer = self.gate.admit(leg.transport)
        if peer is None:
            leg.relay.closed = True  # refused before the relay existed: nothing to finish
            return
        self.relays.add(leg.relay)
        if self.observer is not None:
            relay = leg.relay
            relay.start, relay.peer = time.time(), peer
            relay.upstream = f"{self.app_host}:{self.app_port}"
            self.observer.opened(peer)
        self.peers[leg.relay] = peer
        self._spawn(self._dial(leg.relay))

    def _done(self, relay: _Relay) -> None:
        self.peers.pop(relay, None)
        super()._done(relay)

    def recheck(self) -> int:
        """Decide every open connection again (the intentions changed) and abort those now
        denied; returns how many. One decision per distinct peer, so the cost is the number
        of open connections, and nothing is paid per byte."""
        return self.gate.revoke(self.peers)

    async def _dial(self, relay: _Relay) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: relay.b, self.app_host, self.app_port),
                self.limits.connect_timeout,
            )
        except (OSError, TimeoutError) as err:
            self.stats.upstream_failures += 1
            log.warning("local app %s:%s: %s", self.app_host, self.app_port, err)
            relay.flags = "UF"
            relay.abort()
            return
        _link(relay)
