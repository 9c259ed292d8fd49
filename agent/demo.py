"""`meshlet demo`: the mesh, end to end, on devstack.

It starts devstack and two real HTTP apps, `web` and `api`, then runs a `meshlet sidecar`
process beside each. web's app would call api through its sidecar's local upstream port; the
demo plays that app: every second it sends a request there. The request travels over mutual
TLS (leaves from devstack's Connect CA) to api's sidecar, which checks Consul's intentions and
forwards to api's app with X-Forwarded-Client-Cert. Midway the demo writes a deny intention to
Consul (web -> api), and the next requests get 403; then an allow, and they pass again.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from agent.consul import ConsulClient
from agent.consul_config import ConsulConfig
from agent.consul_errors import ConsulError

PHASE = 5.0  # seconds of traffic before each intention change
READY_WITHIN = 60.0


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class DemoApp:
    """A real HTTP service that says who it is and who called it (from the sidecar's XFCC)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hello(self, request: web.Request) -> web.Response:
        xfcc = request.headers.get("X-Forwarded-Client-Cert", "")
        uri = next((p[4:] for p in xfcc.split(";") if p.startswith("URI=")), "")
        caller = uri.rpartition("/svc/")[2] or "unknown"
        return web.Response(text=f"hello from {self.name}; mTLS caller (XFCC): {caller} ({uri})")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def _sidecar_config(
    consul: str, app: DemoApp, sidecar_port: int, admin: str, upstreams: str
) -> str:
    return (
        f"consul: {{address: '{consul}'}}\n"
        f"service:\n  name: {app.name}\n  port: {app.port}\n  address: 127.0.0.1\n"
        f"  check: {{http: 'http://127.0.0.1:{app.port}/health', interval: 1s}}\n"
        f"sidecar:\n  port: {sidecar_port}\n  protocol: http\n  upstreams: {upstreams}\n"
        f"admin: {{address: '{admin}'}}\n"
        "shutdown: {drain_period: 0s}\n"
    )


@contextlib.asynccontextmanager
async def _sidecar(config: Path, log: Path) -> AsyncIterator[None]:
    meshlet = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"
    with log.open("w") as out:
        proc = await asyncio.create_subprocess_exec(
            meshlet, "sidecar", "-c", str(config), stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_ready(http: aiohttp.ClientSession, admin: str, name: str, log: Path) -> None:
    """Poll the sidecar's /ready (it has no push channel to wait on)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_WITHIN
    while loop.time() < deadline:
        try:
            async with http.get(f"http://{admin}/ready") as resp:
                if resp.status == 200:
                    _say(f"  {name}'s sidecar is ready (leaf held, listeners up, registered)")
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{name}'s sidecar not ready within {READY_WITHIN:.0f}s; see {log}")


async def _until_api_healthy(consul: ConsulClient) -> None:
    """Wait (blocking queries) until api's sidecar passes its checks, as web's sees it."""
    index = 0
    while True:
        result = await consul.health.connect("api", passing=True, index=index, wait="30s")
        if result.value:
            _say("  api's sidecar is healthy in Consul: web's sidecar now has an endpoint")
            return
        index = result.next_index


async def _traffic(http: aiohttp.ClientSession, port: int) -> None:
    n = 0
    while True:
        n += 1
        try:
            async with http.get(f"http://127.0.0.1:{port}/") as resp:
                body = (await resp.text()).strip()
                _say(f"  web -> api #{n}: {resp.status} {body[:110]}")
        except aiohttp.ClientError as err:
            _say(f"  web -> api #{n}: failed: {err}")
        await asyncio.sleep(1.0)


async def _intentions(consul: ConsulClient, stop: asyncio.Event, *, once: bool) -> None:
    for action in ("deny", "allow"):
        await asyncio.sleep(PHASE)
        entry = {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [{"Name": "web", "Action": action}],
        }
        await consul.config_entries.put(entry)
        _say(f"==> intention written to Consul: web -> api {action.upper()}")
    if once:
        await asyncio.sleep(PHASE)
        stop.set()


async def demo(http_addr: str, duration: float, *, once: bool = False) -> int:
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
    dev = DevServer(config)
    try:
        await dev.start()
    except OSError as err:
        await dev.close()
        _say(f"meshlet demo: cannot listen on {http_addr}: {err.strerror}")
        return 1
    apps = [DemoApp("web"), DemoApp("api")]
    try:
        _say(f"==> devstack (Consul-compatible) at {dev.http_url}  (UI: {dev.http_url}/ui/)")
        for app in apps:
            await app.start()
        async with (
            ConsulClient(ConsulConfig(address=dev.http_addr)) as consul,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        ):
            await _run_mesh(dev.http_addr, consul, http, apps, stop, once=once)
    except (ConsulError, RuntimeError) as err:
        _say(f"meshlet demo: {err}")
        return 1
    finally:
        for app in apps:
            await app.stop()
        await dev.close()
    _say("==> demo stopped")
    return 0


async def _run_mesh(
    consul_addr: str,
    consul: ConsulClient,
    http: aiohttp.ClientSession,
    apps: list[DemoApp],
    stop: asyncio.Event,
    *,
    once: bool,
) -> None:
    web_app, api_app = apps
    # L7 intentions need an HTTP-family protocol for api, as Consul requires.
    await consul.config_entries.put({"Kind": "service-defaults", "Name": "api", "Protocol": "http"})
    upstream_port = _free_port()
    admins = {"web": f"127.0.0.1:{_free_port()}", "api": f"127.0.0.1:{_free_port()}"}
    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        work = Path(tmp)
        (work / "api.yaml").write_text(
            _sidecar_config(consul_addr, api_app, _free_port(), admins["api"], "[]")
        )
        (work / "web.yaml").write_text(
            _sidecar_config(
                consul_addr,
                web_app,
                _free_port(),
                admins["web"],
                f"[{{name: api, local_bind_port: {upstream_port}, protocol: http}}]",
            )
        )
        _say("==> starting a `meshlet sidecar` for api and for web")
        async with (
            _sidecar(work / "api.yaml", work / "api.log"),
            _sidecar(work / "web.yaml", work / "web.log"),
        ):
            for name in ("api", "web"):
                await _until_ready(http, admins[name], name, work / f"{name}.log")
            await _until_api_healthy(consul)
            _say(
                f"==> web's app calls api at 127.0.0.1:{upstream_port} (plaintext); the sidecars "
                "carry it over mTLS and enforce Consul's intentions (Ctrl-C to stop)"
            )
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(_traffic(http, upstream_port)),
                    tg.create_task(_intentions(consul, stop, once=once)),
                ]
                await stop.wait()
                for task in tasks:
                    task.cancel()
