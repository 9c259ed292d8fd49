"""Who may do what: Consul's token and policy model, in memory.

With ACLs off every request is allowed. With ACLs on a request's secret resolves to a token;
the token's policies, service identities and node identities compile (once per change of the
ACL state, not per request) into `acl_rules.Rules`, and what those rules leave open falls back
to the default policy, as Consul's chained authorizer does. The initial management token holds
the built-in `global-management` policy (everything, ACL management included); the anonymous
token (no secret, or the secret `anonymous`) starts without policies. An unknown secret is
"ACL not found".

Texts and shapes: consul `acl/errors.go` (PermissionDeniedError), `api/acl.go` (ACLToken,
ACLPolicy and their list entries), `agent/consul/acl_token_writer.go` and
`agent/consul/acl_endpoint.go` (validation messages).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from devstack.acl_rules import (
    Rules,
    RulesError,
    merge,
    node_identity_rules,
    parse_rules,
    service_identity_rules,
)

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
MANAGEMENT_ACCESSOR = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
HIDDEN_SECRET = "<hidden>"

_POLICY_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")


class ACLNotFound(Exception):
    def __str__(self) -> str:
        return "ACL not found"


class ACLInvalid(Exception):
    """A write Consul refuses in its RPC layer (answered 500 with this text, as Consul does)."""


class PermissionDenied(Exception):
    def __init__(self, identity: Identity, permission: str, resource: str | None) -> None:
        self.identity = identity
        self.permission = permission
        self.resource = resource

    def __str__(self) -> str:
        on = f' on "{self.resource}"' if self.resource is not None else ""
        if self.identity.anonymous:
            return (
                f"Permission denied: anonymous token lacks permission '{self.permission}'{on}. "
                "The anonymous token is used implicitly when a request does not specify a token."
            )
        return (
            f"Permission denied: token with AccessorID '{self.identity.accessor_id}' "
            f"lacks permission '{self.permission}'{on}"
        )


@dataclass(frozen=True)
class Identity:
    accessor_id: str
    allow_all: bool
    anonymous: bool
    # Whether the caller named a token: Consul only reports ACL filtering to such callers.
    token_given: bool
    rules: Rules | None = None
    default_allow: bool = False

    def allowed(self, permission: str, resource: str | None = None) -> bool:
        if self.allow_all:
            return True
        decision = self.rules.decide(permission, resource) if self.rules else None
        if decision is None:
            # acl.AllowAll() still refuses ACL management: only management tokens have it.
            return self.default_allow and not permission.startswith("acl:")
        return decision

    def require(self, permission: str, resource: str | None = None) -> None:
        if not self.allowed(permission, resource):
            raise PermissionDenied(self, permission, resource)


class IndexSource(Protocol):
    def commit_acl(self) -> int: ...


@dataclass
class Policy:
    id: str
    name: str
    description: str
    rules: str
    datacenters: list[str]
    compiled: Rules
    create_index: int
    modify_index: int

    def hash(self) -> str:
        text = json.dumps([self.name, self.description, self.rules, self.datacenters])
        return _b64(hashlib.blake2b(text.encode(), digest_size=32).digest())

    def render(self, *, stub: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ID": self.id,
            "Name": self.name,
            "Description": self.description,
        }
        if not stub:
            out["Rules"] = self.rules
        if self.datacenters:
            out["Datacenters"] = self.datacenters
        out |= {
            "Hash": self.hash(),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        return out


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    description: str
    policy_ids: list[str]
    service_identities: list[dict[str, Any]]
    node_identities: list[dict[str, Any]]
    local: bool
    create_time: str
    create_index: int
    modify_index: int
    # Unix time after which the token no longer resolves (ExpirationTTL/ExpirationTime).
    expires: float | None = None
    compiled: Rules | None = field(default=None, repr=False)

    def hash(self) -> str:
        text = json.dumps(
            [self.description, self.policy_ids, self.service_identities, self.node_identities]
        )
        return _b64(hashlib.blake2b(text.encode(), digest_size=32).digest())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"


class Authorizer:
    """The ACL state (policies, tokens) and the resolution of a secret to an Identity."""

    def __init__(
        self, management_token: str | None, default_policy: str, index: IndexSource | None = None
    ) -> None:
        self.enabled = management_token is not None
        self._default_allow = default_policy == "allow"
        self._index = index
        self.policies: dict[str, Policy] = {}
        self.tokens: dict[str, Token] = {}
        self._by_secret: dict[str, str] = {}
        # The agent's default token (PUT /v1/agent/token/default), used when none is given.
        self.default_token = ""
        if management_token is not None:
            self.policies[MANAGEMENT_POLICY_ID] = Policy(
                MANAGEMENT_POLICY_ID,
                MANAGEMENT_POLICY_NAME,
                "Builtin Policy that grants unlimited access",
                "",
                [],
                Rules(),
                1,
                1,
            )
            self._put_token(
                Token(
                    MANAGEMENT_ACCESSOR,
                    management_token,
                    "Initial Management Token",
                    [MANAGEMENT_POLICY_ID],
                    [],
                    [],
                    False,
                    _now(),
                    1,
                    1,
                )
            )
            self._put_token(
                Token(
                    ANONYMOUS_ACCESSOR,
                    "anonymous",
                    "Anonymous Token",
                    [],
                    [],
                    [],
                    False,
                    _now(),
                    1,
                    1,
                )
            )

    # ---- resolution ----------------------------------------------------------------------

    def resolve(self, secret: str) -> Identity:
        if not self.enabled:
            return Identity("", allow_all=True, anonymous=False, token_given=bool(secret))
        given = bool(secret)
        accessor = self._by_secret.get(secret or self.default_token or "anonymous")
        if accessor is None:
            raise ACLNotFound
        token = self.tokens[accessor]
        if token.expires is not None and time.time() >= token.expires:
            raise ACLNotFound
        if MANAGEMENT_POLICY_ID in token.policy_ids:
            return Identity(accessor, allow_all=True, anonymous=False, token_given=given)
        if token.compiled is None:
            token.compiled = merge(
                [self.policies[p].compiled for p in token.policy_ids if p in self.policies]
                + [service_identity_rules(s["ServiceName"]) for s in token.service_identities]
                + [node_identity_rules(n["NodeName"]) for n in token.node_identities]
            )
        return Identity(
            accessor,
            allow_all=False,
            anonymous=accessor == ANONYMOUS_ACCESSOR,
            token_given=given,
            rules=token.compiled,
            default_allow=self._default_allow,
        )

    def token_by_secret(self, secret: str) -> Token:
        accessor = self._by_secret.get(secret)
        if accessor is None:
            raise ACLNotFound
        return self.tokens[accessor]

    # ---- policies ------------------------------------------------------------------------

    def _next_index(self) -> int:
        return self._index.commit_acl() if self._index is not None else 1

    def _invalidate(self) -> None:
        for token in self.tokens.values():
            token.compiled = None

    def policy_by_name(self, name: str) -> Policy | None:
        return next((p for p in self.policies.values() if p.name == name), None)

    def set_policy(self, body: dict[str, Any], policy_id: str) -> Policy:
        """Create (policy_id "") or update a policy; ACLInvalid names what is wrong."""
        name = body.get("Name", "")
        if policy_id == MANAGEMENT_POLICY_ID:
            raise ACLInvalid(
                "Changing the Rules for the builtin global-management policy is not permitted"
            )
        old = self.policies.get(policy_id) if policy_id else None
        if policy_id and old is None:
            raise ACLInvalid(f"Cannot find policy {policy_id}")
        if not name:
            raise ACLInvalid("Invalid Policy: no Name is set")
        if not _POLICY_NAME.match(name):
            raise ACLInvalid(
                "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are "
                "allowed"
            )
        same = self.policy_by_name(name)
        if same is not None and same.id != policy_id:
            raise ACLInvalid(f'Invalid Policy: A Policy with Name "{name}" already exists')
        rules = body.get("Rules", "")
        try:
            compiled = parse_rules(rules)
        except RulesError as err:
            raise ACLInvalid(str(err)) from None
        index = self._next_index()
        policy = Policy(
            id=policy_id or str(uuid.uuid4()),
            name=name,
            description=body.get("Description", ""),
            rules=rules,
            datacenters=list(body.get("Datacenters") or []),
            compiled=compiled,
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        self.policies[policy.id] = policy
        self._invalidate()
        return policy

    def delete_policy(self, policy_id: str) -> None:
        if policy_id == MANAGEMENT_POLICY_ID:
            raise ACLInvalid(
                "Delete operation not permitted on the builtin global-management policy"
            )
        if self.policies.pop(policy_id, None) is not None:
            for token in self.tokens.values():
                if policy_id in token.policy_ids:
                    token.policy_ids.remove(policy_id)
            self._next_index()
            self._invalidate()

    # ---- tokens --------------------------------------------------------------------------

    def _put_token(self, token: Token) -> None:
        old = self.tokens.get(token.accessor_id)
        if old is not None:
            self._by_secret.pop(old.secret_id, None)
        self.tokens[token.accessor_id] = token
        self._by_secret[token.secret_id] = token.accessor_id

    def _policy_links(self, links: list[dict[str, Any]]) -> list[str]:
        ids: list[str] = []
        for link in links:
            if link.get("ID"):
                if link["ID"] not in self.policies:
                    raise ACLInvalid(f'No such ACL policy with ID "{link["ID"]}"')
                pid = link["ID"]
            elif link.get("Name"):
                found = self.policy_by_name(link["Name"])
                if found is None:
                    raise ACLInvalid(f'No such ACL policy with name "{link["Name"]}"')
                pid = found.id
            else:
                raise ACLInvalid("Policy link is missing both the ID and the Name")
            if pid not in ids:
                ids.append(pid)
        return ids

    @staticmethod
    def _service_identities(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sid in raw:
            name = sid.get("ServiceName", "")
            if not name:
                raise ACLInvalid("Service identity is missing the service name field on this token")
            if not _IDENTITY_NAME.match(name):
                raise ACLInvalid(
                    f'Service identity "{name}" has an invalid name. Only lowercase alphanumeric '
                    "characters, '-' and '_' are allowed"
                )
            entry: dict[str, Any] = {"ServiceName": name}
            if sid.get("Datacenters"):
                entry["Datacenters"] = list(sid["Datacenters"])
            if entry not in out:
                out.append(entry)
        return out

    @staticmethod
    def _node_identities(raw: list[dict[str, Any]], datacenter: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for nid in raw:
            name = nid.get("NodeName", "")
            if not name:
                raise ACLInvalid("Node identity is missing the node name field on this token")
            if not nid.get("Datacenter"):
                raise ACLInvalid("Node identity is missing the datacenter field on this token")
            if not _IDENTITY_NAME.match(name):
                raise ACLInvalid(
                    "Node identity has an invalid name. Only lowercase alphanumeric "
                    "characters, '-' and '_' are allowed"
                )
            entry = {"NodeName": name, "Datacenter": nid["Datacenter"]}
            if entry not in out:
                out.append(entry)
        return out

    def set_token(self, body: dict[str, Any], accessor_id: str, datacenter: str) -> Token:
        """Create (accessor_id "") or update a token; ACLInvalid names what is wrong."""
        old = self.tokens.get(accessor_id) if accessor_id else None
        if accessor_id and old is None:
            raise ACLInvalid(f'Cannot find token "{accessor_id}"')
        if old is None:
            accessor = body.get("AccessorID") or str(uuid.uuid4())
            secret = body.get("SecretID") or str(uuid.uuid4())
            for value, what in ((accessor, "AccessorID"), (secret, "SecretID")):
                try:
                    uuid.UUID(value)
                except ValueError:
                    raise ACLInvalid(f"Invalid Token: {what} is not a valid UUID") from None
            if accessor in self.tokens:
                raise ACLInvalid("Invalid Token: AccessorID is already in use")
            if secret in self._by_secret:
                raise ACLInvalid("Invalid Token: SecretID is already in use")
        else:
            accessor = old.accessor_id
            secret = old.secret_id
            if body.get("SecretID") and body["SecretID"] != old.secret_id:
                raise ACLInvalid("Changing a token's SecretID is not permitted")
        if body.get("Rules"):
            raise ACLInvalid("Rules cannot be specified for this token")
        expires = self._expiry(body, old)
        policy_ids = self._policy_links(list(body.get("Policies") or []))
        services = self._service_identities(list(body.get("ServiceIdentities") or []))
        nodes = self._node_identities(list(body.get("NodeIdentities") or []), datacenter)
        index = self._next_index()
        token = Token(
            accessor_id=accessor,
            secret_id=secret,
            description=body.get("Description", ""),
            policy_ids=policy_ids,
            service_identities=services,
            node_identities=nodes,
            local=bool(body.get("Local", old.local if old else False)),
            create_time=old.create_time if old else _now(),
            create_index=old.create_index if old else index,
            modify_index=index,
            expires=expires,
        )
        self._put_token(token)
        return token

    def clone(self, accessor_id: str, description: str | None) -> Token:
        """A new token (new IDs) with the same links as `accessor_id`'s (Consul's TokenClone)."""
        source = self.tokens.get(accessor_id)
        if source is None:
            raise ACLInvalid(f'Cannot find token "{accessor_id}"')
        if accessor_id == ANONYMOUS_ACCESSOR:
            raise ACLInvalid("Cannot clone the anonymous token")
        return self.set_token(
            {
                "Description": source.description if description is None else description,
                "Policies": [{"ID": p} for p in source.policy_ids],
                "ServiceIdentities": source.service_identities,
                "NodeIdentities": source.node_identities,
                "Local": source.local,
            },
            "",
            "",
        )

    @staticmethod
    def _expiry(body: dict[str, Any], old: Token | None) -> float | None:
        if old is not None:
            return old.expires  # Consul does not let an update change a token's expiry
        ttl_ns = body.get("ExpirationTTL") or 0
        if body.get("ExpirationTime") and ttl_ns:
            raise ACLInvalid("Expiration TTL and Expiration Time cannot both be set")
        if not ttl_ns:
            return None
        if not 60e9 <= ttl_ns <= 86400e9:
            raise ACLInvalid(
                f"Token Expiration TTL '{ttl_ns / 1e9:g}s' should be between 1m0s and 24h0m0s"
            )
        return time.time() + ttl_ns / 1e9

    def delete_token(self, accessor_id: str, caller: str) -> None:
        if accessor_id == ANONYMOUS_ACCESSOR:
            raise ACLInvalid("Delete operation not permitted on the anonymous token")
        if accessor_id == caller:
            raise ACLInvalid("Deletion of the request's authorization token is not permitted")
        token = self.tokens.pop(accessor_id, None)
        if token is not None:
            self._by_secret.pop(token.secret_id, None)
            self._next_index()

    def render_token(self, token: Token, *, show_secret: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "AccessorID": token.accessor_id,
            "SecretID": token.secret_id if show_secret else HIDDEN_SECRET,
            "Description": token.description,
        }
        if token.policy_ids:
            out["Policies"] = [
                {"ID": p, "Name": self.policies[p].name}
                for p in token.policy_ids
                if p in self.policies
            ]
        if token.service_identities:
            out["ServiceIdentities"] = token.service_identities
        if token.node_identities:
            out["NodeIdentities"] = token.node_identities
        if token.expires is not None:
            out["ExpirationTime"] = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(token.expires)) + "Z"
            )
        out |= {
            "Local": token.local,
            "CreateTime": token.create_time,
            "Hash": token.hash(),
            "CreateIndex": token.create_index,
            "ModifyIndex": token.modify_index,
        }
        return out
