"""Two sidecars keep verifying each other while they switch, at different times, to the new CA
of a control plane restarted empty (issue 14: the routing fault test lost a GET in the ~1 s
between two sidecars' switches).

devstack over real HTTP: the first server stopped, a second one (a new CA and trust domain, no
cross-signing) started on the same address; `api` is told Consul is back first, `web` later.
Real mutual TLS on 127.0.0.1 between `DynamicTLS` contexts fed by the rotators, both
directions, with the SPIFFE ID checked on both ends. Before the change `api` trusted only the
new root as soon as it read it, and refused `web`'s old leaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.ca_switch import SwitchPolicy
from connect.leaf import Material
from connect.leaf_rotation import LeafRotator
from connect.renewal import Policy
from connect.tls import DynamicTLS
from devstack.config import DevConfig
from devstack.server import DevServer
from tests.connect.identity_support import Conn, EchoService, Running

HOUR = 3600.0
"""A backoff no test waits out: only `consul_back()` ends it."""
SWITCH = SwitchPolicy(delay=5.0, jitter=0.0, grace=12.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _RootsFailures(logging.Handler):
    """Counts the rotators' failed roots reads (each then waits its hour-long backoff)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.more = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("roots:"):
            self.count += 1
            self.more.set()

    async def at_least(self, n: int) -> None:
        while self.count < n:
            self.more.clear()
            await self.more.wait()


async def _start(consul: ConsulClient, service: str) -> Running:
    rotator = LeafRotator(
        consul_leaf_source(consul, service),
        consul_roots_source(consul),
        policy=Policy(backoff_base=HOUR, backoff_cap=HOUR),
        switch=SWITCH,
    )
    task = asyncio.create_task(rotator.run())
    first = await asyncio.wait_for(rotator.ready(), 20)
    tls = DynamicTLS(first)
    generations = [first]

    async def follow() -> None:
        while True:
            material = await rotator.changed(tls.material.generation)
            tls.update(material)
            generations.append(material)

    return Running(rotator, tls, task, asyncio.create_task(follow()), generations)


async def _until(run: Running, done: Callable[[Material], bool]) -> None:
    """Until the material `run`'s contexts are built from satisfies `done`."""
    while True:
        material: Material = run.tls.material
        if done(material):
            return
        await run.rotator.changed(material.generation)


async def _exchange(client: Running, server: EchoService) -> str:
    """One request from `client` to `server` over mutual TLS, the server's SPIFFE ID checked
    by the client too; the serial of the leaf the server presented."""
    conn = await Conn.open(server.port, client.tls.client())
    try:
        client.tls.peer(conn.ssl_object())
        return (await conn.request()).decode()
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _two_sidecars(addr: str) -> AsyncIterator[tuple[Running, Running]]:
    async with (
        ConsulClient(ConsulConfig(address=addr, timeout=5.0)) as consul_api,
        ConsulClient(ConsulConfig(address=addr, timeout=5.0)) as consul_web,
    ):
        runs = [await _start(consul_api, "api"), await _start(consul_web, "web")]
        try:
            yield runs[0], runs[1]
        finally:
            for run in runs:
                for t in (run.follower, run.task):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t


async def test_two_sidecars_switching_at_different_times_keep_verifying_each_other() -> None:
    failures = _RootsFailures()
    rotation_log = logging.getLogger("meshlet.connect.rotation")
    rotation_log.addHandler(failures)
    addr = f"127.0.0.1:{_free_port()}"
    first = DevServer(DevConfig(http_addr=addr))
    await first.start()
    second: DevServer | None = None
    try:
        async with (
            _two_sidecars(addr) as (api, web),
            EchoService(api.tls) as api_svc,
            EchoService(web.tls) as web_svc,
        ):

            async def both_ways() -> str:
                await _exchange(api, web_svc)
                return await _exchange(web, api_svc)

            old_serial = await both_ways()
            old_td = api.tls.trust_domain
            await first.close()
            await asyncio.wait_for(failures.at_least(2), 30)
            second = DevServer(DevConfig(http_addr=addr))
            await second.start()

            # api reads the new roots first: it trusts both CAs, still presents its old leaf.
            api.rotator.consul_back()
            await asyncio.wait_for(_until(api, lambda m: m.bundle.grace_until > 0), 30)
            assert api.tls.trust_domain != old_td
            assert await both_ways() == old_serial

            # web reads them later, while api has not switched its leaf yet.
            web.rotator.consul_back()
            await asyncio.wait_for(_until(web, lambda m: m.bundle.grace_until > 0), 30)
            assert await both_ways() == old_serial

            # Each presents a leaf of the new CA after the delay; peers accept it throughout.
            new_td = api.tls.trust_domain
            for run in (api, web):
                await asyncio.wait_for(
                    _until(run, lambda m: f"//{new_td}/" in m.leaf.service_uri), 30
                )
                assert await both_ways() != old_serial

            assert api_svc.refusals == web_svc.refusals == []

            # The grace ends: the old roots are trusted no more. A client presenting web's old
            # leaf (and trusting the new roots, so only api's verdict counts) is refused.
            for run in (api, web):
                await asyncio.wait_for(_until(run, lambda m: m.bundle.grace_until == 0), 30)
            assert await both_ways() != old_serial
            current = web.tls.material
            old_leaf = DynamicTLS(Material(web.generations[0].leaf, current.bundle, 1))
            with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
                conn = await Conn.open(api_svc.port, old_leaf.client())
                with contextlib.suppress(OSError, ConnectionError):
                    await conn.request()
                await conn.close()
            await asyncio.wait_for(api_svc.refused.wait(), 10)
            assert len(api_svc.refusals) == 1, api_svc.refusals

            assert api.rotator.ca_switches == web.rotator.ca_switches == 1
            assert api.rotator.chain_breaks == web.rotator.chain_breaks == 0
    finally:
        if second is not None:
            await second.close()
        rotation_log.removeHandler(failures)
