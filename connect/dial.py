"""Dialing an upstream's sidecars with mTLS: one endpoint (`dial_target`), and the one
choose -> dial -> record loop (`dial_upstream`) that the L4 and HTTP outbound paths share.

`Upstream` is how the outbound side reaches one upstream service: what it expects of the
server (identity, SNI), how it dials (client context, timeouts, TLS resumption), and its
`Cluster` (connect.cluster), which holds the endpoints and the balancing and ejection state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from connect.balancer import Target
from connect.cluster import NO_LIMITS, Cluster, EjectionPolicy, EndpointSource, Limits, Outcome
from connect.dial_failures import dial_failure
from connect.resumption import offering, sessions_of
from connect.seams import PeerCache
from connect.ssl_native import SESSION_GETTER_LEAKS, has_ticket

log = logging.getLogger("meshlet.proxy")

__all__ = ["DialFailed", "Upstream", "dial_failover", "dial_target", "dial_upstream"]


@dataclass(slots=True)
class Upstream:
    """One upstream service as the outbound side dials it. Its mutable state (the cluster's,
    the refusal counts) belongs to the proxy's event loop; the endpoint set comes from
    `endpoints`."""

    name: str
    endpoints: EndpointSource
    client_ssl: Callable[[], ssl.SSLContext]
    verify_peer: PeerCache
    expected_service: str
    expected_namespace: str = "default"
    sni: str | None = None
    connect_timeout: float = 5.0
    eject_for: float = 10.0
    """How long an endpoint that refused a connection is skipped (the default
    `EjectionPolicy`'s time when `ejection` is not given)."""
    resume_tls: bool = True
    """Offer the endpoint's last TLS session (connect.resumption) when the client context
    keeps sessions; the server is still verified and its identity checked on every dial."""
    rng: random.Random = field(default_factory=random.Random)
    limits: Limits = NO_LIMITS
    """Circuit breaking (Consul's UpstreamConfig.Limits)."""
    ejection: tuple[EjectionPolicy, ...] = ()
    """The cluster's ejection policies; empty: one `EjectionPolicy(eject_for)`. Add
    `EjectionPolicy.passive_health_check(...)` for Consul's PassiveHealthCheck."""
    refusals: dict[str, int] = field(default_factory=dict)
    """Failed dials by kind (connect.dial_failures): handshakes refused by the peer or by
    us, identity mismatches, timeouts. Read through `refusal_counts()`."""
    cluster: Cluster = field(init=False)
    _unconfirmed: list[tuple[asyncio.BaseTransport, ssl.SSLObject]] = field(default_factory=list)
    """Fresh TLS 1.3 connections whose server has not yet sent a session ticket, i.e. not
    yet said it accepted our certificate (connect.dial_failures, `peer_refused`)."""

    def __post_init__(self) -> None:
        policies = self.ejection or (EjectionPolicy(self.eject_for),)
        self.cluster = Cluster(self.endpoints, policies, self.limits)

    def refused(self, kind: str) -> None:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1

    def settle(self) -> None:
        """Count the fresh connections that closed before their server accepted us."""
        if not self._unconfirmed:
            return
        waiting = []
        for transport, ssl_object in self._unconfirmed:
            if not transport.is_closing():
                waiting.append((transport, ssl_object))
                continue
            # Only once closed, and without ssl's copy of the session where possible: ssl's
            # `session` encodes and decodes it (the server's certificate with it), ~130 us,
            # and leaks it on some CPythons (connect.ssl_native.SESSION_GETTER_LEAKS): there,
            # without the native calls, whether the server refused us is not known.
            ticket = has_ticket(ssl_object)
            if ticket is None:
                if SESSION_GETTER_LEAKS:
                    continue
                session = ssl_object.session
                ticket = session is not None and session.has_ticket
            if ticket:
                continue
            self.refused("peer_refused")
            log.warning(
                "upstream %s: the server closed right after the handshake: it refused "
                "our certificate (its handshake_failures say why)",
                self.name,
            )
        # Bounded: open connections wait here until they close; many at once must not grow it.
        self._unconfirmed = waiting[-_UNCONFIRMED_MAX:]

    def refusal_counts(self) -> dict[str, int]:
        self.settle()
        return dict(self.refusals)


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
    protocol_for: Callable[[Target], P],
    *,
    request_hash: int | None = None,
    avoid: Collection[str] = (),
    first: Target | None = None,
    on_failure: Callable[[], None] | None = None,
    panic: bool = True,
) -> tuple[asyncio.Transport, P, Target]:
    """Choose an endpoint of the upstream's cluster and `dial_target` it; on failure record
    it (the cluster's ejection policy decides what that costs the endpoint) and choose
    another, never one already tried. `first`, already chosen by the caller (who looked for
    a pooled connection to it), is tried first. `on_failure` is called per failed dial.
    `panic`: see `Cluster.choose` (False when failover clusters follow this one).

    The returned target stays in flight in the cluster: the caller records its outcome.
    Raises DialFailed with the last failure once no endpoint is left to try.
    """
    loop = asyncio.get_running_loop()
    cluster = upstream.cluster
    tried = set(avoid)
    target = first
    last_error = "no healthy endpoint"
    while True:
        if target is None:
            target = cluster.choose(loop.time(), upstream.rng, request_hash, tried, panic=panic)
            if target is None:
                raise DialFailed(last_error)
        chosen = target
        try:
            transport, protocol = await dial_target(upstream, chosen, partial(protocol_for, chosen))
        except DialFailed as err:
            last_error = str(err)
            cluster.record(chosen, Outcome.CONNECT_FAILURE, loop.time())
            if on_failure is not None:
                on_failure()
            tried.add(chosen.key)
            target = None
            continue
        except BaseException:
            cluster.record(chosen, Outcome.CANCELLED, loop.time())
            raise
        return transport, protocol, chosen


async def dial_failover(
    upstreams: Sequence[Upstream],
    protocol_for: Callable[[Target], P],
    *,
    request_hash: int | None = None,
    on_failure: Callable[[], None] | None = None,
) -> tuple[asyncio.Transport, P, Upstream, Target]:
    """`dial_upstream` over a primary cluster and its failover clusters, in order (a
    service-resolver's `Failover` targets): a cluster is left for the next when it has no
    endpoint that is not ejected, or when every one of them failed to connect; the last one
    tries even ejected endpoints (`panic`). Returns the upstream that answered with the
    transport, protocol and target (in flight in that upstream's cluster)."""
    last_error = "no healthy endpoint"
    for i, upstream in enumerate(upstreams):
        try:
            transport, protocol, target = await dial_upstream(
                upstream,
                protocol_for,
                request_hash=request_hash,
                on_failure=on_failure,
                panic=i == len(upstreams) - 1,
            )
        except DialFailed as err:
            last_error = str(err)
            continue
        return transport, protocol, upstream, target
    raise DialFailed(last_error)
