"""A throwaway Connect-style CA for the proxy tests (ECDSA P-256, SPIFFE URI SANs).

Stand-in until connect/tls.py and devstack's Connect CA are committed: then the proxy tests
should take their contexts from those. Also holds a test PeerVerifier: the agent wires
`connect.identity.peer_identity`; this checks the same essentials (one SPIFFE URI SAN, our
trust domain, a service identity) without depending on uncommitted code.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connect.proxy import Peer, PeerRejected
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
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshlet test {name}")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = directory / f"{name}.crt"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(
        self,
        service: str,
        *,
        uri: str | None = None,
        expired: bool = False,
    ) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            before, after = now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
        else:
            before, after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(service),
                        x509.UniformResourceIdentifier(uri or spiffe(service, self.trust_domain)),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = f"{self.name}-{service}{'-expired' if expired else ''}-{cert.serial_number % 10**8}"
        cert_path = self.dir / f"{stem}.crt"
        key_path = self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
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
