"""One blocking watch of one Consul read, generic in what it reads and what it publishes.

    watch = BlockingWatch(
        "service-defaults api",
        fetch=lambda index, wait: consul.config_entries.get(
            "service-defaults", "api", index=index, wait=wait),
        decode=lambda raw, index: Defaults.from_entry(raw),   # AnswerRejected if unusable
        initial=None,
        settings=lambda: WatchSettings(),
    )
    tg.create_task(watch.run())
    watch.latest.get()       # the last good value (`initial` until the first)
    watch.state              # WatchState: loaded, index, failures, last_error, ...

What it does for every watch, so no follower hand-copies it:

* index: each read passes the index of the previous answer (`Indexed.next_index`: Consul's
  rules, 0 after the index went backwards, never below 1 otherwise, live in
  agent/consul_blocking.py). An answer at the index already applied (the wait ran out, or
  another key of the same table changed) is not decoded again.
* decode: the answer is turned into the published value whole, or refused whole: `decode`
  raises `AnswerRejected` and the last good value stays published; the refusal is counted
  (`state.rejected`), recorded (`state.last_error`) and logged. The answer is Consul's state
  at that index, so after the backoff the watch blocks on that index: the next answer is the
  next change, not the same refusal again.
* errors: Consul unreachable (`ConsulUnavailable`) or refusing the read (`ConsulError`: ACLs,
  a bad filter) keep the last good value, mark the watch stale, and retry after
  `connect.latest.backoff` (exponential with equal jitter) from a non-blocking read, since a
  restarted Consul may be at a lower index.
* publish: into a `Latest[T]` (connect/latest.py) that consumers follow; `changed(old, new)`
  may say that a decoded answer adds nothing worth waking them for.

What to do with a refused answer is the caller's decision, made in `decode`: for routing the
last good value is right; for authorization it is not (the intentions watch compiles a broken
entry into a deny-all marker for its destination instead of raising, so it is never rejected
and never falls back to a previous snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from agent.connectivity import Connectivity
from agent.consul_blocking import Indexed
from agent.consul_errors import ConsulError, ConsulUnavailable
from connect.latest import Latest, backoff

log = logging.getLogger("meshlet.agent.watch")

R = TypeVar("R")
T = TypeVar("T")

Fetch = Callable[[int, float], Awaitable[Indexed[R]]]
"""`fetch(index, wait)`: one read of Consul, blocking on `index` (0: answer at once)."""

Decode = Callable[[R, int], T]
"""`decode(answer, index)`: the value to publish, or `AnswerRejected`."""


class AnswerRejected(ValueError):
    """Consul's answer cannot be used as a whole; the message says what was wrong with it."""

    index = 0
    """Where the watch reads next: the refused answer's index when it is known (the same
    answer would come back, so wait for the next change), else 0."""


@dataclass(frozen=True, slots=True)
class WatchSettings:
    wait: float = 300.0
    retry_initial: float = 0.2
    retry_max: float = 5.0


@dataclass(frozen=True, slots=True)
class WatchState:
    """What status rendering shows about one watch besides its value."""

    loaded: bool = False
    """An answer has been accepted since start (the value is no longer `initial`)."""
    index: int = 0
    """Consul's index of the last accepted answer."""
    failures: int = 0
    """Failed reads (or refused answers) since the last accepted one."""
    last_error: str = ""
    last_success: float | None = None
    """Unix time of the last accepted answer."""
    stale_since: float | None = None
    """Unix time of the first failure since the last accepted answer; None while healthy."""
    rejected: int = 0
    """Answers refused as unusable since start."""


def unindexed(call: Callable[[], Awaitable[R]]) -> Fetch[R]:
    """A `Fetch` for a read that does not block (`/v1/agent/self`), for `BlockingWatch.first`:
    every answer is new (index 1 after a reset)."""

    async def fetch(index: int, wait: float) -> Indexed[R]:
        return Indexed(await call(), 1, 0, True, 0.0)

    return fetch


class BlockingWatch(Generic[R, T]):
    def __init__(
        self,
        name: str,
        fetch: Fetch[R],
        decode: Decode[R, T],
        initial: T,
        settings: Callable[[], WatchSettings],
        *,
        changed: Callable[[T, T], bool] | None = None,
        connectivity: Connectivity | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`name` labels logs and errors. `changed(old, new)` (default: always) decides
        whether a decoded answer is published; `connectivity` learns from every read whether
        Consul answered."""
        self.name = name
        self.latest: Latest[T] = Latest(initial)
        self.state = WatchState()
        self._fetch = fetch
        self._decode = decode
        self._changed = changed
        self._settings = settings
        self._connectivity = connectivity
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock

    async def run(self) -> None:
        """Watch until cancelled. Never raises for Consul's failures or bad answers."""
        index = 0
        while True:
            settings = self._settings()
            try:
                index = await self.step(index, settings.wait)
            except (AnswerRejected, ConsulError) as exc:
                self._failed(exc)
                # A refused answer is Consul's state at its index: wait for the next change.
                # Otherwise from a plain read: a restarted Consul may be at a lower index.
                index = exc.index if isinstance(exc, AnswerRejected) else 0
                await asyncio.sleep(self.delay(settings))

    async def first(self) -> T:
        """Read until one answer is accepted (retrying as `run` does) and return its value:
        for what is read once, such as the datacenter."""
        while True:
            settings = self._settings()
            try:
                await self.step(0, settings.wait)
            except (AnswerRejected, ConsulError) as exc:
                self._failed(exc)
                await asyncio.sleep(self.delay(settings))
                continue
            return self.latest.get()

    async def step(self, index: int, wait: float) -> int:
        """One read at `index`: decode and publish what is new. Returns the index for the next
        read; raises `AnswerRejected` or `ConsulError` with the state untouched."""
        got = await self._fetch(index, wait)
        if self._connectivity is not None:
            self._connectivity.ok()
        st = self.state
        if not st.loaded or got.reset or got.index != st.index:
            try:
                value = self._decode(got.value, got.index)
            except AnswerRejected as exc:
                exc.index = got.next_index
                raise
            if not st.loaded or self._changed is None or self._changed(self.latest.get(), value):
                self.latest.publish(value)
        if st.failures:
            log.info("%s: watch recovered after %d failures", self.name, st.failures)
        self.state = WatchState(True, got.index, 0, "", self._clock(), None, st.rejected)
        return got.next_index

    def delay(self, settings: WatchSettings) -> float:
        """Before the next read after `state.failures` failures in a row."""
        return backoff(
            self.state.failures, settings.retry_initial, settings.retry_max, self._rng.random()
        )

    def _failed(self, exc: Exception) -> None:
        st = self.state
        since = st.stale_since if st.stale_since is not None else self._clock()
        error = str(exc)
        rejected = st.rejected
        if self._connectivity is not None and not isinstance(exc, ConsulUnavailable):
            self._connectivity.ok()  # Consul answered, with something we cannot use
        if isinstance(exc, AnswerRejected):
            rejected += 1
            error = f"answer rejected: {exc}"
            log.error(
                "%s: Consul's answer rejected, keeping the last good value: %s", self.name, exc
            )
        elif isinstance(exc, ConsulUnavailable):
            if self._connectivity is not None:
                self._connectivity.failed(str(exc))
        else:
            # Refused (ACLs, a bad filter): only an operator can fix it; keep serving.
            log.error("%s: %s", self.name, exc)
        self.state = replace(
            st, failures=st.failures + 1, last_error=error, stale_since=since, rejected=rejected
        )
