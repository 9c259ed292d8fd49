"""/v1/kv/*: the key/value store, with CAS, flags, locks and blocking reads."""

from __future__ import annotations

import base64
from typing import Any

from devstack.httpapi import Call, HTTPError, Reply, Router, RPCError, bad_request
from devstack.store import KVEntry

MAX_VALUE_SIZE = 512 * 1024


def routes(router: Router) -> None:
    router.add("/v1/kv/", rpc=True, get=get, put=put, delete=delete)


def render_entry(e: KVEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": base64.b64encode(e.value).decode() if e.value else None,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    }
    if e.session:
        out["Session"] = e.session
    return out


def _uint(call: Call, name: str) -> int | None:
    raw = call.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request(f"Invalid {name} value: {raw!r}")
    return int(raw)


def _readable(call: Call, entries: list[KVEntry]) -> list[KVEntry]:
    shown = [e for e in entries if call.identity.allowed("key:read", e.key)]
    call.results_filtered = call.results_filtered or len(shown) < len(entries)
    return shown


async def get(call: Call) -> Reply:
    key = call.tail
    store = call.store
    if call.flag("keys"):
        return await _keys(call, key)
    recurse = call.flag("recurse")
    if not key and not recurse:
        raise bad_request("Missing key name")
    # Consul checks key:list only with acl.enable_key_list_policy (off by default); a
    # recursive read is filtered by key:read instead (kvs_endpoint.go List, FilterDirEnt).
    if not recurse:
        call.identity.require("key:read", key)

    def compute() -> tuple[int, list[KVEntry]]:
        if recurse:
            found = sorted(
                (e for k, e in store.kv.items() if k.startswith(key)), key=lambda e: e.key
            )
            return store.kv_prefix_index(key), _readable(call, found)
        entry = store.kv.get(key)
        if entry is None:
            return store.table_index("kvs", "tombstones"), []
        return entry.modify_index, [entry]

    index, entries = await call.blocking(compute)
    if not entries:
        return Reply(status=404, index=index)
    if call.flag("raw") and not recurse:
        return Reply(raw=entries[0].value, index=index, content_type="application/octet-stream")
    return call.reply([render_entry(e) for e in entries], index=index)


async def _keys(call: Call, prefix: str) -> Reply:
    sep = call.query.get("separator", "")
    store = call.store

    def compute() -> tuple[int, list[str]]:
        keys: set[str] = set()
        for k in store.kv:
            if not k.startswith(prefix):
                continue
            cut = k.find(sep, len(prefix)) if sep else -1
            keys.add(k[: cut + len(sep)] if cut >= 0 else k)
        readable = [k for k in sorted(keys) if call.identity.allowed("key:read", k)]
        call.results_filtered = call.results_filtered or len(readable) < len(keys)
        return store.kv_prefix_index(prefix), readable

    index, keys = await call.blocking(compute)
    if not keys:
        return Reply(status=404, index=index)
    return call.reply(keys, index=index)


async def put(call: Call) -> Reply:
    key = call.tail
    store = call.store
    if not key:
        raise bad_request("Missing key name")
    present = [f for f in ("cas", "acquire", "release") if f in call.query]
    if len(present) > 1:
        raise bad_request("Conflicting flags: " + "&".join(present))
    call.identity.require("key:write", key)
    flags = _uint(call, "flags") or 0
    cas = _uint(call, "cas")
    length = call.request.content_length or 0
    if length > MAX_VALUE_SIZE:
        raise HTTPError(
            413, f"Request body({length} bytes) too large, max size: {MAX_VALUE_SIZE} bytes"
        )
    value = await call.request.read()
    if len(value) > MAX_VALUE_SIZE:
        raise HTTPError(
            413, f"Request body({len(value)} bytes) too large, max size: {MAX_VALUE_SIZE} bytes"
        )
    existing = store.kv.get(key)
    if cas is not None:
        current = existing.modify_index if existing else 0
        if cas != current:
            return call.reply(False)
    for mode in ("acquire", "release"):
        if mode in call.query:
            session = call.query[mode]
            if mode == "acquire" and session not in store.sessions:
                raise RPCError(f'invalid session "{session}"')
            if mode == "release" and (existing is None or existing.session != session):
                # Releasing a lock one does not hold fails without changing the key.
                return call.reply(False)
            if existing is not None and existing.session and existing.session != session:
                return call.reply(False)
            store.kv_put(key, value, flags)
            store.kv_lock(key, session, acquire=mode == "acquire")
            return call.reply(True)
    store.kv_put(key, value, flags)
    return call.reply(True)


async def delete(call: Call) -> Reply:
    key = call.tail
    store = call.store
    recurse = call.flag("recurse")
    if not key and not recurse:
        raise bad_request("Missing key name")
    call.identity.require("key:write", key)
    cas = _uint(call, "cas")
    if recurse:
        store.kv_delete([k for k in store.kv if k.startswith(key)])
        return call.reply(True)
    existing = store.kv.get(key)
    # CAS delete: only when the key is still at the index the caller read (a key that is
    # already gone counts as deleted, as in Consul's kvsDeleteCASTxn).
    if cas is not None and (existing is None or existing.modify_index != cas):
        return call.reply(existing is None)
    store.kv_delete([key] if existing else [])
    return call.reply(True)
