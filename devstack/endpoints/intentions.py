"""/v1/connect/intentions*: the legacy intention API, as views over service-intentions entries.

Since Consul 1.9 only config entries are stored; each source of the entry for destination D is
the intention `source => D`. Writes here edit those entries, with the same validation and
service-graph checks as `PUT /v1/config`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
from typing import Any, Literal

from devstack import decode as schema
from devstack.config_entries import ConfigEntryError, Entry, validate_graph
from devstack.filter_schemas import INTENTION as INTENTION_SCHEMA
from devstack.httpapi import Call, HTTPError, Reply, Router, RPCError, bad_request
from intentions import legacy
from intentions.engine import Identity
from intentions.entries import (
    KIND,
    ServiceIntentions,
    SourceIntention,
    decode_entry,
    drop_legacy_fields,
    entry_to_json,
    normalize,
    validate,
)
from intentions.errors import EntryDecodeError, InvalidEntry

# The legacy intention body (api.Intention); names come from the URL on the exact endpoint.
INTENTION = schema.Struct(
    "Intention",
    {
        "ID": schema.STRING,
        "Description": schema.STRING,
        "SourceNS": schema.STRING,
        "SourceName": schema.STRING,
        "SourcePartition": schema.STRING,
        "SourcePeer": schema.STRING,
        "SourceSamenessGroup": schema.STRING,
        "DestinationNS": schema.STRING,
        "DestinationName": schema.STRING,
        "DestinationPartition": schema.STRING,
        "SourceType": schema.STRING,
        "Action": schema.STRING,
        "Permissions": schema.ListOf(schema.MapOf(schema.ANY)),
        "Meta": schema.MapOf(schema.STRING),
        "Precedence": schema.INT,
        "CreatedAt": schema.STRING,
        "UpdatedAt": schema.STRING,
        "Hash": schema.STRING,
        "CreateIndex": schema.INT,
        "ModifyIndex": schema.INT,
    },
)


def routes(router: Router) -> None:
    router.add("/v1/connect/intentions", rpc=True, get=list_all, post=create_legacy)
    router.add(
        "/v1/connect/intentions/exact", rpc=True, get=get_exact, put=put_exact, delete=delete_exact
    )
    router.add("/v1/connect/intentions/match", rpc=True, get=match)
    router.add("/v1/connect/intentions/check", get=check)
    router.add(
        "/v1/connect/intentions/", rpc=True, get=get_by_id, put=put_by_id, delete=delete_by_id
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _entry_for(call: Call, name: str) -> ServiceIntentions | None:
    return next((e for e in call.server.intentions.entries() if e.name == name), None)


def _store(call: Call, model: ServiceIntentions | None, name: str, *, legacy_write: bool) -> None:
    """Validate and write (or delete) the entry for `name`, as PUT /v1/config would."""
    store = call.store
    previous = store.config.get((KIND, name))
    held = previous.intentions.sources if previous and previous.intentions else ()
    if legacy_write and any(not src.legacy_id for src in held):
        # Consul's checkLegacyIntentionApplyAllowed (CE names the service alone).
        raise RPCError(
            f'cannot use legacy intention API to edit intentions with a destination of "{name}"'
            " after editing them via a service-intentions config entry"
        )
    if model is None:
        proposed = {k: v for k, v in store.config.items() if k != (KIND, name)}
    else:
        model = normalize(model)
        if not legacy_write:
            model = drop_legacy_fields(model)
        try:
            validate(model, legacy_write=legacy_write)
        except InvalidEntry as err:
            raise RPCError(str(err)) from None
        entry = Entry(KIND, model.name, entry_to_json(model, with_indexes=False), model)
        proposed = {**store.config, (KIND, name): entry}
    try:
        validate_graph(proposed)
    except ConfigEntryError as err:
        raise RPCError(err.text) from None
    if model is None:
        store.config_delete(KIND, name)
    else:
        store.config_set(proposed[(KIND, name)])


def _source_from_body(
    body: dict[str, Any], source: str, *, legacy_id: str = "", created: str | None = None
) -> SourceIntention:
    """Read the source half of an intention body through the config-entry decoder, so that
    permissions get exactly the entry's decoding rules."""
    ns, name = legacy.parse_service_ref(source)
    raw: dict[str, Any] = {"Name": name, "Type": body.get("SourceType") or "consul"}
    if ns != "default":
        raw["Namespace"] = ns
    for key, out in (
        ("Action", "Action"),
        ("Description", "Description"),
        ("Permissions", "Permissions"),
    ):
        if body.get(key):
            raw[out] = body[key]
    try:
        parsed = decode_entry({"Kind": KIND, "Name": "_", "Sources": [raw]}).sources[0]
    except EntryDecodeError as err:
        raise bad_request(str(err)) from None
    if legacy_id:
        now = _now()
        parsed = dataclasses.replace(
            parsed,
            legacy_id=legacy_id,
            legacy_meta=tuple(sorted((body.get("Meta") or {}).items())),
            legacy_create_time=created or now,
            legacy_update_time=now,
        )
    return parsed


def _ref(call: Call, param: str, *, allow_peer: bool = False) -> str:
    value = call.query.get(param, "")
    if not value:
        raise RPCError(f"required query parameter '{param}' not set")
    try:
        legacy.parse_service_ref(value)
    except ValueError as err:
        raise RPCError(f'{param} "{value}" is invalid: {err}') from None
    return value


def _visible(call: Call, intention: legacy.LegacyIntention) -> bool:
    if call.identity.allowed("intentions:read", intention.entry.name):
        return True
    call.results_filtered = True
    return False


async def list_all(call: Call) -> Reply:
    f = call.filter(INTENTION_SCHEMA)
    state = call.server.intentions

    def compute() -> tuple[int, list[dict[str, Any]]]:
        out = [i.to_json() for i in legacy.legacy_intentions(state.entries()) if _visible(call, i)]
        return state.index(), [i for i in out if f is None or f.matches(i)]

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def get_exact(call: Call) -> Reply:
    source, destination = _ref(call, "source"), _ref(call, "destination")
    call.identity.require("intentions:read", legacy.parse_service_ref(destination)[1])
    found = legacy.exact(call.server.intentions.entries(), source, destination)
    if found is None:
        raise HTTPError(404, "Intention not found")
    return call.reply(found.to_json())


async def put_exact(call: Call) -> Reply:
    source, destination = _ref(call, "source"), _ref(call, "destination")
    name = legacy.parse_service_ref(destination)[1]
    call.identity.require("intentions:write", name)
    body = await call.body(INTENTION)
    src = _source_from_body(body, source)
    _store(
        call,
        legacy.upsert_source(_entry_for(call, name), destination, src),
        name,
        legacy_write=False,
    )
    return call.reply(True)


async def delete_exact(call: Call) -> Reply:
    source, destination = _ref(call, "source"), _ref(call, "destination")
    name = legacy.parse_service_ref(destination)[1]
    call.identity.require("intentions:write", name)
    entry = _entry_for(call, name)
    if entry is not None:
        _store(call, legacy.remove_source(entry, source), name, legacy_write=False)
    return call.reply(True)


async def match(call: Call) -> Reply:
    by = call.query.get("by", "")
    if not by:
        raise RPCError("required query parameter 'by' not set")
    if by not in ("source", "destination"):
        raise RPCError("'by' parameter must be one of 'source' or 'destination'")
    names = call.query.getall("name", [])
    if not names:
        raise RPCError("required query parameter 'name' not set")
    for n in names:
        try:
            legacy.parse_service_ref(n)
        except ValueError as err:
            raise RPCError(f'name "{n}" is invalid: {err}') from None
    direction: Literal["source", "destination"] = "source" if by == "source" else "destination"
    # Consul refuses the whole query when any name asked about is not intentions:read
    # (Intention.Match), rather than filtering the answer.
    for n in names:
        call.identity.require("intentions:read", legacy.parse_service_ref(n)[1])
    state = call.server.intentions

    def compute() -> tuple[int, dict[str, list[dict[str, Any]]]]:
        entries = state.entries()
        return state.index(), {
            n: [i.to_json() for i in legacy.match(entries, direction, n) if _visible(call, i)]
            for n in names
        }

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def check(call: Call) -> Reply:
    source, destination = _ref(call, "source"), _ref(call, "destination")
    source_type = call.query.get("source-type", "consul")
    if source_type != "consul":
        raise bad_request(f"unsupported SourceType: {source_type}")
    dst_ns, dst = legacy.parse_service_ref(destination)
    src_ns, src = legacy.parse_service_ref(source)
    call.identity.require("service:read", dst)
    decision = call.server.intentions.snapshot().decide_connection(
        Identity(dst, namespace=dst_ns), Identity(src, namespace=src_ns)
    )
    return call.reply({"Allowed": decision.allowed})


# ---- the deprecated ID-based API ------------------------------------------------------------


def _by_id(call: Call) -> legacy.LegacyIntention:
    ident = call.tail
    try:
        uuid.UUID(ident)
    except ValueError:
        raise bad_request(f"UUID must be 36 characters: {ident!r}") from None
    for i in legacy.legacy_intentions(call.server.intentions.entries()):
        if i.source.legacy_id == ident:
            return i
    raise HTTPError(404, "Intention not found")


async def _legacy_body(call: Call) -> dict[str, Any]:
    raw = await call.request.read()
    try:
        parsed = json.loads(raw) if raw.strip() else {}
        result: dict[str, Any] = schema.decode(parsed, INTENTION)
    except (json.JSONDecodeError, UnicodeDecodeError, schema.DecodeError) as err:
        # The legacy endpoint reports decode failures as server errors.
        raise RPCError(f"Failed to decode request body: {err}") from None
    except RecursionError:  # Go's decoder: past 10,000 levels; Python's: near 1,000
        raise RPCError("Failed to decode request body: exceeded max depth") from None
    for key, text in (
        ("DestinationPartition", "Cannot specify a destination partition with this endpoint"),
        ("SourcePartition", "Cannot specify a source partition with this endpoint"),
    ):
        if result.get(key):
            raise bad_request(text)
    if result.get("Permissions"):
        raise RPCError("Sources[0].Permissions cannot be set by legacy intentions")
    return result


async def create_legacy(call: Call) -> Reply:
    body = await _legacy_body(call)
    dest = body.get("DestinationName", "")
    call.identity.require("intentions:write", dest)
    source = _qualified(body.get("SourceNS", ""), body.get("SourceName", ""))
    destination = _qualified(body.get("DestinationNS", ""), dest)
    if legacy.exact(call.server.intentions.entries(), source, destination) is not None:
        raise RPCError(f"duplicate intention found: {source} => {destination}")
    ident = str(uuid.uuid4())
    src = _source_from_body(body, source, legacy_id=ident)
    _store(
        call,
        legacy.upsert_source(_entry_for(call, dest), destination, src),
        dest,
        legacy_write=True,
    )
    return call.reply({"ID": ident})


def _qualified(ns: str, name: str) -> str:
    return f"{ns}/{name}" if ns and ns != "default" else name


async def get_by_id(call: Call) -> Reply:
    found = _by_id(call)
    call.identity.require("intentions:read", found.entry.name)
    return call.reply(found.to_json())


async def put_by_id(call: Call) -> Reply:
    found = _by_id(call)
    body = await _legacy_body(call)
    name = found.entry.name
    call.identity.require("intentions:write", name)
    source = _qualified(found.source.namespace, found.source.name)
    src = _source_from_body(
        body, source, legacy_id=found.source.legacy_id, created=found.source.legacy_create_time
    )
    destination = _qualified(found.entry.namespace, name)
    _store(call, legacy.upsert_source(found.entry, destination, src), name, legacy_write=True)
    return call.reply({"ID": found.source.legacy_id})


async def delete_by_id(call: Call) -> Reply:
    found = _by_id(call)
    name = found.entry.name
    call.identity.require("intentions:write", name)
    source = _qualified(found.source.namespace, found.source.name)
    _store(call, legacy.remove_source(found.entry, source), name, legacy_write=True)
    return call.reply(True)
