"""Mirrored requests (a route's `Mirror`): a copy of a request sent to another cluster, fire
and forget. The copy never delays or fails the real request: it goes on a connection of its
own, after the real request has been read whole, its answer is read and discarded, and at most
`cap` copies are in flight per listener (over it, a copy is dropped and counted). What the
copy is (`connect.routes.shadow_head`) and whether it is sent (`Mirror.decide`) are decided
without I/O; this is the shell that sends it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from connect.balancer import Target
from connect.cluster import Outcome
from connect.dial import DialFailed, Upstream, dial_failover

log = logging.getLogger("meshlet.proxy.http")

__all__ = ["Mirrors"]


class _Discard(asyncio.Protocol):
    """Reads the mirror's answer and drops it; `done` resolves when the connection ends."""

    def __init__(self) -> None:
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.answered = False

    def data_received(self, data: bytes) -> None:
        self.answered = True

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.answered)


class Mirrors:
    """The copies one listener sends, each counted once by how it ended (`counts`): `sent`
    (written, and its connection ended), `failed` (no endpoint, dial failed, no end in
    time), `dropped_over_limit` (`cap` copies were in flight), `skipped` (not copyable: a
    body that was not kept whole, or a mirror cluster the listener does not have)."""

    def __init__(self, cap: int = 64, timeout: float = 30.0) -> None:
        self.cap = cap
        self.timeout = timeout
        """Longest a copy may take, dial to last byte of its discarded answer."""
        self.inflight = 0
        self.sent = 0
        self.skipped = 0
        self.dropped_over_limit = 0
        self.failed = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def send(self, chain: Sequence[Upstream], parts: list[bytes]) -> None:
        """Send `parts` (a whole request: shadow head and body) to the first cluster of
        `chain` that has an endpoint (its failover order), unless the cap is reached."""
        if self.inflight >= self.cap:
            self.dropped_over_limit += 1
            return
        self.inflight += 1
        self._spawn(self._copy(chain, parts))

    def skip(self) -> None:
        self.skipped += 1

    def counts(self) -> dict[str, int]:
        """The outcomes so far and the copies in flight now (connect.counters reports them)."""
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped_over_limit": self.dropped_over_limit,
            "skipped": self.skipped,
            "inflight": self.inflight,
        }

    @property
    def used(self) -> bool:
        """A copy was ever asked of this listener (only those are reported)."""
        return bool(self.sent or self.failed or self.dropped_over_limit or self.skipped) or (
            self.inflight > 0
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _copy(self, chain: Sequence[Upstream], parts: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        up: Upstream | None = None
        target: Target | None = None
        transport: asyncio.Transport | None = None
        outcome = Outcome.CANCELLED
        try:
            async with asyncio.timeout(self.timeout):
                transport, sink, up, target = await dial_failover(chain, lambda _t: _Discard())
                transport.writelines(parts)
                answered = await sink.done
            outcome = Outcome.SUCCESS if answered else Outcome.RESET
            self.sent += 1
        except (DialFailed, TimeoutError, OSError) as err:
            self.failed += 1
            outcome = Outcome.TIMEOUT if isinstance(err, TimeoutError) else outcome
            log.debug("mirror: %s", err)
        finally:
            self.inflight -= 1
            if transport is not None and not transport.is_closing():
                transport.abort()
            if up is not None and target is not None:
                up.cluster.record(target, outcome, loop.time())

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
