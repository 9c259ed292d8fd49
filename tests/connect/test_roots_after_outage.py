"""The control plane down, then back empty with a new CA (issue 14, the routing fault's 503s).

A rotator whose roots read failed waits out a backoff that grows to the policy's cap (60 s by
default). Each sidecar's backoff ends at its own time, so after Consul came back with a new
CA, one sidecar could hold the new roots and leaf while a peer still held the old ones for
up to that long, and each refused the other's certificate: the fault suite saw web dialling
api-3 (already re-signed) fail `unable to get local issuer certificate` for 14 s, and every GET
routed to api-3's subset answered 503 `no healthy upstream`. Told that Consul is back
(`consul_back`, from the agent's shared connectivity), the rotator reads the roots at once.

devstack over real HTTP: the first server stopped, a second one (a new CA and trust domain)
started on the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.leaf import Material
from connect.leaf_chain import chain_problem
from connect.leaf_rotation import LeafRotator
from connect.renewal import Policy
from devstack.config import DevConfig
from devstack.server import DevServer

HOUR = 3600.0
"""A backoff no test waits out: only `consul_back()` ends it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _until(rotator: LeafRotator, done: object) -> Material:
    material = rotator.current
    assert material is not None
    while not done(material):  # type: ignore[operator]
        material = await rotator.changed(material.generation)
    return material


class _RootsFailed(logging.Handler):
    """Sets `failed` once the rotator logs a failed roots read (it then waits its backoff)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("roots:"):
            self.failed.set()


async def test_a_roots_read_in_backoff_is_made_at_once_when_consul_is_back() -> None:
    roots_failed = _RootsFailed()
    rotation_log = logging.getLogger("meshlet.connect.rotation")
    rotation_log.addHandler(roots_failed)
    addr = f"127.0.0.1:{_free_port()}"
    first = DevServer(DevConfig(http_addr=addr))
    await first.start()
    second: DevServer | None = None
    async with ConsulClient(ConsulConfig(address=addr, timeout=5.0)) as consul:
        rotator = LeafRotator(
            consul_leaf_source(consul, "web"),
            consul_roots_source(consul),
            policy=Policy(backoff_base=HOUR, backoff_cap=HOUR),
        )
        task = asyncio.create_task(rotator.run())
        try:
            before = await asyncio.wait_for(rotator.ready(), 20)
            await first.close()
            # The roots read failed and waits out its (hour-long) backoff.
            await asyncio.wait_for(roots_failed.failed.wait(), 30)
            second = DevServer(DevConfig(http_addr=addr))
            await second.start()
            rotator.consul_back()

            def renewed(m: Material) -> bool:
                now = datetime.datetime.now(datetime.UTC)
                # The new CA's leaf (the old one stays for a while: connect.ca_switch).
                return m.bundle.trust_domain != before.bundle.trust_domain and (
                    m.leaf.service_uri.find(m.bundle.trust_domain) > 0
                    and not chain_problem(m.leaf, m.bundle, now)
                )

            after = await asyncio.wait_for(_until(rotator, renewed), 30)
            assert after.leaf.serial != before.leaf.serial
            assert not rotator.problem()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if second is not None:
                await second.close()
            rotation_log.removeHandler(roots_failed)
