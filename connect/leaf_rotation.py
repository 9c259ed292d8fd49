"""Keeps one service's leaf and the trust bundle current, and publishes them as `Material`.

Two loops under one TaskGroup: roots (a blocking watch) and the leaf (Consul's blocking query,
or the pure schedule in `renewal.py` for sources that do not block). A failure never drops a
valid leaf: it is logged, retried with backoff, and shows up in `health()` once the leaf is past
its hard deadline. A root rotation renews at once a leaf the new root did not sign.

Readers take `current` (one immutable value) or wait for a new generation with `changed()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from connect.leaf import (
    Leaf,
    LeafError,
    LeafSource,
    Material,
    RootsSource,
    SourceRejected,
    TrustBundle,
)
from connect.renewal import (
    DEFAULT_POLICY,
    Health,
    Policy,
    Validity,
    health,
    renew_at,
    retry_at,
    should_replace,
)

log = logging.getLogger("meshlet.connect.rotation")


class LeafRotator:
    def __init__(
        self,
        leaf_source: LeafSource,
        roots_source: RootsSource,
        *,
        policy: Policy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._leaf_source = leaf_source
        self._roots_source = roots_source
        self._policy = policy
        self._clock = clock
        self._draw = draw
        self._leaf: Leaf | None = None
        self._bundle: TrustBundle | None = None
        self._material: Material | None = None
        self._generation = 0
        self._renew_at = 0.0
        self._published = asyncio.Condition()
        self._roots_moved = asyncio.Event()
        self._have_bundle = asyncio.Event()
        self.renewals = 0
        self.failures = 0

    # ---- readers ---------------------------------------------------------------------------

    @property
    def current(self) -> Material | None:
        return self._material

    def health(self) -> Health:
        if self._leaf is None:
            return Health.EXPIRED
        return health(self._leaf.validity, self._clock(), self._policy)

    async def ready(self) -> Material:
        return await self.changed(0)

    async def changed(self, generation: int) -> Material:
        """The first material newer than `generation`."""
        async with self._published:
            await self._published.wait_for(
                lambda: self._material is not None and self._material.generation > generation
            )
            assert self._material is not None
            return self._material

    async def _publish(self) -> None:
        if self._leaf is None or self._bundle is None:
            return
        self._generation += 1
        self._material = Material(self._leaf, self._bundle, self._generation)
        async with self._published:
            self._published.notify_all()

    # ---- loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._roots_loop(), name="roots")
            tg.create_task(self._leaf_loop(), name="leaf")

    async def _roots_loop(self) -> None:
        index = 0
        failures = 0
        while True:
            try:
                bundle = await self._roots_source.roots(index)
            except LeafError as err:
                failures += 1
                delay = min(self._policy.backoff_cap, self._policy.backoff_base * 2**failures)
                log.warning("roots: %s; retrying in %.1fs", err, delay)
                await asyncio.sleep(delay * (0.5 + 0.5 * self._draw()))
                index = 0
                continue
            failures = 0
            index = bundle.index
            old = self._bundle
            if old is not None and (old.roots_pem, old.active_root_id) == (
                bundle.roots_pem,
                bundle.active_root_id,
            ):
                continue
            self._bundle = bundle
            self._have_bundle.set()
            if old is not None and old.active_root_id != bundle.active_root_id:
                log.info("CA root rotated to %s", bundle.active_root_id)
                self._roots_moved.set()
            await self._publish()

    async def _leaf_loop(self) -> None:
        await self._have_bundle.wait()
        failures = 0
        next_try: float | None = None
        while True:
            current = self._leaf
            if next_try is not None:
                await self._wait_until(next_try)
            elif (
                current is not None
                and not self._leaf_source.blocking
                and not self._needs_new_root(current)
            ):
                await self._wait_until(self._renew_at)
            self._roots_moved.clear()
            assert self._bundle is not None
            try:
                fresh = await self._leaf_source.fetch(current, self._bundle)
            except LeafError as err:
                failures += 1
                self.failures += 1
                validity = current.validity if current else Validity(0, 0)
                now = self._clock()
                next_try = retry_at(validity, now, failures, self._draw(), self._policy)
                state = health(validity, now, self._policy) if current else Health.EXPIRED
                level = logging.ERROR if isinstance(err, SourceRejected) else logging.WARNING
                log.log(
                    level,
                    "%s leaf for %s: %s; keeping the current leaf (%s), retry in %.1fs",
                    self._leaf_source.name,
                    current.service if current else "?",
                    err,
                    state.value,
                    next_try - now,
                )
                continue
            failures, next_try = 0, None
            if current is not None and fresh.serial == current.serial:
                continue  # a blocking query that ran out of wait
            if current is not None and not should_replace(current.validity, fresh.validity):
                log.warning("%s returned an older leaf; ignored", self._leaf_source.name)
                continue
            self._leaf = fresh
            self._renew_at = renew_at(fresh.validity, self._draw(), self._policy)
            if current is not None:
                self.renewals += 1
            log.info(
                "leaf for %s from %s: serial %s, valid until %s",
                fresh.service,
                fresh.source,
                fresh.serial,
                fresh.valid_before.isoformat(),
            )
            await self._publish()

    def _needs_new_root(self, leaf: Leaf) -> bool:
        return self._bundle is not None and leaf.issuer != self._bundle.active_subject

    async def _wait_until(self, at: float) -> None:
        """Sleep until `at` (wall clock, as certificates are), or until the roots rotate."""
        delay = at - self._clock()
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._roots_moved.wait(), delay)
