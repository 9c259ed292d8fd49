"""`meshlet demo`: the mesh's control-plane loop, end to end, on devstack.

It starts devstack, two real HTTP services (`web` and `api`) on loopback, registers each with
a sidecar and an HTTP health check through meshlet's own Consul client, then watches `api`'s
healthy endpoints with blocking queries, as the agent does for every upstream. Midway it makes
one `api` instance fail its health check, so the watch can be seen dropping it and taking it
back. The proxy, certificates and policy join the demo as they are built.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_errors import ConsulError
from agent.consul_services import CheckDefinition, ServiceRegistration, SidecarService

FLIP_AFTER = 4.0  # seconds before the demo makes one api instance unhealthy


class DemoApp:
    """A real HTTP service whose /health answer can be flipped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {self.name}\n")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok\n")


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def _apps(names: list[str]) -> AsyncIterator[list[DemoApp]]:
    apps = [DemoApp(n) for n in names]
    try:
        for app in apps:
            await app.start()
        yield apps
    finally:
        for app in apps:
            await app.stop()


async def _register(consul: ConsulClient, app: DemoApp, service: str) -> None:
    await consul.agent.register_service(
        ServiceRegistration(
            name=service,
            id=app.name,
            port=app.port,
            address="127.0.0.1",
            checks=(
                CheckDefinition(
                    name=f"{app.name} /health",
                    http=f"http://127.0.0.1:{app.port}/health",
                    interval="1s",
                    timeout="1s",
                ),
            ),
            sidecar=SidecarService(),
        )
    )
    _say(f"  registered {app.name} ({service}) at 127.0.0.1:{app.port} with a sidecar")


async def _watch(consul: ConsulClient, service: str) -> None:
    index = 0
    last: tuple[str, ...] | None = None
    while True:
        result = await consul.health.service(service, passing=True, index=index, wait="5s")
        index = result.next_index
        endpoints = tuple(sorted(f"{e.service_id}@{e.address}:{e.port}" for e in result.value))
        if endpoints != last:
            _say(f"  [index {result.index}] healthy {service}: {', '.join(endpoints) or 'none'}")
            last = endpoints


async def _scenario(apps: list[DemoApp]) -> None:
    victim = apps[-1]
    await asyncio.sleep(FLIP_AFTER)
    _say(f"  -> {victim.name} starts failing its health check")
    victim.healthy = False
    await asyncio.sleep(FLIP_AFTER)
    _say(f"  -> {victim.name} recovers")
    victim.healthy = True


async def demo(http_addr: str, duration: float) -> int:
    from devstack.config import DevConfig, DevConfigError
    from devstack.server import DevServer

    try:
        config = DevConfig(http_addr=http_addr)
    except DevConfigError as err:
        _say(f"meshlet demo: {err}")
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if duration > 0:
        loop.call_later(duration, stop.set)
    try:
        dev = DevServer(config)
        await dev.start()
    except OSError as err:
        _say(f"meshlet demo: cannot listen on {http_addr}: {err.strerror}")
        return 1
    try:
        _say(f"==> devstack (Consul-compatible) at {dev.http_url}  (UI: {dev.http_url}/ui/)")
        async with (
            ConsulClient(ConsulConfig(address=dev.http_addr)) as consul,
            _apps(["web-1", "api-1", "api-2"]) as apps,
        ):
            for app in apps:
                await _register(consul, app, app.name.rsplit("-", 1)[0])
            _say("==> watching api's healthy endpoints with blocking queries (Ctrl-C to stop)")
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(_watch(consul, "api")),
                    tg.create_task(_scenario(apps)),
                ]
                await stop.wait()
                for task in tasks:
                    task.cancel()
    except ConsulError as err:
        _say(f"meshlet demo: Consul call failed: {err}")
        return 1
    finally:
        await dev.close()
    _say("==> demo stopped")
    return 0
