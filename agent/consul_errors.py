"""The Consul client's exception tree.

    ConsulError
    ├── ConsulConfigError        the client's own configuration is wrong (env, files)
    ├── ConsulUnavailable        no usable answer: refused, reset, deadline, TLS failure
    │   └── ConsulBadResponse    something answered, but not with Consul's API
    ├── ConsulRejected           Consul answered with an error status and its message
    │   ├── ConsulBadRequest     400
    │   └── ConsulPermissionDenied   403 "Permission denied ..."
    │       └── ConsulACLNotFound    403 "ACL not found" (the token itself is unknown)
    └── ConsulNotFound           404: the service, check or node does not exist

The split follows what a caller does next: `ConsulUnavailable` is worth retrying with backoff,
`ConsulRejected` will fail the same way again until someone changes the request or the ACLs,
and `ConsulNotFound` is usually a fact about the world (the thing was deregistered).
Transport errors (OSError, ssl.SSLError, consul_wire.WireError) never escape the client; they are
mapped where they enter.
"""

from __future__ import annotations

# Consul answers with whole Go error strings; keep log lines bounded if something else answers.
_MAX_MESSAGE = 2000


class ConsulError(Exception):
    """Anything the Consul client raises."""


class ConsulConfigError(ConsulError, ValueError):
    """The client configuration is invalid; the message names the setting and what is allowed."""


class ConsulUnavailable(ConsulError):
    """Consul could not be reached or gave no usable answer before the request's deadline."""


class ConsulBadResponse(ConsulUnavailable):
    """The peer answered, but not as Consul does (not JSON, truncated, wrong shape or headers)."""


class _StatusError(ConsulError):
    """Shared shape of errors that carry Consul's HTTP status and plain-text message."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.message = message[:_MAX_MESSAGE]
        super().__init__(f"{method} {path}: {status} {self.message}")


class ConsulRejected(_StatusError):
    """Consul refused the request; `message` is Consul's own error text."""


class ConsulBadRequest(ConsulRejected):
    """400: the request was malformed (decode failure, missing name, invalid definition)."""


class ConsulPermissionDenied(ConsulRejected):
    """403: the token (or the anonymous token) lacks a permission the request needs."""


class ConsulACLNotFound(ConsulPermissionDenied):
    """403 "ACL not found": the token sent is not known to Consul."""


class ConsulNotFound(_StatusError):
    """404: the addressed object (service ID, check ID, node, ...) does not exist."""
