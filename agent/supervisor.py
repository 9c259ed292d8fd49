"""What the agent decides about its `--workers N` data-plane processes (agent/dataplanes.py
runs them): when to restart one that exited (`RestartPolicy`, pure), its exit in words, what
/v1/status shows of each (`WorkerState`), and how their counters add up (`sum_counters`).

A data plane that exits while the agent is not stopping, for any reason and with any code, is
restarted after a delay that doubles with each quick failure and is logged with its exit
status. A dead or unready one shows under `workers` in /v1/status and counts as degraded.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterable, Mapping
from typing import Any

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


# ---- what the agent shows ---------------------------------------------------------------------


@dataclasses.dataclass
class WorkerState:
    """What the parent knows about one worker (shown in /v1/status)."""

    index: int
    state: str = "pending"
    """pending (the agent holds no leaf and intentions yet), running, restarting or stopped."""
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


__all__ = [
    "RestartPolicy",
    "WorkerState",
    "describe_exit",
    "sum_counters",
]
