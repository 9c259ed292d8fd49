"""The sidecar proxy's seams, and picking and dialing an upstream sidecar.

The proxy decides nothing about identity, certificates, endpoints or authorization: it is
handed them. The agent (the composition root) wires:

* `server_ssl` / `TLSSource`: the inbound context (client certificate required, current roots)
  and a callable returning the current outbound client context. Rotation happens inside the
  contexts (an `sni_callback` that swaps to the current leaf), so a listener keeps one object.
* `PeerVerifier`: DER of the peer's leaf -> `Peer`, or `PeerRejected` naming the failed check
  (the agent wraps `connect.identity.peer_identity`). Results are cached per DER here.
* `EndpointSource`: the current compiled `Balancer` for an upstream (swapped whole on change).
* `ConnectionAuthorizer` / `RequestAuthorizer`: peer (and request) -> a verdict with `allowed`
  and `reason`; `intentions.Decision` is one. `intentions_authorizers` builds both from an
  intentions snapshot getter.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from connect.balancer import Balancer, Cursor, Target
from connect.dial_failures import dial_failure
from connect.resumption import offering, sessions_of
from intentions.engine import Identity, Snapshot, http_request
from intentions.errors import BadRequest

log = logging.getLogger("meshlet.proxy")

__all__ = [
    "ConnectionAuthorizer",
    "DialFailed",
    "EndpointSource",
    "HandshakeFailures",
    "LimitRefusals",
    "Peer",
    "PeerCache",
    "PeerRejected",
    "PeerVerifier",
    "RequestAuthorizer",
    "Upstream",
    "Verdict",
    "dial_target",
    "dial_upstream",
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
class LimitRefusals:
    """Connections reset at accept because a listener was full (connect.listener)."""

    max_connections: int = 0
    """The listener held `max_connections` open connections."""
    max_pending_handshakes: int = 0
    """The listener held `max_pending_handshakes` connections not yet through TLS."""


@dataclass(slots=True)
class ProxyStats:
    """Counters the admin endpoint exposes; plain ints so the hot path pays one add.
    `dataclasses.asdict` gives the JSON shape (handshake failures as a nested object)."""

    handshakes_failed: int = 0
    """All failed inbound handshakes; `handshake_failures` splits them by reason."""
    handshake_failures: HandshakeFailures = field(default_factory=HandshakeFailures)
    connections_refused_limit: LimitRefusals = field(default_factory=LimitRefusals)
    """Refused at accept, by the cap that was reached."""
    peers_refused: int = 0
    connections_denied: int = 0
    connections: int = 0
    requests: int = 0
    requests_denied: int = 0
    bad_requests: int = 0
    upstream_failures: int = 0
    no_endpoint: int = 0


class EndpointSource(Protocol):
    def balancer(self) -> Balancer: ...


@dataclass(frozen=True, slots=True)
class _Fixed:
    current: Balancer

    def balancer(self) -> Balancer:
        return self.current


def fixed_endpoints(balancer: Balancer) -> EndpointSource:
    """An EndpointSource that never changes (tests, static upstreams)."""
    return _Fixed(balancer)


@dataclass(slots=True)
class Upstream:
    """One upstream service as the outbound side dials it. Mutable state (cursor, marks) is
    private to the proxy's event loop; the endpoint set comes from `endpoints`."""

    name: str
    endpoints: EndpointSource
    client_ssl: Callable[[], ssl.SSLContext]
    verify_peer: PeerCache
    expected_service: str
    expected_namespace: str = "default"
    sni: str | None = None
    connect_timeout: float = 5.0
    eject_for: float = 10.0
    """How long an endpoint that refused a connection is skipped."""
    resume_tls: bool = True
    """Offer the endpoint's last TLS session (connect.resumption) when the client context
    keeps sessions; the server is still verified and its identity checked on every dial."""
    rng: random.Random = field(default_factory=random.Random)
    refusals: dict[str, int] = field(default_factory=dict)
    """Failed dials by kind (connect.dial_failures): handshakes refused by the peer or by
    us, identity mismatches, timeouts. Read through `refusal_counts()`."""
    _balancer: Balancer | None = None
    _cursor: Cursor = field(default_factory=lambda: Cursor([]))
    _ejected: dict[str, float] = field(default_factory=dict)
    _unconfirmed: list[tuple[asyncio.BaseTransport, ssl.SSLObject]] = field(default_factory=list)
    """Fresh TLS 1.3 connections whose server has not yet sent a session ticket, i.e. not
    yet said it accepted our certificate (connect.dial_failures, `peer_refused`)."""

    def refused(self, kind: str) -> None:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1

    def settle(self) -> None:
        """Count the fresh connections that closed before their server accepted us."""
        if not self._unconfirmed:
            return
        waiting = []
        for transport, ssl_object in self._unconfirmed:
            session = ssl_object.session
            if session is not None and session.has_ticket:
                continue
            if transport.is_closing():
                self.refused("peer_refused")
                log.warning(
                    "upstream %s: the server closed right after the handshake: it refused "
                    "our certificate (its handshake_failures say why)",
                    self.name,
                )
                continue
            waiting.append((transport, ssl_object))
        # Bounded: a server that sends no tickets at all must not make this grow.
        self._unconfirmed = waiting[-_UNCONFIRMED_MAX:]

    def refusal_counts(self) -> dict[str, int]:
        self.settle()
        return dict(self.refusals)

    def cursor_for(self, balancer: Balancer) -> Cursor:
        if balancer is not self._balancer:
            self._balancer = balancer
            self._cursor = Cursor.for_balancer(balancer)
        return self._cursor

    @property
    def has_marks(self) -> bool:
        return bool(self._ejected)

    def ejected_indexes(self, balancer: Balancer, now: float) -> set[int]:
        if not self._ejected:
            return set()
        out: set[int] = set()
        for i, t in enumerate(balancer.targets):
            until = self._ejected.get(t.key)
            if until is not None:
                if until > now:
                    out.add(i)
                else:
                    del self._ejected[t.key]
        return out

    def mark_failed(self, target: Target, now: float) -> None:
        self._ejected[target.key] = now + self.eject_for


_UNCONFIRMED_MAX = 64


class DialFailed(Exception):
    """No endpoint could be reached; str() is the reason for the 503's header."""


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def dial_target(
    upstream: Upstream, target: Target, protocol_factory: Callable[[], P]
) -> tuple[asyncio.Transport, P]:
    """Connect to one endpoint with mTLS and check that the server is the expected service.

    Raises DialFailed (refused, reset, timeout, TLS failure, wrong identity): all before any
    byte of a request was sent, so the caller may try another endpoint.
    """
    loop = asyncio.get_running_loop()
    upstream.settle()
    ctx = upstream.client_ssl()
    sessions = sessions_of(ctx) if upstream.resume_tls else None
    offer = None
    key: tuple[object, ...] = ()
    if sessions is not None:
        # A session is offered only to the endpoint it came from, for the same expected identity.
        key = (target.key, target.host, target.port, upstream.expected_service)
        key += (upstream.expected_namespace, upstream.sni)
        offer = sessions.offer(key)
    try:
        with offering(ctx, offer):
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    protocol_factory,
                    target.host,
                    target.port,
                    ssl=ctx,
                    server_hostname=upstream.sni or "",
                ),
                upstream.connect_timeout,
            )
    except (OSError, TimeoutError) as err:  # ssl.SSLError is an OSError
        if sessions is not None:
            sessions.forget(key)
        kind, detail = dial_failure(err)
        upstream.refused(kind)
        if kind not in ("connect_refused", "timeout", "closed", "other"):
            log.warning("upstream %s endpoint %s: %s", upstream.name, target.key, detail)
        raise DialFailed(f"connect to {target.key} failed: {type(err).__name__}") from None
    ssl_object = transport.get_extra_info("ssl_object")
    peer = upstream.verify_peer.peer_of(ssl_object)
    reason = ""
    if isinstance(peer, str):
        reason = peer
        upstream.refused("identity_refused")
    elif (
        peer.identity.name != upstream.expected_service
        or peer.identity.namespace != upstream.expected_namespace
    ):
        reason = f"server is {peer.uri}, not {upstream.expected_service}"
        upstream.refused("identity_mismatch")
    if reason:
        transport.abort()
        if sessions is not None:
            sessions.forget(key)
        log.warning("upstream %s endpoint %s refused: %s", upstream.name, target.key, reason)
        raise DialFailed(f"{target.key}: {reason}")
    if sessions is not None:
        sessions.keep(key, ssl_object)
    if (
        ssl_object is not None
        and not ssl_object.session_reused
        and ssl_object.version() == "TLSv1.3"
    ):
        upstream._unconfirmed.append((transport, ssl_object))
    return transport, protocol


async def dial_upstream(
    upstream: Upstream,
    protocol_factory: Callable[[], P],
    request_hash: int | None = None,
) -> tuple[asyncio.Transport, P, Target, int]:
    """Pick an endpoint and `dial_target` it; on failure mark it (skipped for `eject_for`)
    and try the next. Returns the transport, protocol, target and the target's index in the
    balancer (for in-flight accounting in `Cursor.inflight`)."""
    loop = asyncio.get_running_loop()
    balancer = upstream.endpoints.balancer()
    cursor = upstream.cursor_for(balancer)
    exclude = upstream.ejected_indexes(balancer, loop.time())
    if len(exclude) == len(balancer.targets):
        # Every endpoint is marked: trying one beats a certain 503.
        exclude = set()
    last_error = "no healthy endpoint"
    while True:
        idx = balancer.pick(cursor, upstream.rng, request_hash, exclude)
        if idx is None:
            raise DialFailed(last_error)
        target = balancer.targets[idx]
        try:
            transport, protocol = await dial_target(upstream, target, protocol_factory)
        except DialFailed as err:
            last_error = str(err)
            upstream.mark_failed(target, loop.time())
            exclude.add(idx)
            continue
        return transport, protocol, target, idx


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
