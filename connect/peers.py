"""Who a mesh peer is: the verifier both listeners and dialers use, cached per certificate.

connect.identity decides from the certificate (SPIFFE URI, trust domain, validity, read at
each decision so a trust-domain change applies to new certificates at once); the proxy's
`PeerCache` keeps each distinct certificate's answer, so a connection costs a dict lookup.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from connect.identity import PeerRefused, ServiceIdentity, peer_identity
from connect.seams import Peer, PeerCache, PeerRejected
from intentions.engine import Identity


def service_peers(trust_domain: Callable[[], str]) -> PeerCache:
    """Peers that are mesh services of `trust_domain()`; anything else is refused with
    connect.identity's reason."""

    def verify(der: bytes, /) -> Peer:
        try:
            ident = peer_identity(
                der, trust_domain=trust_domain(), now=datetime.datetime.now(datetime.UTC)
            )
        except PeerRefused as err:
            raise PeerRejected(str(err)) from None
        if not isinstance(ident, ServiceIdentity):
            raise PeerRejected(f"{ident.uri} is not a service identity")
        return Peer(ident.uri, Identity(ident.service, ident.namespace, ident.partition))

    return PeerCache(verify)
