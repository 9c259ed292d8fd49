"""/v1/session/*: sessions, which KV locks (acquire/release) are held by."""

from __future__ import annotations

import uuid
from typing import Any

from devstack import decode as schema
from devstack.durations import DurationError, format_duration, parse_duration
from devstack.httpapi import Call, Reply, Router, RPCError, bad_request, not_found
from devstack.store import Session

DEFAULT_LOCK_DELAY = 15_000_000_000


def routes(router: Router) -> None:
    router.add("/v1/session/create", rpc=True, put=create)
    router.add("/v1/session/destroy/", rpc=True, put=destroy)
    router.add("/v1/session/renew/", rpc=True, put=renew)
    router.add("/v1/session/info/", rpc=True, get=info)
    router.add("/v1/session/node/", rpc=True, get=by_node)
    router.add("/v1/session/list", rpc=True, get=listing)


def render(s: Session) -> dict[str, Any]:
    return {
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay,
        "Behavior": s.behavior,
        "TTL": s.ttl,
        "NodeChecks": list(s.node_checks),
        "ServiceChecks": None,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    }


async def create(call: Call) -> Reply:
    body = await call.body(schema.SESSION)
    node = body.get("Node") or call.server.config.node_name
    if node not in call.store.nodes:
        raise RPCError(f"Missing node registration for '{node}'")
    behavior = body.get("Behavior") or "release"
    if behavior not in ("release", "delete"):
        raise RPCError(f"Invalid Behavior setting '{behavior}'")
    ttl = body.get("TTL", "")
    if ttl:
        try:
            ttl_ns = parse_duration(ttl)
        except DurationError:
            raise bad_request(f"Request decode failed: invalid TTL {ttl!r}") from None
        if not 10_000_000_000 <= ttl_ns <= 86_400_000_000_000:
            raise RPCError(f"Invalid Session TTL '{ttl_ns}', must be between [10s=24h0m0s]")
        ttl = format_duration(ttl_ns)
    call.identity.require("session:write", node)
    checks = body.get("NodeChecks") or body.get("Checks")
    session = Session(
        id=str(uuid.uuid4()),
        name=body.get("Name", ""),
        node=node,
        lock_delay=body.get("LockDelay", DEFAULT_LOCK_DELAY),
        behavior=behavior,
        ttl=ttl,
        node_checks=list(checks) if checks is not None else ["serfHealth"],
        create_index=0,
        modify_index=0,
    )
    index = call.store.session_create(session)
    call.identity.require("session:write", session.node)
    call.server.session_ttl_started(session)
    return call.reply({"ID": session.id}, index=index)


async def destroy(call: Call) -> Reply:
    if not call.tail:
        raise bad_request("Missing session")
    call.identity.require("session:write", call.server.config.node_name)
    call.server.destroy_session(call.tail)
    return call.reply(True)


async def renew(call: Call) -> Reply:
    session = call.store.sessions.get(call.tail)
    if session is None:
        raise not_found(f"Session id '{call.tail}' not found")
    call.identity.require("session:write", session.node)
    call.server.session_ttl_started(session)
    return call.reply([render(session)], index=call.store.table_index("sessions"))


def _readable(call: Call, sessions: list[Session]) -> list[dict[str, Any]]:
    """Consul's filterSessions: session:read on the session's node."""
    shown = [render(s) for s in sessions if call.identity.allowed("session:read", s.node)]
    call.results_filtered = call.results_filtered or len(shown) < len(sessions)
    return shown


async def info(call: Call) -> Reply:
    def compute() -> tuple[int, list[dict[str, Any]]]:
        s = call.store.sessions.get(call.tail)
        return call.store.table_index("sessions"), _readable(call, [s] if s else [])

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def by_node(call: Call) -> Reply:
    def compute() -> tuple[int, list[dict[str, Any]]]:
        found = [s for s in call.store.sessions.values() if s.node == call.tail]
        return call.store.table_index("sessions"), _readable(call, found)

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def listing(call: Call) -> Reply:
    def compute() -> tuple[int, list[dict[str, Any]]]:
        return call.store.table_index("sessions"), _readable(
            call, list(call.store.sessions.values())
        )

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)
