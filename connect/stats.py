"""The proxy's counters: plain ints, so the hot path pays one add."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HandshakeFailures", "LimitRefusals", "ProxyStats", "RequestRefusals"]


@dataclass(slots=True)
class HandshakeFailures:
    """Failed inbound TLS handshakes by reason (connect.inbound.handshake_failure)."""

    no_certificate: int = 0
    """The client sent no certificate."""
    unknown_ca: int = 0
    """Its certificate does not chain to the mesh roots (another CA or trust domain)."""
    expired: int = 0
    plaintext: int = 0
    """Not TLS at all (HTTP, or other bytes) on the TLS port."""
    timeout: int = 0
    """The handshake did not finish within the listener's handshake timeout."""
    closed: int = 0
    """The peer closed or reset before the handshake finished (TCP health checks, scanners,
    or a client that refused our certificate)."""
    other: int = 0


@dataclass(slots=True)
class LimitRefusals:
    """Connections reset at accept because a listener was full (connect.listener)."""

    max_connections: int = 0
    """The listener held `max_connections` open connections."""
    max_pending_handshakes: int = 0
    """The listener held `max_pending_handshakes` connections not yet through TLS."""


@dataclass(slots=True)
class RequestRefusals:
    """HTTP requests answered 431 (and their connections closed) by the limit reached
    (connect.http1.limits)."""

    max_headers: int = 0
    max_header_bytes: int = 0


@dataclass(slots=True)
class ProxyStats:
    """Counters the admin endpoint exposes; plain ints so the hot path pays one add.
    `dataclasses.asdict` gives the JSON shape (handshake failures as a nested object)."""

    handshakes_failed: int = 0
    """All failed inbound handshakes; `handshake_failures` splits them by reason."""
    handshake_failures: HandshakeFailures = field(default_factory=HandshakeFailures)
    connections_refused_limit: LimitRefusals = field(default_factory=LimitRefusals)
    """Refused at accept, by the cap that was reached."""
    peers_refused: int = 0
    connections_denied: int = 0
    connections_revoked: int = 0
    """Open L4 connections closed because the intentions changed to deny their source."""
    connections: int = 0
    plaintext_connections: int = 0
    """Of `connections`, those admitted as plaintext (MutualTLSMode permissive)."""
    requests: int = 0
    requests_denied: int = 0
    bad_requests: int = 0
    """Request heads refused (400, 408, 431)."""
    requests_refused_limit: RequestRefusals = field(default_factory=RequestRefusals)
    retry_buffer_overflows: int = 0
    """Requests a route would retry whose body outgrew the retry buffer: sent unkept, so not
    retried."""
    upstream_failures: int = 0
    no_endpoint: int = 0
