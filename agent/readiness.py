"""Is the sidecar fit to receive traffic? Its Consul check says what this module answers.

The answer is "yes" only when the sidecar's listeners accept connections and it holds a leaf
certificate that has not expired and that chains to the CA's current roots (a leaf the roots
no longer vouch for is refused by every peer). The registrar asks a `SidecarReadiness` and
reports the verdict to Consul as a TTL check, so instances that cannot serve drop out of their
callers' `/v1/health/connect/...?passing` answers.

The proxy and the certificate source are built elsewhere (connect/); they plug in here through
`LeafStatus` (and, when the proxy runs in this process, a `SidecarReadiness` of its own that
asks its listener objects directly instead of dialling them). A process that runs no proxy
has no readiness to give, and registers no sidecar (agent/registration.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

_MAX_NOTE = 512


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...] = ()
    """Why not ready (empty when ready)."""
    leaf_expires_at: float | None = None
    """Unix time the held leaf expires; None when no leaf is held."""

    @property
    def note(self) -> str:
        """One line for the check's output. Bounded: it travels in a query string, and an
        agent with a thousand upstreams can have a thousand listeners down."""
        if self.ready:
            return "listeners up, valid leaf held"
        shown = "; ".join(self.reasons[:3])
        more = f" (+{len(self.reasons) - 3} more)" if len(self.reasons) > 3 else ""
        text = shown + more
        return text if len(text) <= _MAX_NOTE else text[: _MAX_NOTE - 3] + "..."


class SidecarReadiness(Protocol):
    async def check(self) -> Readiness: ...


class LeafStatus(Protocol):
    """What the certificate source tells the agent about the leaf it holds."""

    def leaf_expiry(self) -> float | None:
        """Unix time at which the current leaf expires, or None when none is held."""
        ...

    def leaf_problem(self) -> str:
        """Why no usable leaf is held: none yet, or one that does not chain to the current
        roots (empty when the held leaf is usable)."""
        ...


async def _accepts(host: str, port: int, timeout: float) -> str:
    """ "" if something accepts TCP connections at host:port, else what went wrong."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return f"{host}:{port}: no answer within {timeout:g}s"
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    writer.close()
    # The listener may hang up first; it still accepted, which is all this asks.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


class ListenerReadiness:
    """Ready when every listener accepts a TCP connection and the leaf is valid `now`.

    Dialling the port is what Consul's default sidecar check does (`Connect Sidecar
    Listening`); it is the one fact about a listener in another task or process that can be
    checked without its cooperation.
    """

    def __init__(
        self,
        listeners: Sequence[tuple[str, int]],
        leaf: LeafStatus,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 1.0,
    ) -> None:
        self._listeners = tuple(listeners)
        self._leaf = leaf
        self._clock = clock
        self._timeout = timeout

    async def check(self) -> Readiness:
        problems = await asyncio.gather(
            *(_accepts(h, p, self._timeout) for h, p in self._listeners)
        )
        reasons = [f"listener {p}" for p in problems if p]
        expiry = self._leaf.leaf_expiry()
        if expiry is None:
            reasons.append(self._leaf.leaf_problem() or "no leaf certificate held")
        elif expiry <= self._clock():
            reasons.append("leaf certificate expired")
        elif problem := self._leaf.leaf_problem():
            reasons.append(problem)
        return Readiness(not reasons, tuple(reasons), expiry)
