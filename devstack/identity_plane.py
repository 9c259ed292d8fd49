"""The dev server's identity plane: the Connect CA and, when asked for, the Vault listener.

With `vault_addr` set, devstack also serves a Vault PKI subset there, mounts `pki` with a root,
creates the `meshlet` role (URI SANs in this cluster's trust domain, no CN required) and makes
that mount the Connect CA's provider, as Consul does with `ca_provider = "vault"`. A fresh
`meshlet dev --vault-addr ...` therefore serves meshlet's defaults with no setup, and leaves
from Consul's API and from Vault's chain to one trust bundle.
"""

from __future__ import annotations

import logging
import secrets

from devstack.config import DevConfig
from devstack.connect_ca import CASettings, ConnectCA, ConsulProvider, RootProvider
from devstack.store import Store
from devstack.vault_pki import VaultProvider
from devstack.vault_server import VaultServer

log = logging.getLogger("devstack.identity")

DEFAULT_MOUNT = "pki"
DEFAULT_ROLE = "meshlet"


class IdentityPlane:
    def __init__(self, store: Store, config: DevConfig) -> None:
        self.config = config
        self.vault: VaultServer | None = None
        self._vault_provider: VaultProvider | None = None
        if config.vault_addr is not None:
            token = config.vault_token or "hvs." + secrets.token_urlsafe(24)
            self.vault = VaultServer(config.vault_addr, token)
        self.ca = ConnectCA(
            store,
            datacenter=config.datacenter,
            settings=CASettings(leaf_cert_ttl=config.leaf_cert_ttl),
            min_leaf_ttl=min(config.min_leaf_cert_ttl, config.leaf_cert_ttl),
            change_delay=config.ca_change_delay,
        )

    async def start(self) -> None:
        if self.vault is not None:
            await self.vault.start()
            mount = self.vault.enable_pki(DEFAULT_MOUNT)
            self._vault_provider = VaultProvider(mount, self.vault.url)
            self.ca.provider = self._vault_provider
        self.ca.initialize()
        if self.vault is not None:
            mount = self.vault.mounts[DEFAULT_MOUNT]
            mount.write_role(
                DEFAULT_ROLE,
                {
                    "allowed_uri_sans": [f"spiffe://{self.ca.trust_domain}/*"],
                    "require_cn": False,
                    "allow_any_name": False,
                    "enforce_hostnames": False,
                    "allow_ip_sans": False,
                    "allow_localhost": False,
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": self.ca.settings.leaf_cert_ttl,
                    "max_ttl": max(self.ca.settings.leaf_cert_ttl, 72 * 3600),
                    "no_store": True,
                },
            )

    async def close(self) -> None:
        self.ca.close()
        if self.vault is not None:
            await self.vault.close()

    def provider(self, name: str) -> RootProvider | None:
        if name == "consul":
            return self.ca.provider if self.ca.provider.name == "consul" else ConsulProvider()
        if name == "vault":
            return self._vault_provider
        return None
