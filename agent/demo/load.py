"""The demo's traffic: real HTTP requests through web's sidecar, a bounded load at a time.

`Load` runs a few concurrent workers, each sending one request after another, until a count
or a time limit; `every_second` calls back once a second while it runs (the live table's row).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Answer:
    status: int
    """0 when no HTTP answer came."""
    body: str
    seconds: float


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    start = time.perf_counter()
    try:
        async with http.request(method, url, headers=headers) as resp:
            body = (await resp.text()).strip()
            return Answer(resp.status, body, time.perf_counter() - start)
    except (aiohttp.ClientError, TimeoutError) as err:
        return Answer(0, f"no answer: {err or type(err).__name__}", time.perf_counter() - start)


Request = Callable[[int], Awaitable[tuple[str, Answer]]]
"""Sends request number n; returns (kind, answer): kind is what the step tallies it under."""


@dataclass
class Load:
    request: Request
    workers: int
    limit: int
    """Stop after this many requests (all workers together)."""
    seconds: float
    """...or after this long."""
    pause: float = 0.0
    """Each worker waits this long between its requests: a steady rate, not a flood."""
    sent: int = 0
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    """Per kind, answers by status code."""
    slowest: dict[str, float] = field(default_factory=dict)
    """Per kind, the longest a request took, as the client saw it (seconds)."""

    def count(self, kind: str, status: int | None = None) -> int:
        tally = self.statuses.get(kind, Counter())
        return tally.total() if status is None else tally[status]

    async def _worker(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        while self.sent < self.limit and loop.time() < until:
            n = self.sent
            self.sent += 1
            kind, answer = await self.request(n)
            self.statuses.setdefault(kind, Counter())[answer.status] += 1
            self.slowest[kind] = max(self.slowest.get(kind, 0.0), answer.seconds)
            if self.pause:
                await asyncio.sleep(self.pause)

    async def run(self, tick: Callable[[str], Awaitable[None]]) -> None:
        """Send the load; await `tick(label)` after each whole second ("1s", "2s", ...) and
        at the end ("4.6s"), unless that is within a fifth of a second of the last tick."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        workers = [
            asyncio.create_task(self._worker(start + self.seconds)) for _ in range(self.workers)
        ]
        done = asyncio.gather(*workers)
        try:
            second = 1
            while True:
                try:
                    await asyncio.wait_for(
                        asyncio.shield(done), max(0.0, start + second - loop.time())
                    )
                    break
                except TimeoutError:
                    await tick(f"{second}s")
                    second += 1
            elapsed = loop.time() - start
            if elapsed - (second - 1) >= 0.2:
                await tick(f"{elapsed:.1f}s")
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
