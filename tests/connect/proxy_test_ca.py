"""A throwaway Connect-style CA for the proxy tests (ECDSA P-256, SPIFFE URI SANs), signed by
devstack's issuer (devstack/issuer.py) as devstack's Connect CA signs; leaves are written to
files for `ssl`. Also holds a test PeerVerifier: the agent wires `connect.identity.peer_identity`;
this checks the same essentials (one SPIFFE URI SAN, our trust domain, a service identity).
Tests that need devstack's own leaves over its HTTP API use tests/connect/devstack_tls.py.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from connect.seams import Peer, PeerRejected
from devstack.issuer import cert_pem, generate_key, key_pem, new_root
from intentions.engine import identity_from_consul_uri

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


def spiffe(service: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{service}"


@dataclass(frozen=True)
class Leaf:
    cert_path: Path
    key_path: Path
    der: bytes


class ProxyTestCA:
    def __init__(self, directory: Path, name: str = "ca", trust_domain: str = TRUST_DOMAIN) -> None:
        self.dir = directory
        self.name = name
        self.trust_domain = trust_domain
        self.issuer = new_root(
            f"meshlet test {name}",
            ttl=datetime.timedelta(days=1),
            now=datetime.datetime.now(datetime.UTC),
        )
        self.cert = self.issuer.cert
        self.ca_path = directory / f"{name}.crt"
        self.ca_path.write_text(self.issuer.pem)

    def leaf(
        self,
        service: str,
        *,
        uri: str | None = None,
        expired: bool = False,
    ) -> Leaf:
        key = generate_key("ec", 256)
        now = datetime.datetime.now(datetime.UTC)
        # An expired leaf was issued two days ago for one day; the others live an hour.
        issued = now - datetime.timedelta(days=2) if expired else now
        ttl = datetime.timedelta(days=1) if expired else datetime.timedelta(hours=1)
        cert = self.issuer.sign_leaf(
            key.public_key(),
            uri_sans=[uri or spiffe(service, self.trust_domain)],
            dns_sans=[service],
            common_name=service,
            ttl=ttl,
            now=issued,
        )
        stem = f"{self.name}-{service}{'-expired' if expired else ''}-{cert.serial_number % 10**8}"
        cert_path = self.dir / f"{stem}.crt"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_text(cert_pem(cert))
        key_path.write_text(key_pem(key))
        return Leaf(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))

    def server_context(self, leaf: Leaf) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.ca_path)
        ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
        return ctx

    def client_context(self, leaf: Leaf | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.ca_path)
        if leaf is not None:
            ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
        return ctx

    def verifier(self) -> CAPeerVerifier:
        return CAPeerVerifier(self.trust_domain)


@dataclass(frozen=True)
class CAPeerVerifier:
    trust_domain: str

    def __call__(self, der: bytes, /) -> Peer:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise PeerRejected("certificate has no SPIFFE URI SAN") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise PeerRejected("certificate must carry exactly one URI SAN")
        uri = uris[0]
        if not uri.startswith(f"spiffe://{self.trust_domain}/"):
            raise PeerRejected(f"{uri} is not in trust domain {self.trust_domain}")
        identity = identity_from_consul_uri(uri)
        if identity is None:
            raise PeerRejected(f"{uri} is not a service identity")
        return Peer(uri, identity)
