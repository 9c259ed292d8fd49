"""Hash blocking (`/v1/agent/service/:id`) fed to `BlockingWatch`, whose loop speaks indexes.

Consul's agent-local reads block on an opaque `ContentHash` instead of an index: `?hash=H`
returns when the content no longer hashes to H, or when `wait` runs out. `HashedFetch` numbers
each distinct hash it sees (1, 2, ...) and hands that number to the watch as the index; asked to
block on the number of the last answer, it blocks on that answer's hash. So the watch's rules
hold unchanged: an answer with the same hash is not decoded again, a refused answer is blocked
on, and index 0 (after a failure) is a plain read.

An unknown ID is Consul's 404, which cannot be blocked on: it becomes the `absent` value, and
the next read of an absent service comes after `absent_poll` seconds (or `wait`, if shorter).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from agent.consul_blocking import Hashed, Indexed
from agent.consul_errors import ConsulNotFound

R = TypeVar("R")
A = TypeVar("A")

HashedRead = Callable[[str, float], Awaitable[Hashed[R]]]
"""`read(hash, wait)`: one read, blocking until the content no longer hashes to `hash` ("":
answer at once); `ConsulNotFound` when there is nothing at that ID."""

_ABSENT = ""
"""The hash recorded for a 404: Consul's hashes are never empty (the client refuses those)."""


class HashedFetch(Generic[R, A]):
    """A `Fetch` (agent.watches.blocking) over a hash-blocking read: answers are `R`, or
    `A` (`absent`) while there is nothing at the ID."""

    def __init__(self, read: HashedRead[R], *, absent: A, absent_poll: float) -> None:
        if absent_poll <= 0:
            raise ValueError(f"absent_poll must be positive, got {absent_poll}")
        self._read = read
        self._absent = absent
        self._absent_poll = absent_poll
        self._hash: str | None = None
        """The last answer's hash (`_ABSENT` for a 404); None before the first answer."""
        self._number = 0
        """How many distinct hashes in a row have been seen: the last answer's index."""

    async def __call__(self, index: int, wait: float) -> Indexed[R | A]:
        known = ""
        if index and index == self._number:
            if self._hash == _ABSENT:
                await asyncio.sleep(min(self._absent_poll, wait))
            elif self._hash is not None:
                known = self._hash
        value: R | A
        try:
            got = await self._read(known, wait)
        except ConsulNotFound:
            value, digest = self._absent, _ABSENT
        else:
            value, digest = got.value, got.content_hash
        if digest != self._hash:
            self._hash = digest
            self._number += 1
        return Indexed(value, self._number, self._number, True, 0.0)
