"""What the demo prints: plain words, a live table per step, a verdict per step."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.demo.table import Table


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    """The feature is not in this build: the step was not run."""


@dataclass(frozen=True)
class Verdict:
    step: str
    outcome: Outcome
    detail: str


_COLOURS = {Outcome.PASS: "\x1b[32m", Outcome.FAIL: "\x1b[31m", Outcome.SKIP: "\x1b[33m"}


class Output:
    def __init__(self, *, colour: bool) -> None:
        self._colour = colour

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def heading(self, text: str) -> None:
        self.say(f"==> {text}")

    def table(self, table: Table) -> None:
        self.say(table.header())

    def _outcome(self, outcome: Outcome) -> str:
        word = outcome.value
        return f"{_COLOURS[outcome]}{word}\x1b[0m" if self._colour else word

    def verdict(self, verdict: Verdict) -> None:
        self.say(f"    {self._outcome(verdict.outcome)}: {verdict.detail}")
        self.say()

    def summary(self, verdicts: Sequence[Verdict]) -> None:
        self.heading("summary")
        width = max(len(v.step) for v in verdicts)
        for v in verdicts:
            self.say(f"    {v.step.ljust(width)}  {self._outcome(v.outcome)}  {v.detail}")
