"""The proxy's seams: what it is handed instead of deciding about identity and authorization.

* `PeerVerifier`: DER of the peer's leaf -> `Peer`, or `PeerRejected` naming the failed check
  (connect.peers.service_peers wraps connect.identity). `PeerCache` verifies each distinct
  certificate once.
* `ConnectionAuthorizer` / `RequestAuthorizer`: peer (and request) -> a `Verdict` with
  `allowed` and `reason`; `intentions.Decision` is one (connect.authz builds both).
* Endpoints come through `connect.cluster.EndpointSource`; TLS contexts as callables
  (connect.tls).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from intentions.engine import Identity

__all__ = [
    "PLAINTEXT",
    "ConnectionAuthorizer",
    "Peer",
    "PeerCache",
    "PeerRejected",
    "PeerVerifier",
    "RequestAuthorizer",
    "Verdict",
]


@dataclass(frozen=True, slots=True)
class Peer:
    """A verified mesh peer, built once per distinct certificate."""

    uri: str
    """The SPIFFE URI SAN."""
    identity: Identity
    """The source as the intentions engine identifies it."""
    cert_sha256: str = ""
    """Lower-case hex SHA-256 of the leaf DER (X-Forwarded-Client-Cert's Hash)."""
    plaintext: bool = False
    """No TLS at all (`PLAINTEXT`): accepted only in MutualTLSMode permissive."""


PLAINTEXT = Peer("", Identity("*"), plaintext=True)
"""The source of every plaintext connection (MutualTLSMode permissive): no certificate, so no
identity. Its name `*` is in no intention's exact source map (a `*` source is kept as a
wildcard), so the engine's lookups can only match intentions whose source is `*` (in the
default namespace, or `*/*`): a plaintext caller gets what any caller gets, never what a
named service was granted, and the default decision otherwise."""


class PeerRejected(Exception):
    """A peer certificate is not a mesh identity we accept; str() says why."""


class PeerVerifier(Protocol):
    def __call__(self, der: bytes, /) -> Peer: ...


class Verdict(Protocol):
    @property
    def allowed(self) -> bool: ...
    @property
    def reason(self) -> str: ...


ConnectionAuthorizer = Callable[[Peer], Verdict]
RequestAuthorizer = Callable[[Peer, bytes, bytes, bytes, Sequence[tuple[bytes, bytes]]], Verdict]
"""(peer, method, request target, host, header fields) -> verdict. Bytes as the parser
hands them over: an authorizer that needs only the peer decodes nothing. The target is the
origin-form one the listener already normalized (connect.http_target) and will forward; the
fields are those the app will receive (connect.http1_headers.ForwardedFields), not what the
caller sent."""


class PeerCache:
    """Verify each distinct peer certificate once: a mesh has few identities and many
    connections, and DER bytes are a cheaper key than parsing the certificate."""

    def __init__(self, verify: PeerVerifier, limit: int = 4096) -> None:
        self._verify = verify
        self._limit = limit
        self._cache: dict[bytes, Peer | str] = {}

    def peer_of(self, ssl_object: ssl.SSLObject | None) -> Peer | str:
        """The peer, or the refusal reason as text."""
        if ssl_object is None:
            return "no TLS session"
        der = ssl_object.getpeercert(True)
        if not der:
            return "no client certificate"
        hit = self._cache.get(der)
        if hit is not None:
            return hit
        result: Peer | str
        try:
            peer = self._verify(der)
        except PeerRejected as err:
            result = str(err)
        else:
            if not peer.cert_sha256:
                peer = Peer(peer.uri, peer.identity, hashlib.sha256(der).hexdigest())
            result = peer
        if len(self._cache) >= self._limit:
            # Certificates expire and rotate; dropping the whole cache is simpler than LRU
            # and costs one re-verification per live identity.
            self._cache.clear()
        self._cache[der] = result
        return result
