"""A chain target's endpoints across a control-plane reset (issue 14), and a new target whose
watch never answers (Envoy's initial_fetch_timeout), against real devstacks over real HTTP.

The sidecar reaches Consul through a relay the test points at one devstack, at nothing (the
control plane down: every watch fails), then at a second devstack prepared beforehand (the
control plane back with its state replaced). The second one's index for the api service is
already past the first one's, as a restarted Consul's is once enough registrations happened,
so the v2 target's own watch cannot see that the index went backwards: only the entry
watches (whose indexes did go back) can say Consul was reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from agent.catalog import WatchKey
from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.routing import ChainWatch
from agent.watches import WatchSettings
from connect.chain_routes import RoutingSnapshot
from connect.latest import Latest
from devstack.server import DevServer
from tests.agent.conftest import SocketServer
from tests.agent.test_routing import CANARY, _proxy, _put

# Long enough that the snapshot after the reset is taken within it on a loaded machine (CI ran
# this with 2 s and once saw the hold end first); the test waits it out once, at the end.
HOLD = 8.0
SETTINGS = WatchSettings(wait=1.0, retry_initial=0.05, retry_max=0.2, reset_hold=HOLD)
V1, V2 = "v1.api.default.default.dc1", "v2.api.default.default.dc1"
V2_KEY = WatchKey("api", "", "", 'Service.Meta.version == "v2"', warning=True)


class Switch:
    """Where the relay sends each new connection; `down()` refuses them all. While `held`
    is set, a read whose request line names `held_path` waits until `release` is set: the
    test decides which watches read the new Consul first."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.held_path = b""
        self.release = asyncio.Event()

    def down(self) -> None:
        self.target = ""

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.target:
            return  # closed at once: nothing listens behind it
        host, _, port = self.target.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def requests() -> None:
            try:
                # The client's reads are GETs: each chunk holds whole request heads.
                while data := await reader.read(65536):
                    if self.held_path and b" " + self.held_path in data:
                        await self.release.wait()
                    up_writer.write(data)
                    await up_writer.drain()
            except OSError:
                pass
            finally:
                up_writer.close()

        async def answers() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        await asyncio.gather(requests(), answers())


async def _until(
    latest: Latest[RoutingSnapshot | None], done: Callable[[RoutingSnapshot], bool]
) -> RoutingSnapshot:
    version, snap = latest.version, latest.get()
    while snap is None or not done(snap):
        version, snap = await asyncio.wait_for(latest.changed(version), 30)
    return snap


def _hosts(snap: RoutingSnapshot, tid: str) -> list[str]:
    return sorted(t.host for t in snap.endpoints[tid])


@pytest.fixture
async def devstacks() -> AsyncIterator[tuple[DevServer, DevServer]]:
    async with DevServer() as first, DevServer() as second:
        yield first, second


async def _client(addr: str) -> ConsulClient:
    return ConsulClient(ConsulConfig(address=addr, timeout=5.0))


async def _all_failed(chains: ChainWatch, *targets: WatchKey) -> None:
    """Until (bounded) every entry watch and `targets` failed a read: the control plane is
    down for all of them before it comes back."""
    for _ in range(1500):
        states = [w.state for w in chains.entries.values()]
        states += [chains.targets[k][0].state for k in targets]
        if all(st.failures for st in states):
            return
        await asyncio.sleep(0.02)  # polling watch states; the bound only catches a hang
    raise AssertionError(f"watches never failed: {chains.status()}")


async def _release_when(switch: Switch, done: Callable[[], bool]) -> None:
    for _ in range(3000):
        if done():
            switch.release.set()
            return
        await asyncio.sleep(0.01)  # polling the watches; the bound only catches a hang
    raise AssertionError("the watches let through never got there")


@pytest.mark.parametrize("first_back", ["entries", "targets"])
async def test_a_targets_empty_answer_after_a_reset_keeps_its_endpoints_for_the_hold(
    devstacks: tuple[DevServer, DevServer], first_back: str
) -> None:
    """`first_back`: which watches read the new Consul first. "entries": the reset is seen
    while the v2 target still holds its answer from before (which must not count as the
    target being back: CI saw v2 emptied so); "targets": v2's empty answer comes while the
    entry watches cannot tell yet whether Consul was reset."""
    first, second = devstacks
    switch = Switch(first.http_addr)
    async with (
        SocketServer(switch.handler) as relay,
        await _client(first.http_addr) as a,
        await _client(second.http_addr) as b,
        await _client(relay.address) as consul,
    ):
        # The first control plane: other writes first, so that its entries' indexes are
        # above the ones the second gives them.
        for i in range(10):
            await a.catalog.register(_proxy("pad", 20 + i, "x"))
        await _put(a, *CANARY)
        await a.catalog.register(_proxy("api", 1, "v1"))
        await a.catalog.register(_proxy("api", 3, "v2"))
        chains = ChainWatch(consul, "web", lambda: SETTINGS)
        latest = chains.upstream("api")
        task = asyncio.create_task(chains.run())
        try:
            before = await _until(latest, lambda s: bool(s.endpoints[V1] and s.endpoints[V2]))
            assert _hosts(before, V2) == ["10.0.0.3"]

            # The second: the same entries, api-1 registered again, api-3 not yet; api's
            # index pushed past the first's by registrations (another instance's updates).
            await _put(b, *CANARY)
            await b.catalog.register(_proxy("api", 1, "v1"))
            for j in range(40):
                await b.catalog.register(_proxy("api", 9, f"other{j}"))
            old = await a.health.connect("api", filter='Service.Meta.version == "v2"')
            new = await b.health.connect("api", filter='Service.Meta.version == "v2"')
            assert new.index > old.index and new.value == ()  # the premise
            old_r = await a.config_entries.list("service-resolver")
            new_r = await b.config_entries.list("service-resolver")
            assert new_r.index < old_r.index

            switch.down()
            await first.close()
            await _all_failed(chains, V2_KEY)
            v2_watch = chains.targets[V2_KEY][0]
            if first_back == "entries":
                switch.held_path = b"/v1/health/"

                def done() -> bool:
                    return bool(chains.status()["reset_hold"])
            else:
                switch.held_path = b"/v1/config/"

                def done() -> bool:
                    got = v2_watch.latest.get()
                    return got is not None and not got.endpoints

            release = asyncio.create_task(_release_when(switch, done))
            switch.target = second.http_addr
            for _ in range(1500):  # until v2's watch took the second's empty answer
                got = v2_watch.latest.get()
                if got is not None and not got.endpoints:
                    break
                await asyncio.sleep(0.02)  # polling a watch; the bound only catches a hang
            assert not v2_watch.holding  # its own index did not go back: it cannot tell
            await asyncio.wait_for(release, 30)

            # A change after that one: api-2 joins v1. The snapshot with it still routes v2
            # to api-3 (registering again, serving meanwhile).
            await b.catalog.register(_proxy("api", 2, "v1"))
            during = await _until(latest, lambda s: _hosts(s, V1) == ["10.0.0.1", "10.0.0.2"])
            assert _hosts(during, V2) == ["10.0.0.3"], "v2 emptied right after the reset"
            assert chains.status()["reset_hold"] is True

            # api-3 never comes back: once the hold is over, Consul's answer applies.
            after = await _until(latest, lambda s: not s.endpoints[V2])
            assert _hosts(after, V1) == ["10.0.0.1", "10.0.0.2"]
            assert chains.status()["reset_hold"] is False
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_without_a_reset_a_targets_instances_leaving_apply_at_once(
    consul: ConsulClient,
) -> None:
    await _put(consul, *CANARY)
    await consul.catalog.register(_proxy("api", 1, "v1"))
    await consul.catalog.register(_proxy("api", 3, "v2"))
    chains = ChainWatch(consul, "web", lambda: SETTINGS)
    latest = chains.upstream("api")
    task = asyncio.create_task(chains.run())
    try:
        await _until(latest, lambda s: bool(s.endpoints[V1] and s.endpoints[V2]))
        await consul.catalog.deregister("node-3", service_id="api-3-sidecar-proxy")
        after = await _until(latest, lambda s: not s.endpoints[V2])
        assert _hosts(after, V1) == ["10.0.0.1"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_new_target_that_never_answers_applies_after_the_initial_fetch_timeout(
    consul: ConsulClient,
) -> None:
    """A chain change adding a target waits for the target's first answer (a warming
    cluster), but not for ever: a target whose reads keep failing (here in a datacenter
    Consul has no path to) is applied empty after the initial-fetch timeout, logged and
    counted, so the rest of the change is not held back indefinitely."""
    billing = (
        {"Kind": "service-defaults", "Name": "billing", "Protocol": "http"},
        {"Kind": "service-resolver", "Name": "billing", "Redirect": {"Datacenter": "dc2"}},
    )
    await _put(
        consul,
        *CANARY[:3],
        *billing,
        {**CANARY[3], "Splits": [{"Weight": 100, "ServiceSubset": "v1"}]},
    )
    await consul.catalog.register(_proxy("api", 1, "v1"))
    chains = ChainWatch(consul, "web", lambda: SETTINGS, initial_fetch_timeout=1.0)
    latest = chains.upstream("api")
    task = asyncio.create_task(chains.run())
    try:
        first = await _until(latest, lambda s: bool(s.endpoints[V1]))
        assert list(first.routing.targets) == [V1]
        split = {
            **CANARY[3],
            "Splits": [
                {"Weight": 90, "ServiceSubset": "v1"},
                {"Weight": 10, "Service": "billing"},
            ],
        }
        await _put(consul, split)
        far = "billing.default.default.dc2"
        after = await _until(latest, lambda s: far in s.routing.targets)
        assert after.endpoints[far] == () and _hosts(after, V1) == ["10.0.0.1"]
        assert chains.status()["initial_fetch_timeouts"] == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
