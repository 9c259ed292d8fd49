"""The public listener's gate: failed handshakes (counted by reason, logged once per peer),
then peer identity and the connection decision after the mTLS handshake.

The listener terminates TLS per connection with `start_tls` (connect.listener), which reports
each failed handshake with the peer's address and OpenSSL's reason to `handshake_failed`.

MutualTLSMode permissive (`permissive`): the listener hands over a connection whose first byte
is not a TLS record as it is; `admit` takes a connection without a TLS session as the
`PLAINTEXT` peer (no identity: only intentions whose source is `*` can allow it) while
permissive, and refuses it otherwise. `revoke` closes open plaintext connections once the mode
is strict again, as it closes connections whose intention now denies them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from connect.seams import PLAINTEXT, ConnectionAuthorizer, Peer, PeerCache
from connect.stats import ProxyStats

log = logging.getLogger("meshlet.proxy.inbound")

__all__ = ["InboundGate", "Revocable", "handshake_failure"]

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) that mean "not signed by a root we trust".
_UNKNOWN_CA = frozenset(
    {
        2,  # UNABLE_TO_GET_ISSUER_CERT
        18,  # DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # SELF_SIGNED_CERT_IN_CHAIN
        20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)
_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
# SSL_R_* reasons for a first record that is not TLS.
_PLAINTEXT = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER"})
_NO_CERTIFICATE = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE"})
_CLOSED = frozenset({"UNEXPECTED_EOF_WHILE_READING"})


def handshake_failure(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) for a failed server handshake: kind is a `HandshakeFailures` field,
    detail OpenSSL's words for a log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {exc.verify_message}"
        if exc.verify_code == _EXPIRED:
            return "expired", detail
        if exc.verify_code in _UNKNOWN_CA:
            return "unknown_ca", detail
        return "other", detail
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed", "closed by the peer during the handshake"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        detail = reason.lower().replace("_", " ") if reason else str(exc)
        if reason in _NO_CERTIFICATE:
            return "no_certificate", "no client certificate"
        if reason in _PLAINTEXT:
            return "plaintext", f"not TLS ({detail})"
        if reason in _CLOSED:
            return "closed", "closed by the peer during the handshake"
        return "other", detail
    if isinstance(exc, (ConnectionAbortedError, TimeoutError)):
        # Both loops abort a handshake that outlives ssl_handshake_timeout this way.
        return "timeout", str(exc) or "handshake timed out"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "closed", "closed by the peer during the handshake"
    return "other", f"{type(exc).__name__}: {exc}"


class Revocable(Protocol):
    """An open connection that can be cut (connect.l4's relay)."""

    def abort(self) -> None: ...


def _host_port(peername: Any) -> tuple[str, str]:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return str(peername[0]), f"{peername[0]}:{peername[1]}"
    text = str(peername) if peername else "unknown peer"
    return text, text


class InboundGate:
    """The `TLSTerminator` of inbound listeners (connect.listener) and their admission.

    `server_ssl` is one context for the listener's life (connect.tls's listener context moves
    each handshake onto the current leaf). Its TLS 1.3 session tickets therefore outlive a
    rotation, and OpenSSL does not verify a client again when it resumes (no ticket is issued on
    a resumed connection, connect.tls, so resumptions do not chain past the lifetime of the
    full handshake's ticket). Give `current_ssl` (e.g.
    `DynamicTLS.server`) and `_tls()` listeners use the current generation's context for each
    handshake instead: a new leaf or new roots then also means new ticket keys, so no session
    is resumed across a rotation. Independently, `admit` refuses a resumed session whose
    client certificate has expired since.
    """

    def __init__(
        self,
        server_ssl: ssl.SSLContext,
        peers: PeerCache,
        stats: ProxyStats,
        *,
        authorize: ConnectionAuthorizer | None = None,
        handshake_timeout: float = 10.0,
        log_limit: int = 1024,
        current_ssl: Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        self.server_ssl = server_ssl
        self.current_ssl = current_ssl
        self.peers = peers
        self.stats = stats
        self.authorize = authorize
        self.handshake_timeout = handshake_timeout
        self.permissive = False
        """MutualTLSMode permissive: plaintext is accepted too (see the module's docstring)."""
        self._logged: set[tuple[str, str]] = set()
        self._log_limit = log_limit
        self._not_after: dict[bytes, float] = {}
        self.on_refused: Callable[[str, str], None] | None = None
        """Told of every connection refused here, before any byte of it reached the app
        (peer address, why): the access log's listener logs (connect.observe.Telemetry)."""

    def server_context(self) -> ssl.SSLContext:
        return self.current_ssl() if self.current_ssl is not None else self.server_ssl

    def _log_once(self, host: str, key: str, message: str, *args: object) -> None:
        """Log once per (peer host, key); the set is bounded (cleared when full)."""
        k = (host, key)
        if k in self._logged:
            return
        if len(self._logged) >= self._log_limit:
            self._logged.clear()
        self._logged.add(k)
        log.warning(message, *args)

    def handshake_failed(self, peername: Any, exc: BaseException) -> None:
        """Count a failed TLS handshake under its reason and log it once per peer host and
        reason (the connection is already closed)."""
        kind, detail = handshake_failure(exc)
        self.stats.handshakes_failed += 1
        counts = self.stats.handshake_failures
        setattr(counts, kind, getattr(counts, kind) + 1)
        host, where = _host_port(peername)
        self._log_once(
            host, "handshake:" + kind, "inbound TLS handshake from %s refused (%s): %s",
            where, kind, detail,
        )  # fmt: skip
        if self.on_refused is not None:
            self.on_refused(where, f"TLS handshake failed ({kind}): {detail}")

    def _expired(self, ssl_object: ssl.SSLObject) -> bool:
        der = ssl_object.getpeercert(True) or b""
        not_after = self._not_after.get(der)
        if not_after is None:
            cert = ssl_object.getpeercert()
            text = cert.get("notAfter") if cert else None
            not_after = ssl.cert_time_to_seconds(text) if isinstance(text, str) else 0.0
            if len(self._not_after) >= 4096:
                self._not_after.clear()
            self._not_after[der] = not_after
        return not_after <= time.time()

    def _refuse(self, transport: asyncio.BaseTransport, reason: str) -> None:
        host, where = _host_port(transport.get_extra_info("peername"))
        self._log_once(host, reason, "inbound connection from %s refused: %s", host, reason)
        transport.abort()  # type: ignore[attr-defined]
        if self.on_refused is not None:
            self.on_refused(where, reason)

    def admit(self, transport: asyncio.BaseTransport) -> Peer | None:
        """Identify and authorize a connection whose handshake just succeeded; None if
        refused (counted, logged once per peer and reason, aborted before any byte is read)."""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None and transport.is_closing():
            # The peer left between its handshake and this callback (a client that closes at
            # once, a health check): nothing to admit, and nobody was refused.
            return None
        if ssl_object is None:
            return self._admit_plaintext(transport)
        peer = self.peers.peer_of(ssl_object)
        if isinstance(peer, str):
            self.stats.peers_refused += 1
            self._refuse(transport, peer)
            return None
        if ssl_object.session_reused and self._expired(ssl_object):
            # A fresh handshake would have failed; resumption does not verify again.
            self.stats.peers_refused += 1
            self._refuse(transport, f"{peer.uri}: certificate expired (resumed TLS session)")
            return None
        if self.authorize is not None:
            verdict = self.authorize(peer)
            if not verdict.allowed:
                self.stats.connections_denied += 1
                self._refuse(transport, f"{peer.uri} denied: {verdict.reason}")
                return None
        self.stats.connections += 1
        return peer

    def _admit_plaintext(self, transport: asyncio.BaseTransport) -> Peer | None:
        """A connection the listener handed over without TLS: the `PLAINTEXT` peer while
        permissive, decided by the connection authorizer like any other (an HTTP listener
        decides each request instead)."""
        if not self.permissive:
            # Only a permissive listener hands plaintext over; a mode switched in between is
            # decided by the mode now.
            self.stats.handshakes_failed += 1
            self.stats.handshake_failures.plaintext += 1
            self._refuse(transport, "plaintext refused: MutualTLSMode is strict")
            return None
        if self.authorize is not None:
            verdict = self.authorize(PLAINTEXT)
            if not verdict.allowed:
                self.stats.connections_denied += 1
                self._refuse(transport, f"plaintext (no identity) denied: {verdict.reason}")
                return None
        self.stats.connections += 1
        self.stats.plaintext_connections += 1
        return PLAINTEXT

    def decide_open(self, peer: Peer) -> tuple[bool, str]:
        """Whether an open connection from `peer` may stay open now, and why not."""
        if peer.plaintext and not self.permissive:
            return False, "plaintext no longer accepted: MutualTLSMode is strict"
        if self.authorize is None:
            return True, ""
        verdict = self.authorize(peer)
        return verdict.allowed, verdict.reason

    def revoke(self, open_connections: Mapping[Any, Peer]) -> int:
        """Decide each open connection's peer again with the current authorizer and abort the
        connections now denied (the intentions changed since their handshake); counted in
        `connections_revoked`, logged once per peer and reason. Returns how many."""
        if not open_connections:
            return 0
        verdicts: dict[Peer, tuple[bool, str]] = {}
        denied: list[tuple[Revocable, Peer]] = []
        for conn, peer in open_connections.items():
            verdict = verdicts.get(peer)
            if verdict is None:
                verdict = verdicts[peer] = self.decide_open(peer)
            if not verdict[0]:
                denied.append((conn, peer))
        counts: dict[Peer, int] = {}
        for conn, peer in denied:
            counts[peer] = counts.get(peer, 0) + 1
            conn.abort()  # its listener forgets it (the mapping changes under us: listed first)
        self.stats.connections_revoked += len(denied)
        for peer, n in counts.items():
            reason = verdicts[peer][1]
            log.warning(
                "inbound: closed %d open connection(s) from %s: now denied: %s",
                n, peer.uri or "plaintext", reason,
            )  # fmt: skip
        return len(denied)
