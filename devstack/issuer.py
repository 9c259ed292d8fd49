"""Certificate issuers: a CA key and certificate that signs mesh leaves, with real X.509.

Shared by the Connect CA (`connect_ca.py`) and the Vault PKI subset (`vault_pki.py`), so that a
leaf from either one chains to the same roots. The certificate profile follows what Consul's
built-in CA issues: roots named `pri-<id>.consul.ca.<cluster>.consul` with the trust domain as a
URI SAN; leaves with an empty subject, one critical URI SAN, both TLS EKUs and CA:FALSE.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

EC_CURVES: dict[int, ec.EllipticCurve] = {
    224: ec.SECP224R1(),
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}
RSA_BITS = (2048, 4096)
# Absorbs clock skew between hosts without eating much of a short-lived leaf.
MAX_BACKDATE = datetime.timedelta(seconds=30)


class KeySpecError(ValueError):
    pass


def generate_key(key_type: str, bits: int) -> PrivateKey:
    if key_type == "ec":
        curve = EC_CURVES.get(bits)
        if curve is None:
            raise KeySpecError(f"EC key length must be one of {sorted(EC_CURVES)} bits")
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        if bits not in RSA_BITS:
            raise KeySpecError(f"RSA key length must be one of {list(RSA_BITS)} bits")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise KeySpecError(f"unknown private key type {key_type!r}; expected 'ec' or 'rsa'")


def key_spec(key: PrivateKey | PublicKey) -> tuple[str, int]:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ec", key.curve.key_size
    return "rsa", key.key_size


def colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def serial_hex(serial: int) -> str:
    return colon_hex(serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big"))


def key_pem(key: PrivateKey) -> str:
    # Consul hands out SEC1 ("EC PRIVATE KEY") for EC keys; PKCS#1 for RSA.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial() -> int:
    # Consul's JSON carries root serials as uint64; stay below 2**63 so every decoder copes.
    return secrets.randbits(63) | 1


def _ca_extensions(
    builder: x509.CertificateBuilder, subject_key: PublicKey, issuer_cert: x509.Certificate | None
) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(subject_key)
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(ski, critical=False)
    )
    if issuer_cert is None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_cert.public_key()  # type: ignore[arg-type]
        )
    return builder.add_extension(aki, critical=False)


@dataclass(frozen=True)
class Issuer:
    """A signing CA: its key, its (self-signed) certificate, and the certificates that link it
    to older roots (cross-signatures), sent after every leaf it signs."""

    name: str
    key: PrivateKey = field(repr=False)
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        """Consul's root ID: colon-hex SHA-1 of the certificate's DER."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return colon_hex(hashlib.sha1(der).digest())

    @property
    def key_id(self) -> str:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return colon_hex(ski.value.digest)

    @property
    def key_type(self) -> str:
        return key_spec(self.key)[0]

    @property
    def key_bits(self) -> int:
        return key_spec(self.key)[1]

    def sign_leaf(
        self,
        public_key: PublicKey,
        *,
        uri_sans: Sequence[str],
        ttl: datetime.timedelta,
        now: datetime.datetime,
        dns_sans: Sequence[str] = (),
        common_name: str = "",
    ) -> x509.Certificate:
        """A TLS client+server leaf; its validity never outlives this issuer's own."""
        backdate = min(MAX_BACKDATE, ttl / 20)
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uri_sans]
        names += [x509.DNSName(d) for d in dns_sans]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - backdate)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.cert.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )
        if names:
            # An empty subject makes the SAN the whole identity; RFC 5280 then wants it critical.
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=not common_name
            )
        return builder.sign(self.key, _signing_hash(self.key))

    def cross_sign(self, other: x509.Certificate, now: datetime.datetime) -> x509.Certificate:
        """`other`'s subject and key, vouched for by this issuer: lets peers that trust only
        this (older) root verify leaves of the newer one during a rotation."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(other.subject)
            .issuer_name(self.cert.subject)
            .public_key(other.public_key())
            .serial_number(_serial())
            .not_valid_before(now - MAX_BACKDATE)
            .not_valid_after(min(other.not_valid_after_utc, self.cert.not_valid_after_utc))
        )
        for ext in other.extensions:
            if isinstance(ext.value, x509.AuthorityKeyIdentifier):
                continue
            builder = builder.add_extension(ext.value, critical=ext.critical)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.cert.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
        return builder.sign(self.key, _signing_hash(self.key))


def new_root(
    common_name: str,
    *,
    uri_sans: Sequence[str] = (),
    key_type: str = "ec",
    key_bits: int = 256,
    ttl: datetime.timedelta,
    now: datetime.datetime,
) -> Issuer:
    key = generate_key(key_type, key_bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(now + ttl)
    )
    builder = _ca_extensions(builder, key.public_key(), None)
    if uri_sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uri_sans]),
            critical=False,
        )
    return Issuer(name=common_name, key=key, cert=builder.sign(key, _signing_hash(key)))


def public_key_of_csr(csr: x509.CertificateSigningRequest) -> PublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise KeySpecError("only EC and RSA keys are supported")
    return key
