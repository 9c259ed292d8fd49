"""/v1/connect/ca/* and /v1/agent/connect/*: roots, CA configuration, leaves, authorize.

As Consul's HTTP API documents them. Roots and leaves block on `?index=`; a leaf query parked on its
current ModifyIndex returns when that leaf reaches its soft expiry or the active root changes.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

from connect.identity import DEFAULT_PARTITION, IdentityError, ServiceIdentity, parse
from devstack import decode as schema
from devstack.connect_ca import CAConfigError, ConnectCA, IssuedLeaf, utcnow
from devstack.httpapi import Call, Reply, Router, RPCError, bad_request
from intentions.engine import Identity

PEM_CHAIN = "application/pem-certificate-chain"

CA_CONFIG = schema.Struct(
    "CAConfiguration",
    {
        "Provider": schema.STRING,
        "Config": schema.MapOf(schema.ANY),
        "State": schema.MapOf(schema.STRING),
        "ForceWithoutCrossSigning": schema.BOOL,
        "ClusterID": schema.STRING,
        "CreateIndex": schema.INT,
        "ModifyIndex": schema.INT,
    },
    snake_aliases=True,
)
AUTHORIZE = schema.Struct(
    "ConnectAuthorizeRequest",
    {
        "Target": schema.STRING,
        "ClientCertURI": schema.STRING,
        "ClientCertSerial": schema.STRING,
        "Namespace": schema.STRING,
        "Partition": schema.STRING,
    },
)

# Config keys that name a provider's root material: sending a new value rotates the root.
ROTATING_KEYS = ("PrivateKey", "RootCert", "RootPKIPath", "IntermediatePKIPath")


def routes(router: Router) -> None:
    router.add("/v1/connect/ca/roots", rpc=True, get=roots)
    router.add("/v1/agent/connect/ca/roots", rpc=True, get=agent_roots)
    router.add("/v1/connect/ca/configuration", rpc=True, get=get_config, put=put_config)
    router.add("/v1/agent/connect/ca/leaf/", rpc=True, get=leaf)
    router.add("/v1/agent/connect/authorize", post=authorize)


def _ca(call: Call) -> ConnectCA:
    return call.server.identity.ca


async def roots(call: Call) -> Reply:
    pem = call.bool_param("pem", "The 'pem' query parameter must be a boolean value")
    ca = _ca(call)
    index, body = await _blocking_roots(call, ca)
    if pem:
        return Reply(raw=ca.roots_pem().encode(), index=index, content_type=PEM_CHAIN)
    return call.reply(body, index=index)


async def agent_roots(call: Call) -> Reply:
    ca = _ca(call)
    index, body = await _blocking_roots(call, ca)
    reply = call.reply(body, index=index)
    reply.headers["X-Cache"] = "MISS"
    return reply


async def _park(call: Call, ca: ConnectCA, timeout: float) -> None:
    """Wait for a store write, the timeout, or the server closing: a shutting-down devstack
    answers its parked CA queries at once rather than holding its listener open."""
    change = asyncio.ensure_future(call.store.wait_for_change(timeout))
    closing = asyncio.ensure_future(ca.closing.wait())
    try:
        await asyncio.wait({change, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (change, closing):
            task.cancel()


async def _blocking_roots(call: Call, ca: ConnectCA) -> tuple[int, dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + call.wait
    while True:
        index = ca.roots_index()
        remaining = deadline - loop.time()
        if call.min_index == 0 or index > call.min_index or remaining <= 0 or ca.closing.is_set():
            return index, ca.roots_json()
        await _park(call, ca, remaining)


async def get_config(call: Call) -> Reply:
    call.identity.require("operator:write")
    ca = _ca(call)
    return call.reply(ca.config_json(), index=ca.config_modify_index)


async def put_config(call: Call) -> Reply:
    call.identity.require("operator:write")
    body = await call.body(CA_CONFIG)
    ca = _ca(call)
    state = body.get("State")
    if state:
        raise bad_request(
            "Provider State is read-only. It must be omitted or identical to the current value"
        )
    name = body.get("Provider") or ca.provider.name
    provider = call.server.identity.provider(name)
    if provider is None:
        raise RPCError(f"devstack: CA provider {name!r} is not available here")
    try:
        ca.update_config(
            provider,
            dict(body.get("Config") or {}),
            rotate_for=ROTATING_KEYS,
            cross_sign=not body.get("ForceWithoutCrossSigning", False),
            cluster_id=body.get("ClusterID") or "",
        )
    except CAConfigError as err:
        raise RPCError(f"error parsing CA config: {err}") from None
    return Reply()


async def leaf(call: Call) -> Reply:
    service = unquote(call.tail)
    if not service or "/" in service:
        raise bad_request("Missing service name")
    call.identity.require("service:write", service)
    ca = _ca(call)
    issued = await _blocking_leaf(call, ca, service)
    reply = call.reply(ca.leaf_json(issued), index=issued.modify_index)
    reply.headers["X-Cache"] = "MISS"
    return reply


async def _blocking_leaf(call: Call, ca: ConnectCA, service: str) -> IssuedLeaf:
    """Return at once unless `?index` names the current leaf; then wait until it must be
    replaced (soft expiry, root rotation) or the wait runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + call.wait
    while True:
        now = utcnow()
        issued = ca.leaf(service, now)
        remaining = deadline - loop.time()
        if (
            call.min_index == 0
            or issued.modify_index > call.min_index
            or remaining <= 0
            or ca.closing.is_set()
        ):
            return issued
        until = issued.soft_expiry
        resign = ca.resign_at(issued)
        if resign is not None:
            until = min(until, resign)
        await _park(call, ca, max(0.0, min(remaining, (until - now).total_seconds())))


async def authorize(call: Call) -> Reply:
    body = await call.body(AUTHORIZE)
    target = body.get("Target", "")
    if not target:
        raise bad_request("Target service must be specified")
    try:
        ident = parse(body.get("ClientCertURI", ""))
    except IdentityError:
        raise bad_request("ClientCertURI not a valid Connect identifier") from None
    if not isinstance(ident, ServiceIdentity):
        raise bad_request("ClientCertURI not a valid Service identifier")
    call.identity.require("service:write", target)
    authorized, reason = _decide(call, ident, target)
    return call.reply({"Authorized": authorized, "Reason": reason})


def _decide(call: Call, source: ServiceIdentity, target: str) -> tuple[bool, str]:
    """consul:agent/connect_auth.go: partitions must match, then the first intention by
    precedence decides (an L7 intention answers this L4 question with deny), then the
    default; the trust domain is not checked here (the TLS handshake did that)."""
    if source.partition != DEFAULT_PARTITION:
        return False, f"Mismatched partitions: {source.partition} != {DEFAULT_PARTITION}"
    decision = call.server.intentions.snapshot().decide_connection(
        Identity(target), Identity(source.service, namespace=source.namespace)
    )
    return decision.allowed, decision.reason
