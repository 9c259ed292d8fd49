"""devstack's Vault listener driven by hvac's real client: sys, tokens, AppRole, PKI mount,
roles, issue and sign (CSR), trust bundle, errors; and the Connect CA using it as provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devstack.config import DevConfig
from devstack.server import DevServer
from tests.conftest import Http

TOKEN = "test-root"


@pytest.fixture
def dev_config() -> DevConfig:
    return DevConfig(vault_addr="127.0.0.1:0", vault_token=TOKEN)


@pytest.fixture
async def vault(dev: DevServer) -> AsyncIterator[hvac.Client]:
    assert dev.identity.vault is not None
    client = hvac.Client(url=dev.identity.vault.url, token=TOKEN, timeout=5)
    yield client
    client.adapter.close()


async def run(fn: Any, *args: Any, **kw: Any) -> Any:
    """hvac is synchronous: call it off the event loop that serves devstack."""
    return await asyncio.to_thread(fn, *args, **kw)


def _csr(uri: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_health_and_token_auth(vault: hvac.Client, dev: DevServer) -> None:
    health = await run(vault.sys.read_health_status, method="GET")
    assert health["initialized"] is True and health["sealed"] is False
    assert await run(vault.is_authenticated)
    assert dev.identity.vault is not None
    anonymous = hvac.Client(url=dev.identity.vault.url, token="wrong")
    assert not await run(anonymous.is_authenticated)
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        await run(anonymous.secrets.pki.generate_certificate, "meshlet", "", mount_point="pki")
    assert info.value.errors == ["permission denied"]


async def test_defaults_issue_and_sign_spiffe_leaves(vault: hvac.Client, dev: DevServer) -> None:
    td = dev.identity.ca.trust_domain
    uri = f"spiffe://{td}/ns/default/dc/dc1/svc/web"
    issued = await run(
        vault.secrets.pki.generate_certificate,
        name="meshlet",
        common_name="",
        extra_params={"uri_sans": uri, "ttl": "1h"},
    )
    assert issued["lease_id"] == "" and issued["warnings"] is None
    data = issued["data"]
    assert {"certificate", "issuing_ca", "ca_chain", "private_key", "serial_number"} <= set(data)
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    # One trust bundle: Vault's issuer is the Connect CA's active root.
    root = dev.identity.ca.active.issuer.cert
    cert.verify_directly_issued_by(root)
    assert data["issuing_ca"] == dev.identity.ca.active.issuer.pem

    signed = await run(
        vault.secrets.pki.sign_certificate,
        name="meshlet",
        csr=_csr(uri),
        common_name="",
        extra_params={"ttl": "1000h"},
    )
    assert signed["warnings"] == [
        'TTL "1000h0m0s" is longer than permitted maxTTL "72h0m0s", so maxTTL is being used'
    ]
    assert "private_key" not in signed["data"]
    leaf = x509.load_pem_x509_certificate(signed["data"]["certificate"].encode())
    leaf.verify_directly_issued_by(root)
    assert await run(vault.secrets.pki.read_ca_certificate) == dev.identity.ca.active.issuer.pem
    chain = await run(vault.secrets.pki.read_certificate, "ca_chain")
    assert chain["data"]["ca_chain"] == [dev.identity.ca.active.issuer.pem]


async def test_role_checks(vault: hvac.Client, dev: DevServer) -> None:
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        await run(
            vault.secrets.pki.generate_certificate,
            name="meshlet",
            common_name="",
            extra_params={"uri_sans": "spiffe://elsewhere.consul/ns/default/dc/dc1/svc/web"},
        )
    assert info.value.errors == [
        "URI Subject Alternative Name spiffe://elsewhere.consul/ns/default/dc/dc1/svc/web "
        "not allowed by this role"
    ]
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        await run(vault.secrets.pki.generate_certificate, name="nope", common_name="x")
    assert info.value.errors == ["unknown role: nope"]
    await run(
        vault.secrets.pki.create_or_update_role,
        "strict",
        extra_params={"allowed_uri_sans": "spiffe://*", "key_type": "ec"},
    )
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        await run(vault.secrets.pki.generate_certificate, name="strict", common_name="")
    assert "require_cn" in info.value.errors[0]
    role = await run(vault.secrets.pki.read_role, "strict")
    assert role["data"]["require_cn"] is True and role["data"]["key_bits"] == 256


async def test_new_mount_root_role_and_approle_login(vault: hvac.Client, dev: DevServer) -> None:
    await run(
        vault.sys.enable_secrets_engine, "pki", path="pki_mesh", config={"max_lease_ttl": "8760h"}
    )
    root = await run(
        vault.secrets.pki.generate_root,
        "internal",
        "mesh root",
        extra_params={"key_type": "ec", "key_bits": 384, "ttl": "8760h"},
        mount_point="pki_mesh",
    )
    assert "certificate" in root["data"]
    await run(
        vault.secrets.pki.create_or_update_role,
        "mesh-leaf",
        extra_params={
            "allowed_uri_sans": "spiffe://td.consul/ns/default/dc/dc1/svc/*",
            "require_cn": False,
            "key_type": "ec",
            "ttl": "24h",
        },
        mount_point="pki_mesh",
    )
    await run(vault.sys.enable_auth_method, "approle")
    await run(vault.auth.approle.create_or_update_approle, "sidecar", token_ttl="1h")
    role_id = (await run(vault.auth.approle.read_role_id, "sidecar"))["data"]["role_id"]
    secret = (await run(vault.auth.approle.generate_secret_id, "sidecar"))["data"]["secret_id"]
    assert dev.identity.vault is not None
    app = hvac.Client(url=dev.identity.vault.url)
    login = await run(app.auth.approle.login, role_id=role_id, secret_id=secret)
    assert login["auth"]["lease_duration"] > 3500
    signed = await run(
        app.secrets.pki.sign_certificate,
        name="mesh-leaf",
        csr=_csr("spiffe://td.consul/ns/default/dc/dc1/svc/api"),
        common_name="",
        mount_point="pki_mesh",
    )
    cert = x509.load_pem_x509_certificate(signed["data"]["certificate"].encode())
    assert cert.issuer.rfc4514_string() == "CN=mesh root"
    with pytest.raises(hvac.exceptions.InvalidRequest):
        await run(app.auth.approle.login, role_id=role_id, secret_id="wrong")


async def test_connect_ca_uses_vault_as_provider(http: Http, dev: DevServer) -> None:
    _, cfg, _ = await http.get("/v1/connect/ca/configuration")
    assert cfg["Provider"] == "vault"
    assert cfg["Config"]["RootPKIPath"] == "pki/"
    assert "Token" not in cfg["Config"]
    _, leaf, _ = await http.get("/v1/agent/connect/ca/leaf/web")
    mount = dev.identity.vault.mounts["pki"]  # type: ignore[union-attr]
    leaf_cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    leaf_cert.verify_directly_issued_by(mount.issuer().cert)
