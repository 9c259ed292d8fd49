"""devstack's state: Consul's catalog, health checks, KV and sessions, in memory.

One global, monotonically increasing modify index, as Raft gives Consul. Every write commits
one index, records it on the tables (and per-service watch keys) it touched, and wakes blocking
queries. Readers compute `(index, result)` pairs; the HTTP layer does the blocking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devstack.config_entries import Entry

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE = "_node_maintenance"


@dataclass
class Node:
    id: str
    name: str
    address: str
    datacenter: str
    tagged_addresses: dict[str, str]
    meta: dict[str, str]
    create_index: int = 0
    modify_index: int = 0


@dataclass
class Service:
    """A service instance (Consul's NodeService), fields keyed by Consul's JSON names."""

    node: str
    data: dict[str, Any]
    # Registered through this agent's API (so /v1/agent/* shows it), not the catalog API.
    local: bool = False
    # The parent service ID when the agent created this instance as its sidecar.
    sidecar_of: str | None = None
    create_index: int = 0
    modify_index: int = 0

    @property
    def id(self) -> str:
        return str(self.data["ID"])

    @property
    def name(self) -> str:
        return str(self.data["Service"])

    def watch_keys(self) -> list[str]:
        """The blocking-query keys a change to this instance moves."""
        keys = [f"service/{self.name}"]
        if self.data.get("Kind") == "connect-proxy":
            dest = (self.data.get("Proxy") or {}).get("DestinationServiceName", "")
            keys.append(f"connect/{dest}")
        if (self.data.get("Connect") or {}).get("Native"):
            keys.append(f"connect/{self.name}")
        return keys


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    notes: str = ""
    output: str = ""
    type: str = ""
    interval: str = ""
    timeout: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    # The agent-side definition that the check runner executes (None: catalog-only check).
    runner: dict[str, Any] | None = None
    local: bool = False
    create_index: int = 0
    modify_index: int = 0


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str = ""


@dataclass
class Session:
    id: str
    name: str
    node: str
    lock_delay: int
    behavior: str
    ttl: str
    node_checks: list[str]
    create_index: int
    modify_index: int


def _by_id(chk: Check) -> str:
    return chk.check_id


class Store:
    def __init__(self) -> None:
        self.index = 1
        self.tables: dict[str, int] = {}
        self.keys: dict[str, int] = {}
        self.nodes: dict[str, Node] = {}
        self.services: dict[tuple[str, str], Service] = {}
        self.checks: dict[tuple[str, str], Check] = {}
        self.kv: dict[str, KVEntry] = {}
        self.tombstones: dict[str, int] = {}
        self.sessions: dict[str, Session] = {}
        self.config: dict[tuple[str, str], Entry] = {}
        self._node_services: dict[str, dict[str, Service]] = {}
        self._node_checks: dict[str, dict[str, Check]] = {}
        self._watched: dict[str, dict[tuple[str, str], Service]] = {}
        # Bumped when the index is rewound: a blocking query that sees it move returns at
        # once, as Consul's queries do when a snapshot restore abandons the state store.
        self.epoch = 0
        # Set at shutdown: parked queries answer at once instead of running out their wait.
        self.closed = False
        self.last_write = time.monotonic()
        self._changed = asyncio.Event()
        # How many blocking queries are parked right now (tests wait on this, never sleep).
        self.blocked = 0
        self._blocked_changed = asyncio.Event()

    # ---- commit and wait -----------------------------------------------------------------

    def _commit(self, tables: Iterable[str], keys: Iterable[str] = ()) -> int:
        self.index += 1
        for t in tables:
            self.tables[t] = self.index
        for k in keys:
            self.keys[k] = self.index
        self.last_write = time.monotonic()
        self._wake()
        return self.index

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_change(self, timeout: float) -> None:
        """Wait until the next write or `timeout` seconds, whichever is first."""
        event = self._changed
        self._set_blocked(+1)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._set_blocked(-1)

    def _set_blocked(self, delta: int) -> None:
        self.blocked += delta
        self._blocked_changed.set()
        self._blocked_changed = asyncio.Event()

    async def until_blocked(self, count: int = 1) -> None:
        """Wait until at least `count` blocking queries are parked."""
        while self.blocked < count:
            await self._blocked_changed.wait()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def rewind_index(self, index: int) -> None:
        """Test hook: make the index go backwards, as after a snapshot restore."""
        if index < 1:
            raise ValueError("index must be >= 1")
        self.index = index
        for table in (self.tables, self.keys, self.tombstones):
            for k, v in table.items():
                table[k] = min(v, index)
        records: list[Node | Service | Check | KVEntry] = [
            *self.nodes.values(),
            *self.services.values(),
            *self.checks.values(),
            *self.kv.values(),
        ]
        for obj in records:
            obj.create_index = min(obj.create_index, index)
            obj.modify_index = min(obj.modify_index, index)
        self.epoch += 1
        self._wake()

    def table_index(self, *tables: str) -> int:
        return max((self.tables.get(t, 0) for t in tables), default=0)

    def key_index(self, key: str, fallback_table: str) -> int:
        return self.keys.get(key) or self.table_index(fallback_table)

    # ---- nodes -----------------------------------------------------------------------------

    def upsert_node(self, node: Node) -> int:
        old = self.nodes.get(node.name)
        if old is not None and (
            old.id,
            old.address,
            old.tagged_addresses,
            old.meta,
        ) == (node.id, node.address, node.tagged_addresses, node.meta):
            return self.index
        idx = self.index + 1
        node.create_index = old.create_index if old else idx
        node.modify_index = idx
        self.nodes[node.name] = node
        return self._commit(["nodes"], self._node_keys(node.name))

    def delete_node(self, name: str) -> int:
        keys = self._node_keys(name)
        self.nodes.pop(name, None)
        for svc in list(self._node_services.get(name, {}).values()):
            self._drop_service(svc)
        for chk in list(self._node_checks.get(name, {}).values()):
            self._drop_check(chk)
        return self._commit(["nodes", "services", "checks"], keys)

    def _node_keys(self, node: str) -> list[str]:
        return [k for s in self._node_services.get(node, {}).values() for k in s.watch_keys()]

    # ---- services --------------------------------------------------------------------------
    # `services` is the table; the dicts beside it are its secondary indexes (by node, by
    # watch key), kept in step by _add_service/_drop_service so that reads never scan.

    def _add_service(self, svc: Service) -> None:
        self.services[(svc.node, svc.id)] = svc
        self._node_services.setdefault(svc.node, {})[svc.id] = svc
        for key in svc.watch_keys():
            self._watched.setdefault(key, {})[(svc.node, svc.id)] = svc

    def _drop_service(self, svc: Service) -> None:
        self.services.pop((svc.node, svc.id), None)
        self._node_services.get(svc.node, {}).pop(svc.id, None)
        for key in svc.watch_keys():
            self._watched.get(key, {}).pop((svc.node, svc.id), None)

    def node_services(self, node: str) -> list[Service]:
        return list(self._node_services.get(node, {}).values())

    def instances(self, watch_key: str) -> list[Service]:
        """Instances behind a watch key: `service/<name>`, or `connect/<name>` (the sidecar
        proxies for <name> and its Connect-native instances)."""
        return list(self._watched.get(watch_key, {}).values())

    def upsert_service(self, svc: Service) -> int:
        key = (svc.node, svc.id)
        old = self.services.get(key)
        if old is not None and old.data == svc.data and old.local == svc.local:
            return self.index
        idx = self.index + 1
        svc.create_index = old.create_index if old else idx
        svc.modify_index = idx
        if old is not None:
            self._drop_service(old)
        self._add_service(svc)
        keys = svc.watch_keys() + (old.watch_keys() if old else [])
        # Checks carry the service's name and tags; keep them in step.
        for chk in self._node_checks.get(svc.node, {}).values():
            if chk.service_id == svc.id:
                chk.service_name = svc.name
                chk.service_tags = list(svc.data.get("Tags") or [])
        return self._commit(["services"], keys)

    def delete_service(self, node: str, service_id: str) -> int:
        svc = self.services.get((node, service_id))
        if svc is None:
            return self.index
        self._drop_service(svc)
        for chk in list(self._node_checks.get(node, {}).values()):
            if chk.service_id == service_id:
                self._drop_check(chk)
        return self._commit(["services", "checks"], svc.watch_keys())

    # ---- checks ----------------------------------------------------------------------------

    def _add_check(self, chk: Check) -> None:
        self.checks[(chk.node, chk.check_id)] = chk
        self._node_checks.setdefault(chk.node, {})[chk.check_id] = chk

    def _drop_check(self, chk: Check) -> None:
        self.checks.pop((chk.node, chk.check_id), None)
        self._node_checks.get(chk.node, {}).pop(chk.check_id, None)

    def _check_keys(self, chk: Check) -> list[str]:
        if chk.service_id:
            svc = self.services.get((chk.node, chk.service_id))
            return svc.watch_keys() if svc else []
        return self._node_keys(chk.node)

    def upsert_check(self, chk: Check) -> int:
        key = (chk.node, chk.check_id)
        old = self.checks.get(key)
        idx = self.index + 1
        chk.create_index = old.create_index if old else idx
        chk.modify_index = idx
        self._add_check(chk)
        keys = self._check_keys(chk) + (self._check_keys(old) if old else [])
        return self._commit(["checks"], keys)

    def update_check_status(self, node: str, check_id: str, status: str, output: str) -> int:
        """Set status and output; an update that changes nothing writes nothing, as the
        agent's anti-entropy sync skips checks that are already in sync."""
        chk = self.checks.get((node, check_id))
        if chk is None or (chk.status, chk.output) == (status, output):
            return self.index
        chk.status, chk.output = status, output
        chk.modify_index = self.index + 1
        return self._commit(["checks"], self._check_keys(chk))

    def delete_check(self, node: str, check_id: str) -> int:
        chk = self.checks.get((node, check_id))
        if chk is None:
            return self.index
        self._drop_check(chk)
        return self._commit(["checks"], self._check_keys(chk))

    def instance_checks(self, node: str, service_id: str) -> list[Check]:
        """What decides an instance's health: its node's checks and its own, in CheckID order
        (Consul reads them off the node index and filters)."""
        found = self._node_checks.get(node, {}).values()
        return sorted((c for c in found if c.service_id in ("", service_id)), key=_by_id)

    def checks_of(self, node: str, service_id: str | None) -> list[Check]:
        """Checks on a node: all of them (None), one instance's, or the node-level ones ('')."""
        found = self._node_checks.get(node, {}).values()
        return sorted(
            (c for c in found if service_id is None or c.service_id == service_id), key=_by_id
        )

    # ---- KV ----------------------------------------------------------------------------------

    def kv_put(self, key: str, value: bytes, flags: int) -> int:
        old = self.kv.get(key)
        idx = self.index + 1
        self.kv[key] = KVEntry(
            key=key,
            value=value,
            flags=flags,
            create_index=old.create_index if old else idx,
            modify_index=idx,
            lock_index=old.lock_index if old else 0,
            session=old.session if old else "",
        )
        self.tombstones.pop(key, None)
        return self._commit(["kvs"])

    def kv_lock(self, key: str, session: str, *, acquire: bool) -> int:
        entry = self.kv[key]
        if acquire:
            if entry.session != session:
                entry.lock_index += 1
            entry.session = session
        else:
            entry.session = ""
        entry.modify_index = self.index + 1
        return self._commit(["kvs"])

    def kv_delete(self, keys: list[str]) -> int:
        if not keys:
            return self.index
        idx = self.index + 1
        for k in keys:
            self.kv.pop(k, None)
            self.tombstones[k] = idx
        return self._commit(["kvs", "tombstones"])

    def kv_prefix_index(self, prefix: str) -> int:
        """Max modify index under a prefix, tombstones included, so deletes wake watchers."""
        best = max(
            [e.modify_index for k, e in self.kv.items() if k.startswith(prefix)]
            + [i for k, i in self.tombstones.items() if k.startswith(prefix)],
            default=0,
        )
        return best or self.table_index("kvs", "tombstones")

    # ---- config entries -----------------------------------------------------------------

    def config_set(self, entry: Entry) -> int:
        key = (entry.kind, entry.name)
        old = self.config.get(key)
        idx = self.index + 1
        self.config[key] = replace(
            entry, create_index=old.create_index if old else idx, modify_index=idx
        )
        return self._commit(["config"], [f"config/{entry.kind}"])

    def config_delete(self, kind: str, name: str) -> int:
        if self.config.pop((kind, name), None) is None:
            return self.index
        return self._commit(["config"], [f"config/{kind}"])

    # ---- sessions ----------------------------------------------------------------------------

    def session_create(self, session: Session) -> int:
        idx = self.index + 1
        session.create_index = session.modify_index = idx
        self.sessions[session.id] = session
        return self._commit(["sessions"])

    def session_destroy(self, session_id: str) -> int:
        if self.sessions.pop(session_id, None) is None:
            return self.index
        # Consul's default behaviour ("release"): locks held by the session are released.
        for entry in self.kv.values():
            if entry.session == session_id:
                entry.session = ""
                entry.modify_index = self.index + 1
        return self._commit(["sessions", "kvs"])

    # ---- ACLs and transactions ------------------------------------------------------------

    def commit_acl(self) -> int:
        """An ACL write: the index the written policy or token carries."""
        return self._commit(["acl"])

    def kv_apply(self, changes: dict[str, KVEntry | None]) -> int:
        """Apply a transaction's KV writes (None deletes) at one new index, all at once."""
        if not changes:
            return self.index
        idx = self.index + 1
        for key, entry in changes.items():
            if entry is None:
                if self.kv.pop(key, None) is not None:
                    self.tombstones[key] = idx
            else:
                self.kv[key] = entry
                self.tombstones.pop(key, None)
        return self._commit(["kvs", "tombstones"])
