"""connect.identity: SPIFFE IDs parsed and formatted, and the peer-certificate decision."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connect.identity import (
    IdentityError,
    PeerRefused,
    Refusal,
    ServiceIdentity,
    WorkloadIdentity,
    parse,
    parse_service,
    peer_identity,
    service_identity,
)
from devstack.issuer import new_root

TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)


def test_consul_service_uri_round_trips() -> None:
    ident = service_identity(TD, "dc1", "web")
    assert ident.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert parse(ident.uri) == ident


def test_partitioned_uri_and_default_partition_elided() -> None:
    uri = f"spiffe://{TD}/ap/team-a/ns/payments/dc/dc2/svc/api"
    ident = parse_service(uri)
    assert (ident.partition, ident.namespace, ident.datacenter, ident.service) == (
        "team-a",
        "payments",
        "dc2",
        "api",
    )
    assert ident.uri == uri
    assert "/ap/" not in ServiceIdentity(TD, "default", "dc1", "web").uri


def test_istio_workload_identity() -> None:
    ident = parse("spiffe://cluster.local/ns/prod/sa/reviews")
    assert ident == WorkloadIdentity("cluster.local", "prod", "reviews")
    assert str(ident) == "spiffe://cluster.local/ns/prod/sa/reviews"
    with pytest.raises(IdentityError, match="not a service identity"):
        parse_service(ident.uri)


@pytest.mark.parametrize(
    "uri",
    [
        "http://td/ns/default/dc/dc1/svc/web",
        "spiffe://",
        f"spiffe://{TD}",
        f"spiffe://{TD}/",
        "spiffe://UPPER.case/ns/default/dc/dc1/svc/web",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web/extra",
        f"spiffe://{TD}/ns//dc/dc1/svc/web",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/web?x=1",
        f"spiffe://{TD}/agent/client/dc/dc1/id/abc",
        f"spiffe://{TD}/ns/default/dc/dc1/svc/we b",
    ],
)
def test_invalid_ids_are_refused(uri: str) -> None:
    with pytest.raises(IdentityError):
        parse(uri)


def _der(**kw: object) -> bytes:
    root = new_root("root", ttl=100 * HOUR, now=NOW - HOUR)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = root.sign_leaf(key.public_key(), ttl=HOUR, now=NOW, **kw)  # type: ignore[arg-type]
    return cert.public_bytes(serialization.Encoding.DER)


def test_peer_identity_of_a_good_leaf() -> None:
    uri = service_identity(TD, "dc1", "web").uri
    ident = peer_identity(_der(uri_sans=[uri]), trust_domain=TD, now=NOW)
    assert ident == ServiceIdentity(TD, "default", "dc1", "web")


@pytest.mark.parametrize(
    ("kw", "now", "reason"),
    [
        (
            {"uri_sans": [f"spiffe://{TD}/ns/default/dc/dc1/svc/web"]},
            NOW + 2 * HOUR,
            Refusal.EXPIRED,
        ),
        (
            {"uri_sans": [f"spiffe://{TD}/ns/default/dc/dc1/svc/web"]},
            NOW - HOUR,
            Refusal.NOT_YET_VALID,
        ),
        ({"uri_sans": [], "common_name": "web"}, NOW, Refusal.NO_SPIFFE_SAN),
        (
            {"uri_sans": [f"spiffe://{TD}/ns/a/sa/b", f"spiffe://{TD}/ns/c/sa/d"]},
            NOW,
            Refusal.MANY_URI_SANS,
        ),
        (
            {"uri_sans": ["spiffe://other.consul/ns/default/dc/dc1/svc/web"]},
            NOW,
            Refusal.WRONG_TRUST_DOMAIN,
        ),
        ({"uri_sans": [f"spiffe://{TD}/agent/server/dc/dc1"]}, NOW, Refusal.BAD_SPIFFE_ID),
    ],
)
def test_peer_identity_refusals_name_the_check(
    kw: dict[str, object], now: datetime.datetime, reason: Refusal
) -> None:
    with pytest.raises(PeerRefused) as info:
        peer_identity(_der(**kw), trust_domain=TD, now=now)
    assert info.value.reason is reason
    assert reason.value in str(info.value)


def test_ca_and_self_signed_certificates_are_not_peers() -> None:
    root = new_root("root", uri_sans=[f"spiffe://{TD}"], ttl=HOUR, now=NOW)
    der = root.cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(PeerRefused) as info:
        peer_identity(der, trust_domain=TD, now=NOW)
    assert info.value.reason is Refusal.CA
    with pytest.raises(PeerRefused) as garbage:
        peer_identity(b"not a certificate", trust_domain=TD, now=NOW)
    assert garbage.value.reason is Refusal.UNPARSABLE
