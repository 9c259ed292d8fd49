"""The public listener's gate: mTLS handshake, peer identity, and the connection decision.

The handshake runs through `loop.start_tls` on an accepted plain transport, instead of
`create_server(ssl=...)`, because asyncio reports a failed server handshake to nobody; the
issue wants every refusal counted and logged once per peer with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from connect.proxy import ConnectionAuthorizer, Peer, PeerCache, ProxyStats

log = logging.getLogger("meshlet.proxy.inbound")


class Parked(asyncio.Protocol):
    """A just-accepted transport, paused and handed to `on_accept` (which starts a task that
    runs the handshake or installs the real protocol)."""

    __slots__ = ("on_accept",)

    def __init__(self, on_accept: Callable[[asyncio.Transport], None]) -> None:
        self.on_accept = on_accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # bytes must wait for the TLS layer, not land here
        self.on_accept(transport)


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

    def _refuse(self, transport: asyncio.Transport, reason: str) -> None:
        addr = transport.get_extra_info("peername")
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        key = (host, reason)
        if key not in self._logged:
            if len(self._logged) >= self._log_limit:
                self._logged.clear()
            self._logged.add(key)
            log.warning("inbound connection from %s refused: %s", host, reason)
        transport.abort()

    async def admit(
        self, raw: asyncio.Transport, protocol: asyncio.BaseProtocol
    ) -> tuple[asyncio.Transport, Peer] | None:
        """Handshake and identify; None if refused (already counted, logged, closed).

        `protocol` becomes the TLS transport's protocol. start_tls does not call its
        `connection_made` (the caller does, with the returned transport), and it may already
        have received bytes that came with the handshake: it must hold them until released.
        """
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw,
                protocol,
                self.server_ssl,
                server_side=True,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, TimeoutError, EOFError) as err:
            self.stats.handshakes_failed += 1
            reason = getattr(err, "reason", None) or type(err).__name__
            self._refuse(raw, f"TLS handshake failed: {reason}")
            return None
        if tls is None:  # the peer went away during the handshake
            self.stats.handshakes_failed += 1
            return None
        peer = self.peers.peer_of(tls.get_extra_info("ssl_object"))
        if isinstance(peer, str):
            self.stats.peers_refused += 1
            self._refuse(tls, peer)
            return None
        if self.authorize is not None:
            verdict = self.authorize(peer)
            if not verdict.allowed:
                self.stats.connections_denied += 1
                self._refuse(tls, f"{peer.uri} denied: {verdict.reason}")
                return None
        return tls, peer
