"""The dev server's one typed configuration."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

CONSUL_VERSION = "1.22.0"


class DevConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DevConfig:
    http_addr: str = "127.0.0.1:0"
    datacenter: str = "dc1"
    node_name: str = "meshlet-dev"
    acl_initial_management_token: str | None = None
    default_policy: Literal["allow", "deny"] = "allow"
    default_intention_policy: Literal["allow", "deny"] | None = None
    enable_script_checks: bool = False
    # Consul's sidecar port range (ports.sidecar_min_port / sidecar_max_port).
    sidecar_min_port: int = 21000
    sidecar_max_port: int = 21255
    # Connect CA: leaf lifetime (Consul's LeafCertTTL, 72h) and the floor a CA configuration
    # PUT may set (Consul's is 1h; tests lower it to use leaves that live seconds).
    leaf_cert_ttl: float = 72 * 3600.0
    min_leaf_cert_ttl: float = 3600.0
    # Seconds the agent keeps serving a leaf of a root that is no longer active before it
    # re-signs (Consul: a random delay of up to 30 s; fixed here so tests can rely on it).
    ca_change_delay: float = 0.0
    # Serve the Vault PKI subset on this HOST:PORT, with this root token (random if unset).
    vault_addr: str | None = None
    vault_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        split_host_port(self.http_addr)
        if self.default_policy not in ("allow", "deny"):
            raise DevConfigError(
                f"default_policy: {self.default_policy!r} is not one of 'allow', 'deny'"
            )
        if self.default_intention_policy not in (None, "allow", "deny"):
            raise DevConfigError(
                "default_intention_policy: "
                f"{self.default_intention_policy!r} is not one of 'allow', 'deny'"
            )
        if self.vault_addr is not None:
            split_host_port(self.vault_addr)
        if not 0 < self.leaf_cert_ttl < 8760 * 3600:
            raise DevConfigError("leaf_cert_ttl must be more than 0s and less than 8760h")
        if not 0 <= self.ca_change_delay <= 600:
            raise DevConfigError("ca_change_delay must be between 0s and 600s")
        if not self.datacenter or not self.node_name:
            raise DevConfigError("datacenter and node_name must not be empty")

    @property
    def acl_enabled(self) -> bool:
        return self.acl_initial_management_token is not None

    @property
    def host(self) -> str:
        return split_host_port(self.http_addr)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.http_addr)[1]


def split_host_port(addr: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 in brackets), naming what is wrong."""
    host, sep, port_text = addr.rpartition(":")
    if not sep or not host:
        raise DevConfigError(f"http address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:8500")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise DevConfigError(
                f"http address {addr!r}: host must be an IP address or localhost"
            ) from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise DevConfigError(f"http address {addr!r}: port must be 0-65535")
    return host, int(port_text)
