"""connect.peer_der: the peer decision's fields read without an X.509 library, checked
against cryptography's reading of the same certificates, and malformed DER refused."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connect.identity import PeerRefused, Refusal, is_ca, peer_identity, uri_sans
from connect.peer_der import leaf_facts
from devstack.issuer import new_root

TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
WEB = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"


def _cert(**kw: object) -> x509.Certificate:
    root = new_root("root", ttl=100 * HOUR, now=NOW - HOUR)
    key = ec.generate_private_key(ec.SECP256R1())
    return root.sign_leaf(key.public_key(), ttl=HOUR, now=NOW, **kw)  # type: ignore[arg-type]


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "kw",
    [
        {"uri_sans": [WEB]},
        {"uri_sans": []},
        {"uri_sans": [WEB, f"spiffe://{TD}/ns/a/sa/b"]},
        {"uri_sans": [], "common_name": "web"},
    ],
)
def test_leaf_facts_agree_with_cryptography(kw: dict[str, object]) -> None:
    cert = _cert(**kw)
    facts = leaf_facts(_der(cert))
    assert facts.not_before == cert.not_valid_before_utc
    assert facts.not_after == cert.not_valid_after_utc
    assert facts.is_ca is is_ca(cert) is False
    assert list(facts.uris) == uri_sans(cert)
    assert facts.self_issued is (cert.issuer == cert.subject)


def test_a_root_is_a_self_issued_ca() -> None:
    root = new_root("root", uri_sans=[f"spiffe://{TD}"], ttl=HOUR, now=NOW)
    facts = leaf_facts(_der(root.cert))
    assert facts.is_ca and facts.self_issued
    assert facts.uris == (f"spiffe://{TD}",)


def test_malformed_der_is_refused_as_unparsable() -> None:
    der = _der(_cert(uri_sans=[WEB]))
    assert peer_identity(der, trust_domain=TD, now=NOW).uri == WEB
    bad = [
        b"",
        der[:-1],  # truncated
        der + b"\x00",  # trailing byte
        der[:1] + b"\x80" + der[2:],  # indefinite length (BER, not DER)
        b"\x1f" + der[1:],  # high tag number
        bytes([der[0], 0x85]) + der[2:],  # a length of more than 4 bytes
    ]
    # Every cut through the certificate: each prefix is refused, never misread.
    bad += [der[:n] for n in range(0, len(der), 7)]
    for data in bad:
        with pytest.raises(PeerRefused) as info:
            peer_identity(data, trust_domain=TD, now=NOW)
        assert info.value.reason is Refusal.UNPARSABLE, data[:8]
