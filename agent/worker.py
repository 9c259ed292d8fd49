"""One extra data-plane process of `meshlet sidecar --workers N` (the worker side).

    meshlet sidecar -c web.yaml --workers 3
      pid 100  the agent: registration, watches, admin, readiness, its own listeners,
               and the supervisor (agent/supervisor.py) of:
      pid 101  python -m agent.cli sidecar --worker-index 1 --control-fd 5 --parent-pid 100
      pid 102  python -m agent.cli sidecar --worker-index 2 --control-fd 5 --parent-pid 100

A worker runs only the proxy: its own leaf (rotated), intentions watch and one blocking query
per upstream, and the same listeners bound with SO_REUSEPORT. It registers nothing and has no
admin port. It binds only once it holds a leaf, the compiled intentions and a first answer for
every upstream, so the kernel never hands a connection to a worker that cannot serve it.

The control channel is a unix socketpair inherited as `--control-fd`, carrying JSON lines:

    parent -> worker   {"config": {...}}     the parent's running configuration (`to_raw`):
                                             first, and again after each reload (SIGHUP)
                       {"stop": "drain"}     keep serving for shutdown.drain_period, then stop
                       {"stop": "now"}       stop now (the parent's drain is over)
    worker -> parent   {"ready": bool, "problems": [...]}   whenever that changes
                       {"stats": {...}}      its proxy counters (ProxyStats), at most once a
                                             second and only when they moved

The worker never reads the file: a file edited since start, or rejected by the parent's
reload, never reaches it. Its end of the channel reaching EOF means the parent is gone: it
stops at once. On Linux it also asks the kernel for SIGTERM when the parent dies
(PR_SET_PDEATHSIG), so no worker outlives its parent even if the parent is SIGKILLed.
SIGTERM and SIGINT drain as the parent does (a second one ends the drain); SIGHUP is ignored:
reloads come from the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.catalog import Snapshot, WatchKey
from agent.config import AgentConfig, ConfigError, parse
from agent.connectivity import Connectivity
from agent.consul import ConsulClient
from agent.sidecar import Sidecar, needs_restart
from agent.watch import Latest, UpstreamWatcher, WatchSettings, watch_key

log = logging.getLogger("meshlet.agent.worker")

_PR_SET_PDEATHSIG = 1

# What a worker must not inherit: systemd talks to the main process only.
PARENT_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


# ---- the control channel's messages -----------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message; `ValueError` for anything that is not a JSON object."""
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


# ---- the process ------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> bool:
    """Ask Linux for SIGTERM when the parent exits; False when it is already gone (it may
    have died before the request was made, so the pid is checked after it)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(err))
    return os.getppid() == parent_pid


class WorkerRuntime:
    """The worker's one TaskGroup: upstream watches, the proxy, the control channel."""

    def __init__(
        self,
        index: int,
        config: AgentConfig,
        env: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.index = index
        self.config: Latest[AgentConfig] = Latest(config)
        self._env = dict(env)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.sidecar = Sidecar(
            config, env, self._watch_settings, rng=self._rng, clock=clock, reuse_port=True
        )
        self.connectivity = Connectivity(clock)
        self.watchers: dict[WatchKey, UpstreamWatcher] = {}
        self._watch_tasks: dict[WatchKey, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._now = asyncio.Event()
        self._exit_code = 0

    def request_stop(self, *, now: bool = False) -> None:
        if self._stop.is_set() or now:
            self._now.set()
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        log.info("SIGHUP ignored: workers take their configuration from the parent")

    def _watch_settings(self) -> WatchSettings:
        w = self.config.get().watch
        return WatchSettings(wait=w.wait, retry_initial=w.retry_initial, retry_max=w.retry_max)

    def _latest(self, key: WatchKey) -> Latest[Snapshot | None] | None:
        watcher = self.watchers.get(key)
        return watcher.latest if watcher is not None else None

    async def _first_snapshots(self) -> None:
        for watcher in self.watchers.values():
            if watcher.latest.get() is None:
                await watcher.latest.changed(0)

    def problems(self) -> list[str]:
        reasons = [
            f"no endpoints yet for {key.label}"
            for key, w in self.watchers.items()
            if w.latest.get() is None
        ]
        return reasons + self.sidecar.problems()

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        cfg = self.config.get()
        async with ConsulClient(cfg.consul_client) as consul, asyncio.TaskGroup() as tg:
            self._follow_watches(tg, consul, cfg)
            tasks = [
                tg.create_task(self._run_sidecar(consul), name="sidecar"),
                tg.create_task(self._control(reader), name="control"),
                tg.create_task(self._report(writer), name="report"),
                tg.create_task(self._follow_config(tg, consul), name="reloads"),
            ]
            await self._stop.wait()
            await self._drain()
            await self.sidecar.close(grace=1.0)
            for task in tasks:
                task.cancel()
            for task in self._watch_tasks.values():
                task.cancel()
        writer.close()
        log.info("worker stopped")
        return self._exit_code

    def _follow_watches(
        self, tg: asyncio.TaskGroup, consul: ConsulClient, cfg: AgentConfig
    ) -> None:
        """One watcher per upstream of `cfg`: new ones started, removed ones stopped."""
        wanted = {watch_key(up) for up in cfg.sidecar.upstreams}
        for key in [k for k in self.watchers if k not in wanted]:
            del self.watchers[key]
            self._watch_tasks.pop(key).cancel()
        for key in wanted - self.watchers.keys():
            watcher = UpstreamWatcher(
                consul,
                key,
                self._watch_settings,
                self.connectivity,
                rng=self._rng,
                clock=self._clock,
            )
            self.watchers[key] = watcher
            self._watch_tasks[key] = tg.create_task(watcher.run(), name=f"watch {key.label}")

    async def _follow_config(self, tg: asyncio.TaskGroup, consul: ConsulClient) -> None:
        """Each configuration the parent sends (already accepted by `_reconfigure`): the
        watches, then the listeners, follow it as the parent's did."""
        version = self.config.version
        while True:
            version, cfg = await self.config.changed(version)
            self._follow_watches(tg, consul, cfg)
            try:
                await self.sidecar.reconfigure(cfg)
            except OSError as exc:
                log.error("reload: a listener could not be started: %s", exc)

    async def _drain(self) -> None:
        if self._now.is_set() or not self.sidecar.started.is_set():
            return
        period = self.config.get().shutdown.drain_period
        log.info("draining for %gs (the parent ends it sooner when its own drain ends)", period)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._now.wait(), period)

    async def _run_sidecar(self, consul: ConsulClient) -> None:
        try:
            await self.sidecar.run(consul, self._latest, before_listen=self._first_snapshots)
        except Exception as exc:
            # As in the parent: a listener that cannot bind means this process cannot serve.
            # The parent restarts it with a backoff.
            log.error("sidecar failed, stopping: %s", exc, exc_info=exc)
            self._exit_code = 1
            self.request_stop(now=True)

    async def _control(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                try:
                    message = decode(line)
                except ValueError as exc:
                    log.error("bad control message ignored: %s", exc)
                    continue
                if "config" in message:
                    self._reconfigure(message["config"])
                stop = message.get("stop")
                if stop in ("drain", "now"):
                    self.request_stop(now=stop == "now")
        log.warning("the parent is gone (control channel closed): stopping now")
        self.request_stop(now=True)

    def _reconfigure(self, raw: Any) -> None:
        """A reload in the parent: what can change in place (upstreams and their listeners,
        watch timings, drain period, log level); `_follow_config` applies it. The leaf
        source, the service and the inbound listener are fixed at start in the parent too,
        which keeps its running values for them and so sends them unchanged."""
        try:
            new = parse(raw, self._env, source="the parent's configuration")
        except ConfigError as exc:
            log.error("reload from the parent not applied: %s", exc)
            return
        old = self.config.get()
        if needs_restart(old, new):
            # The parent keeps its running values for these, so it never sends such a change.
            log.warning(
                "reload: certs, service or the inbound listener changed; kept the running values"
            )
            return
        self.config.publish(new)
        logging.getLogger("meshlet").setLevel(new.log_level.upper())
        log.info("reloaded from the parent")

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        """Tell the parent whenever readiness changes: at once when the listeners open, and
        otherwise checked every second (a leaf can expire, a listener stop serving); and the
        proxy's counters when they moved, so the parent's status counts every process."""
        last: tuple[str, ...] | None = None
        last_stats: dict[str, Any] = {}
        while True:
            problems = tuple(self.problems())
            stats = self.sidecar.counters()
            if problems != last or stats != last_stats:
                if problems != last:
                    writer.write(encode({"ready": not problems, "problems": list(problems)}))
                if stats != last_stats:
                    writer.write(encode({"stats": stats}))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if not problems and problems != last:
                    log.info("serving: listeners open with a leaf and intentions")
                last, last_stats = problems, stats
            if self.sidecar.started.is_set():
                await asyncio.sleep(1.0)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.sidecar.started.wait(), 1.0)


def configure_worker_logging(index: int, level: str) -> None:
    logging.basicConfig(
        force=True,
        level=logging.INFO,
        format=f"%(asctime)s [%(levelname)s] worker {index} (pid {os.getpid()}) %(name)s: "
        "%(message)s",
    )
    logging.getLogger("meshlet").setLevel(level.upper())


async def run_worker(index: int, control_fd: int, parent_pid: int, env: Mapping[str, str]) -> int:
    """`meshlet sidecar --worker-index K --control-fd FD --parent-pid P` (started by the
    supervisor, never by hand): read the configuration from the parent, serve until told to
    stop or until the parent is gone."""
    configure_worker_logging(index, "info")
    if not die_with_parent(parent_pid):
        log.error("parent %d is gone before the worker started", parent_pid)
        return 1
    sock = socket.socket(fileno=control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    line = await reader.readline()
    if not line:
        log.error("the parent closed the control channel before sending the configuration")
        return 1
    try:
        config = parse(decode(line)["config"], env, source="the parent's configuration")
    except (ValueError, KeyError) as exc:  # ConfigError is a ValueError
        log.error("unusable configuration from the parent: %s", exc)
        return 2
    configure_worker_logging(index, config.log_level)
    runtime = WorkerRuntime(index, config, env)
    runtime.install_signal_handlers()
    log.info("worker for %s started", config.service.service_id)
    return await runtime.run(reader, writer)


__all__ = ["PARENT_ONLY_ENV", "WorkerRuntime", "decode", "die_with_parent", "encode", "run_worker"]
