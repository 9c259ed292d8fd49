"""Would a peer accept our own leaf? Pure: the check a peer's TLS stack and identity check make,
run on the leaf we hold against the bundle we hold.

After the CA's roots change, a leaf signed by a root that is no longer in the bundle is refused
by every peer (`unknown_ca`), and one whose SPIFFE ID names the old trust domain fails their
identity check. The rotator asks `chain_problem` whenever its leaf or its bundle changes: a leaf
that does not pass is replaced at once, and the sidecar reports itself not ready meanwhile.

The path search mirrors OpenSSL's default (no partial chains): from the leaf, through the
intermediates it carries and the bundle's non-self-signed certificates (cross-signatures), to a
self-signed root of the bundle; every certificate on the way is a CA, current at `now`, and
signs the one below it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from connect.identity import PeerRefused, certificate_identity, is_ca, is_self_signed
from connect.leaf import Leaf, TrustBundle

__all__ = ["chain_problem"]

# Consul's chains are leaf -> (cross-signed or intermediate) -> root; a few more levels are
# tolerated, a loop of cross-signatures is not followed forever.
_MAX_DEPTH = 8


def _load(pems: Sequence[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def _current(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _reaches_root(
    cert: x509.Certificate,
    roots: list[x509.Certificate],
    intermediates: list[x509.Certificate],
    now: datetime.datetime,
    depth: int,
) -> bool:
    for root in roots:
        if root.subject == cert.issuer and _current(root, now) and _signed_by(cert, root):
            return True
    if depth >= _MAX_DEPTH:
        return False
    for mid in intermediates:
        if (
            mid is not cert
            and mid.subject == cert.issuer
            and is_ca(mid)
            and _current(mid, now)
            and _signed_by(cert, mid)
            and _reaches_root(mid, roots, intermediates, now, depth + 1)
        ):
            return True
    return False


def chain_problem(leaf: Leaf, bundle: TrustBundle, now: datetime.datetime) -> str:
    """ "" when a peer holding `bundle` would accept `leaf` at `now`; else what is wrong, in
    words for a log line and the readiness check."""
    try:
        chain = _load(leaf.chain_pem)
        anchors = _load(bundle.roots_pem)
    except ValueError as err:
        return f"leaf or bundle is not parsable: {err}"
    refusals: list[str] = []
    for domain in bundle.trust_domains:
        try:
            certificate_identity(chain[0], trust_domain=domain, now=now)
            break
        except PeerRefused as err:
            refusals.append(str(err))
    else:
        return f"leaf {leaf.service_uri} is refused: {refusals[0]}"
    roots = [c for c in anchors if is_self_signed(c)]
    intermediates = chain[1:] + [c for c in anchors if not is_self_signed(c)]
    if _reaches_root(chain[0], roots, intermediates, now, 0):
        return ""
    return (
        f"leaf serial {leaf.serial} (issuer {leaf.issuer}) does not chain to any of the "
        f"{len(roots)} current roots of trust domain {bundle.trust_domain}"
    )
