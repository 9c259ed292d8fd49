"""/v1/health/*: service instances with their checks, and checks by service, state, node."""

from __future__ import annotations

from typing import Any

from devstack import render
from devstack.endpoints.catalog import (
    InstanceQuery,
    node_matches,
    node_meta_filter,
    service_name_of,
)
from devstack.filter_schemas import AGENT_CHECK, HEALTH_ENTRY
from devstack.httpapi import Call, Reply, Router, bad_request
from devstack.store import PASSING, Check


def routes(router: Router) -> None:
    router.add("/v1/health/service/", rpc=True, get=service)
    router.add("/v1/health/connect/", rpc=True, get=connect)
    router.add("/v1/health/ingress/", rpc=True, get=ingress)
    router.add("/v1/health/checks/", rpc=True, get=checks)
    router.add("/v1/health/state/", rpc=True, get=state)
    router.add("/v1/health/node/", rpc=True, get=node)


def _visible_checks(call: Call, checks: list[Check]) -> list[dict[str, Any]]:
    return [
        render.check(c)
        for c in checks
        if call.identity.allowed(
            "service:read" if c.service_id else "node:read",
            c.service_name if c.service_id else c.node,
        )
    ]


async def _entries(call: Call, *, connect: bool) -> Reply:
    query = InstanceQuery.parse(call, connect=connect)
    passing = call.bool_param("passing", "Invalid value for ?passing")
    f = call.filter(HEALTH_ENTRY)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        index, selected = query.select(call)
        out = []
        for n, s in selected:
            checks = call.store.instance_checks(s.node, s.id)
            # Any check that is not passing (node checks and warnings included) hides it.
            if passing and any(c.status != PASSING for c in checks):
                continue
            entry = {
                "Node": render.node(n),
                "Service": render.node_service(s),
                "Checks": _visible_checks(call, checks),
            }
            if f is None or f.matches(entry):
                out.append(entry)
        return index, out

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def service(call: Call) -> Reply:
    return await _entries(call, connect=False)


async def connect(call: Call) -> Reply:
    return await _entries(call, connect=True)


async def ingress(call: Call) -> Reply:
    """Ingress gateways that route to the service. Routing to a service through an ingress
    gateway needs its config entry, which devstack does not hold yet: none route anywhere."""
    service_name_of(call)
    call.bool_param("passing", "Invalid value for ?passing")
    call.filter(HEALTH_ENTRY)
    return call.reply([], index=call.store.table_index("services"))


def _check_list(call: Call, selected: list[Check]) -> list[dict[str, Any]]:
    f = call.filter(AGENT_CHECK)
    out = _visible_checks(call, sorted(selected, key=lambda c: (c.node, c.check_id)))
    return [c for c in out if f.matches(c)] if f is not None else out


async def checks(call: Call) -> Reply:
    name = service_name_of(call)
    meta = node_meta_filter(call)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        store = call.store
        selected = [
            c
            for s in store.instances(f"service/{name}")
            if node_matches(store.nodes[s.node], meta)
            for c in store.checks_of(s.node, s.id)
        ]
        return store.key_index(f"service/{name}", "services"), _check_list(call, selected)

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def state(call: Call) -> Reply:
    wanted = call.tail
    if not wanted:
        raise bad_request("Missing check state")
    meta = node_meta_filter(call)

    def compute() -> tuple[int, list[dict[str, Any]]]:
        store = call.store
        selected = [
            c
            for c in store.checks.values()
            if wanted in ("any", c.status) and node_matches(store.nodes[c.node], meta)
        ]
        return store.table_index("checks"), _check_list(call, selected)

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)


async def node(call: Call) -> Reply:
    name = call.tail
    if not name:
        raise bad_request("Missing node name")

    def compute() -> tuple[int, list[dict[str, Any]]]:
        store = call.store
        selected = [c for c in store.checks.values() if c.node == name]
        return store.table_index("checks", "nodes"), _check_list(call, selected)

    index, out = await call.blocking(compute)
    return call.reply(out, index=index)
