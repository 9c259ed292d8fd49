"""Is Consul reachable? One shared answer, reported by every caller of the client.

The watchers and the registrar each learn it as a side effect of their own calls; whoever
sees Consul come back first wakes the others (the registrar repairs registration at once,
instead of at its next anti-entropy tick).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("meshlet.agent")


@dataclass(frozen=True, slots=True)
class ConsulState:
    reachable: bool | None
    """None until the first call has finished."""
    since: float | None
    """Unix time of the last change of `reachable`."""
    last_error: str


class Connectivity:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._state = ConsulState(None, None, "")
        self._on_recover: list[Callable[[], None]] = []

    @property
    def state(self) -> ConsulState:
        return self._state

    def on_recover(self, callback: Callable[[], None]) -> None:
        self._on_recover.append(callback)

    def ok(self) -> None:
        was = self._state.reachable
        if was is True:
            return
        self._state = ConsulState(True, self._clock(), "")
        if was is False:
            log.info("Consul is reachable again")
            for callback in self._on_recover:
                callback()

    def failed(self, error: str) -> None:
        was = self._state.reachable
        if was is False:
            if error != self._state.last_error:
                self._state = ConsulState(False, self._state.since, error)
            return
        log.warning("Consul is unreachable: %s; serving the last known state", error)
        self._state = ConsulState(False, self._clock(), error)
