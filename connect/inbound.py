"""The public listener's gate: peer identity and the connection decision after the mTLS
handshake, and the count of handshakes that failed.

The listener is `create_server(ssl=...)`: the event loop's own TLS (uvloop's, in Cython) does
the handshake. (`start_tls` on an accepted socket would let us see each failure, but uvloop's
server-side `start_tls` never completed a handshake in our tests.) The loop reports a failed
server handshake to nobody, so each accepted connection's protocol carries a small
`_HandshakeWatch`: the protocol is created at accept time and reaches `connection_made` only
after a successful handshake; a watch freed without having seen it counts one failure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from connect.proxy import ConnectionAuthorizer, Peer, PeerCache, ProxyStats

log = logging.getLogger("meshlet.proxy.inbound")


class _HandshakeWatch:
    __slots__ = ("done", "gate")

    def __init__(self, gate: InboundGate) -> None:
        self.gate = gate
        self.done = False

    def __del__(self) -> None:
        if not self.done:
            self.gate.handshake_failed()


class InboundGate:
    def __init__(
        self,
        server_ssl: ssl.SSLContext,
        peers: PeerCache,
        stats: ProxyStats,
        *,
        authorize: ConnectionAuthorizer | None = None,
        handshake_timeout: float = 10.0,
        log_limit: int = 1024,
    ) -> None:
        self.server_ssl = server_ssl
        self.peers = peers
        self.stats = stats
        self.authorize = authorize
        self.handshake_timeout = handshake_timeout
        self._logged: set[tuple[str, str]] = set()
        self._log_limit = log_limit
        self._last_handshake_log = 0.0

    def watch(self) -> _HandshakeWatch:
        """Give one to each accepted connection's protocol; call `admit` in connection_made."""
        return _HandshakeWatch(self)

    def handshake_failed(self) -> None:
        self.stats.handshakes_failed += 1
        now = time.monotonic()
        if now - self._last_handshake_log >= 10.0:
            # The loop does not say who or why; rate-limit instead of once per peer.
            self._last_handshake_log = now
            log.warning(
                "inbound TLS handshakes are failing (%d so far): plaintext, no client "
                "certificate, or a certificate the mesh roots do not verify",
                self.stats.handshakes_failed,
            )

    def _refuse(self, transport: asyncio.BaseTransport, reason: str) -> None:
        addr = transport.get_extra_info("peername")
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        key = (host, reason)
        if key not in self._logged:
            if len(self._logged) >= self._log_limit:
                self._logged.clear()
            self._logged.add(key)
            log.warning("inbound connection from %s refused: %s", host, reason)
        transport.abort()  # type: ignore[attr-defined]

    def admit(self, transport: asyncio.BaseTransport, watch: _HandshakeWatch) -> Peer | None:
        """Identify and authorize a connection whose handshake just succeeded; None if
        refused (counted, logged once per peer and reason, aborted before any byte is read)."""
        watch.done = True
        peer = self.peers.peer_of(transport.get_extra_info("ssl_object"))
        if isinstance(peer, str):
            self.stats.peers_refused += 1
            self._refuse(transport, peer)
            return None
        if self.authorize is not None:
            verdict = self.authorize(peer)
            if not verdict.allowed:
                self.stats.connections_denied += 1
                self._refuse(transport, f"{peer.uri} denied: {verdict.reason}")
                return None
        self.stats.connections += 1
        return peer
