"""The intentions devstack enforces: its service-intentions entries, compiled once per change.

One engine serves `/v1/connect/intentions/check`, `/v1/agent/connect/authorize` and the
sidecars (through the entries they watch), so the control plane and the data plane cannot
disagree about a decision.
"""

from __future__ import annotations

import dataclasses

from devstack.config import DevConfig
from devstack.store import Store
from intentions.engine import (
    ACL_DEFAULT_REASON,
    DEFAULT_INTENTION_POLICY_REASON,
    Snapshot,
    compile_snapshot,
)
from intentions.entries import KIND, ServiceIntentions


def default_decision(config: DevConfig) -> tuple[bool, str]:
    """Consul's fallback when no intention matches (consul:agent/connect_auth.go): the agent's
    default intention policy when set, else the ACL default (allow while ACLs are off)."""
    if config.default_intention_policy is not None:
        return config.default_intention_policy == "allow", DEFAULT_INTENTION_POLICY_REASON
    return (not config.acl_enabled or config.default_policy == "allow"), ACL_DEFAULT_REASON


class IntentionsState:
    def __init__(self, store: Store, config: DevConfig) -> None:
        self._store = store
        self._config = config
        self._compiled: tuple[int, int, Snapshot] | None = None

    def entries(self) -> list[ServiceIntentions]:
        """The stored entries, carrying their raft indexes."""
        return [
            dataclasses.replace(
                e.intentions, create_index=e.create_index, modify_index=e.modify_index
            )
            for (kind, _), e in sorted(self._store.config.items())
            if kind == KIND and e.intentions is not None
        ]

    def index(self) -> int:
        return self._store.key_index(f"config/{KIND}", "config")

    def snapshot(self) -> Snapshot:
        """The compiled engine, rebuilt only when the entries (or the index epoch) changed."""
        key = (self.index(), self._store.epoch)
        if self._compiled is None or self._compiled[:2] != key:
            allow, reason = default_decision(self._config)
            snap = compile_snapshot(self.entries(), default_allow=allow, default_reason=reason)
            self._compiled = (*key, snap)
        return self._compiled[2]
