"""`meshlet sidecar --workers N`: the parent's side, keeping N-1 worker processes alive.

    supervisor = Supervisor(3, runtime.config.get, env)
    tg.create_task(supervisor.run())          # once the parent's own listeners are up
    supervisor.begin_stop()                   # SIGTERM: workers drain with the parent
    await supervisor.stop(timeout)            # the parent's drain is over: stop, reap, exit

Each worker is `python -m agent.cli sidecar --worker-index K --control-fd FD --parent-pid P`
(agent/worker.py), a fresh interpreter rather than a fork: the parent's event loop, sockets and
threads never leak into a child, and `ps` says what each process is. The parent's running
configuration goes over the control channel, so a worker serves exactly what the parent
serves. Workers are spawned after the parent's listeners are up: the parent first checks that
no stranger holds the ports, and only its own group shares them.

A worker that exits while the parent is not stopping, for any reason and with any code, is
restarted after a delay that doubles with each quick failure (`RestartPolicy`, pure) and is
logged with its exit status. A dead or unready worker leaves the instance ready (the other
processes serve its share of new connections); `/v1/status` shows it under `workers` and it
counts as degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.config import AgentConfig, to_raw
from agent.worker import PARENT_ONLY_ENV, decode, encode

log = logging.getLogger("meshlet.agent.supervisor")


# ---- pure decisions ---------------------------------------------------------------------------


def sum_counters(reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counters of several processes added up, nested objects key by key (ProxyStats's
    shape); a value that is not a number or an object is left out."""
    total: dict[str, Any] = {}
    for report in reports:
        for key, value in report.items():
            if isinstance(value, Mapping):
                inner = total.get(key)
                total[key] = sum_counters([inner if isinstance(inner, dict) else {}, value])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                prior = total.get(key, 0)
                total[key] = (prior if isinstance(prior, int | float) else 0) + value
    return total


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial: float = 0.5
    """Delay before restarting a worker that failed once."""
    maximum: float = 30.0
    """Cap of the doubling delay (a worker that cannot bind retries this often)."""
    stable_after: float = 60.0
    """A worker that ran this long before exiting starts the doubling over."""

    def delay(self, consecutive: int) -> float:
        """Delay before restart number `consecutive` (1 for the first quick failure)."""
        if consecutive < 1:
            return 0.0
        return min(self.maximum, self.initial * 2.0 ** min(consecutive - 1, 60))

    def after_exit(self, consecutive: int, ran_for: float) -> tuple[int, float]:
        """A worker exited after running `ran_for` seconds, with `consecutive` quick failures
        before it: the new count and the delay before starting it again."""
        count = 1 if ran_for >= self.stable_after else consecutive + 1
        return count, self.delay(count)


def describe_exit(returncode: int) -> str:
    """`asyncio.subprocess.Process.returncode` in words: negative is a signal."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


def worker_command(index: int, control_fd: int, parent_pid: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent.cli",
        "sidecar",
        "--worker-index",
        str(index),
        "--control-fd",
        str(control_fd),
        "--parent-pid",
        str(parent_pid),
    ]


# ---- the shell --------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkerState:
    """What the parent knows about one worker (shown in /v1/status)."""

    index: int
    state: str = "pending"
    """pending (the parent's listeners are not up yet), running, restarting or stopped."""
    pid: int | None = None
    started_at: float | None = None
    ready: bool = False
    problems: tuple[str, ...] = ("not started",)
    restarts: int = 0
    consecutive_failures: int = 0
    last_exit: str = ""
    last_exit_at: float | None = None
    restart_at: float | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The proxy counters it last reported (they restart from zero with the process)."""

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "state": self.state,
            "pid": self.pid,
            "started_at": self.started_at,
            "ready": self.ready,
            "problems": list(self.problems),
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at,
            "restart_at": self.restart_at,
            "stats": self.stats,
        }

    def problem(self) -> str:
        """Why this worker does not serve now ("" when it does)."""
        if self.state == "running" and self.ready:
            return ""
        if self.state == "restarting":
            return f"worker {self.index} down ({self.last_exit}), restarting"
        if self.state == "running":
            return f"worker {self.index} not serving: {'; '.join(self.problems)}"
        if self.state == "pending":
            return f"worker {self.index} not started yet"
        return f"worker {self.index} {self.state}"


class Supervisor:
    def __init__(
        self,
        workers: int,
        config: Callable[[], AgentConfig],
        env: Mapping[str, str],
        *,
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.time,
        command: Callable[[int, int, int], list[str]] = worker_command,
    ) -> None:
        self.workers = [WorkerState(i) for i in range(1, workers)]
        self._config = config
        self._env = {k: v for k, v in env.items() if k not in PARENT_ONLY_ENV}
        self._policy = policy
        self._clock = clock
        self._command = command
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._channels: dict[int, asyncio.StreamWriter] = {}
        self._stop_phase = ""
        self._stopping = asyncio.Event()

    # ---- what the runtime asks ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "count": len(self.workers) + 1,
            "processes": [w.status() for w in self.workers],
        }

    def problems(self) -> list[str]:
        return [p for w in self.workers if (p := w.problem())]

    def reconfigure(self, config: AgentConfig) -> None:
        """After the parent's reload: every running worker gets the new running values."""
        self._send_all({"config": to_raw(config)})

    def begin_stop(self) -> None:
        """The parent is draining: workers keep serving for their drain period too."""
        self._stopping.set()
        if not self._stop_phase:
            self._stop_phase = "drain"
            self._send_all({"stop": "drain"})

    async def stop(self, timeout: float = 10.0) -> None:
        """The parent's drain is over: workers stop now; any still alive after `timeout`
        seconds is killed. Returns once every worker is reaped."""
        self._stopping.set()
        self._stop_phase = "now"
        self._send_all({"stop": "now"})
        procs = list(self._procs.values())
        if not procs:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        _, pending = await asyncio.wait(waits, timeout=timeout)
        if pending:
            log.warning("%d workers still running after %gs: killing them", len(pending), timeout)
            self._kill_all()
            await asyncio.wait(waits)

    # ---- running the workers -----------------------------------------------------------------

    async def run(self) -> None:
        """Start every worker and keep it running until `stop()` (or cancellation, which
        kills them: a worker never outlives the task that supervises it)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for w in self.workers:
                    tg.create_task(self._keep(w), name=f"worker {w.index}")
        finally:
            self._kill_all()

    def _kill_all(self) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def _send_all(self, message: Mapping[str, Any]) -> None:
        data = encode(message)
        for writer in self._channels.values():
            if not writer.is_closing():
                writer.write(data)

    async def _keep(self, w: WorkerState) -> None:
        while not self._stopping.is_set():
            started = self._clock()
            outcome = await self._run_once(w)
            if self._stopping.is_set():
                w.state = "stopped"
                log.info("worker %d (pid %s) stopped (%s)", w.index, w.pid, outcome)
                return
            ran_for = self._clock() - started
            w.consecutive_failures, delay = self._policy.after_exit(w.consecutive_failures, ran_for)
            w.state = "restarting"
            w.ready = False
            w.restart_at = self._clock() + delay
            log.warning(
                "worker %d (pid %s) exited unexpectedly (%s) after %.1fs; restarting in %.1fs",
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

    async def _run_once(self, w: WorkerState) -> str:
        """Start worker `w`, follow its reports until it exits; its exit in words."""
        ours, theirs = socket.socketpair()
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._command(w.index, theirs.fileno(), os.getpid()),
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    env=self._env,
                )
            finally:
                theirs.close()
        except OSError as exc:
            ours.close()
            w.last_exit, w.last_exit_at = f"could not start: {exc}", self._clock()
            return w.last_exit
        # From here the process exists: whatever happens next (a cancellation while the
        # channel opens included), it is killed and reaped before this returns or raises.
        self._procs[w.index] = proc
        writer: asyncio.StreamWriter | None = None
        reports: asyncio.Future[None] | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            self._channels[w.index] = writer
            w.state, w.pid, w.started_at, w.restart_at = "running", proc.pid, self._clock(), None
            w.ready, w.problems = False, ("starting",)
            log.info("worker %d started (pid %d)", w.index, proc.pid)
            writer.write(encode({"config": to_raw(self._config())}))
            if self._stop_phase:
                # Asked to stop while it was starting: it learns at once.
                writer.write(encode({"stop": self._stop_phase}))
            reports = asyncio.ensure_future(self._follow(w, reader))
            returncode = await proc.wait()
        finally:
            if reports is not None:
                reports.cancel()
            if proc.returncode is None:  # cancelled: the worker must not outlive us
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                # Reaped here, not left to the garbage collector (a zombie until then).
                await asyncio.shield(proc.wait())
            self._channels.pop(w.index, None)
            self._procs.pop(w.index, None)
            if writer is not None:
                writer.close()
            else:
                ours.close()
        w.ready, w.problems = False, ("not running",)
        w.last_exit, w.last_exit_at = describe_exit(returncode), self._clock()
        return w.last_exit

    async def _follow(self, w: WorkerState, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                try:
                    message = decode(line)
                except ValueError as exc:
                    log.error("worker %d: bad report ignored: %s", w.index, exc)
                    continue
                stats = message.get("stats")
                if isinstance(stats, dict):
                    w.stats = stats
                if "ready" in message:
                    w.ready = message["ready"] is True
                    problems = message.get("problems")
                    w.problems = (
                        tuple(str(p) for p in problems) if isinstance(problems, list) else ()
                    )


__all__ = [
    "RestartPolicy",
    "Supervisor",
    "WorkerState",
    "describe_exit",
    "sum_counters",
    "worker_command",
]
