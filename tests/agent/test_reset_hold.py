"""The rule that keeps an upstream's last endpoints after a control-plane reset
(agent.watch.hold_after_reset): precise about when it holds, and never without a reset."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from agent.catalog import Endpoint, Snapshot, WatchKey, snapshot_of
from agent.connectivity import Connectivity
from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.watch import UpstreamWatcher, WatchSettings, hold_after_reset
from tests.agent.test_agent_runtime import FakeConsul, _entry

KEY = WatchKey("api")
GRACE = 60.0


def snap(n: int, index: int = 10) -> Snapshot:
    endpoints = [Endpoint("n1", f"api-{i}-sidecar", "127.0.0.1", 20000 + i) for i in range(n)]
    return snapshot_of(KEY, endpoints, index, 0.0)


def test_an_empty_answer_after_a_reset_is_held_while_the_upstream_had_endpoints() -> None:
    assert hold_after_reset(snap(2, 50), snap(0, 3), reset_at=100.0, now=100.0, grace=GRACE)
    assert hold_after_reset(snap(2, 50), snap(0, 9), reset_at=100.0, now=159.9, grace=GRACE)


def test_without_a_reset_a_deregistration_takes_effect() -> None:
    assert not hold_after_reset(snap(2, 50), snap(0, 51), reset_at=None, now=100.0, grace=GRACE)


def test_the_hold_ends_when_the_grace_has_passed() -> None:
    assert not hold_after_reset(snap(2, 50), snap(0, 9), reset_at=100.0, now=160.0, grace=GRACE)


def test_a_grace_of_zero_never_holds() -> None:
    assert not hold_after_reset(snap(2, 50), snap(0, 3), reset_at=100.0, now=100.0, grace=0.0)


def test_a_non_empty_answer_is_never_held() -> None:
    # One instance registered again: it is published (and ends the hold).
    assert not hold_after_reset(snap(2, 50), snap(1, 4), reset_at=100.0, now=101.0, grace=GRACE)


def test_nothing_to_hold_when_the_upstream_had_no_endpoints() -> None:
    assert not hold_after_reset(None, snap(0, 3), reset_at=100.0, now=101.0, grace=GRACE)
    assert not hold_after_reset(snap(0, 50), snap(0, 3), reset_at=100.0, now=101.0, grace=GRACE)


# The watcher over a real HTTP server answering a script (index, entries), as Consul would.


async def _watch(
    answers: list[tuple[int, list[dict[str, object]]]],
    clock: Callable[[FakeConsul], float] = lambda fake: 1000.0,
) -> tuple[Snapshot | None, bool, int]:
    """Run the watcher until the script is served; (published snapshot, holding, version)."""
    async with (
        FakeConsul(answers) as fake,
        ConsulClient(ConsulConfig(address=fake.address, timeout=5)) as client,
    ):
        watcher = UpstreamWatcher(
            client,
            WatchKey("api"),
            lambda: WatchSettings(wait=30.0, retry_initial=0.01, retry_max=0.02),
            Connectivity(lambda: 0.0),
            clock=lambda: clock(fake),
        )
        task = asyncio.ensure_future(watcher.run())
        try:
            await fake.asked_again.wait()
            return watcher.latest.get(), watcher.holding, watcher.latest.version
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


GOOD = [_entry("api-1-sidecar", "api"), _entry("api-2-sidecar", "api")]


async def test_restarted_empty_consul_keeps_the_last_endpoints() -> None:
    snap, holding, version = await _watch([(50, GOOD), (3, []), (4, [])])
    assert snap is not None and len(snap.endpoints) == 2 and snap.index == 50
    assert holding
    assert version == 1  # the empty answers were never published


async def test_instances_registering_again_end_the_hold() -> None:
    snap, holding, _ = await _watch([(50, GOOD), (3, []), (5, GOOD[:1])])
    assert snap is not None and [e.service_id for e in snap.endpoints] == ["api-1-sidecar"]
    assert not holding


async def test_a_deregistration_without_a_reset_takes_effect_at_once() -> None:
    snap, holding, version = await _watch([(50, GOOD), (51, [])])
    assert snap is not None and snap.endpoints == () and snap.index == 51
    assert not holding and version == 2


async def test_the_empty_answer_is_applied_once_the_grace_has_passed() -> None:
    # The reset is seen on the second answer, which the watch reads again at once (a reset
    # invalidates its memo: every entry validated afresh); 100 s pass once the fourth answer
    # (nothing new at the held index) has been served.
    snap, holding, _ = await _watch(
        [(50, GOOD), (3, []), (3, []), (3, [])],
        clock=lambda fake: 1000.0 + (100.0 if fake.served >= 4 else 0.0),
    )
    assert snap is not None and snap.endpoints == ()
    assert not holding
