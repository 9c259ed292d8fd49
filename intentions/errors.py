"""The exception tree of the intentions package.

Two families, because their callers differ: policy problems come from a user's YAML and are
reported all at once (one line each, exit 2 in the CLI); entry problems come from a Consul
config-entry body and carry Consul's own verbatim text so the devstack can answer exactly as
Consul does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ProblemKind = Literal["invalid", "unsupported"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one policy document.

    `kind` is "invalid" when Istio's own validator rejects the input, "unsupported" when Istio
    accepts it but meshlet cannot enforce it exactly through Consul intentions.
    """

    document: str
    path: str
    message: str
    kind: ProblemKind = "invalid"

    def __str__(self) -> str:
        # One line per problem: the CLI prints one stderr line each.
        where = f"{self.document}: {self.path}" if self.path else self.document
        return f"{where}: {' '.join(self.message.split())}"


class IntentionsError(Exception):
    """Base of every error this package raises."""


class PolicyError(IntentionsError):
    """A policy set cannot be used. Nothing was translated: translation is all or nothing."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class EntryError(IntentionsError):
    """A Consul config entry is unusable; `str(err)` is Consul's text for the same case."""


class EntryDecodeError(EntryError):
    """The body does not decode (Consul answers 400)."""


class InvalidEntry(EntryError):
    """The body decodes but fails Consul's validation (Consul answers 500)."""


class UnsupportedEntry(EntryError):
    """Valid for Consul, but the decision engine cannot enforce it exactly (e.g. JWT).

    Raised at snapshot compile time so the caller keeps its previous snapshot, the way Envoy
    keeps its previous configuration when it rejects an update.
    """


class BadRequest(IntentionsError):
    """A request the sidecar rejects before authorization (e.g. `%00` in the path)."""
