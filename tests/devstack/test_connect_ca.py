"""Connect CA endpoints over real HTTP: roots, leaves (blocking), configuration and rotation,
authorize."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from devstack.config import DevConfig
from devstack.server import DevServer
from tests.conftest import Http


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig(leaf_cert_ttl=2.0, min_leaf_cert_ttl=1.0)


async def test_roots_shape_and_pem(http: Http, dev: DevServer) -> None:
    status, body, headers = await http.get("/v1/connect/ca/roots")
    assert status == 200
    assert int(headers["X-Consul-Index"]) >= 1
    assert body["TrustDomain"].endswith(".consul")
    [root] = body["Roots"]
    assert root["ID"] == body["ActiveRootID"] and root["Active"] is True
    assert root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
    cert = x509.load_pem_x509_certificate(root["RootCert"].encode())
    assert cert.serial_number == root["SerialNumber"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://" + body["TrustDomain"]
    ]
    for key in ("Name", "SigningKeyID", "NotBefore", "NotAfter", "IntermediateCerts"):
        assert key in root
    status, agent_body, headers = await http.get("/v1/agent/connect/ca/roots")
    assert agent_body == body and headers["X-Cache"] == "MISS"
    status, pem, headers = await http.get("/v1/connect/ca/roots", params={"pem": "true"})
    assert headers["Content-Type"].startswith("application/pem-certificate-chain")
    assert pem == root["RootCert"]
    status, text, _ = await http.get("/v1/connect/ca/roots", params={"pem": "maybe"})
    assert (status, text) == (400, "The 'pem' query parameter must be a boolean value")


async def test_leaf_shape(http: Http, dev: DevServer) -> None:
    status, leaf, headers = await http.get("/v1/agent/connect/ca/leaf/web")
    assert status == 200
    td = dev.identity.ca.trust_domain
    assert leaf["Service"] == "web"
    assert leaf["ServiceURI"] == f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    assert int(headers["X-Consul-Index"]) == leaf["ModifyIndex"]
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    assert (
        ":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(8)).lstrip("0:")
        in (leaf["SerialNumber"])
    )
    assert "PRIVATE KEY" in leaf["PrivateKeyPEM"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The cached leaf comes back while it is fresh.
    _, again, _ = await http.get("/v1/agent/connect/ca/leaf/web")
    assert again["SerialNumber"] == leaf["SerialNumber"]


async def test_blocked_leaf_query_returns_a_new_leaf_at_soft_expiry(
    http: Http, dev: DevServer
) -> None:
    _, leaf, _ = await http.get("/v1/agent/connect/ca/leaf/web")
    status, fresh, _ = await http.get(
        "/v1/agent/connect/ca/leaf/web", params={"index": str(leaf["ModifyIndex"]), "wait": "30s"}
    )
    assert status == 200
    assert fresh["ModifyIndex"] > leaf["ModifyIndex"]
    assert fresh["SerialNumber"] != leaf["SerialNumber"]
    # Renewed inside the old leaf's lifetime, not after it.
    assert fresh["ValidAfter"] <= leaf["ValidBefore"]


async def test_rotation_wakes_blocked_roots_and_leaf_queries(http: Http, dev: DevServer) -> None:
    await http.put(
        "/v1/connect/ca/configuration", json={"Provider": "consul", "Config": {"LeafCertTTL": "1h"}}
    )
    _, roots, headers = await http.get("/v1/agent/connect/ca/roots")
    _, leaf, _ = await http.get("/v1/agent/connect/ca/leaf/web")
    roots_wait = asyncio.create_task(
        http.get(
            "/v1/agent/connect/ca/roots",
            params={"index": headers["X-Consul-Index"], "wait": "30s"},
        )
    )
    leaf_wait = asyncio.create_task(
        http.get(
            "/v1/agent/connect/ca/leaf/web",
            params={"index": str(leaf["ModifyIndex"]), "wait": "30s"},
        )
    )
    await dev.store.until_blocked(2)
    status, body, _ = await http.put(
        "/v1/connect/ca/configuration",
        json={
            "Provider": "consul",
            "Config": {"LeafCertTTL": "1h", "PrivateKeyType": "rsa", "PrivateKeyBits": 2048},
        },
    )
    assert (status, body) == (200, "")
    _, new_roots, _ = await asyncio.wait_for(roots_wait, 10)
    _, new_leaf, _ = await asyncio.wait_for(leaf_wait, 10)
    assert new_roots["ActiveRootID"] != roots["ActiveRootID"]
    old, new = new_roots["Roots"]
    assert (old["Active"], new["Active"]) == (False, True)
    assert new["PrivateKeyType"] == "rsa"
    [cross_pem] = new["IntermediateCerts"]
    cross = x509.load_pem_x509_certificate(cross_pem.encode())
    new_cert = x509.load_pem_x509_certificate(new["RootCert"].encode())
    old_cert = x509.load_pem_x509_certificate(old["RootCert"].encode())
    # The cross-signature: the new root's subject and key, vouched for by the old root.
    assert cross.subject == new_cert.subject and cross.issuer == old_cert.subject
    assert cross.public_key() == new_cert.public_key()
    cross.verify_directly_issued_by(old_cert)
    chain = x509.load_pem_x509_certificates(new_leaf["CertPEM"].encode())
    assert chain[0].issuer == new_cert.subject
    chain[0].verify_directly_issued_by(new_cert)
    assert chain[1] == cross


async def test_configuration_get_put_and_errors(http: Http) -> None:
    status, cfg, _ = await http.get("/v1/connect/ca/configuration")
    assert status == 200 and cfg["Provider"] == "consul"
    assert cfg["Config"]["LeafCertTTL"] == "2s"
    status, body, _ = await http.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"LeafCertTTL": "500ms"}},
    )
    assert status == 500 and "LeafCertTTL must be at least 1s" in body
    status, body, _ = await http.put(
        "/v1/connect/ca/configuration", json={"Provider": "consul", "State": {"a": "b"}}
    )
    assert status == 400 and body.startswith("Provider State is read-only")
    status, body, _ = await http.put("/v1/connect/ca/configuration", data=b"{")
    assert status == 400 and body.startswith("Request decode failed:")
    status, body, _ = await http.put(
        "/v1/connect/ca/configuration", json={"Provider": "vault", "Config": {}}
    )
    assert status == 500  # no Vault listener in this devstack
    status, _, _ = await http.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"LeafCertTTL": "3s", "CSRMaxPerSecond": 50}},
    )
    assert status == 200
    _, cfg, _ = await http.get("/v1/connect/ca/configuration")
    assert cfg["Config"]["LeafCertTTL"] == "3s" and cfg["Config"]["CSRMaxPerSecond"] == 50
    _, roots, _ = await http.get("/v1/connect/ca/roots")
    assert len(roots["Roots"]) == 1  # a TTL change does not rotate


async def test_authorize_follows_default_policy_and_validates(http: Http, dev: DevServer) -> None:
    uri = f"spiffe://{dev.identity.ca.trust_domain}/ns/default/dc/dc1/svc/web"
    status, body, _ = await http.call(
        "POST", "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": uri}
    )
    assert (status, body) == (
        200,
        {"Authorized": True, "Reason": "Default behavior configured by ACLs"},
    )
    cases = [
        ({"ClientCertURI": uri}, "Target service must be specified"),
        ({"Target": "db", "ClientCertURI": "nope"}, "ClientCertURI not a valid Connect identifier"),
        (
            {"Target": "db", "ClientCertURI": "spiffe://cluster.local/ns/a/sa/b"},
            "ClientCertURI not a valid Service identifier",
        ),
    ]
    for payload, text in cases:
        status, body, _ = await http.call("POST", "/v1/agent/connect/authorize", json=payload)
        assert (status, body) == (400, text)


@pytest.mark.parametrize(
    "dev_config",
    [DevConfig(acl_initial_management_token="root", default_policy="deny")],
)
async def test_leaf_needs_service_write_when_acls_are_on(http: Http) -> None:
    status, body, _ = await http.get("/v1/agent/connect/ca/leaf/web")
    assert status == 403 and "service:write" in body
    status, _, _ = await http.get(
        "/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "root"}
    )
    assert status == 200
    status, _, _ = await http.get("/v1/connect/ca/roots")
    assert status == 200  # roots are public
