"""Mesh TLS from devstack for tests that run their own event loop (asyncio or uvloop): a
devstack with its Connect CA, and a DynamicTLS per service from the Consul leaf API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import uvloop

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_connect import consul_leaf_source, consul_roots_source
from connect.leaf_rotation import LeafRotator
from connect.tls import DynamicTLS
from devstack.config import DevConfig
from devstack.server import DevServer

LOOPS = ["asyncio", "uvloop"]


def run(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


@dataclass
class DevMesh:
    dev: DevServer
    consul: ConsulClient
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def tls(self, service: str) -> DynamicTLS:
        """The service's first leaf from the Consul leaf API (leaves live 72 h by default, so
        no rotation happens during a test unless the test makes one)."""
        source = consul_leaf_source(self.consul, service)
        rotator = LeafRotator(source, consul_roots_source(self.consul))
        self.tasks.append(asyncio.create_task(rotator.run()))
        return DynamicTLS(await asyncio.wait_for(rotator.ready(), 20))


@contextlib.asynccontextmanager
async def dev_mesh() -> AsyncIterator[DevMesh]:
    async with (
        DevServer(DevConfig()) as dev,
        ConsulClient(ConsulConfig(address=dev.http_addr, timeout=5.0)) as consul,
    ):
        mesh = DevMesh(dev, consul)
        try:
            yield mesh
        finally:
            for task in mesh.tasks:
                task.cancel()
            for task in mesh.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
