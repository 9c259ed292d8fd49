"""Leaf certificates and trust bundles as immutable values, and the sources that supply them.

    Leaf          one service's certificate chain and private key, with its validity
    TrustBundle   the mesh's trust domain and every root (and cross-signed intermediate) to trust
    Material      a leaf and the bundle it is used with: what a TLS context is built from

`LeafSource` and `RootsSource` are what the rotator (`leaf_rotation.py`) pulls from: Consul's
agent (`leaf_consul.py`) or Vault's PKI engine (`leaf_vault.py`). Their failures are
`SourceUnavailable` (retry with backoff) or `SourceRejected` (will fail the same way again).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from connect.identity import IdentityError, parse_service
from connect.renewal import Validity


class LeafError(Exception):
    """A leaf or bundle could not be obtained."""


class SourceUnavailable(LeafError):
    """The source did not answer usefully this time (down, timeout, rate limited)."""


class SourceRejected(LeafError):
    """The source refused (permissions, a role that does not allow the name, bad config)."""


class MalformedAnswer(LeafError, ValueError):
    """The source answered with something that is not a usable certificate or bundle."""


def _time(value: Any, what: str) -> datetime.datetime:
    if not isinstance(value, str):
        raise MalformedAnswer(f"{what}: expected an RFC 3339 time, got {value!r:.40}")
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedAnswer(f"{what}: {value!r:.40} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise MalformedAnswer(f"{what}: {value!r:.40} has no time zone")
    return parsed


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedAnswer(f"{key}: expected a non-empty string, got {value!r:.40}")
    return value


def split_pem(bundle: str) -> tuple[str, ...]:
    """Each certificate of a PEM bundle, normalised; non-certificate text is an error."""
    try:
        certs = x509.load_pem_x509_certificates(bundle.encode())
    except ValueError as err:
        raise MalformedAnswer(f"not a PEM certificate chain: {err}") from None
    return tuple(c.public_bytes(Encoding.PEM).decode() for c in certs)


@dataclass(frozen=True)
class Leaf:
    service: str
    service_uri: str
    chain_pem: tuple[str, ...]
    """The leaf first, then the intermediates a peer may need (never the root)."""
    key_pem: str = field(repr=False)
    serial: str
    valid_after: datetime.datetime
    valid_before: datetime.datetime
    issuer: str
    """RFC 4514 issuer name: which root (by subject) signed this leaf."""
    source: str
    index: int = 0
    """Consul's ModifyIndex (what a blocking leaf query waits past); 0 for other sources."""

    @property
    def validity(self) -> Validity:
        return Validity(self.valid_after.timestamp(), self.valid_before.timestamp())

    @property
    def cert_pem(self) -> str:
        return "".join(self.chain_pem)

    @classmethod
    def from_pem(
        cls, chain: str, key_pem: str, *, source: str, index: int = 0, service: str = ""
    ) -> Leaf:
        """A leaf from PEM text, its facts read from the certificate itself."""
        pems = split_pem(chain)
        if not pems:
            raise MalformedAnswer("no certificate in the chain")
        if "PRIVATE KEY" not in key_pem:
            raise MalformedAnswer("the private key is not PEM")
        cert = x509.load_pem_x509_certificate(pems[0].encode())
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if len(uris) != 1:
            raise MalformedAnswer(f"a leaf must carry exactly one URI SAN, it has {len(uris)}")
        try:
            ident = parse_service(uris[0])
        except IdentityError as err:
            raise MalformedAnswer(str(err)) from None
        if service and ident.service != service:
            raise MalformedAnswer(f"leaf is for {ident.service!r}, not {service!r}")
        serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8 or 1)
        return cls(
            service=ident.service,
            service_uri=ident.uri,
            chain_pem=pems,
            key_pem=key_pem,
            serial=":".join(f"{b:02x}" for b in serial),
            valid_after=cert.not_valid_before_utc,
            valid_before=cert.not_valid_after_utc,
            issuer=cert.issuer.rfc4514_string(),
            source=source,
            index=index,
        )

    @classmethod
    def from_consul(cls, obj: Mapping[str, Any]) -> Leaf:
        """`/v1/agent/connect/ca/leaf/:service`'s JSON."""
        leaf = cls.from_pem(
            _str(obj, "CertPEM"),
            _str(obj, "PrivateKeyPEM"),
            source="consul",
            index=int(obj.get("ModifyIndex") or 0),
            service=_str(obj, "Service"),
        )
        if leaf.service_uri != _str(obj, "ServiceURI"):
            raise MalformedAnswer("ServiceURI does not match the certificate's URI SAN")
        _time(obj.get("ValidBefore"), "ValidBefore")
        return leaf


@dataclass(frozen=True)
class TrustBundle:
    trust_domain: str
    active_root_id: str
    active_subject: str
    """RFC 4514 subject of the active root: a leaf whose issuer differs predates a rotation."""
    roots_pem: tuple[str, ...]
    """Every root and intermediate to trust, active or not (old roots stay during rotation)."""
    index: int = 0
    grace_domains: tuple[str, ...] = ()
    """Trust domains also accepted from peers until `grace_until` (connect.ca_switch)."""
    grace_until: float = 0.0
    """Epoch seconds; non-zero while roots of a CA replaced without cross-signing are in
    `roots_pem` (connect.ca_switch)."""

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return (self.trust_domain, *self.grace_domains)

    @property
    def pem(self) -> str:
        return "".join(self.roots_pem)

    @classmethod
    def from_consul(cls, obj: Mapping[str, Any], index: int = 0) -> TrustBundle:
        """`/v1/agent/connect/ca/roots`'s JSON."""
        roots = obj.get("Roots")
        if not isinstance(roots, list) or not roots:
            raise MalformedAnswer("Roots: expected a non-empty list")
        active_id = _str(obj, "ActiveRootID")
        pems: list[str] = []
        active_subject = ""
        for root in roots:
            if not isinstance(root, dict):
                raise MalformedAnswer("Roots: expected objects")
            certs = split_pem(_str(root, "RootCert"))
            pems += certs
            for extra in root.get("IntermediateCerts") or []:
                pems += split_pem(str(extra))
            if root.get("ID") == active_id and root.get("Active"):
                cert = x509.load_pem_x509_certificate(certs[0].encode())
                active_subject = cert.subject.rfc4514_string()
        if not active_subject:
            raise MalformedAnswer(f"no active root with ID {active_id}")
        return cls(
            trust_domain=_str(obj, "TrustDomain"),
            active_root_id=active_id,
            active_subject=active_subject,
            roots_pem=tuple(dict.fromkeys(pems)),
            index=index,
        )


@dataclass(frozen=True)
class Material:
    """What one generation of TLS contexts is built from; replaced whole, never mutated."""

    leaf: Leaf
    bundle: TrustBundle
    generation: int


class LeafSource(Protocol):
    name: str
    blocking: bool
    """True when `fetch(current, ...)` itself waits until a replacement is due (Consul's
    blocking leaf query); False when the caller must decide when to call (Vault)."""

    async def fetch(self, current: Leaf | None, bundle: TrustBundle) -> Leaf: ...


class RootsSource(Protocol):
    async def roots(self, index: int) -> TrustBundle:
        """The bundle; with `index` > 0, wait until it changes past that index (or a timeout)."""
        ...
