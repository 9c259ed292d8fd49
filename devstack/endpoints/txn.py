"""/v1/txn: KV operations applied as one transaction (consul agent/txn_endpoint.go).

Every operation runs against a scratch view of the KV store; if any fails, nothing is
applied and the answer is 409 with `Errors` (`OpIndex`, `What`), otherwise the writes land at
one new index and the answer is 200 with `Results`. Verbs, per-verb ACL checks and error
texts follow consul `agent/consul/state/txn.go`, `state/kvs.go` and
`agent/consul/txn_endpoint.go` (`kvsPreApply`: delete-tree needs `key:write` on the prefix,
check-index/check-session `key:read`, get/get-tree are filtered by `key:read` on the way out,
everything else needs `key:write`). Node, service, check and session operations are not
served: devstack answers 400 naming the operation.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace
from typing import Any

from devstack.acl import PermissionDenied
from devstack.endpoints.kv import MAX_VALUE_SIZE, render_entry
from devstack.httpapi import Call, HTTPError, Reply, Router, bad_request
from devstack.store import KVEntry, Store

# consul agent/txn_endpoint.go maxTxnOps.
MAX_OPS = 128
# TxnMaxReqLen defaults to the suggested raft entry size, as KVMaxValueSize does.
MAX_REQUEST = MAX_VALUE_SIZE

WRITE_VERBS = {"set", "delete", "delete-cas", "delete-tree", "cas", "lock", "unlock"}
READ_VERBS = {"get", "get-tree", "check-index", "check-session", "check-not-exists"}
NON_KV = ("Node", "Service", "Check", "Session", "Intention")


def routes(router: Router) -> None:
    router.add("/v1/txn", put=apply)


@dataclass(frozen=True)
class KVOp:
    verb: str
    key: str
    value: bytes
    flags: int
    index: int
    session: str


class OpFailed(Exception):
    """One operation's failure; the transaction goes on to collect every failure."""


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _field(raw: dict[str, Any], name: str) -> Any:
    # Go's decoder matches field names case-insensitively.
    for key, value in raw.items():
        if key.lower() == name.lower():
            return value
    return None


def _uint(raw: dict[str, Any], name: str, at: int) -> int:
    value = _field(raw, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(
            f"Failed to parse body: operation {at}: KV.{name} must be an unsigned integer"
        )
    return value


def _string(raw: dict[str, Any], name: str, at: int) -> str:
    value = _field(raw, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_request(f"Failed to parse body: operation {at}: KV.{name} must be a string")
    return value


def decode_ops(raw_body: bytes) -> list[KVOp]:
    """The request body as KV operations; HTTPError (400/413) with Consul's text otherwise."""
    try:
        data = json.loads(raw_body) if raw_body.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"Failed to parse body: {err}") from None
    except RecursionError:  # Go's decoder: past 10,000 levels; Python's: near 1,000
        raise bad_request("Failed to parse body: exceeded max depth") from None
    if data is None:
        data = []
    if not isinstance(data, list):
        raise bad_request(
            "Failed to parse body: json: cannot unmarshal "
            f"{type(data).__name__} into Go value of type api.TxnOps"
        )
    if len(data) > MAX_OPS:
        raise HTTPError(413, f"Transaction contains too many operations ({len(data)} > {MAX_OPS})")
    ops: list[KVOp] = []
    for at, item in enumerate(data):
        if not isinstance(item, dict):
            raise bad_request(f"Failed to parse body: operation {at} is not an object")
        kv = _field(item, "KV")
        if kv is None:
            other = next((k for k in NON_KV if _field(item, k) is not None), None)
            what = f"{other} operations" if other else "operations without a KV member"
            raise bad_request(f"devstack's /v1/txn serves KV operations only, not {what} (op {at})")
        if not isinstance(kv, dict):
            raise bad_request(f"Failed to parse body: unexpected raw KV type: {type(kv).__name__}")
        encoded = _field(kv, "Value")
        value = b""
        if encoded is not None:
            if not isinstance(encoded, str):
                raise bad_request(
                    f"Failed to parse body: unexpected value type: {type(encoded).__name__}"
                )
            try:
                value = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as err:
                raise bad_request(f"Failed to parse body: failed to decode value: {err}") from None
        key = _string(kv, "Key", at)
        if len(value) > MAX_VALUE_SIZE:
            raise HTTPError(
                413,
                f"Value for key {_go_quote(key)} is too large "
                f"({len(value)} > {MAX_VALUE_SIZE} bytes)",
            )
        ops.append(
            KVOp(
                verb=_string(kv, "Verb", at),
                key=key,
                value=value,
                flags=_uint(kv, "Flags", at),
                index=_uint(kv, "Index", at),
                session=_string(kv, "Session", at),
            )
        )
    return ops


class Scratch:
    """The store's KV table as a transaction sees it: its own writes over the committed state."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.index = store.index + 1
        self.changes: dict[str, KVEntry | None] = {}

    def get(self, key: str) -> KVEntry | None:
        if key in self.changes:
            return self.changes[key]
        return self.store.kv.get(key)

    def tree(self, prefix: str) -> list[KVEntry]:
        keys = {k for k in self.store.kv if k.startswith(prefix)}
        keys |= {k for k in self.changes if k.startswith(prefix)}
        found = (self.get(k) for k in sorted(keys))
        return [e for e in found if e is not None]

    def put(self, op: KVOp, old: KVEntry | None, **extra: Any) -> KVEntry:
        entry = KVEntry(
            key=op.key,
            value=op.value,
            flags=op.flags,
            create_index=old.create_index if old else self.index,
            modify_index=self.index,
            lock_index=old.lock_index if old else 0,
            session=old.session if old else "",
        )
        entry = replace(entry, **extra)
        self.changes[op.key] = entry
        return entry


def run_op(view: Scratch, op: KVOp) -> list[KVEntry]:
    """Apply one operation to the scratch view; the entries it reports, or OpFailed."""
    key = _go_quote(op.key)
    old = view.get(op.key)
    sessions = view.store.sessions
    match op.verb:
        case "set":
            return [view.put(op, old)]
        case "cas":
            if (op.index == 0 and old is not None) or (
                op.index != 0 and (old is None or old.modify_index != op.index)
            ):
                raise OpFailed(f"failed to set key {key}, index is stale")
            return [view.put(op, old)]
        case "lock":
            if not op.session:
                raise OpFailed("missing session")
            if op.session not in sessions:
                raise OpFailed(f"invalid session {_go_quote(op.session)}")
            if old is not None and old.session and old.session != op.session:
                raise OpFailed(f"failed to lock key {key}, lock is already held")
            held = old is not None and old.session == op.session
            lock_index = (old.lock_index if old else 0) + (0 if held else 1)
            return [view.put(op, old, session=op.session, lock_index=lock_index)]
        case "unlock":
            if old is None or not old.session or old.session != op.session:
                raise OpFailed(
                    f"failed to unlock key {key}, lock isn't held, or is held by another session"
                )
            return [view.put(op, old, session="")]
        case "get":
            if old is None:
                raise OpFailed(f"key {key} doesn't exist")
            return [old]
        case "get-tree":
            return view.tree(op.key)
        case "check-index":
            if old is None:
                raise OpFailed(f"failed to check index, key {key} doesn't exist")
            if old.modify_index != op.index:
                raise OpFailed(
                    f"failed index check for key {key}, current modify index "
                    f"{old.modify_index} != {op.index}"
                )
            return [old]
        case "check-session":
            if old is None:
                raise OpFailed(f"failed to check session, key {key} doesn't exist")
            if old.session != op.session:
                raise OpFailed(
                    f"failed session check for key {key}, current session "
                    f"{_go_quote(old.session)} != {_go_quote(op.session)}"
                )
            return [old]
        case "check-not-exists":
            if old is not None:
                raise OpFailed(f"key {key} exists")
            return []
        case "delete":
            view.changes[op.key] = None
            return []
        case "delete-cas":
            if old is not None and old.modify_index != op.index:
                raise OpFailed(f"failed to delete key {key}, index is stale")
            view.changes[op.key] = None
            return []
        case "delete-tree":
            for entry in view.tree(op.key):
                view.changes[entry.key] = None
            return []
    raise OpFailed(f"unknown KV verb {_go_quote(op.verb)}")


def _permission(op: KVOp) -> str | None:
    if op.verb in ("get", "get-tree"):
        return None  # filtered on the way out
    if op.verb in ("check-index", "check-session"):
        return "key:read"
    return "key:write"


async def apply(call: Call) -> Reply:
    length = call.request.content_length or 0
    if length > MAX_REQUEST:
        raise HTTPError(413, f"Request body too large, max size: {MAX_REQUEST} bytes")
    raw = await call.request.content.read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        raise HTTPError(413, f"Request body too large, max size: {MAX_REQUEST} bytes")
    ops = decode_ops(raw)

    errors: list[dict[str, Any]] = []
    for at, op in enumerate(ops):
        permission = _permission(op)
        try:
            if permission is not None:
                call.identity.require(permission, op.key)
        except PermissionDenied as err:
            errors.append({"OpIndex": at, "What": str(err)})
    if errors:
        return _conflict(errors)

    view = Scratch(call.store)
    results: list[dict[str, Any]] = []
    for at, op in enumerate(ops):
        try:
            entries = run_op(view, op)
        except OpFailed as err:
            errors.append({"OpIndex": at, "What": str(err)})
            continue
        for entry in entries:
            # Filtered silently: Consul's Txn handler sets no X-Consul-Results-Filtered header.
            if op.verb in ("get", "get-tree") and not call.identity.allowed("key:read", entry.key):
                continue
            shown = entry if op.verb in ("get", "get-tree") else replace(entry, value=b"")
            results.append({"KV": render_entry(shown)})
    if errors:
        return _conflict(errors)
    call.store.kv_apply(view.changes)
    headers = {}
    if not any(op.verb in WRITE_VERBS for op in ops):
        headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
    return Reply(body={"Results": results, "Errors": None}, headers=headers)


def _conflict(errors: list[dict[str, Any]]) -> Reply:
    return Reply(body={"Results": None, "Errors": errors}, status=409)
