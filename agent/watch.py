"""Watching upstreams: one blocking query per upstream, snapshots published whole.

    watcher = UpstreamWatcher(consul, WatchKey("api"), settings, connectivity)
    tg.create_task(watcher.run())
    snap = watcher.latest.get()                 # None until the first answer

Each watcher asks `/v1/health/connect/<name>?passing` (with `dc`, `peer`, `filter`), builds a
`catalog.Snapshot` from the answer and swaps it in. Consul answers a blocking query with the
whole list, so the watcher keeps the previous answer's endpoints by the bytes of their entries
(`catalog.decode_answer`): only new or changed entries are decoded (into lean typed entries,
agent/health_entries.py) and validated again. The memo is
used only while the watch's index moves forward; the first answer, every answer after an
error, and an answer whose index went backwards are validated entry by entry.

The loop itself (index handling, backoff, last good snapshot on errors, `WatchState`) is the
generic `agent.watches.BlockingWatch`; this module says what an upstream reads and how its
answer becomes a snapshot. An inconsistent answer is rejected whole and the last good snapshot
kept (routing may fall back; authorization never does, see agent/sidecar.py).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable

from agent.catalog import (
    EMPTY_MEMO,
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
from agent.watches.blocking import AnswerRejected, BlockingWatch, WatchSettings, WatchState
from connect.latest import Latest, backoff

log = logging.getLogger("meshlet.agent.watch")


def backoff_delay(failures: int, rng: random.Random, initial: float, maximum: float) -> float:
    """Delay before retry number `failures` (1 for the first): exponential, capped, with
    "equal jitter" (half fixed, half random) so many agents that lost the same Consul spread
    their retries without any of them retrying at once."""
    return backoff(failures, initial, maximum, rng.random())


def watch_key(up: UpstreamSection) -> WatchKey:
    """What one upstream section watches: its name, datacenter, peer and filter."""
    return WatchKey(up.name, up.datacenter, up.peer, up.filter)


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
    decode: Callable[[bytes], Decoded],
    index: int,
    wait: float,
) -> Indexed[Decoded]:
    """`consul.health.connect(key.name, passing=True, ...)` (without `passing` for a key that
    takes `warning` instances too), with the answer's body handed to
    `decode` instead of being turned into `ServiceEntry`s first.

    The client's `health.connect` decodes every entry in full; `connect_decoded` takes the
    same request path, parameters, error mapping and index handling with our decoder.
    """
    return await consul.health.connect_decoded(
        key.name,
        decode,
        passing=not key.warning,
        filter=key.filter,
        dc=key.datacenter,
        index=index,
        wait=wait,
        peer=key.peer,
    )


HOLDING = "holding last endpoints after a control-plane reset"


def hold_after_reset(
    current: Snapshot | None,
    answer: Snapshot,
    reset_at: float | None,
    now: float,
    grace: float,
) -> bool:
    """Whether to keep `current` published instead of `answer`.

    Only after a control-plane reset (`reset_at`: when Consul's index was seen going
    backwards, None otherwise): a restarted, empty Consul answers "no instances" until they
    register again, though they are serving. An answer that would empty an upstream that had
    endpoints is then held until a non-empty answer arrives or `grace` seconds have passed
    since the reset. Without a reset nothing is held: a real deregistration takes effect."""
    return (
        reset_at is not None
        and current is not None
        and bool(current.endpoints)
        and not answer.endpoints
        and now - reset_at < grace
    )


class UpstreamWatcher:
    """The `BlockingWatch` of one upstream's healthy instances.

    After a control-plane reset, an answer that would empty the upstream is held for up to
    `WatchSettings.reset_hold` (`hold_after_reset`); `holding` says so meanwhile."""

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
        self._consul = consul
        self._clock = clock
        self._apply_times = apply_times
        self._memo: Memo = EMPTY_MEMO
        """The last accepted answer's entries and their endpoints."""
        self._started = 0.0
        self._settings = settings
        self._reset_at: float | None = None
        """When Consul's index was last seen going backwards, until an answer is published."""
        self._held: Snapshot | None = None
        """The empty answer held back after a reset (`hold_after_reset`)."""
        self.watch: BlockingWatch[Decoded, Snapshot | None] = BlockingWatch(
            f"upstream {key.label}",
            self._fetch,
            self._snapshot,
            None,
            settings,
            changed=self._changed,
            connectivity=connectivity,
            rng=rng,
            clock=clock,
        )
        self.latest: Latest[Snapshot | None] = self.watch.latest

    @property
    def state(self) -> WatchState:
        return self.watch.state

    async def run(self) -> None:
        """Watch until cancelled. Never raises for Consul's failures: it waits and retries."""
        await self.watch.run()

    @property
    def holding(self) -> bool:
        """An empty answer after a control-plane reset is held: the last endpoints serve."""
        return self._held is not None

    def _release_held(self, now: float) -> float:
        """Seconds the held answer may still be held; publishes it once the grace is over."""
        held = self._held
        if held is None or self._reset_at is None:
            return float("inf")
        remaining = self._settings().reset_hold - (now - self._reset_at)
        if remaining <= 0:
            log.warning(
                "upstream %s: no instance registered again within %gs of the control-plane "
                "reset: applying the empty answer",
                self.key.label, self._settings().reset_hold,
            )  # fmt: skip
            self._held = None
            self._reset_at = None
            self.watch.latest.publish(held)
        return remaining

    async def _fetch(self, index: int, wait: float) -> Indexed[Decoded]:
        # While an answer is held, block no longer than its grace, then publish it.
        remaining = self._release_held(self._clock())
        if remaining > 0:
            wait = min(wait, max(1.0, remaining))
        # A non-blocking read (first, or after any error or reset) validates every entry.
        memo = self._memo if index else EMPTY_MEMO

        def decode(body: bytes) -> Decoded:
            self._started = time.perf_counter()
            return decode_answer(self.key, body, memo)

        try:
            got = await health_connect_decoded(self._consul, self.key, decode, index, wait)
        except SnapshotRejected as exc:
            raise AnswerRejected(str(exc)) from exc
        if got.reset and memo.prints:
            # Consul's state was replaced (restore, another cluster): its ModifyIndexes may
            # repeat with other data, so nothing decoded with the memo is trusted. Read again
            # at once, validating every entry.
            self._memo = EMPTY_MEMO
            return await self._fetch(0, wait)
        st = self.watch.state
        if st.loaded and got.index < st.index and self._reset_at is None:
            # Consul's state was replaced (restarted empty, restored): until its instances
            # register again its answers may say "none" about instances still serving.
            self._reset_at = self._clock()
            log.warning(
                "upstream %s: Consul's index went backwards (%d -> %d): control-plane reset",
                self.key.label, st.index, got.index,
            )  # fmt: skip
        return got

    def _snapshot(self, decoded: Decoded, index: int) -> Snapshot | None:
        snapshot = snapshot_of(
            self.key, decoded.endpoints, index, self._clock(), in_order=decoded.in_order
        )
        self._memo = decoded.memo
        return snapshot

    def _changed(self, current: Snapshot | None, snapshot: Snapshot | None) -> bool:
        assert snapshot is not None
        grace = self._settings().reset_hold
        if hold_after_reset(current, snapshot, self._reset_at, self._clock(), grace):
            if self._held is None:
                log.warning(
                    "upstream %s: %s: the restarted control plane has no instance yet; "
                    "kept for up to %gs or until one registers",
                    self.key.label, HOLDING, grace,
                )  # fmt: skip
            self._held = snapshot
            return False
        if self._held is not None:
            log.info("upstream %s: instances registered again: hold ended", self.key.label)
        self._held = None
        self._reset_at = None
        changes = diff(current, snapshot)
        if not changes and current is not None:
            return False
        if self._apply_times is not None:
            # Decode of the body (JSON included) + snapshot + diff (not the HTTP read).
            self._apply_times.add(time.perf_counter() - self._started)
        what = (
            f"first snapshot, {len(snapshot.endpoints)} endpoints"
            if current is None
            else changes.describe()
        )
        log.info("upstream %s (index %d): %s", self.key.label, snapshot.index, what)
        return True


__all__ = [
    "HOLDING",
    "ApplyTimes",
    "Latest",
    "UpstreamWatcher",
    "WatchSettings",
    "WatchState",
    "backoff_delay",
    "health_connect_decoded",
    "hold_after_reset",
    "watch_key",
]
