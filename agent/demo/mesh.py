"""The demo's `meshlet sidecar` processes: one per app instance, all in one process group.

Each sidecar is a real `meshlet sidecar -c FILE` process with its config in the demo's temp
directory. They share one process group, led by the first, so that stopping the demo stops
every one of them with one signal (SIGTERM, then SIGKILL after a grace), and a Ctrl-C at the
terminal reaches only the demo, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.demo.apps import DemoApp

STOP_GRACE = 10.0


def free_ports(n: int) -> list[int]:
    """n distinct ports free now: each socket stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


@dataclass(frozen=True)
class Upstream:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Sidecar:
    """One app instance and the sidecar in front of it."""

    app: DemoApp
    service_id: str
    upstreams: tuple[Upstream, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    """The public mTLS listener."""
    admin: str = ""
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None

    @property
    def label(self) -> str:
        return self.service_id

    def upstream(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)

    def config(self, consul: str) -> str:
        app = self.app
        meta = "".join(f"\n    {k}: '{v}'" for k, v in self.meta.items())
        upstreams = "".join(
            f"\n    - {{name: {u.name}, local_bind_port: {u.port}, protocol: http}}"
            for u in self.upstreams
        )
        return (
            f"consul: {{address: '{consul}'}}\n"
            f"service:\n  name: {app.name}\n  id: {self.service_id}\n  port: {app.port}\n"
            "  address: 127.0.0.1\n"
            + (f"  meta:{meta}\n" if meta else "")
            + f"  check: {{http: 'http://127.0.0.1:{app.port}/health', interval: 1s}}\n"
            f"sidecar:\n  port: {self.port}\n  protocol: http\n"
            + (f"  upstreams:{upstreams}\n" if upstreams else "  upstreams: []\n")
            + f"admin: {{address: '{self.admin}'}}\n"
            "shutdown: {drain_period: 0s}\n"
        )

    def ports(self) -> list[int]:
        return [self.port, int(self.admin.rpartition(":")[2]), *(u.port for u in self.upstreams)]


# Loaded before any fork: the child only calls into it.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _in_group(group: int) -> None:
    """In the child, before exec: join the demo's process group (uvloop has no
    process_group argument) and, on Linux, be sent SIGTERM if the demo dies without
    stopping it (killed with SIGKILL, say), so that not even then is a sidecar left behind."""
    os.setpgid(0, group)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def meshlet_command() -> str:
    """The `meshlet` script beside this interpreter (the venv's), else the one on PATH."""
    return shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"


@contextlib.asynccontextmanager
async def running(
    sidecars: Sequence[Sidecar], consul: str, work: Path
) -> AsyncIterator[Sequence[Sidecar]]:
    """Start every sidecar (one process group); on exit stop the group and reap each."""
    group = 0
    try:
        for side in sidecars:
            config = work / f"{side.service_id}.yaml"
            config.write_text(side.config(consul))
            side.log = work / f"{side.service_id}.log"
            with side.log.open("w") as out:
                side.proc = await asyncio.create_subprocess_exec(
                    meshlet_command(),
                    "sidecar",
                    "-c",
                    str(config),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    preexec_fn=functools.partial(_in_group, group),
                )
            group = group or side.proc.pid
        yield sidecars
    finally:
        await _stop(group, [s.proc for s in sidecars if s.proc is not None])


async def _stop(group: int, procs: Sequence[asyncio.subprocess.Process]) -> None:
    if not group:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    waits = asyncio.gather(*(p.wait() for p in procs))
    try:
        await asyncio.wait_for(asyncio.shield(waits), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        await waits


async def status(http: aiohttp.ClientSession, side: Sidecar) -> Mapping[str, Any]:
    """The sidecar's /v1/status; an empty mapping when it does not answer."""
    try:
        async with http.get(f"http://{side.admin}/v1/status") as resp:
            if resp.status == 200:
                body: Mapping[str, Any] = await resp.json()
                return body
    except (aiohttp.ClientError, ValueError):
        pass
    return {}


def proxy_upstreams(state: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    upstreams: Mapping[str, Mapping[str, Any]] = (state.get("proxy") or {}).get("upstreams") or {}
    return upstreams


async def until_ready(
    http: aiohttp.ClientSession,
    sidecars: Sequence[Sidecar],
    expected: Mapping[str, int],
    within: float,
) -> None:
    """Until every sidecar answers /ready and holds `expected` endpoints per upstream name.

    Polling: a sidecar has no channel to push its state on. Raises RuntimeError naming what
    is still missing, and the sidecar's log, when `within` seconds pass first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    waiting: dict[str, str] = {s.label: "not started" for s in sidecars}
    while waiting:
        if loop.time() > deadline:
            raise RuntimeError(
                f"sidecars not ready within {within:.0f}s: "
                + "; ".join(f"{name}: {why}" for name, why in waiting.items())
            )
        for side in sidecars:
            if side.label not in waiting:
                continue
            if side.proc is not None and side.proc.returncode is not None:
                raise RuntimeError(
                    f"{side.label}'s sidecar exited with status {side.proc.returncode}; "
                    f"see {side.log}"
                )
            why = await _not_ready(http, side, expected)
            if why:
                waiting[side.label] = why
            else:
                del waiting[side.label]
        await asyncio.sleep(0.2)


async def _not_ready(
    http: aiohttp.ClientSession, side: Sidecar, expected: Mapping[str, int]
) -> str:
    try:
        async with http.get(f"http://{side.admin}/ready") as resp:
            if resp.status != 200:
                return f"/ready answered {resp.status} (see {side.log})"
    except aiohttp.ClientError:
        return f"admin not answering yet (see {side.log})"
    held = proxy_upstreams(await status(http, side))
    for up in side.upstreams:
        have = int((held.get(up.name) or {}).get("endpoints") or 0)
        if have < expected[up.name]:
            return f"upstream {up.name} has {have} of {expected[up.name]} endpoints"
    return ""
