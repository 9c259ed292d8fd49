"""Keeps one service's leaf and the trust bundle current, and publishes them as `Material`.

Two loops under one TaskGroup: roots (a blocking watch) and the leaf (Consul's blocking query,
or the pure schedule in `renewal.py` for sources that do not block). A failure never drops a
valid leaf: it is logged, retried with backoff, and shows up in `health()` once the leaf is past
its hard deadline. A root rotation renews at once a leaf the new root did not sign.

Roots changes: whenever the bundle changes, the held leaf is checked against it
(`leaf_chain.chain_problem`: chains to one of the roots, SPIFFE ID in the bundle's trust domain).
A leaf that no longer passes is useless (every peer refuses it), so the loop stops waiting on
Consul's blocking query and asks for a leaf at once with a non-blocking one, retrying with
backoff until a leaf that chains arrives: Consul's agent re-signs when the active root changes,
but only after a random delay of up to 30 s (`caChangeJitterWindow`, consul:agent/leafcert/
generate.go), and while that refresh is pending it answers even non-blocking queries with the
leaf it holds (consul:agent/leafcert/leafcert.go `certNeedsUpdate`). A fetched leaf that does not
chain never replaces one (it is counted in `stale_leaves`), and `problem()` says why the held
leaf is unusable until one that chains is in place. Conversely, a fetched leaf that does not
chain to our bundle may mean the bundle is the stale one (a rebuilt cluster whose index went
backwards parks the roots query): the roots are then re-read at once. So are they when Consul
is back after an outage (`consul_back`, called by the agent when any of its calls sees it
answer again): a control plane restarted empty has a new CA, and the sidecars that read it
and the ones still in their backoff refuse each other until all have.

Readers take `current` (one immutable value) or wait for a new generation with `changed()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from connect.ca_switch import (
    DEFAULT_SWITCH,
    Grace,
    SwitchPolicy,
    switch_without_cross_signing,
    trusted,
)
from connect.latest import Latest, backoff
from connect.leaf import (
    Leaf,
    LeafError,
    LeafSource,
    Material,
    RootsSource,
    SourceRejected,
    TrustBundle,
)
from connect.leaf_chain import chain_problem
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

T = TypeVar("T")


class LeafRotator:
    def __init__(
        self,
        leaf_source: LeafSource,
        roots_source: RootsSource,
        *,
        policy: Policy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        switch: SwitchPolicy = DEFAULT_SWITCH,
    ) -> None:
        self._leaf_source = leaf_source
        self._roots_source = roots_source
        self._policy = policy
        self._clock = clock
        self._draw = draw
        self._switch = switch
        self._leaf: Leaf | None = None
        self._bundle: TrustBundle | None = None
        """What we trust: the source's roots, plus a replaced CA's while `_grace` lasts."""
        self._answered: TrustBundle | None = None
        """The roots as the source last gave them."""
        self._grace: Grace | None = None
        self._switch_from = ""
        """Serial of the leaf the CA switch in progress replaces."""
        self._grace_moved = asyncio.Event()
        self._material: Latest[Material | None] = Latest(None)
        """Published whole; its version is the material's generation."""
        self._renew_at = 0.0
        self._roots_moved = asyncio.Event()
        self._reread_roots = asyncio.Event()
        self._consul_back = asyncio.Event()
        self._have_bundle = asyncio.Event()
        self._problem = ""
        self.renewals = 0
        self.failures = 0
        self.roots_changes = 0
        self.chain_breaks = 0
        """Times a roots change left the held leaf without a chain to the roots."""
        self.stale_leaves = 0
        """Leaves fetched that did not chain to the current roots (never put in use)."""
        self.ca_switches = 0
        """Roots changes that dropped the root of the served leaf (no cross-signing)."""

    # ---- readers ---------------------------------------------------------------------------

    @property
    def current(self) -> Material | None:
        return self._material.get()

    def health(self) -> Health:
        if self._leaf is None:
            return Health.EXPIRED
        return health(self._leaf.validity, self._clock(), self._policy)

    @property
    def grace(self) -> Grace | None:
        """The CA switch in progress: the old roots are trusted until `grace.until`."""
        return self._grace

    def problem(self) -> str:
        """Why the held leaf is unusable with the held bundle ("" when it chains, or when
        nothing is held yet)."""
        return self._problem

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)

    def _check_chain(self) -> str:
        """Re-evaluate the held leaf against the held bundle; returns (and keeps) the problem."""
        if self._leaf is None or self._bundle is None:
            self._problem = ""
        else:
            self._problem = chain_problem(self._leaf, self._bundle, self._now())
        return self._problem

    async def ready(self) -> Material:
        return await self.changed(0)

    async def changed(self, generation: int) -> Material:
        """The newest material once one newer than `generation` is published."""
        _, material = await self._material.changed(generation)
        assert material is not None  # only materials are published
        return material

    async def _publish(self) -> None:
        if self._leaf is None or self._bundle is None:
            return
        generation = self._material.version + 1
        self._material.publish(Material(self._leaf, self._bundle, generation))

    def consul_back(self) -> None:
        """Consul answers again (another caller of it saw it come back): a roots read waiting
        out its backoff (which grows to the policy's cap) is made at once. A control plane
        restarted empty has a new CA; each sidecar must take its roots, and so its new leaf,
        within a round trip of Consul's return, not at the end of its own backoff: until
        every peer has, the ones that did and the ones that did not refuse each other."""
        self._consul_back.set()

    # ---- loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._roots_loop(), name="roots")
            tg.create_task(self._leaf_loop(), name="leaf")
            tg.create_task(self._grace_loop(), name="ca-switch grace")

    async def _roots_loop(self) -> None:
        index = 0
        failures = 0
        while True:
            self._reread_roots.clear()
            self._consul_back.clear()
            try:
                got = await self._unless(
                    self._roots_source.roots(index), self._reread_roots, lambda: True
                )
            except LeafError as err:
                failures += 1
                # The policy's base doubles from the first failure (base * 2 at once).
                delay = backoff(
                    failures + 1, self._policy.backoff_base, self._policy.backoff_cap, self._draw()
                )
                log.warning("roots: %s; retrying in %.1fs", err, delay)
                with contextlib.suppress(TimeoutError):
                    # Set during the failed read too: Consul came back meanwhile.
                    await asyncio.wait_for(self._consul_back.wait(), delay)
                index = 0
                continue
            if got is None:
                # A leaf that does not chain to our bundle came back: maybe the bundle is
                # the stale one. Read the roots now rather than when the blocking query ends.
                index = 0
                continue
            bundle = got
            failures = 0
            index = bundle.index
            old = self._answered
            if old is not None and (old.roots_pem, old.active_root_id, old.trust_domain) == (
                bundle.roots_pem,
                bundle.active_root_id,
                bundle.trust_domain,
            ):
                continue
            self._answered = bundle
            if old is not None and self._leaf is not None and self._bundle is not None:
                self._start_grace(self._leaf, self._bundle, bundle)
            self._bundle = trusted(bundle, self._grace, self._clock())
            self._have_bundle.set()
            if old is None:
                self._check_chain()
                await self._publish()
                continue
            self.roots_changes += 1
            had_problem = self._problem
            problem = self._check_chain()
            if old.active_root_id != bundle.active_root_id:
                log.info(
                    "CA root rotated to %s (trust domain %s)",
                    bundle.active_root_id,
                    bundle.trust_domain,
                )
            if problem and not had_problem:
                self.chain_breaks += 1
                log.error("%s after the roots changed; fetching a new leaf now", problem)
            if problem or old.active_root_id != bundle.active_root_id:
                self._roots_moved.set()
            await self._publish()

    def _start_grace(self, leaf: Leaf, held: TrustBundle, new: TrustBundle) -> None:
        now = self._clock()
        grace = switch_without_cross_signing(
            leaf, held, new, now, self._draw(), policy=self._switch
        )
        if grace is None:
            return  # the new roots still sign our leaf (or it was useless anyway)
        if self._grace is not None and now < self._grace.until:
            # A second change within the grace: the first one's roots keep their deadline.
            grace = Grace(
                old_roots=grace.old_roots,
                old_domain=grace.old_domain or self._grace.old_domain,
                adopt_at=grace.adopt_at,
                until=min(grace.until, max(self._grace.until, now)),
            )
        self._grace = grace
        self._switch_from = leaf.serial
        self.ca_switches += 1
        self._grace_moved.set()
        log.warning(
            "roots changed without cross-signing (trust domain %s -> %s); old roots trusted "
            "until %s, the new CA's leaf put in use from %s",
            held.trust_domain,
            new.trust_domain,
            datetime.datetime.fromtimestamp(grace.until, datetime.UTC).isoformat(),
            datetime.datetime.fromtimestamp(grace.adopt_at, datetime.UTC).isoformat(),
        )

    async def _grace_loop(self) -> None:
        """Drops the replaced CA's roots when the grace ends."""
        while True:
            self._grace_moved.clear()
            grace = self._grace
            if grace is None:
                await self._grace_moved.wait()
                continue
            delay = grace.until - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._grace_moved.wait(), delay)
                continue
            self._grace = None
            assert self._answered is not None
            self._bundle = self._answered
            log.info("grace over: the replaced CA's roots are no longer trusted")
            if self._check_chain():
                # The control plane has not re-signed our leaf within the grace.
                self.chain_breaks += 1
                log.error(
                    "%s after the roots changed (the replaced CA's grace is over); fetching a "
                    "new leaf now",
                    self._problem,
                )
                self._roots_moved.set()
            await self._publish()

    def _switching(self, leaf: Leaf | None) -> bool:
        """`leaf` is the one the CA switch in progress is replacing."""
        return leaf is not None and self._grace is not None and leaf.serial == self._switch_from

    async def _until_adopt(self) -> None:
        """Holds a leaf of the new CA until the switch's adoption time, so that every peer
        trusts the new root by the time we present it."""
        grace = self._grace
        if grace is not None and (delay := grace.adopt_at - self._clock()) > 0:
            await asyncio.sleep(delay)

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
                and not self._problem
            ):
                await self._wait_until(self._renew_at)
            self._roots_moved.clear()
            current = self._leaf
            bundle = self._bundle
            assert bundle is not None
            # A held leaf that does not chain is worth nothing: ask for one at once (a
            # non-blocking query: Consul's agent then revalidates its cached leaf).
            broken = current is not None and bool(self._problem)
            # Our leaf is from a replaced CA: ask at once too (a blocking query would wait on
            # an index the new control plane never had), and judge the answer by the new roots.
            switching = not broken and self._switching(current)
            ask = None if broken or switching else current
            try:
                if ask is not None and self._leaf_source.blocking:
                    fresh = await self._unless(
                        self._leaf_source.fetch(ask, bundle),
                        self._roots_moved,
                        lambda: bool(self._problem),
                    )
                    if fresh is None:
                        continue  # the roots changed under the wait: decide again
                else:
                    fresh = await self._leaf_source.fetch(ask, bundle)
            except LeafError as err:
                failures += 1
                self.failures += 1
                next_try = self._retry(current, failures)
                level = logging.ERROR if isinstance(err, SourceRejected) else logging.WARNING
                log.log(
                    level,
                    "%s leaf for %s: %s; keeping the current leaf (%s), retry in %.1fs",
                    self._leaf_source.name,
                    current.service if current else "?",
                    err,
                    self._state(current),
                    next_try - self._clock(),
                )
                continue
            if self._bundle is not bundle:
                continue  # the roots changed during the fetch: judge against the new ones
            judge = self._answered if switching and self._answered is not None else bundle
            problem = chain_problem(fresh, judge, self._now())
            if problem and current is not None:
                # Consul's agent answers with the leaf it holds until its re-signing delay
                # has passed; it must not replace ours, nor stop us asking.
                self.stale_leaves += 1
                failures += 1
                next_try = self._retry(current, failures)
                log.warning(
                    "%s answered with a leaf that does not chain to the current roots (%s); "
                    "asking again in %.1fs",
                    self._leaf_source.name,
                    problem,
                    next_try - self._clock(),
                )
                self._reread_roots.set()
                continue
            if switching:
                await self._until_adopt()
                if self._bundle is not bundle and not self._switching(current):
                    continue  # the roots changed again meanwhile: decide again
            failures, next_try = 0, None
            if current is not None and not broken and not switching:
                if fresh.serial == current.serial:
                    continue  # a blocking query that ran out of wait
                # A higher ModifyIndex is Consul's word that the leaf is newer, even when it
                # expires earlier (LeafCertTTL was lowered); only an unindexed source is
                # judged by expiry. Ignoring it would re-ask at once, forever.
                newer = fresh.index > current.index if fresh.index else False
                if not newer and not should_replace(current.validity, fresh.validity):
                    log.warning("%s returned an older leaf; ignored", self._leaf_source.name)
                    next_try = self._retry(current, 1)
                    continue
            self._leaf = fresh
            self._renew_at = renew_at(fresh.validity, self._draw(), self._policy)
            if current is not None:
                self.renewals += 1
            self._check_chain()
            log.info(
                "leaf for %s from %s: serial %s, valid until %s%s",
                fresh.service,
                fresh.source,
                fresh.serial,
                fresh.valid_before.isoformat(),
                "; it replaces a leaf that no longer chained to the roots" if broken else "",
            )
            if self._problem:
                log.error("%s; asking again", self._problem)
                failures = 1
                next_try = self._retry(fresh, failures)
            await self._publish()

    def _retry(self, current: Leaf | None, failures: int) -> float:
        validity = current.validity if current else Validity(0, 0)
        return retry_at(validity, self._clock(), failures, self._draw(), self._policy)

    def _state(self, current: Leaf | None) -> str:
        if current is None:
            return Health.EXPIRED.value
        if self._problem:
            return "not chaining to the roots"
        return health(current.validity, self._clock(), self._policy).value

    async def _unless(
        self, call: Awaitable[T], event: asyncio.Event, still: Callable[[], bool]
    ) -> T | None:
        """`call`'s result, or None once `event` is set while `still()` holds (the call is
        then cancelled). Errors of `call` propagate."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                waiter = asyncio.ensure_future(event.wait())
                try:
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if task.done():
                    return task.result()
                if still():
                    return None
                event.clear()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _needs_new_root(self, leaf: Leaf) -> bool:
        return self._bundle is not None and leaf.issuer != self._bundle.active_subject

    async def _wait_until(self, at: float) -> None:
        """Sleep until `at` (wall clock, as certificates are), or until the roots rotate."""
        delay = at - self._clock()
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._roots_moved.wait(), delay)
