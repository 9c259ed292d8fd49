"""Bad peer certificates are refused over real mTLS, each with a log line naming the check."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connect.identity import service_identity
from connect.leaf import Leaf, Material
from connect.tls import DynamicTLS
from devstack.issuer import Issuer, cert_pem, key_pem, new_root
from devstack.server import DevServer
from tests.connect.identity_support import Conn, EchoService, Start

NOW = datetime.datetime.now(datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def _uri(dev: DevServer, trust_domain: str | None = None) -> str:
    td = trust_domain or dev.identity.ca.trust_domain
    return service_identity(td, "dc1", "web").uri


def _signed(issuer: Issuer, **kw: object) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issuer.sign_leaf(key.public_key(), **kw)  # type: ignore[arg-type]
    return cert, key


def _ca_flagged(issuer: Issuer, uri: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sneaky-ca")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert, key


def _self_signed(uri: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def bad_certificate(
    kind: str, dev: DevServer
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    issuer = dev.identity.ca.active.issuer
    uri = _uri(dev)
    if kind == "expired":
        return _signed(issuer, uri_sans=[uri], ttl=HOUR, now=NOW - 2 * HOUR)
    if kind == "not-yet-valid":
        return _signed(issuer, uri_sans=[uri], ttl=HOUR, now=NOW + 2 * HOUR)
    if kind == "wrong-trust-domain":
        other = _uri(dev, "11111111-2222-3333-4444-555555555555.consul")
        return _signed(issuer, uri_sans=[other], ttl=HOUR, now=NOW)
    if kind == "self-signed":
        return _self_signed(uri)
    if kind == "ca-flagged":
        return _ca_flagged(issuer, uri)
    assert kind == "san-less"
    return _signed(issuer, uri_sans=[], common_name="web", ttl=HOUR, now=NOW)


def _client_context(base: Material, cert: x509.Certificate, key: object) -> ssl.SSLContext:
    """A client context presenting `cert` (bypassing Leaf's own checks, as an attacker would)."""
    leaf = Leaf(
        service="web",
        service_uri="",
        chain_pem=(cert_pem(cert),),
        key_pem=key_pem(key),  # type: ignore[arg-type]
        serial="bad",
        valid_after=NOW,
        valid_before=NOW,
        issuer="",
        source="test",
    )
    return DynamicTLS(Material(leaf, base.bundle, 1)).client()


# What the log line says: OpenSSL's verify message, or meshlet's SPIFFE check.
REASONS = {
    "expired": "certificate has expired",
    "not-yet-valid": "certificate is not yet valid",
    "self-signed": "self-signed certificate",
    "wrong-trust-domain": "trust domain is not the mesh's",
    "san-less": "no SPIFFE URI SAN",
    "ca-flagged": "CA certificate",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
async def test_bad_client_certificate_is_refused(
    start_rotator: Start, ca_dev: DevServer, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_rotator("consul", "api")
    cert, key = bad_certificate(kind, ca_dev)
    ctx = _client_context(server.tls.material, cert, key)
    caplog.set_level(logging.WARNING, logger="meshlet.connect.tls")
    async with EchoService(server.tls) as svc:
        with pytest.raises((OSError, ConnectionError, asyncio.IncompleteReadError)):
            # TLS 1.3 finishes the client's side of the handshake before the server has
            # looked at its certificate: the refusal arrives on the first read.
            conn = await Conn.open(svc.port, ctx)
            try:
                await conn.request()
            finally:
                await conn.close()
        await asyncio.wait_for(svc.refused.wait(), 10)
    assert svc.peers == []
    assert len(svc.refusals) == 1 and REASONS[kind] in svc.refusals[0], svc.refusals
    assert any(REASONS[kind] in r.getMessage() for r in caplog.records)
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)


async def test_client_refuses_a_server_from_another_mesh(start_rotator: Start) -> None:
    client = await start_rotator("consul", "web")
    foreign = new_root("other-mesh", ttl=HOUR, now=NOW)
    uri = service_identity("other.consul", "dc1", "api").uri
    cert, key = _signed(foreign, uri_sans=[uri], ttl=HOUR, now=NOW)
    leaf = Leaf(
        service="api",
        service_uri=uri,
        chain_pem=(cert_pem(cert),),
        key_pem=key_pem(key),
        serial="x",
        valid_after=NOW,
        valid_before=NOW,
        issuer="",
        source="test",
    )
    foreign_tls = DynamicTLS(Material(leaf, client.tls.material.bundle, 1))
    async with EchoService(foreign_tls) as svc:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await Conn.open(svc.port, client.tls.client())
    assert "unable to get local issuer certificate" in info.value.verify_message
