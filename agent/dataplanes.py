"""`meshlet sidecar --workers N`: the agent's side of its N data-plane processes.

    planes = DataPlanes(3, control_dir(cfg, env), env)
    await planes.open()                     # the control socket; adopts surviving processes
    tg.create_task(planes.run())            # spawn the others, restart any that exits
    planes.publish(snapshot)                # every attached data plane gets it (and each
                                            #   one that attaches later gets the newest)
    planes.begin_stop(); await planes.stop(timeout)

The agent runs no listener then: each data plane (connect/dataplane/process.py, `python -m
connect.dataplane`) binds every listener with SO_REUSEPORT and serves from the snapshots
the agent pushes over a unix socket in the instance's control directory (`control_dir`).
The data planes dial that socket by path rather than inheriting a socketpair, so they
outlive the agent: SIGKILL it, and they keep serving their last snapshot while it is away.
The agent that starts again finds them by their status files (`dataplane-K.json`: pid and
socket, checked against /proc/PID/cmdline), adopts them instead of starting new ones, waits
for each to dial back, and pushes a fresh snapshot. An adopted process is not our child: its
exit is followed with a pidfd.

A data plane that exits while the agent is not stopping is restarted as workers were
(`RestartPolicy`); one that does not dial back within `ADOPT_WAIT` seconds is killed and
replaced. Readiness: the instance serves while at least one data plane is ready and has
applied the newest snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.supervisor import RestartPolicy, WorkerState, describe_exit
from connect.dataplane.process import status_path
from connect.dataplane.snapshot import (
    MAX_LINE,
    Snapshot,
    decode_message,
    encode_message,
    endpoints_key,
)

log = logging.getLogger("meshlet.agent.dataplanes")

ADOPT_WAIT = 15.0
"""Seconds a surviving data plane gets to dial a restarted agent before it is replaced."""

SNAPSHOT_LAG = 5.0
"""Seconds a data plane that serves an earlier snapshot still counts as serving once a newer
one is published (it is on its way: readiness must not flap with every endpoint change);
past them, or once it refused the newer one, it does not."""

SOCKET_NAME = "dataplane.sock"
MAX_SOCKET_PATH = 107
"""Bytes of a unix socket's path (sun_path is 108 with its terminating NUL)."""

# What a data plane must not inherit: systemd talks to the main process only.
PARENT_ONLY_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


DATAPLANE_ENV = {
    # libuv's thread pool only resolves the listeners' addresses at start: one thread, not
    # four, each with its own malloc arena (together ~3 MB of a data plane's RSS).
    "UV_THREADPOOL_SIZE": "1",
    "MALLOC_ARENA_MAX": "2",
}
"""Defaults for a data plane's environment (the agent's own values win)."""


class ControlDirError(OSError):
    """The control directory is not ours alone; str() says what is wrong."""


def control_dir(cfg: AgentConfig, env: Mapping[str, str]) -> Path:
    """Where this instance's control socket and data-plane status files live: `dataplanes/`
    in systemd's RuntimeDirectory when set, else a directory per instance (service ID and
    public port: two instances cannot share both) under $XDG_RUNTIME_DIR or
    /tmp/meshlet-UID; a service ID too long for the socket's path (Nomad's are about 70
    characters) is replaced by its hash."""
    if env.get("RUNTIME_DIRECTORY"):
        # A directory of our own inside it: systemd creates RuntimeDirectory 0755.
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0], "dataplanes")
    base = (
        Path(env["XDG_RUNTIME_DIR"], "meshlet")
        if env.get("XDG_RUNTIME_DIR")
        else Path(tempfile.gettempdir(), f"meshlet-{os.getuid()}")
    )
    path = base / f"sidecar-{cfg.service.service_id}-{cfg.sidecar.port}"
    if len(os.fsencode(path / SOCKET_NAME)) > MAX_SOCKET_PATH:
        digest = hashlib.sha256(cfg.service.service_id.encode()).hexdigest()[:16]
        path = base / f"sidecar-{digest}-{cfg.sidecar.port}"
    return path


def private_dir(path: Path) -> None:
    """Create `path` (and its parent) 0700; refuse one that is a symlink, not ours, or open
    to others: the socket carries the leaf's private key."""
    for d in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise ControlDirError(f"{d} is not a directory")
        if st.st_uid != os.getuid():
            raise ControlDirError(f"{d} belongs to uid {st.st_uid}, not {os.getuid()}")
        if d == path and st.st_mode & 0o077:
            raise ControlDirError(f"{d} is open to others (mode {st.st_mode & 0o777:o})")


def hold_unanswered(
    snapshot: Snapshot,
    serving: set[str],
    held_since: Mapping[str, float],
    now: float,
    wait: float,
) -> tuple[Snapshot, dict[str, float]]:
    """`snapshot` without the upstream listeners the data planes do not serve yet (not in
    `serving`) whose watch has not answered, each for at most `wait` seconds from when it was
    first held (`held_since`, returned updated): a connection accepted before the first
    answer could only be refused with 503. Past `wait` the port opens anyway and readiness
    says what is missing (as the in-process proxy does on a reload). Pure."""
    answered = {endpoints_key(e) for e in snapshot.endpoints if e.targets is not None}
    held: dict[str, float] = {}
    keep = []
    for up in snapshot.spec.upstreams:
        since = held_since.get(up.bind, now)
        if up.bind in serving or endpoints_key(up) in answered or now - since >= wait:
            keep.append(up)
        else:
            held[up.bind] = since
    if not held:
        return snapshot, held
    spec = dataclasses.replace(snapshot.spec, upstreams=tuple(keep))
    return dataclasses.replace(snapshot, spec=spec), held


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def dataplane_command(index: int, control_socket: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "connect.dataplane",
        "--index",
        str(index),
        "--control-socket",
        str(control_socket),
    ]


def survivor(control_socket: Path, index: int) -> int | None:
    """The pid of data plane `index` of this instance still running from an earlier agent,
    by its status file and /proc/PID/cmdline (a recycled pid runs something else)."""
    try:
        status = json.loads(status_path(control_socket, index).read_text())
        pid = int(status["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = [a.encode() for a in dataplane_command(index, control_socket)[1:]]
    return pid if cmdline[1 : 1 + len(wanted)] == wanted else None


class _Adopted:
    """A data plane left running by an earlier agent: not our child, followed by pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    async def wait(self) -> int:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.returncode = 0
            return 0
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, exited)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        self.returncode = 0  # not our child: its status is its parent's (init) to read
        return 0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class _Plane:
    def __init__(self, index: int) -> None:
        self.state = WorkerState(index)
        self.proc: asyncio.subprocess.Process | _Adopted | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.attached = asyncio.Event()
        self.applied = 0
        self.refused = ""
        self.adopted = False
        self.losses = 0
        """How many times it lost an agent (its own count, from its hello)."""
        self.serving: dict[str, Any] = {}
        """What it last said it serves (its `serving` report; agent/dataplane_status.py)."""


class DataPlanes:
    def __init__(
        self,
        count: int,
        directory: Path,
        env: Mapping[str, str],
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.time,
        command: Callable[[int, Path], list[str]] = dataplane_command,
    ) -> None:
        """`command(index, control_socket)`: the argv of data plane `index` (a test gives
        a stand-in)."""
        self.directory = directory
        self.socket_path = directory / SOCKET_NAME
        self.planes = {i: _Plane(i) for i in range(1, count + 1)}
        self._env = {**DATAPLANE_ENV, **{k: v for k, v in env.items() if k not in PARENT_ONLY_ENV}}
        self._policy = policy if policy is not None else RestartPolicy()
        self._clock = clock
        self._command = command
        self._server: asyncio.Server | None = None
        self._latest: bytes | None = None
        self.version = 0
        """The newest snapshot published (0: none yet)."""
        self._published_at = 0.0
        self._stop_phase = ""
        self._stopping = asyncio.Event()

    @property
    def workers(self) -> list[WorkerState]:
        """Each data plane's state (what /v1/status and /metrics add up)."""
        return [p.state for p in self.planes.values()]

    # ---- start ---------------------------------------------------------------------------------

    async def open(self) -> int:
        """Bind the control socket and find the data planes an earlier agent left running;
        how many were found (their ports are ours: the caller skips its free-port check)."""
        private_dir(self.directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(
            self._accept, str(self.socket_path), limit=MAX_LINE
        )
        os.chmod(self.socket_path, 0o600)
        found = 0
        for index, plane in self.planes.items():
            pid = survivor(self.socket_path, index)
            if pid is not None:
                plane.proc, plane.adopted = _Adopted(pid), True
                found += 1
                log.info("data plane %d (pid %d) still serving: adopting it", index, pid)
        for path in self.directory.glob("dataplane-*.json"):
            index_text = path.stem.removeprefix("dataplane-")
            if not index_text.isdigit() or int(index_text) in self.planes:
                continue
            pid = survivor(self.socket_path, int(index_text))
            if pid is not None:
                # Left by an agent that ran more of them (--workers lowered): drained.
                log.info("data plane %s (pid %d) is one too many now: stopping it", index_text, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        return found

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    # ---- what the runtime asks -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        processes = []
        for plane in self.planes.values():
            st = plane.state.status()
            st["adopted"] = plane.adopted
            st["applied"] = plane.applied
            st["refused"] = plane.refused
            st["agent_losses"] = plane.losses
            processes.append(st)
        return {"count": len(self.planes), "mode": "data planes", "processes": processes}

    def problems(self) -> list[str]:
        return [p for w in self.workers if (p := w.problem())]

    def serving(self) -> bool:
        """Whether a data plane serves the newest snapshot (or, for at most SNAPSHOT_LAG
        seconds after it was published, the one before: an old one does not count)."""
        if not self.version:
            return False
        lagging = self._clock() - self._published_at < SNAPSHOT_LAG
        return any(
            p.state.ready
            and p.state.state == "running"
            and (p.applied == self.version or (lagging and p.applied > 0 and not p.refused))
            for p in self.planes.values()
        )

    def reports(self) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        """(applied snapshot, `serving` report, counters) of each running data plane that
        has reported what it serves."""
        return [
            (p.applied, p.serving, p.state.stats)
            for p in self.planes.values()
            if p.state.state == "running" and p.serving
        ]

    def publish(self, snapshot: Snapshot) -> None:
        self.version, self._published_at = snapshot.version, self._clock()
        self._latest = encode_message(snapshot=snapshot)
        for plane in self.planes.values():
            self._write(plane, self._latest)

    def begin_stop(self) -> None:
        self._stopping.set()
        if not self._stop_phase:
            self._stop_phase = "drain"
            self._send_all(encode_message(stop="drain"))

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._stop_phase = "now"
        self._send_all(encode_message(stop="now"))
        procs = [p.proc for p in self.planes.values() if p.proc is not None]
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                log.warning(
                    "%d data planes still running after %gs: killing", len(pending), timeout
                )
                for p in procs:
                    if p.returncode is None:
                        p.kill()
                await asyncio.wait(waits)
        await self.close()

    def _send_all(self, data: bytes) -> None:
        for plane in self.planes.values():
            self._write(plane, data)

    @staticmethod
    def _write(plane: _Plane, data: bytes) -> None:
        if plane.writer is not None and not plane.writer.is_closing():
            plane.writer.write(data)

    # ---- running them --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep every data plane running until `stop()`; cancelled, it kills the ones it
        started (adopted ones are left: they were not started by this run)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for plane in self.planes.values():
                    tg.create_task(self._keep(plane), name=f"data plane {plane.state.index}")
        finally:
            for plane in self.planes.values():
                proc = plane.proc
                if isinstance(proc, asyncio.subprocess.Process) and proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

    async def _keep(self, plane: _Plane) -> None:
        w = plane.state
        while not self._stopping.is_set():
            started = self._clock()
            outcome = await self._run_once(plane)
            if self._stopping.is_set():
                w.state = "stopped"
                log.info("data plane %d (pid %s) stopped (%s)", w.index, w.pid, outcome)
                return
            ran_for = self._clock() - started
            w.consecutive_failures, delay = self._policy.after_exit(w.consecutive_failures, ran_for)
            w.state, w.ready, w.restart_at = "restarting", False, self._clock() + delay
            log.warning(
                "data plane %d (pid %s) exited unexpectedly (%s) after %.1fs; restarting in %.1fs",
                w.index,
                w.pid,
                outcome,
                ran_for,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if not self._stopping.is_set():
                w.restarts += 1
        w.state = "stopped"

    async def _run_once(self, plane: _Plane) -> str:
        w = plane.state
        proc = plane.proc
        if proc is None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(w.index, self.socket_path),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=self._env,
                )
            except OSError as exc:
                w.last_exit, w.last_exit_at = f"could not start: {exc}", self._clock()
                return w.last_exit
            plane.proc, plane.adopted = proc, False
            log.info("data plane %d started (pid %d)", w.index, proc.pid)
        w.state, w.pid, w.started_at, w.restart_at = "running", proc.pid, self._clock(), None
        if not plane.attached.is_set():  # an adopted one may have dialled back already
            w.ready, w.problems = False, ("starting",)
        exited = asyncio.ensure_future(proc.wait())
        try:
            if plane.adopted and not plane.attached.is_set():
                attach = asyncio.ensure_future(plane.attached.wait())
                await asyncio.wait([exited, attach], timeout=ADOPT_WAIT)
                attach.cancel()
                if not plane.attached.is_set() and not exited.done():
                    log.warning(
                        "data plane %d (pid %d) did not dial back in %gs: replacing it",
                        w.index,
                        proc.pid,
                        ADOPT_WAIT,
                    )
                    proc.kill()
            returncode = await asyncio.shield(exited)
        finally:
            if proc.returncode is None and isinstance(proc, asyncio.subprocess.Process):
                # Cancelled: a data plane this agent started does not outlive the task.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(exited)
            plane.proc = None
            if plane.writer is not None:
                plane.writer.close()
            plane.writer = None
            plane.attached.clear()
        w.ready, w.problems = False, ("not running",)
        plane.serving = {}
        w.last_exit, w.last_exit_at = describe_exit(returncode), self._clock()
        return w.last_exit

    # ---- the control socket --------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        plane: _Plane | None = None
        try:
            if sock is None or _peer_uid(sock) != os.getuid():
                log.error("control socket: a process of another user refused")
                return
            line = await reader.readline()
            hello = decode_message(line).get("hello") if line else None
            if not isinstance(hello, dict):
                log.error("control socket: no hello, closing")
                return
            index, pid = hello.get("index"), hello.get("pid")
            plane = self.planes.get(index) if isinstance(index, int) else None
            if plane is None or plane.proc is None or plane.proc.pid != pid:
                log.error("control socket: unknown data plane %s (pid %s), closing", hello, pid)
                plane = None
                return
            if plane.writer is not None:
                plane.writer.close()
            plane.writer = writer
            plane.attached.set()
            plane.applied = int(hello.get("applied") or 0)
            plane.losses = int(hello.get("losses") or 0)
            log.info("data plane %d (pid %s) attached", plane.state.index, pid)
            if self._latest is not None:
                writer.write(self._latest)
            if self._stop_phase:
                writer.write(encode_message(stop=self._stop_phase))
            await self._follow(plane, reader)
        except (ConnectionError, ValueError) as exc:
            log.error("control socket: %s", exc)
        finally:
            if plane is not None and plane.writer is writer:
                plane.writer = None
                plane.attached.clear()
            writer.close()

    async def _follow(self, plane: _Plane, reader: asyncio.StreamReader) -> None:
        w = plane.state
        while line := await reader.readline():
            try:
                message = decode_message(line)
            except ValueError as exc:
                log.error("data plane %d: bad report ignored: %s", w.index, exc)
                continue
            stats = message.get("stats")
            if isinstance(stats, dict):
                w.stats = stats
            serving = message.get("serving")
            if isinstance(serving, dict):
                plane.serving = serving
            if "ready" in message:
                w.ready = message["ready"] is True
                problems = message.get("problems")
                w.problems = tuple(str(p) for p in problems) if isinstance(problems, list) else ()
            if isinstance(message.get("applied"), int):
                plane.applied, plane.refused = message["applied"], ""
            refused = message.get("refused")
            if isinstance(refused, dict):
                plane.refused = str(refused.get("error", ""))
                log.error(
                    "data plane %d refused snapshot %s: %s",
                    w.index,
                    refused.get("version"),
                    plane.refused,
                )


__all__ = [
    "ADOPT_WAIT",
    "PARENT_ONLY_ENV",
    "ControlDirError",
    "DataPlanes",
    "control_dir",
    "dataplane_command",
    "hold_unanswered",
    "private_dir",
    "survivor",
]
