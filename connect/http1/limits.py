"""The HTTP listeners' limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    max_header_bytes: int = 64 * 1024
    """Request line plus headers; beyond it, 431."""
    max_headers: int = 100
    max_pipelined: int = 32
    """Requests taken from a connection ahead of their answers. llhttp parses a whole read,
    so without it one read of tiny pipelined requests became thousands of queued exchanges
    (about 18 times the bytes sent); beyond it the rest is dropped and the connection closes
    after the last one taken (RFC 9112 §9.3.2: the client retries the others)."""
    header_timeout: float = 10.0
    """A request head must arrive within one to two of these (slowloris)."""
    idle_timeout: float = 300.0
    """Keep-alive idle, and a stalled body or response."""
    high_water: int = 256 * 1024
    max_idle_per_endpoint: int = 64
    connect_timeout: float = 5.0
    retry_body_bytes: int = 64 * 1024
    """A request body up to this size is kept while it is sent, so a route's retry policy can
    send it again; a longer body (or one still arriving) makes the request not replayable."""
