"""Who a mesh peer is: the verifier both listeners and dialers use, cached per certificate.

connect.identity decides from the certificate (SPIFFE URI, trust domain, validity); the proxy's
`PeerCache` keeps each distinct certificate's answer, so a connection costs a dict lookup. The
answers hold for the trust domain they were made for: the cache is dropped when it changes, so
a leaf of the old domain is refused on its next connection. Chain and validity need no such
care: OpenSSL checks them against the current roots at every full handshake, before the cache
is asked, and a resumed session never crosses a rotation (connect.inbound, connect.resumption).
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable

from connect.identity import PeerRefused, ServiceIdentity, peer_identity
from connect.seams import Peer, PeerCache, PeerRejected, PeerVerifier
from intentions.engine import Identity


def service_peers(
    trust_domain: Callable[[], str], grace_domains: Callable[[], tuple[str, ...]] = tuple
) -> PeerCache:
    """Peers that are mesh services of `trust_domain()` (or, while a CA replaced without
    cross-signing is still trusted, of `grace_domains()`); anything else is refused with
    connect.identity's reason."""

    def verify(der: bytes, /) -> Peer:
        try:
            ident = peer_identity(
                der,
                trust_domain=trust_domain(),
                now=datetime.datetime.now(datetime.UTC),
                also=grace_domains(),
            )
        except PeerRefused as err:
            raise PeerRejected(str(err)) from None
        if not isinstance(ident, ServiceIdentity):
            raise PeerRejected(f"{ident.uri} is not a service identity")
        return Peer(ident.uri, Identity(ident.service, ident.namespace, ident.partition))

    return _TrustDomainPeers(verify, lambda: (trust_domain(), *grace_domains()))


class _TrustDomainPeers(PeerCache):
    """A `PeerCache` whose answers are dropped when the trusted domains change (a grace
    ending drops the answers for the old domain's leaves)."""

    def __init__(self, verify: PeerVerifier, trust_domain: Callable[[], tuple[str, ...]]) -> None:
        super().__init__(verify)
        self._trust_domain = trust_domain
        self._domain = trust_domain()

    def peer_of(self, ssl_object: ssl.SSLObject | None) -> Peer | str:
        domain = self._trust_domain()
        if domain != self._domain:
            self._domain = domain
            self._cache.clear()
        return super().peer_of(ssl_object)
