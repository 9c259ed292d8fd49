"""Who may do what: Consul's ACL model reduced to what a dev agent needs.

With ACLs off every request is allowed. With ACLs on there are two identities: the initial
management token (allowed everything) and the anonymous token, used when a request carries no
token, whose rights are the configured default policy. Any other secret is "ACL not found".
"""

from __future__ import annotations

from dataclasses import dataclass

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
MANAGEMENT_ACCESSOR = "00000000-0000-0000-0000-000000000001"


class ACLNotFound(Exception):
    def __str__(self) -> str:
        return "ACL not found"


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

    def allowed(self, permission: str, resource: str | None = None) -> bool:
        return self.allow_all

    def require(self, permission: str, resource: str | None = None) -> None:
        if not self.allowed(permission, resource):
            raise PermissionDenied(self, permission, resource)


class Authorizer:
    def __init__(self, management_token: str | None, default_policy: str) -> None:
        self.enabled = management_token is not None
        self._management = management_token
        self._default_allow = default_policy == "allow"

    def resolve(self, token: str) -> Identity:
        if not self.enabled:
            return Identity("", allow_all=True, anonymous=False, token_given=bool(token))
        if token == self._management:
            return Identity(MANAGEMENT_ACCESSOR, allow_all=True, anonymous=False, token_given=True)
        if token in ("", "anonymous"):
            return Identity(
                ANONYMOUS_ACCESSOR,
                allow_all=self._default_allow,
                anonymous=True,
                token_given=bool(token),
            )
        raise ACLNotFound
