"""Watching upstreams: one blocking query per upstream, snapshots published whole.

    watcher = UpstreamWatcher(consul, WatchKey("api"), settings, connectivity)
    tg.create_task(watcher.run())
    snap = watcher.latest.get()                 # None until the first answer

Each watcher asks `/v1/health/connect/<name>?passing` (with `dc`, `peer`, `filter`), builds a
`catalog.Snapshot` from the answer and swaps it in. Consul answers a blocking query with the
whole list, so the watcher keeps the previous answer's endpoints by fingerprint
(`catalog.decode_answer`): only new or changed entries are decoded and validated again. The
memo is used only while the watch's index moves forward; the first answer, every answer after
an error, and an answer whose index went backwards are validated entry by entry.

On errors it keeps the last good snapshot, records `stale_since`, and retries after an
exponential delay with jitter (`backoff_delay`, pure). Consul's blocking-query rules (index
reset when it goes backwards, never block on 0) live in the client's `Indexed.next_index`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.catalog import (
    Decoded,
    Memo,
    Snapshot,
    SnapshotRejected,
    WatchKey,
    decode_answer,
    diff,
    snapshot_of,
)
from agent.config import UpstreamSection
from agent.connectivity import Connectivity
from agent.consul import ConsulClient, Indexed
from agent.consul_errors import ConsulError, ConsulUnavailable

log = logging.getLogger("meshlet.agent.watch")

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


def backoff_delay(failures: int, rng: random.Random, initial: float, maximum: float) -> float:
    """Delay before retry number `failures` (1 for the first): exponential, capped, with
    "equal jitter" (half fixed, half random) so many agents that lost the same Consul spread
    their retries without any of them retrying at once."""
    if failures < 1:
        return 0.0
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 60))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def watch_key(up: UpstreamSection) -> WatchKey:
    """What one upstream section watches: its name, datacenter, peer and filter."""
    return WatchKey(up.name, up.datacenter, up.peer, up.filter)


@dataclass(frozen=True, slots=True)
class WatchSettings:
    wait: float = 300.0
    retry_initial: float = 0.2
    retry_max: float = 5.0


@dataclass(frozen=True, slots=True)
class WatchState:
    """What the admin API shows about one watch besides its snapshot."""

    failures: int = 0
    last_error: str = ""
    stale_since: float | None = None
    """Unix time of the first failure since the last good answer; None while healthy."""
    rejected: int = 0
    """Answers refused as inconsistent since start."""


class ApplyTimes:
    """The most recent apply durations (seconds), for status and the benchmark."""

    def __init__(self, keep: int = 4096) -> None:
        self.samples: deque[float] = deque(maxlen=keep)
        self.count = 0

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self.count += 1

    def summary(self) -> dict[str, float | int | list[float]]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"count": self.count}

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        return {
            "count": self.count,
            "p50_ms": round(pct(0.50), 4),
            "p99_ms": round(pct(0.99), 4),
            "max_ms": round(ordered[-1] * 1000, 4),
            # In order, newest last: what the last changes cost, apart from the first snapshots.
            "recent_ms": [
                round(s * 1000, 4) for s in itertools.islice(reversed(self.samples), 256)
            ][::-1],
        }


async def health_connect_decoded(
    consul: ConsulClient,
    key: WatchKey,
    decode: Callable[[object], Decoded],
    index: int,
    wait: float,
) -> Indexed[Decoded]:
    """`consul.health.connect(key.name, passing=True, ...)`, with the parsed answer handed to
    `decode` instead of being turned into `ServiceEntry`s first.

    The client's `health.connect` decodes every entry in full; `connect_decoded` takes the
    same request path, parameters, error mapping and index handling with our decoder.
    """
    return await consul.health.connect_decoded(
        key.name,
        decode,
        passing=True,
        filter=key.filter,
        dc=key.datacenter,
        index=index,
        wait=wait,
        peer=key.peer,
    )


class UpstreamWatcher:
    def __init__(
        self,
        consul: ConsulClient,
        key: WatchKey,
        settings: Callable[[], WatchSettings],
        connectivity: Connectivity,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        apply_times: ApplyTimes | None = None,
    ) -> None:
        self.key = key
        self.latest: Latest[Snapshot | None] = Latest(None)
        self.state = WatchState()
        self._consul = consul
        self._settings = settings
        self._connectivity = connectivity
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._apply_times = apply_times
        self._memo: Memo = {}
        """Endpoints of the last accepted answer by entry fingerprint."""

    async def _fetch(self, index: int, wait: float) -> tuple[int, int, bool, Snapshot | None]:
        # A non-blocking read (first, or after any error or reset) validates every entry.
        memo = self._memo if index else {}
        started: list[float] = []

        def decode(value: object) -> Decoded:
            started.append(time.perf_counter())
            return decode_answer(self.key, value, memo)

        got = await health_connect_decoded(self._consul, self.key, decode, index, wait)
        current = self.latest.get()
        if got.reset and memo:
            # Consul's state was replaced (restore, another cluster): its ModifyIndexes may
            # repeat with other data. Publish nothing from the memo; read again at once.
            self._memo = {}
            return got.index, 0, False, None
        if current is not None and not got.reset and got.index == current.index:
            # A blocking query that timed out, or a write elsewhere in the same table.
            return got.index, got.next_index, False, None
        snapshot = snapshot_of(self.key, got.value.endpoints, got.index, self._clock())
        self._memo = got.value.memo
        changes = diff(current, snapshot)
        if changes or current is None:
            self.latest.publish(snapshot)
            if self._apply_times is not None:
                # Decode of the parsed answer + snapshot + diff + publish (not HTTP, not JSON).
                self._apply_times.add(time.perf_counter() - started[0])
            what = (
                f"first snapshot, {len(snapshot.endpoints)} endpoints"
                if current is None
                else changes.describe()
            )
            log.info("upstream %s (index %d): %s", self.key.label, got.index, what)
        return got.index, got.next_index, True, snapshot

    def _failed(self, error: str) -> None:
        st = self.state
        since = st.stale_since if st.stale_since is not None else self._clock()
        self.state = WatchState(st.failures + 1, error, since, st.rejected)

    async def run(self) -> None:
        """Watch until cancelled. Never raises for Consul's failures: it waits and retries."""
        index = 0
        while True:
            settings = self._settings()
            try:
                _, index, _, _ = await self._fetch(index, settings.wait)
            except SnapshotRejected as exc:
                # Consul's state itself is bad at this index; asking again at once would get
                # the same answer, so wait for the next change while keeping the old snapshot.
                self._connectivity.ok()
                self._failed(f"answer rejected: {exc}")
                self.state = WatchState(
                    self.state.failures,
                    self.state.last_error,
                    self.state.stale_since,
                    self.state.rejected + 1,
                )
                log.error(
                    "upstream %s: Consul's answer rejected, keeping the last snapshot: %s",
                    self.key.label,
                    exc,
                )
                await asyncio.sleep(self._delay(settings))
                index = 0
                continue
            except ConsulUnavailable as exc:
                self._connectivity.failed(str(exc))
                self._failed(str(exc))
                # A Consul that restarted may be at a lower index; blocking on the old one would
                # park the query for the whole wait before the reset is seen.
                index = 0
                await asyncio.sleep(self._delay(settings))
                continue
            except ConsulError as exc:
                # Rejected (ACLs, a bad filter): only an operator can fix it; keep serving.
                self._connectivity.ok()
                self._failed(str(exc))
                log.error("upstream %s: %s", self.key.label, exc)
                index = 0
                await asyncio.sleep(self._delay(settings))
                continue
            self._connectivity.ok()
            if self.state.failures:
                log.info(
                    "upstream %s: watch recovered after %d failures",
                    self.key.label,
                    self.state.failures,
                )
                self.state = WatchState(rejected=self.state.rejected)

    def _delay(self, settings: WatchSettings) -> float:
        return backoff_delay(
            self.state.failures, self._rng, settings.retry_initial, settings.retry_max
        )
