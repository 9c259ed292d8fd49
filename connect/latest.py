"""Two primitives every control-plane follower shares: the current value of something that
changes whole (`Latest`), and the delay before trying again after a failure (`backoff`).

They live at the lowest layer that needs them: connect's leaf rotation and listeners use them,
and so do agent's watches (agent/watches) that feed them.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["Latest", "backoff"]

T = TypeVar("T")


class Latest(Generic[T]):
    """The current value of something that changes whole; readers never lock.

    `changed(version)` waits until a value newer than `version` is published and returns the
    new version with its value.
    """

    def __init__(self, value: T) -> None:
        self._value = value
        self._version = 0
        self._published = asyncio.Event()

    def get(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    def publish(self, value: T) -> None:
        self._value = value
        self._version += 1
        # Wake everyone waiting on the old event; later waiters get a fresh one.
        event, self._published = self._published, asyncio.Event()
        event.set()

    async def changed(self, version: int) -> tuple[int, T]:
        while self._version <= version:
            await self._published.wait()
        return self._version, self._value


def backoff(failures: int, initial: float, maximum: float, draw: float) -> float:
    """Delay before retry number `failures` (1 for the first): `initial` doubled per failure,
    capped at `maximum`, with "equal jitter" (half fixed, half scaled by `draw` in [0, 1)) so
    many processes that lost the same server spread their retries without any of them
    retrying at once. Pure: the caller draws the random number."""
    if failures < 1:
        return 0.0
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 60))
    return ceiling / 2 + draw * ceiling / 2
