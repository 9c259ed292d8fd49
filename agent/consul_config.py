"""How to reach Consul: a frozen, typed configuration and the consul CLI's environment rules.

`config_from_env` is pure (it takes the mapping, reads no files); files named in the config (CA,
client certificate, token file) are read once when a client is built from it, so a bad path
fails at start-up with the setting's name rather than on the first request.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.consul_errors import ConsulConfigError

DEFAULT_ADDRESS = "127.0.0.1:8500"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 100
# Consul renders ~1 KB per instance of /v1/health/connect: 64 MiB is some 60,000 instances of
# one service. Nothing bounds Consul's answers otherwise, and the whole body is held in memory.
DEFAULT_MAX_RESPONSE_BYTES = 64 << 20

# Go's strconv.ParseBool, which the consul CLI uses for its boolean variables.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass(frozen=True, slots=True)
class ConsulTLS:
    """HTTPS settings. Present on a `ConsulConfig` exactly when the client speaks HTTPS."""

    ca_file: Path | None = None
    ca_path: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    """SNI and the name to verify, when it differs from the host in the address."""
    verify: bool = True

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ConsulConfigError(
                "a client certificate needs both client_cert and client_key "
                "(CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY)"
            )


@dataclass(frozen=True, slots=True)
class ConsulConfig:
    """Where Consul is and how to authenticate to it."""

    address: str = DEFAULT_ADDRESS
    """host:port (IPv6 in brackets); ignored when `unix_socket` is set."""
    unix_socket: Path | None = None
    tls: ConsulTLS | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    """Read once when the client is built; a non-empty file wins over `token`, as in Consul."""
    timeout: float = DEFAULT_TIMEOUT
    """Deadline in seconds of a non-blocking request; also the slack added to a blocking one."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Pooled connections to Consul. Every parked blocking query holds one, so a process that
    watches N services needs more than N (and Consul's `http_max_conns_per_client` above it)."""
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """The largest answer body read; a larger one is refused (`ConsulBadResponse`) unread."""

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConsulConfigError(
                f"max_connections must be at least 1, got {self.max_connections}"
            )
        if self.max_response_bytes < 1:
            raise ConsulConfigError(
                f"max_response_bytes must be at least 1, got {self.max_response_bytes}"
            )
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConsulConfigError(
                f"timeout must be a positive number of seconds, got {self.timeout}"
            )
        if self.unix_socket is not None:
            if not str(self.unix_socket):
                raise ConsulConfigError("unix_socket must not be empty")
            if self.tls is not None:
                raise ConsulConfigError(
                    "HTTPS over a unix socket is not supported: use a TCP address for TLS, "
                    "or drop the TLS settings (CONSUL_HTTP_SSL) for the socket"
                )
        else:
            _check_address(self.address)

    @property
    def base_url(self) -> str:
        if self.unix_socket is not None:
            # The host is a placeholder; the connector dials the socket whatever it says.
            return "http://localhost"
        return f"{'https' if self.tls is not None else 'http'}://{self.address}"


def _check_address(address: str) -> None:
    if "://" in address:
        raise ConsulConfigError(
            f"address {address!r}: expected HOST:PORT without a scheme; HTTPS is chosen by "
            "`tls`, and config_from_env accepts http://, https:// and unix:// URLs"
        )
    if any(c in address for c in "/?#@ \t"):
        raise ConsulConfigError(
            f"address {address!r}: expected HOST:PORT (e.g. {DEFAULT_ADDRESS}) "
            "without a path, user or query"
        )
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ConsulConfigError(f"address {address!r}: unbalanced '[' around an IPv6 host")
        host, after = address[1:close], address[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConsulConfigError(
                f"address {address!r}: {host!r} is not an IPv6 address"
            ) from None
        if after and not after.startswith(":"):
            raise ConsulConfigError(f"address {address!r}: expected [IPV6]:PORT")
        has_port, port = bool(after), after[1:]
    else:
        host, sep, port = address.partition(":")
        has_port = bool(sep)
        if ":" in port:
            raise ConsulConfigError(
                f"address {address!r}: IPv6 hosts go in brackets, e.g. [::1]:8500"
            )
        if not host or "[" in host or "]" in host:
            raise ConsulConfigError(
                f"address {address!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}"
            )
    # No port is legal, as in Consul's CLI: the scheme's default port (80/443) is used.
    if has_port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ConsulConfigError(f"address {address!r}: port must be a number from 1 to 65535")


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name, "")
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConsulConfigError(f"{name}={value!r}: expected true or false (also 1/0, t/f)")


def _env_path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "")
    return Path(value) if value else None


def config_from_env(env: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT) -> ConsulConfig:
    """Build a `ConsulConfig` from the consul CLI's variables; empty values count as unset.

    CONSUL_HTTP_ADDR        host:port, http://host:port, https://host:port or unix:///path
    CONSUL_HTTP_SSL         true: HTTPS even when the address says http:// (as Consul does)
    CONSUL_HTTP_SSL_VERIFY  false: do not verify the server's certificate
    CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME
    CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE (the file wins when both are set)

    As in the consul CLI, the TLS file variables only matter once HTTPS is selected.
    """
    raw_addr = env.get("CONSUL_HTTP_ADDR", "") or DEFAULT_ADDRESS
    ssl_flag = _env_bool(env, "CONSUL_HTTP_SSL")
    verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")

    scheme, sep, rest = raw_addr.partition("://")
    if not sep:
        scheme, rest = "", raw_addr
    scheme = scheme.lower()
    if scheme not in ("", "http", "https", "unix"):
        raise ConsulConfigError(
            f"CONSUL_HTTP_ADDR={raw_addr!r}: unknown scheme {scheme!r}; "
            "expected host:port, http://, https:// or unix://"
        )

    unix_socket: Path | None = None
    address = DEFAULT_ADDRESS
    if scheme == "unix":
        if not rest:
            raise ConsulConfigError(
                f"CONSUL_HTTP_ADDR={raw_addr!r}: unix:// needs a socket path, e.g. "
                "unix:///var/run/consul.sock"
            )
        unix_socket = Path(rest)
    else:
        address = rest.rstrip("/")
        try:
            _check_address(address)
        except ConsulConfigError as exc:
            raise ConsulConfigError(f"CONSUL_HTTP_ADDR={raw_addr!r}: {exc}") from None

    tls: ConsulTLS | None = None
    # Consul's rule: https:// selects TLS, and CONSUL_HTTP_SSL=true is never downgraded by
    # an http:// address.
    if scheme == "https" or ssl_flag:
        if unix_socket is not None:
            raise ConsulConfigError(
                f"CONSUL_HTTP_SSL=true with CONSUL_HTTP_ADDR={raw_addr!r}: "
                "HTTPS over a unix socket is not supported"
            )
        tls = ConsulTLS(
            ca_file=_env_path(env, "CONSUL_CACERT"),
            ca_path=_env_path(env, "CONSUL_CAPATH"),
            client_cert=_env_path(env, "CONSUL_CLIENT_CERT"),
            client_key=_env_path(env, "CONSUL_CLIENT_KEY"),
            server_name=env.get("CONSUL_TLS_SERVER_NAME") or None,
            verify=verify is not False,
        )

    return ConsulConfig(
        address=address,
        unix_socket=unix_socket,
        tls=tls,
        token=env.get("CONSUL_HTTP_TOKEN") or None,
        token_file=_env_path(env, "CONSUL_HTTP_TOKEN_FILE"),
        timeout=timeout,
    )
