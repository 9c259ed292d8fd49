"""agent.watches.BlockingWatch against devstack over real HTTP: a config-entry watch (what the
per-upstream discovery-chain watch will be) built from a fetch and a decoder only, with its
last-known-good value, rejection counting, index handling and backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from agent.connectivity import Connectivity
from agent.consul import ConsulClient, Indexed
from agent.consul_config import ConsulConfig
from agent.watches import AnswerRejected, BlockingWatch, WatchSettings
from connect.latest import backoff
from devstack.server import DevServer

DEADLINE = 10.0
FAST = WatchSettings(wait=5.0, retry_initial=0.01, retry_max=0.05)


@dataclass(frozen=True, slots=True)
class Defaults:
    """What an upstream would take from its service-defaults entry."""

    protocol: str


def decode_defaults(entry: Mapping[str, Any], index: int) -> Defaults:
    protocol = entry.get("Protocol", "tcp") or "tcp"
    if protocol not in ("tcp", "http", "http2", "grpc"):
        raise AnswerRejected(f"service-defaults {entry.get('Name')}: protocol {protocol!r}")
    return Defaults(protocol)


def defaults_watch(
    consul: ConsulClient, name: str, connectivity: Connectivity | None = None
) -> BlockingWatch[Mapping[str, Any], Defaults | None]:
    async def fetch(index: int, wait: float) -> Indexed[Mapping[str, Any]]:
        return await consul.config_entries.get("service-defaults", name, index=index, wait=wait)

    return BlockingWatch(
        f"service-defaults {name}",
        fetch,
        decode_defaults,
        None,
        lambda: FAST,
        connectivity=connectivity,
        rng=random.Random(7),
    )


@contextlib.asynccontextmanager
async def running(watch: BlockingWatch[Any, Any]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(watch.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def put(consul: ConsulClient, **fields: Any) -> None:
    assert await consul.config_entries.put({"Kind": "service-defaults", "Name": "api", **fields})


async def until(predicate: Any) -> None:
    async def poll() -> None:
        # WatchState is a plain value with no event to wait on; a bounded poll is the wait.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), DEADLINE)


async def test_a_config_entry_watch_publishes_changes_and_keeps_the_last_good_value(
    dev: DevServer, consul: ConsulClient
) -> None:
    await put(consul, Protocol="http")
    watch = defaults_watch(consul, "api")
    async with running(watch):
        version, value = await asyncio.wait_for(watch.latest.changed(0), DEADLINE)
        assert value == Defaults("http")
        assert watch.state.loaded and watch.state.failures == 0
        first_index = watch.state.index
        assert first_index >= 1

        # An answer the decoder refuses: rejected whole, the last good value stays.
        await put(consul, Protocol="carrier-pigeon")
        await until(lambda: watch.state.rejected == 1)
        assert watch.latest.get() == Defaults("http")
        assert watch.latest.version == version
        assert "carrier-pigeon" in watch.state.last_error
        assert watch.state.stale_since is not None

        # Fixed: published, healthy again, the rejection still counted.
        await put(consul, Protocol="tcp")
        version, value = await asyncio.wait_for(watch.latest.changed(version), DEADLINE)
        assert value == Defaults("tcp")
        await until(lambda: watch.state.failures == 0)
        healthy = watch.state
        assert healthy.index > first_index
        assert healthy.last_error == "" and healthy.stale_since is None
        assert healthy.rejected == 1
        assert healthy.last_success is not None


async def test_a_missing_entry_is_an_error_until_it_exists(
    dev: DevServer, consul: ConsulClient
) -> None:
    watch = defaults_watch(consul, "api")
    async with running(watch):
        await until(lambda: watch.state.failures >= 2)
        assert watch.latest.get() is None and not watch.state.loaded
        assert "not found" in watch.state.last_error.lower()
        await put(consul, Protocol="grpc")
        _, value = await asyncio.wait_for(watch.latest.changed(0), DEADLINE)
        assert value == Defaults("grpc")


async def test_an_index_that_went_backwards_starts_over(
    dev: DevServer, consul: ConsulClient
) -> None:
    await put(consul, Protocol="http")
    watch = defaults_watch(consul, "api")
    assert await watch.step(0, 1.0) >= 1
    # As after a snapshot restore: the index we hold is ahead of Consul's.
    assert await watch.step(watch.state.index + 1000, 0.05) == 0
    assert watch.latest.get() == Defaults("http")
    assert watch.latest.version == 2  # a reset answer is decoded and published again


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_consul_unreachable_is_retried_with_backoff_and_reported() -> None:
    connectivity = Connectivity(lambda: 0.0)
    config = ConsulConfig(address=f"127.0.0.1:{_closed_port()}", timeout=1.0)
    async with ConsulClient(config) as consul:
        watch = defaults_watch(consul, "api", connectivity)
        async with running(watch):
            await until(lambda: watch.state.failures >= 3)
        assert watch.latest.get() is None
        assert not watch.state.loaded
        assert watch.state.stale_since is not None
        assert connectivity.state.reachable is False


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
def test_backoff_doubles_to_its_cap_with_equal_jitter(draw: float) -> None:
    assert backoff(0, 0.2, 5.0, draw) == 0.0
    for failures in range(1, 12):
        ceiling = min(5.0, 0.2 * 2 ** (failures - 1))
        got = backoff(failures, 0.2, 5.0, draw)
        assert ceiling / 2 <= got <= ceiling
