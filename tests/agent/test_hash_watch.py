"""agent.watches.HashedFetch: BlockingWatch on a hash-blocking read (/v1/agent/service/:id)
against devstack over real HTTP, with the real Consul client: a service absent then
registered, changed, refused, deregistered; a write that leaves its hash alone is not news."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from agent.consul import ConsulClient
from agent.consul_blocking import Hashed
from agent.consul_results import AgentService
from agent.watches import AnswerRejected, BlockingWatch, HashedFetch, WatchSettings
from devstack.server import DevServer
from tests.agent.test_blocking_watch import running, until

FAST = WatchSettings(wait=30.0, retry_initial=0.01, retry_max=0.05)


def tags_watch(
    consul: ConsulClient, decoded: list[tuple[str, ...] | None]
) -> BlockingWatch[AgentService | None, tuple[str, ...] | None]:
    async def read(known: str, wait: float) -> Hashed[AgentService]:
        return await consul.agent.service("web", hash=known, wait=wait)

    def decode(svc: AgentService | None, index: int) -> tuple[str, ...] | None:
        tags = svc.tags if svc is not None else None
        if tags is not None and "bad" in tags:
            raise AnswerRejected(f"web: tag 'bad' (index {index})")
        decoded.append(tags)
        return tags

    return BlockingWatch(
        "web registration",
        HashedFetch(read, absent=None, absent_poll=0.05),
        decode,
        None,
        lambda: FAST,
        rng=random.Random(3),
    )


async def register(consul: ConsulClient, *tags: str) -> None:
    await consul.agent.register_service({"Name": "web", "Port": 80, "Tags": list(tags)})


async def test_follows_the_service_through_its_hash(consul: ConsulClient, dev: DevServer) -> None:
    decoded: list[tuple[str, ...] | None] = []
    watch = tags_watch(consul, decoded)
    async with running(watch):
        await until(lambda: watch.state.loaded)
        assert watch.latest.get() is None  # not registered yet: the absent value
        await register(consul, "v1")
        await until(lambda: watch.latest.get() == ("v1",))
        # Now parked on v1's hash: a write elsewhere wakes nothing worth decoding.
        await dev.store.until_blocked()
        await consul.kv.put("unrelated", b"1")
        await dev.store.until_blocked()
        await register(consul, "v2")
        await until(lambda: watch.latest.get() == ("v2",))
        await consul.agent.deregister_service("web")
        await until(lambda: watch.latest.get() is None)
    assert decoded == [None, ("v1",), ("v2",), None]
    assert watch.state.failures == 0


async def test_a_refused_answer_keeps_the_last_good_and_waits_for_the_next(
    consul: ConsulClient, dev: DevServer
) -> None:
    decoded: list[tuple[str, ...] | None] = []
    await register(consul, "v1")
    watch = tags_watch(consul, decoded)
    async with running(watch):
        await until(lambda: watch.latest.get() == ("v1",))
        await register(consul, "bad")
        await until(lambda: watch.state.rejected == 1)
        assert watch.latest.get() == ("v1",)
        # Blocked on the refused answer's hash: it is not read and refused again.
        await dev.store.until_blocked()
        assert watch.state.rejected == 1
        await register(consul, "v3")
        await until(lambda: watch.latest.get() == ("v3",))
    assert decoded == [("v1",), ("v3",)]


@pytest.mark.parametrize("poll", [0.0, -1.0])
def test_absent_poll_must_be_positive(poll: float) -> None:
    async def read(known: str, wait: float) -> Any:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="absent_poll must be positive"):
        HashedFetch(read, absent=None, absent_poll=poll)


async def test_hash_read_blocks_until_wait(consul: ConsulClient, dev: DevServer) -> None:
    """The fetch passes the last answer's hash: Consul parks the read (devstack counts it)."""
    await register(consul, "v1")
    fetch = HashedFetch(
        lambda known, wait: consul.agent.service("web", hash=known, wait=wait),
        absent=None,
        absent_poll=1.0,
    )
    first = await fetch(0, 30.0)
    assert first.index == 1 and first.value is not None
    pending = asyncio.ensure_future(fetch(first.index, 30.0))
    await dev.store.until_blocked()
    assert not pending.done()
    await register(consul, "v2")
    second = await asyncio.wait_for(pending, 10)
    assert second.index == 2 and second.value is not None and second.value.tags == ("v2",)
