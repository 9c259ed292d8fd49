"""The HTTP listeners' limits."""

from __future__ import annotations

from dataclasses import dataclass


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
