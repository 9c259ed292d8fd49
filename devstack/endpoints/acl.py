"""/v1/acl/*: policies and tokens (consul agent/acl_endpoint.go).

Reads need `acl:read`, writes `acl:write`; a token list shows secrets only to a caller with
`acl:write`. With ACLs off every route answers 401 `ACL support disabled`. Refusals of the
state machine (unknown policy link, duplicate name, rules that do not parse) are 500 with
Consul's text, as Consul's RPC errors are.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from devstack import decode as schema
from devstack.acl import HIDDEN_SECRET, ACLInvalid, ACLNotFound, Authorizer
from devstack.httpapi import Call, HTTPError, Reply, Router, RPCError, bad_request

_LINK = schema.Struct("ACLLink", {"ID": schema.STRING, "Name": schema.STRING})
POLICY = schema.Struct(
    "ACLPolicy",
    {
        "ID": schema.STRING,
        "Name": schema.STRING,
        "Description": schema.STRING,
        "Rules": schema.STRING,
        "Datacenters": schema.ListOf(schema.STRING),
        "Hash": schema.ANY,
        "CreateIndex": schema.INT,
        "ModifyIndex": schema.INT,
        "Namespace": schema.STRING,
        "Partition": schema.STRING,
    },
)
TOKEN = schema.Struct(
    "ACLToken",
    {
        "AccessorID": schema.STRING,
        "SecretID": schema.STRING,
        "Description": schema.STRING,
        "Policies": schema.ListOf(_LINK),
        "Roles": schema.ListOf(_LINK),
        "ServiceIdentities": schema.ListOf(
            schema.Struct(
                "ACLServiceIdentity",
                {"ServiceName": schema.STRING, "Datacenters": schema.ListOf(schema.STRING)},
            )
        ),
        "NodeIdentities": schema.ListOf(
            schema.Struct(
                "ACLNodeIdentity", {"NodeName": schema.STRING, "Datacenter": schema.STRING}
            )
        ),
        "Local": schema.BOOL,
        "Rules": schema.STRING,
        "Type": schema.STRING,
        "ExpirationTTL": schema.DURATION,
        "ExpirationTime": schema.ANY,
        "CreateTime": schema.ANY,
        "Hash": schema.ANY,
        "CreateIndex": schema.INT,
        "ModifyIndex": schema.INT,
        "Namespace": schema.STRING,
        "Partition": schema.STRING,
    },
)


def routes(router: Router) -> None:
    router.add("/v1/acl/bootstrap", put=bootstrap)
    router.add("/v1/acl/login", post=login)
    router.add("/v1/acl/logout", post=logout)
    router.add("/v1/acl/policies", rpc=True, get=list_policies)
    router.add("/v1/acl/policy", put=create_policy)
    router.add(
        "/v1/acl/policy/", rpc=True, get=read_policy, put=update_policy, delete=delete_policy
    )
    router.add("/v1/acl/policy/name/", rpc=True, get=read_policy_by_name)
    router.add("/v1/acl/tokens", rpc=True, get=list_tokens)
    router.add("/v1/acl/token", put=create_token)
    router.add("/v1/acl/token/self", rpc=True, get=token_self)
    router.add("/v1/acl/token/", rpc=True, get=read_token, put=update_token, delete=delete_token)


def _acl(call: Call) -> Authorizer:
    if not call.server.acl.enabled:
        raise HTTPError(401, "ACL support disabled")
    return call.server.acl


async def _decode(call: Call, spec: schema.Struct, what: str) -> dict[str, Any]:
    raw = await call.request.read()
    if not raw.strip():
        return {}
    try:
        result: dict[str, Any] = schema.decode(json.loads(raw), spec)
    except (UnicodeDecodeError, json.JSONDecodeError, schema.DecodeError) as err:
        raise bad_request(f"{what} decoding failed: {err}") from None
    except RecursionError:  # Go's decoder: past 10,000 levels; Python's: near 1,000
        raise bad_request(f"{what} decoding failed: exceeded max depth") from None
    return result


def _state_error(err: ACLInvalid) -> RPCError:
    return RPCError(str(err))


def _lookup_id(what: str, raw: str) -> str:
    """Consul looks IDs up in a UUID index: a malformed one is a failed lookup (500)."""
    try:
        uuid.UUID(raw)
    except ValueError:
        raise RPCError(f"failed acl {what} lookup: UUID must be 36 characters") from None
    return raw


def _does_not_exist(what: str) -> HTTPError:
    # consul agent/acl_endpoint.go: 404 with acl.ACLResourceNotExistError.
    return HTTPError(404, f"Requested {what} does not exist: ACL not found")


# ---- policies -------------------------------------------------------------------------------


async def bootstrap(call: Call) -> Reply:
    _acl(call)
    # The initial management token is configured, which is Consul's "already bootstrapped".
    raise HTTPError(403, "Permission denied: ACL bootstrap no longer allowed (reset index: 1)")


async def list_policies(call: Call) -> Reply:
    acl = _acl(call)
    call.identity.require("acl:read")
    policies = sorted(acl.policies.values(), key=lambda p: p.id)
    return call.reply([p.render(stub=True) for p in policies], index=call.store.table_index("acl"))


async def create_policy(call: Call) -> Reply:
    acl = _acl(call)
    body = await _decode(call, POLICY, "Policy")
    call.identity.require("acl:write")
    if body.get("ID"):
        raise bad_request("Cannot specify the ID when creating a new policy")
    try:
        return call.reply(acl.set_policy(body, "").render())
    except ACLInvalid as err:
        raise _state_error(err) from None


async def update_policy(call: Call) -> Reply:
    acl = _acl(call)
    body = await _decode(call, POLICY, "Policy")
    call.identity.require("acl:write")
    policy_id = call.tail
    if body.get("ID") and body["ID"] != policy_id:
        raise bad_request("Policy ID in URL and payload do not match")
    try:
        return call.reply(acl.set_policy(body, policy_id).render())
    except ACLInvalid as err:
        raise _state_error(err) from None


async def read_policy(call: Call) -> Reply:
    acl = _acl(call)
    if not call.tail:
        raise bad_request("Missing policy ID")
    call.identity.require("acl:read")
    policy = acl.policies.get(_lookup_id("policy", call.tail))
    if policy is None:
        raise _does_not_exist("policy")
    return call.reply(policy.render(), index=policy.modify_index)


async def read_policy_by_name(call: Call) -> Reply:
    acl = _acl(call)
    if not call.tail:
        raise bad_request("Missing policy Name")
    call.identity.require("acl:read")
    policy = acl.policy_by_name(call.tail)
    if policy is None:
        raise _does_not_exist("policy")
    return call.reply(policy.render(), index=policy.modify_index)


async def delete_policy(call: Call) -> Reply:
    acl = _acl(call)
    if not call.tail:
        raise bad_request("Missing policy ID")
    call.identity.require("acl:write")
    try:
        acl.delete_policy(call.tail)
    except ACLInvalid as err:
        raise _state_error(err) from None
    return call.reply(True)


# ---- tokens ---------------------------------------------------------------------------------


async def login(call: Call) -> Reply:
    _acl(call)
    # devstack has no auth methods, so every login names one that does not exist.
    raise RPCError("ACL not found: auth method not found")


async def logout(call: Call) -> Reply:
    acl = _acl(call)
    token = acl.tokens.get(call.identity.accessor_id)
    if token is None or call.identity.anonymous:
        raise ACLNotFound
    # Only tokens made by a login may log out, and devstack makes none.
    raise HTTPError(403, "Permission denied")


async def list_tokens(call: Call) -> Reply:
    acl = _acl(call)
    call.identity.require("acl:read")
    show = call.identity.allowed("acl:write")
    wanted = call.query.get("policy", "")
    tokens = sorted(acl.tokens.values(), key=lambda t: t.accessor_id)
    out = [
        acl.render_token(t, show_secret=show) | {"Legacy": False}
        for t in tokens
        if not wanted or wanted in t.policy_ids
    ]
    return call.reply(out, index=call.store.table_index("acl"))


async def create_token(call: Call) -> Reply:
    acl = _acl(call)
    body = await _decode(call, TOKEN, "Token")
    call.identity.require("acl:write")
    try:
        token = acl.set_token(body, "", call.server.config.datacenter)
    except ACLInvalid as err:
        raise _state_error(err) from None
    return call.reply(acl.render_token(token))


async def update_token(call: Call) -> Reply:
    acl = _acl(call)
    body = await _decode(call, TOKEN, "Token")
    if call.tail.endswith("/clone"):
        call.identity.require("acl:write")
        try:
            clone = acl.clone(call.tail.removesuffix("/clone"), body.get("Description"))
        except ACLInvalid as err:
            raise _state_error(err) from None
        return call.reply(acl.render_token(clone))
    call.identity.require("acl:write")
    if body.get("AccessorID") and body["AccessorID"] != call.tail:
        raise bad_request("Token Accessor ID in URL and payload do not match")
    try:
        token = acl.set_token(body, call.tail, call.server.config.datacenter)
    except ACLInvalid as err:
        raise _state_error(err) from None
    return call.reply(acl.render_token(token))


async def read_token(call: Call) -> Reply:
    acl = _acl(call)
    if not call.tail:
        raise bad_request("Missing token ID")
    call.identity.require("acl:read")
    token = acl.tokens.get(call.tail)
    if token is None:
        # ACL.TokenRead answers a missing token with acl.ErrNotFound (403), unlike policies
        # (py-consul's test_acl_token_delete relies on it).
        raise ACLNotFound
    body = acl.render_token(token, show_secret=call.identity.allowed("acl:write"))
    return call.reply(body, index=token.modify_index)


async def token_self(call: Call) -> Reply:
    acl = _acl(call)
    # Any token may read itself; it proves its secret by presenting it.
    token = acl.tokens.get(call.identity.accessor_id)
    if token is None:
        raise ACLNotFound
    return call.reply(acl.render_token(token), index=token.modify_index)


async def delete_token(call: Call) -> Reply:
    acl = _acl(call)
    if not call.tail:
        raise bad_request("Missing token ID")
    call.identity.require("acl:write")
    try:
        acl.delete_token(call.tail, call.identity.accessor_id)
    except ACLInvalid as err:
        raise _state_error(err) from None
    return call.reply(True)


__all__ = ["HIDDEN_SECRET", "routes"]
