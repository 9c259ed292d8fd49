"""Leaves straight from Vault's PKI engine, through hvac.

The key pair is made here and only a CSR goes to `<mount>/sign/<role>`, so the private key
never leaves the host. The SPIFFE ID uses the trust domain of Consul's CA (from the bundle the
rotator passes in), so Vault-issued leaves interoperate with Consul-issued ones. Vault has no
blocking queries: the rotator decides when to call (`blocking = False`).

Authentication: a token, or AppRole (role_id + secret_id) with a fresh login whenever Vault
refuses the current token. Configuration follows the Vault CLI: VAULT_ADDR, VAULT_TOKEN,
VAULT_CACERT (plus VAULT_ROLE_ID / VAULT_SECRET_ID for AppRole). hvac is synchronous, so every
call runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from connect.identity import is_self_signed, service_identity
from connect.leaf import (
    Leaf,
    MalformedAnswer,
    SourceRejected,
    SourceUnavailable,
    TrustBundle,
    split_pem,
)

log = logging.getLogger("meshlet.connect.vault")

DEFAULT_ADDR = "https://127.0.0.1:8200"
DEFAULT_MOUNT = "pki"
DEFAULT_ROLE = "meshlet"
DEFAULT_TIMEOUT = 10.0


class VaultConfigError(ValueError):
    pass


@dataclass(frozen=True)
class VaultConfig:
    addr: str = DEFAULT_ADDR
    token: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    approle_mount: str = "approle"
    mount: str = DEFAULT_MOUNT
    role: str = DEFAULT_ROLE
    ttl: str | None = None
    """Requested leaf TTL (Vault caps it at the role's max_ttl); None: the role's ttl."""
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.addr.startswith(("http://", "https://")):
            raise VaultConfigError(f"VAULT_ADDR {self.addr!r}: expected http(s)://HOST:PORT")
        if (self.role_id is None) != (self.secret_id is None):
            raise VaultConfigError("AppRole needs both role_id and secret_id")
        if self.token is None and self.role_id is None:
            raise VaultConfigError("no Vault credentials: set VAULT_TOKEN, or an AppRole role_id")


def vault_config_from_env(env: Mapping[str, str], **overrides: Any) -> VaultConfig:
    """The Vault CLI's conventions; `overrides` (from the agent config) win over the env."""
    values: dict[str, Any] = {
        "addr": env.get("VAULT_ADDR") or DEFAULT_ADDR,
        "token": env.get("VAULT_TOKEN") or None,
        "ca_cert": Path(env["VAULT_CACERT"]) if env.get("VAULT_CACERT") else None,
        "role_id": env.get("VAULT_ROLE_ID") or None,
        "secret_id": env.get("VAULT_SECRET_ID") or None,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VaultConfig(**values)


def _csr(uri: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_pem


class VaultLeafSource:
    name = "vault"
    blocking = False

    def __init__(self, config: VaultConfig, service: str, datacenter: str) -> None:
        self.config = config
        self.service = service
        self.datacenter = datacenter
        verify: bool | str = str(config.ca_cert) if config.ca_cert else True
        self._client = hvac.Client(
            url=config.addr, token=config.token, verify=verify, timeout=config.timeout
        )
        self._logged_in = config.role_id is None

    async def fetch(self, current: Leaf | None, bundle: TrustBundle) -> Leaf:
        return await asyncio.to_thread(self._fetch, bundle)

    def _fetch(self, bundle: TrustBundle) -> Leaf:
        uri = service_identity(bundle.trust_domain, self.datacenter, self.service).uri
        csr, key_pem = _csr(uri)
        try:
            answer = self._sign(csr, uri)
        except hvac.exceptions.Forbidden:
            if self.config.role_id is None:
                raise SourceRejected("Vault refused the token (permission denied)") from None
            # An AppRole token may have expired: log in again, once.
            self._logged_in = False
            answer = self._sign(csr, uri)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("certificate"), str):
            raise MalformedAnswer("Vault's sign answer has no data.certificate")
        chain = [data["certificate"]]
        for pem in data.get("ca_chain") or []:
            for one in split_pem(str(pem)):
                cert = x509.load_pem_x509_certificate(one.encode())
                # A peer must find the root in its own trust bundle, never take it from us.
                if not is_self_signed(cert):
                    chain.append(one)
        leaf = Leaf.from_pem("".join(chain), key_pem, source="vault", service=self.service)
        if leaf.service_uri != uri:
            raise MalformedAnswer(f"Vault signed {leaf.service_uri}, not the requested {uri}")
        for warning in answer.get("warnings") or []:
            log.warning("vault: %s", warning)
        return leaf

    def _sign(self, csr: str, uri: str) -> Any:
        extra: dict[str, Any] = {"uri_sans": uri, "exclude_cn_from_sans": True}
        if self.config.ttl:
            extra["ttl"] = self.config.ttl
        try:
            self._login()
            return self._client.secrets.pki.sign_certificate(
                name=self.config.role,
                csr=csr,
                common_name="",
                extra_params=extra,
                mount_point=self.config.mount,
            )
        except hvac.exceptions.Forbidden:
            raise
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath) as err:
            raise SourceRejected(f"Vault refused to sign for {uri}: {_errors(err)}") from None
        except hvac.exceptions.VaultError as err:
            raise SourceUnavailable(f"Vault error: {_errors(err)}") from None
        except OSError as err:
            # requests' exceptions are OSErrors: refused, reset, timed out, TLS failures.
            raise SourceUnavailable(f"cannot reach Vault at {self.config.addr}: {err}") from None

    def _login(self) -> None:
        if self._logged_in:
            return
        self._client.auth.approle.login(
            role_id=self.config.role_id,
            secret_id=self.config.secret_id,
            mount_point=self.config.approle_mount,
        )
        self._logged_in = True


def _errors(err: hvac.exceptions.VaultError) -> str:
    errors = getattr(err, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(err)[:300]
