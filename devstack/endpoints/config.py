"""/v1/config: config entries (service-defaults, proxy-defaults, service-intentions,
ingress-gateway, service-router, service-splitter, service-resolver, mesh), with CAS, blocking
reads, service-graph validation on write and delete, and the mesh entry's gate on
MutualTLSMode permissive."""

from __future__ import annotations

import json
from typing import Any

from devstack.config_entries import (
    INGRESS_GATEWAY,
    MESH,
    PROXY_DEFAULTS,
    ConfigEntryError,
    Entry,
    check_kind,
    check_mutual_tls_mode,
    load,
    validate_graph,
)
from devstack.httpapi import Call, HTTPError, Reply, Router, RPCError, bad_request
from intentions.entries import KIND as INTENTIONS_KIND
from traffic.entries import related_services


class _NotJSON(ValueError):
    pass


def _no_constant(name: str) -> object:
    # Go's encoding/json has no NaN or Infinity; Python's json reads them unless told not to.
    raise _NotJSON(f"invalid character {name[0]!r} looking for beginning of value")


def routes(router: Router) -> None:
    router.add("/v1/config", rpc=True, put=put)
    router.add("/v1/config/", rpc=True, get=get, delete=delete)


def _permission(kind: str, write: bool) -> str | None:
    """The ACL permission Consul requires for a kind (config.mdx's table)."""
    if kind == INTENTIONS_KIND:
        return "intentions:write" if write else "intentions:read"
    if kind in (PROXY_DEFAULTS, INGRESS_GATEWAY, MESH):
        return "mesh:write" if write else None
    return "service:write" if write else "service:read"


def _require(call: Call, kind: str, name: str, *, write: bool) -> None:
    permission = _permission(kind, write)
    if permission is not None:
        call.identity.require(permission, name)


def _cas(call: Call) -> int | None:
    raw = call.query.get("cas")
    if raw is None:
        return None
    if not raw.isdigit():
        raise bad_request(f"Failed to parse cas parameter: {raw!r}")
    return int(raw)


def _raise(err: ConfigEntryError) -> None:
    if err.status == 400:
        raise HTTPError(400, err.text) from None
    raise RPCError(err.text) from None


async def put(call: Call) -> Reply:
    raw = await call.request.read()
    try:
        body = json.loads(raw, parse_constant=_no_constant) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(f"Request decoding failed: {err}") from None
    except RecursionError:  # Go's decoder: past 10,000 levels; Python's: near 1,000
        raise bad_request("Request decoding failed: exceeded max depth") from None
    except _NotJSON as err:
        raise bad_request(f"Request decoding failed: {err}") from None
    try:
        entry = load(body)
    except ConfigEntryError as err:
        _raise(err)
        raise
    _require(call, entry.kind, entry.name, write=True)
    if entry.routing is not None:
        # canWriteDiscoveryChain: redirecting traffic to a service needs read on it.
        for service in related_services(entry.routing):
            call.identity.require("service:read", service)
    store = call.store
    key = (entry.kind, entry.name)
    cas = _cas(call)
    if cas is not None:
        current = store.config.get(key)
        if (current.modify_index if current else 0) != cas:
            return call.reply(False)
    proposed = {**store.config, key: entry}
    try:
        check_mutual_tls_mode(entry, store.config)
        validate_graph(proposed)
    except ConfigEntryError as err:
        _raise(err)
    store.config_set(entry)
    return call.reply(True)


def _kind_and_name(call: Call) -> tuple[str, str]:
    parts = call.tail.split("/")
    if len(parts) > 2 or not parts[0]:
        raise bad_request("Must provide either a kind or both kind and name")
    return parts[0], parts[1] if len(parts) == 2 else ""


async def get(call: Call) -> Reply:
    kind, name = _kind_and_name(call)
    try:
        check_kind(kind)
    except ConfigEntryError as err:
        _raise(err)
    store = call.store

    if name:
        _require(call, kind, name, write=False)

        def one() -> tuple[int, Entry | None]:
            return store.key_index(f"config/{kind}", "config"), store.config.get((kind, name))

        index, entry = await call.blocking(one)
        if entry is None:
            raise HTTPError(404, f'Config entry not found for "{kind}" / "{name}"')
        return call.reply(entry.to_json(), index=index)

    def listing() -> tuple[int, list[dict[str, Any]]]:
        found = []
        for (k, n), entry in sorted(store.config.items()):
            if k != kind:
                continue
            permission = _permission(kind, write=False)
            if permission is not None and not call.identity.allowed(permission, n):
                call.results_filtered = True
                continue
            found.append(entry.to_json())
        return store.key_index(f"config/{kind}", "config"), found

    index, found = await call.blocking(listing)
    return call.reply(found, index=index)


async def delete(call: Call) -> Reply:
    kind, name = _kind_and_name(call)
    if not name:
        raise bad_request("Must provide either a kind or both kind and name")
    try:
        check_kind(kind)
    except ConfigEntryError as err:
        raise HTTPError(400, err.text) from None
    _require(call, kind, name, write=True)
    store = call.store
    cas = _cas(call)
    current = store.config.get((kind, name))
    if cas is not None and (current is None or current.modify_index != cas):
        return call.reply(False)
    if current is not None:
        proposed = {k: v for k, v in store.config.items() if k != (kind, name)}
        try:
            validate_graph(proposed)
        except ConfigEntryError as err:
            _raise(err)
        store.config_delete(kind, name)
    return call.reply(True if cas is not None else {})
