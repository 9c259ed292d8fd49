"""The demo's live tables: a header, then one row a second while a step's traffic runs.

Pure formatting; `Output` in agent.demo.steps prints what these return. Every column has a
fixed width so the rows of one table line up as they arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    columns: tuple[tuple[str, int], ...]
    """(heading, width) per column: numbers right-aligned; a negative width left-aligns."""

    def _line(self, cells: Sequence[str]) -> str:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        parts = []
        for cell, (_, width) in zip(cells, self.columns, strict=True):
            parts.append(cell.ljust(-width) if width < 0 else cell.rjust(width))
        return "    " + "  ".join(parts).rstrip()

    def header(self) -> str:
        return self._line([heading for heading, _ in self.columns])

    def row(self, *cells: object) -> str:
        return self._line([str(c) for c in cells])


def percent(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def millis(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
