"""The sidecar proxy's seams (picking and dialing an upstream: connect.cluster, connect.dial).

The proxy decides nothing about identity, certificates, endpoints or authorization: it is
handed them. The agent (the composition root) wires:

* `server_ssl` / `TLSSource`: the inbound context (client certificate required, current roots)
  and a callable returning the current outbound client context. Rotation happens inside the
  contexts (an `sni_callback` that swaps to the current leaf), so a listener keeps one object.
* `PeerVerifier`: DER of the peer's leaf -> `Peer`, or `PeerRejected` naming the failed check
  (the agent wraps `connect.identity.peer_identity`). Results are cached per DER here.
* `connect.cluster.EndpointSource`: the current compiled `Balancer` for an upstream target
  (swapped whole on change).
* `ConnectionAuthorizer` / `RequestAuthorizer`: peer (and request) -> a verdict with `allowed`
  and `reason`; `intentions.Decision` is one. `intentions_authorizers` builds both from an
  intentions snapshot getter.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from intentions.engine import Identity, Snapshot, http_request
from intentions.errors import BadRequest

__all__ = [
    "ConnectionAuthorizer",
    "HandshakeFailures",
    "Peer",
    "PeerCache",
    "PeerRejected",
    "PeerVerifier",
    "RequestAuthorizer",
    "Verdict",
    "intentions_authorizers",
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
"""(peer, method, request target, host, headers as parsed) -> verdict. Bytes as the parser
hands them over: an authorizer that needs only the peer decodes nothing. The target is the
origin-form one the listener already normalized (connect.http_target) and will forward."""


class PeerCache:
    """Verify each distinct peer certificate once: a mesh has few identities and many
    connections, and DER bytes are a cheaper key than parsing (perf.md §5.9)."""

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


@dataclass(slots=True)
class HandshakeFailures:
    """Failed inbound TLS handshakes by reason (connect.inbound.handshake_failure)."""

    no_certificate: int = 0
    """The client sent no certificate."""
    unknown_ca: int = 0
    """Its certificate does not chain to the mesh roots (another CA or trust domain)."""
    expired: int = 0
    plaintext: int = 0
    """Not TLS at all (HTTP, or other bytes) on the TLS port."""
    timeout: int = 0
    """The handshake did not finish within the listener's handshake timeout."""
    closed: int = 0
    """The peer closed or reset before the handshake finished (TCP health checks, scanners,
    or a client that refused our certificate)."""
    other: int = 0


@dataclass(slots=True)
class ProxyStats:
    """Counters the admin endpoint exposes; plain ints so the hot path pays one add.
    `dataclasses.asdict` gives the JSON shape (handshake failures as a nested object)."""

    handshakes_failed: int = 0
    """All failed inbound handshakes; `handshake_failures` splits them by reason."""
    handshake_failures: HandshakeFailures = field(default_factory=HandshakeFailures)
    peers_refused: int = 0
    connections_denied: int = 0
    connections: int = 0
    requests: int = 0
    requests_denied: int = 0
    bad_requests: int = 0
    upstream_failures: int = 0
    no_endpoint: int = 0


def intentions_authorizers(
    snapshot: Callable[[], Snapshot], destination: Identity
) -> tuple[ConnectionAuthorizer, RequestAuthorizer]:
    """Authorizers over the engine's current snapshot for one local destination service.

    A request builds the engine's `HTTPRequest` only when the deciding intention has L7
    permissions; otherwise the connection-level decision answers. The target comes normalized
    by the listener, so it is matched as it is: normalizing again could only make the decision
    differ from what the app receives.
    """

    def connection(peer: Peer) -> Verdict:
        return snapshot().decide_connection(destination, peer.identity)

    def request(
        peer: Peer,
        method: bytes,
        path: bytes,
        host: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> Verdict:
        policy = snapshot().for_destination(
            destination.name, destination.namespace, destination.partition
        )
        intention = policy.intention_for(peer.identity)
        if intention is None:
            return policy.default
        if intention.permissions is None:
            return intention.connection
        merged: dict[str, list[str]] = {}
        for name, value in headers:
            merged.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        try:
            req = http_request(
                method.decode("latin-1"),
                path.decode("latin-1"),
                host.decode("latin-1"),
                merged,
                normalize=False,
            )
        except BadRequest as err:
            return _Refused(f"bad request: {err}")
        return policy.decide_request(peer.identity, req)

    return connection, request


@dataclass(frozen=True, slots=True)
class _Refused:
    reason: str
    allowed: bool = False


def allow_all() -> tuple[ConnectionAuthorizer, RequestAuthorizer]:
    """Authorizers that allow everything (benchmarks of the bare data path, tests)."""
    verdict = _Allowed()
    return (lambda peer: verdict), (lambda peer, m, p, h, hs: verdict)


@dataclass(frozen=True, slots=True)
class _Allowed:
    reason: str = "allowed"
    allowed: bool = True
