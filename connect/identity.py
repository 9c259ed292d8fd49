"""SPIFFE identities, pure: parse and format them, and read the one a certificate carries.

Two URI forms matter to meshlet:

    spiffe://<trust-domain>/ns/<ns>/dc/<dc>/svc/<service>     Consul service identity
    spiffe://<trust-domain>/ap/<partition>/ns/<ns>/dc/<dc>/svc/<service>
    spiffe://<trust-domain>/ns/<ns>/sa/<service-account>      Istio workload identity

`peer_identity` is the security decision made after a TLS handshake: it accepts a certificate
only when it is a valid, current, non-CA leaf that carries exactly one SPIFFE URI SAN in the
expected trust domain. Every refusal names its reason, so a log line can say which check failed.
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from connect.peer_der import leaf_facts

if TYPE_CHECKING:
    # Loaded by the functions that take an x509 object (the agent's leaf checks), never by
    # the peer decision: the data-plane process runs without cryptography.
    from cryptography import x509

SCHEME = "spiffe://"
DEFAULT_NAMESPACE = "default"
DEFAULT_PARTITION = "default"

# Consul names services with DNS-compatible labels, but the URI form accepts anything a path
# segment may hold once unescaped; reject only what would make the URI ambiguous.
_SEGMENT = re.compile(r"^[^/\s]+$")
# SPIFFE spec: trust domain is lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class IdentityError(ValueError):
    """A string is not an identity meshlet accepts; str() says why."""


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    """A Consul service identity (what `/v1/agent/connect/ca/leaf/:service` certifies)."""

    trust_domain: str
    namespace: str
    datacenter: str
    service: str
    partition: str = DEFAULT_PARTITION

    @property
    def uri(self) -> str:
        ap = f"/ap/{self.partition}" if self.partition != DEFAULT_PARTITION else ""
        return (
            f"{SCHEME}{self.trust_domain}{ap}/ns/{self.namespace}"
            f"/dc/{self.datacenter}/svc/{self.service}"
        )

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """An Istio-style workload identity: a service account in a namespace."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


Identity = ServiceIdentity | WorkloadIdentity


def service_identity(
    trust_domain: str,
    datacenter: str,
    service: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    partition: str = DEFAULT_PARTITION,
) -> ServiceIdentity:
    """Build a service identity, validating every part as `parse` would."""
    ident = ServiceIdentity(trust_domain, namespace, datacenter, service, partition)
    return _checked(parse(ident.uri), ServiceIdentity)


def _checked(ident: Identity, kind: type[ServiceIdentity]) -> ServiceIdentity:
    if not isinstance(ident, kind):
        raise IdentityError(f"{ident.uri} is not a service identity")
    return ident


def parse(uri: str) -> Identity:
    """Parse a Consul service or Istio workload SPIFFE ID; anything else is an IdentityError."""
    if not uri.startswith(SCHEME):
        raise IdentityError(f"{uri!r:.120} is not a spiffe:// URI")
    rest = uri[len(SCHEME) :]
    if any(c in rest for c in "?#"):
        raise IdentityError(f"{uri!r:.120}: a SPIFFE ID has no query or fragment")
    trust_domain, sep, path = rest.partition("/")
    trust_domain_ok = bool(_TRUST_DOMAIN.match(trust_domain))
    if not trust_domain_ok:
        raise IdentityError(f"{uri!r:.120}: invalid trust domain {trust_domain!r:.80}")
    if not sep or not path:
        raise IdentityError(f"{uri!r:.120}: names only a trust domain, not a workload")
    raw = path.split("/")
    if any(not _SEGMENT.match(p) for p in raw):
        raise IdentityError(f"{uri!r:.120}: empty or invalid path segment")
    parts = [unquote(p) for p in raw]
    if len(parts) == 6 and parts[0::2] == ["ns", "dc", "svc"]:
        return ServiceIdentity(trust_domain, parts[1], parts[3], parts[5])
    if len(parts) == 8 and parts[0::2] == ["ap", "ns", "dc", "svc"]:
        return ServiceIdentity(trust_domain, parts[3], parts[5], parts[7], parts[1])
    if len(parts) == 4 and parts[0::2] == ["ns", "sa"]:
        return WorkloadIdentity(trust_domain, parts[1], parts[3])
    raise IdentityError(
        f"{uri!r:.120}: not a service identity (/ns/<ns>/dc/<dc>/svc/<name>) "
        "nor a workload identity (/ns/<ns>/sa/<account>)"
    )


def parse_service(uri: str) -> ServiceIdentity:
    return _checked(parse(uri), ServiceIdentity)


def trust_domain_uri(trust_domain: str) -> str:
    return f"{SCHEME}{trust_domain}"


# ---- certificates ------------------------------------------------------------------------------


class Refusal(enum.Enum):
    """Why a peer certificate was refused; the value is the log text."""

    UNPARSABLE = "not a DER X.509 certificate"
    EXPIRED = "certificate has expired"
    NOT_YET_VALID = "certificate is not yet valid"
    SELF_SIGNED = "certificate is self-signed"
    CA = "certificate is a CA certificate, not a leaf"
    NO_SPIFFE_SAN = "certificate has no SPIFFE URI SAN"
    MANY_URI_SANS = "certificate has more than one URI SAN"
    BAD_SPIFFE_ID = "certificate's URI SAN is not a valid SPIFFE ID"
    WRONG_TRUST_DOMAIN = "certificate's trust domain is not the mesh's"


class PeerRefused(Exception):
    """A certificate failed `peer_identity`; `reason` says which check, `detail` adds facts."""

    def __init__(self, reason: Refusal, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


def uri_sans(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def is_ca(cert: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issuer equals subject and the certificate's own key verifies its signature."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

    if cert.issuer != cert.subject:
        return False
    key = cert.public_key()
    algorithm = cert.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def peer_identity(
    der: bytes, *, trust_domain: str, now: datetime.datetime, also: tuple[str, ...] = ()
) -> Identity:
    """The identity of a peer's leaf certificate, or `PeerRefused` naming the failed check.

    Chain verification is the TLS library's job (it has the roots); this repeats the time checks
    because a caller may hold a certificate past the handshake, and adds what TLS does not know:
    a mesh leaf is not a CA, is not self-issued, and names exactly one SPIFFE ID in our domain.
    Read with connect.peer_der, not an X.509 library: the data-plane process decides here too.
    A self-issued certificate (issuer equals subject) is refused without checking its
    signature: after OpenSSL's chain verification only a root presented as a leaf is one.
    """
    try:
        facts = leaf_facts(der)
    except ValueError:
        raise PeerRefused(Refusal.UNPARSABLE) from None
    if now >= facts.not_after:
        raise PeerRefused(Refusal.EXPIRED, f"not after {facts.not_after.isoformat()}")
    if now < facts.not_before:
        raise PeerRefused(Refusal.NOT_YET_VALID, f"not before {facts.not_before.isoformat()}")
    if facts.is_ca:
        raise PeerRefused(Refusal.CA)
    if facts.self_issued:
        raise PeerRefused(Refusal.SELF_SIGNED)
    return _spiffe_identity(list(facts.uris), trust_domain, also)


def certificate_identity(
    cert: x509.Certificate, *, trust_domain: str, now: datetime.datetime
) -> Identity:
    if now >= cert.not_valid_after_utc:
        raise PeerRefused(Refusal.EXPIRED, f"not after {cert.not_valid_after_utc.isoformat()}")
    if now < cert.not_valid_before_utc:
        raise PeerRefused(
            Refusal.NOT_YET_VALID, f"not before {cert.not_valid_before_utc.isoformat()}"
        )
    if is_ca(cert):
        raise PeerRefused(Refusal.CA)
    if is_self_signed(cert):
        raise PeerRefused(Refusal.SELF_SIGNED)
    return _spiffe_identity(uri_sans(cert), trust_domain)


def _spiffe_identity(uris: list[str], trust_domain: str, also: tuple[str, ...] = ()) -> Identity:
    """`also`: domains of a CA being replaced, accepted for its grace (connect.ca_switch)."""
    if not uris:
        raise PeerRefused(Refusal.NO_SPIFFE_SAN)
    if len(uris) > 1:
        raise PeerRefused(Refusal.MANY_URI_SANS, ", ".join(u[:120] for u in uris))
    try:
        ident = parse(uris[0])
    except IdentityError as err:
        raise PeerRefused(Refusal.BAD_SPIFFE_ID, str(err)) from None
    if ident.trust_domain != trust_domain and ident.trust_domain not in also:
        raise PeerRefused(
            Refusal.WRONG_TRUST_DOMAIN, f"{ident.trust_domain!r} is not {trust_domain!r}"
        )
    return ident
