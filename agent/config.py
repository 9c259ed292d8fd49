"""The agent's one typed configuration: parsed once at the edge, validated whole.

    config = load(Path("agent.yaml"), os.environ)     # raises ConfigError naming every problem

The model is a tree of frozen dataclasses. Each field carries its documentation in its
metadata, and one generic parser walks the tree by type, so the YAML keys, their validation and
docs/configuration.md (`meshlet agent --print-config-reference`) come from the same place.
`parse` is pure: it takes the decoded YAML and the environment; only `load` reads the file.

Environment overrides follow the consul CLI: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN(_FILE),
CONSUL_HTTP_SSL(_VERIFY), CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT/_KEY and
CONSUL_TLS_SERVER_NAME win over the file's `consul` section, as they win over a consul CLI
default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml

from agent.consul_blocking import parse_duration
from agent.consul_config import ConsulConfig, config_from_env
from agent.consul_errors import ConsulConfigError
from connect.access_log import parse_access_logs
from connect.tracing_settings import parse_tracing
from intentions.path_normalization import PathNormalization

# ---- field metadata ----------------------------------------------------------------------------


def _doc(
    text: str,
    *,
    duration: bool = False,
    port: bool = False,
    env: str = "",
    required: bool = False,
) -> dict[str, Any]:
    return {"doc": text, "duration": duration, "port": port, "env": env, "required": required}


def _empty_str_map() -> Mapping[str, str]:
    return MappingProxyType({})


# ---- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsulSection:
    address: str = field(
        default="127.0.0.1:8500",
        metadata=_doc(
            "The local Consul agent: `host:port`, `http://host:port`, `https://host:port` or "
            "`unix:///path/to/consul.sock`.",
            env="CONSUL_HTTP_ADDR",
        ),
    )
    token: str = field(
        default="",
        repr=False,
        metadata=_doc(
            "ACL token. Prefer `token_file` (or systemd `LoadCredential=`): a token in the "
            "file is readable by whoever reads the config.",
            env="CONSUL_HTTP_TOKEN",
        ),
    )
    token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "File holding the ACL token; a non-empty file wins over `token`, as in Consul.",
            env="CONSUL_HTTP_TOKEN_FILE",
        ),
    )
    ssl: bool = field(
        default=False,
        metadata=_doc(
            "Speak HTTPS even when `address` has no `https://` scheme.", env="CONSUL_HTTP_SSL"
        ),
    )
    ssl_verify: bool = field(
        default=True,
        metadata=_doc("Verify Consul's certificate.", env="CONSUL_HTTP_SSL_VERIFY"),
    )
    ca_file: Path | None = field(
        default=None, metadata=_doc("CA bundle for Consul's certificate.", env="CONSUL_CACERT")
    )
    ca_path: Path | None = field(
        default=None, metadata=_doc("Directory of CA certificates.", env="CONSUL_CAPATH")
    )
    client_cert: Path | None = field(
        default=None,
        metadata=_doc(
            "Client certificate when Consul verifies incoming HTTPS.", env="CONSUL_CLIENT_CERT"
        ),
    )
    client_key: Path | None = field(
        default=None, metadata=_doc("Key of `client_cert`.", env="CONSUL_CLIENT_KEY")
    )
    tls_server_name: str = field(
        default="",
        metadata=_doc(
            "Name to verify in Consul's certificate when it differs from the address.",
            env="CONSUL_TLS_SERVER_NAME",
        ),
    )
    timeout: float = field(
        default=10.0,
        metadata=_doc(
            "Deadline of each non-blocking request, and the slack added to blocking ones.",
            duration=True,
        ),
    )
    max_connections: int = field(
        default=0,
        metadata=_doc(
            "Pooled connections to Consul. 0 sizes the pool from the upstream count: every "
            "upstream parks one blocking query. Consul's `limits.http_max_conns_per_client` "
            "(default 200) must be above it.",
        ),
    )
    max_response_bytes: int = field(
        default=64 << 20,
        metadata=_doc(
            "Largest Consul answer read: a larger one (declared or streamed) is refused "
            "unread, the last good snapshot stays, and the watch asks again; counted in "
            "`meshlet_consul_watch_errors`.",
        ),
    )


@dataclass(frozen=True, slots=True)
class CheckSection:
    http: str = field(default="", metadata=_doc("URL the Consul agent GETs; 2xx is passing."))
    method: str = field(default="", metadata=_doc("HTTP method of the `http` check (GET)."))
    tls_skip_verify: bool = field(
        default=False, metadata=_doc("Do not verify the certificate of an https `http` check.")
    )
    tcp: str = field(default="", metadata=_doc("host:port the Consul agent connects to."))
    ttl: float | None = field(
        default=None,
        metadata=_doc(
            "A TTL check: the application itself reports to Consul within this period.",
            duration=True,
        ),
    )
    interval: float | None = field(
        default=None, metadata=_doc("How often `http` and `tcp` checks run.", duration=True)
    )
    timeout: float | None = field(
        default=None, metadata=_doc("Deadline of one `http` or `tcp` probe.", duration=True)
    )
    deregister_critical_service_after: float | None = field(
        default=None,
        metadata=_doc(
            "Consul removes the service after it has been critical this long (minimum 1m).",
            duration=True,
        ),
    )

    def problems(self) -> Iterator[tuple[str, str]]:
        kinds = [k for k in ("http", "tcp") if getattr(self, k)] + (
            ["ttl"] if self.ttl is not None else []
        )
        if len(kinds) != 1:
            got = ", ".join(kinds) or "none"
            yield "", f"expected exactly one of http, tcp or ttl, got {got}"
            return
        if kinds[0] in ("http", "tcp") and self.interval is None:
            yield "interval", f"required for a {kinds[0]} check, e.g. 10s"
        if kinds[0] == "ttl" and self.interval is not None:
            yield "interval", "not allowed for a ttl check (the application reports itself)"
        if self.http and not self.http.startswith(("http://", "https://")):
            yield "http", f"expected an http:// or https:// URL, got {self.http!r}"
        if self.tcp and _host_port_problem(self.tcp, allow_zero=False):
            yield "tcp", f"expected HOST:PORT, got {self.tcp!r}"
        for key in ("ttl", "interval", "timeout"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                yield key, "expected a positive duration"
        if (
            self.deregister_critical_service_after is not None
            and self.deregister_critical_service_after < 60
        ):
            yield "deregister_critical_service_after", "expected at least 1m (Consul's floor)"


@dataclass(frozen=True, slots=True)
class ServiceSection:
    name: str = field(default="", metadata=_doc("Service name in Consul's catalog.", required=True))
    id: str = field(
        default="", metadata=_doc("Service instance ID; defaults to `name`. Unique per node.")
    )
    port: int = field(
        default=0, metadata=_doc("Port the application listens on.", port=True, required=True)
    )
    address: str = field(
        default="",
        metadata=_doc("Address the application listens on; empty means the node's address."),
    )
    tags: tuple[str, ...] = field(default=(), metadata=_doc("Catalog tags."))
    meta: Mapping[str, str] = field(
        default_factory=_empty_str_map, metadata=_doc("Catalog metadata (string values).")
    )
    check: CheckSection | None = field(
        default=None,
        metadata=_doc(
            "The application's own health check, run by the Consul agent: set one of "
            "`http`, `tcp` or `ttl`."
        ),
    )

    @property
    def service_id(self) -> str:
        return self.id or self.name


SidecarProtocol = Literal["tcp", "http", "http2", "grpc"]
UpstreamProtocol = Literal["", "tcp", "http", "http2", "grpc"]


@dataclass(frozen=True, slots=True)
class UpstreamSection:
    name: str = field(default="", metadata=_doc("Destination service name.", required=True))
    local_bind_port: int = field(
        default=0,
        metadata=_doc(
            "Local port the sidecar listens on for this upstream.", port=True, required=True
        ),
    )
    local_bind_address: str = field(
        default="127.0.0.1", metadata=_doc("Local address of that listener.")
    )
    datacenter: str = field(
        default="", metadata=_doc("Datacenter of the destination; empty: the local one.")
    )
    peer: str = field(
        default="",
        metadata=_doc("Cluster peer that exports the destination. Not together with `datacenter`."),
    )
    filter: str = field(
        default="",
        metadata=_doc(
            "Consul filter expression over the destination's health entries (a subset), e.g. "
            '`Service.Meta.version == "v2"`.'
        ),
    )
    protocol: UpstreamProtocol = field(
        default="",
        metadata=_doc(
            "What the destination speaks (Consul's upstream `Config.protocol`): http balances "
            "each request over pooled mTLS connections; tcp, http2 and grpc are relayed per "
            "connection. Empty (the default): the discovery chain's protocol, i.e. the "
            "destination's service-defaults or proxy-defaults `Protocol`, tcp when none, as "
            "Consul does."
        ),
    )

    @property
    def bind(self) -> str:
        host = self.local_bind_address
        return (
            f"[{host}]:{self.local_bind_port}" if ":" in host else f"{host}:{self.local_bind_port}"
        )


@dataclass(frozen=True, slots=True)
class SidecarSection:
    port: int = field(
        default=21000,
        metadata=_doc(
            "Inbound mTLS listener of the sidecar (Consul's range is 21000-21255).", port=True
        ),
    )
    address: str = field(
        default="",
        metadata=_doc("Address the sidecar is reached at; empty: the service's address."),
    )
    protocol: SidecarProtocol = field(
        default="tcp", metadata=_doc("What the application speaks: tcp, http, http2 or grpc.")
    )
    path_normalization: PathNormalization = field(
        default="base",
        metadata=_doc(
            "http only: how the inbound listener normalizes each request path before the "
            "intentions decide on it; the app receives the path that was decided on. base "
            "(Istio's default): dot segments removed, `\\` made `/`, percent-encoded unreserved "
            "characters decoded; merge_slashes: base, then `//` made `/`; "
            "decode_and_merge_slashes: `%2F` and `%5C` decoded first, then merge_slashes; "
            "reject: a path that decode_and_merge_slashes would change is refused with 400. "
            "See docs/proxy.md."
        ),
    )
    check_ttl: float = field(
        default=15.0,
        metadata=_doc(
            "TTL of the sidecar's readiness check. The agent reports at a third of it while the "
            "listeners are up and a valid leaf is held; a dead agent lets it expire.",
            duration=True,
        ),
    )
    workers: int = field(
        default=1,
        metadata=_doc(
            "Data-plane processes serving the sidecar's listeners (0 to 64), each with its own "
            "event loop, sharing the ports with SO_REUSEPORT and fed by the agent process "
            "(which registers, watches, holds the leaf and serves admin, and runs no listener); "
            "they keep serving while the agent restarts. 0 runs the listeners inside the agent "
            "process instead (in-process mode, for development and tests). "
            "`meshlet sidecar --workers N` overrides it; `meshlet agent` ignores it.",
        ),
    )
    max_connections: int = field(
        default=4096,
        metadata=_doc(
            "Open downstream connections each listener (inbound, and each upstream's) accepts, "
            "per process; beyond it a new connection is reset at accept and counted in "
            "`connections_refused_limit`. Each inbound connection also holds one to the app.",
        ),
    )
    max_pending_handshakes: int = field(
        default=512,
        metadata=_doc(
            "Connections the inbound listener holds before their TLS handshake has finished "
            "(unauthenticated), per process; beyond it a new connection is reset at accept, "
            "before any TLS work. They count towards `max_connections` too.",
        ),
    )
    max_headers: int = field(
        default=100,
        metadata=_doc(
            "HTTP listeners: headers one request may carry (Envoy's default); beyond it the "
            "request is answered 431 and its connection closed, counted in "
            "`requests_refused_limit`.",
        ),
    )
    max_header_bytes: int = field(
        default=64 * 1024,
        metadata=_doc(
            "HTTP listeners: size of one request's head, its target plus each header's name "
            "and value and 4 bytes; beyond it 431 and a close, counted in "
            "`requests_refused_limit`.",
        ),
    )
    retry_buffer_bytes: int = field(
        default=64 * 1024,
        metadata=_doc(
            "HTTP: a request body up to this size is kept while it is sent, so a route's "
            "retry policy can send it again; a longer one is forwarded unkept, and is not "
            "retried (counted in `retry_buffer_overflows`). 0 keeps no body.",
        ),
    )
    max_pending_requests: int = field(
        default=1024,
        metadata=_doc(
            "HTTP requests per upstream waiting for a connection to be dialed (Envoy's "
            "default), when Consul's upstream `Limits.MaxPendingRequests` sets none; beyond "
            "it 503 at once, counted in `meshlet_circuit_breaker_overflows_total`.",
        ),
    )
    upstreams: tuple[UpstreamSection, ...] = field(
        default=(), metadata=_doc("Services this one calls through the sidecar.")
    )


VaultAuth = Literal["token", "approle"]


@dataclass(frozen=True, slots=True)
class VaultSection:
    address: str = field(
        default="", metadata=_doc("Vault's URL, e.g. `https://vault:8200`.", required=True)
    )
    role: str = field(
        default="", metadata=_doc("PKI role that issues this service's leaf.", required=True)
    )
    mount: str = field(default="pki", metadata=_doc("Mount path of the PKI secrets engine."))
    auth: VaultAuth = field(
        default="token",
        metadata=_doc(
            "How the sidecar logs in: token (`VAULT_TOKEN`) or approle (`VAULT_ROLE_ID` and "
            "`VAULT_SECRET_ID`), from its environment."
        ),
    )


@dataclass(frozen=True, slots=True)
class CertsSection:
    source: Literal["consul", "vault"] = field(
        default="consul",
        metadata=_doc("Where the leaf certificate comes from: Consul's Connect CA, or Vault PKI."),
    )
    vault: VaultSection | None = field(
        default=None, metadata=_doc("Vault settings; required when `source` is vault.")
    )


@dataclass(frozen=True, slots=True)
class AdminSection:
    address: str = field(
        default="127.0.0.1:19000",
        metadata=_doc(
            "Admin HTTP listener (/ready, /live, /v1/status). Loopback only; port 0 picks one."
        ),
    )


@dataclass(frozen=True, slots=True)
class WatchSection:
    wait: float = field(
        default=300.0,
        metadata=_doc("Longest a blocking query parks in Consul (at most 10m).", duration=True),
    )
    retry_initial: float = field(
        default=0.2,
        metadata=_doc("First retry delay after a failed Consul call.", duration=True),
    )
    retry_max: float = field(
        default=5.0,
        metadata=_doc(
            "Cap of the exponential retry delay (full jitter). Also bounds how long a Consul "
            "that comes back goes unnoticed.",
            duration=True,
        ),
    )
    reset_hold: float = field(
        default=60.0,
        metadata=_doc(
            "After the control plane restarts empty (its index goes backwards), how long an "
            "upstream keeps its last endpoints when Consul answers that it has none, waiting "
            "for its instances to register again. 0 applies the empty answer at once.",
            duration=True,
        ),
    )
    anti_entropy_interval: float = field(
        default=30.0,
        metadata=_doc(
            "How often the registration is compared with the Consul agent and repaired.",
            duration=True,
        ),
    )


@dataclass(frozen=True, slots=True)
class ShutdownSection:
    drain_period: float = field(
        default=10.0,
        metadata=_doc(
            "After SIGTERM and deregistration, keep serving this long while Consul's watchers "
            "drop this instance; a second signal ends it early.",
            duration=True,
        ),
    )


@dataclass(frozen=True, slots=True)
class AccessLogsSection:
    """Overrides of the proxy-defaults entry's AccessLogs block (connect/access_log.py); a key
    left unset follows Consul's."""

    enabled: bool | None = field(
        default=None, metadata=_doc("Log every request and connection (unset: proxy-defaults).")
    )
    type: Literal["file", "stdout", "stderr"] | None = field(
        default=None, metadata=_doc("Where lines go: file, stdout or stderr.")
    )
    path: str = field(default="", metadata=_doc("The file, when type is file."))
    json_format: str = field(
        default="", metadata=_doc("A JSON object of Envoy operators (%START_TIME%, %REQ(:PATH)%).")
    )
    text_format: str = field(default="", metadata=_doc("A line of Envoy operators."))
    disable_listener_logs: bool | None = field(
        default=None,
        metadata=_doc(
            "No log lines for connections the inbound listener refuses before they carry "
            "anything (failed TLS handshakes, refused peers)."
        ),
    )

    def overrides(self) -> dict[str, Any]:
        """The keys set here, by their snake_case AccessLogs names."""
        out: dict[str, Any] = {}
        for name in ("enabled", "type", "disable_listener_logs"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("path", "json_format", "text_format"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.enabled:
            try:
                parse_access_logs(self.overrides())
            except ValueError as exc:
                yield "", str(exc)


@dataclass(frozen=True, slots=True)
class TracingSection:
    """This service's tracing, over the proxy-defaults entry's `Config.tracing` key by key.
    Registered as the sidecar's `Proxy.Config.tracing`, where the sidecar reads it back from
    Consul (as it reads one Nomad or an operator registered), so it follows a reload."""

    otlp_endpoint: str = field(
        default="",
        metadata=_doc("OTLP/HTTP traces endpoint (a URL, usually ending in /v1/traces)."),
    )
    sampling_percent: float | None = field(
        default=None, metadata=_doc("Share of the traces this sidecar starts, 0-100.")
    )
    propagation: tuple[str, ...] = field(
        default=(), metadata=_doc("Trace-context headers read and written: w3c, b3.")
    )

    def block(self) -> dict[str, Any]:
        """The keys set here, as a `tracing` block."""
        out: dict[str, Any] = {}
        if self.otlp_endpoint:
            out["otlp_endpoint"] = self.otlp_endpoint
        if self.sampling_percent is not None:
            out["sampling_percent"] = self.sampling_percent
        if self.propagation:
            out["propagation"] = list(self.propagation)
        return out

    def problems(self) -> Iterator[tuple[str, str]]:
        try:
            parse_tracing(self.block(), "tracing")
        except ValueError as exc:
            yield "", str(exc)


@dataclass(frozen=True, slots=True)
class TelemetrySection:
    metrics_address: str = field(
        default="",
        metadata=_doc(
            "A metrics-only listener serving /metrics (e.g. 0.0.0.0:20200, like Consul's "
            "envoy_prometheus_bind_addr), so a Prometheus elsewhere can scrape while admin "
            "stays on loopback. Empty: /metrics on the admin listener only."
        ),
    )
    access_logs: AccessLogsSection = field(
        default_factory=AccessLogsSection, metadata=_doc("Access-log overrides.")
    )
    tracing: TracingSection = field(
        default_factory=TracingSection, metadata=_doc("This service's tracing overrides.")
    )


LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    service: ServiceSection = field(
        default_factory=ServiceSection, metadata=_doc("The local service.", required=True)
    )
    consul: ConsulSection = field(
        default_factory=ConsulSection, metadata=_doc("How to reach the local Consul agent.")
    )
    sidecar: SidecarSection = field(
        default_factory=SidecarSection, metadata=_doc("The service's sidecar proxy.")
    )
    certs: CertsSection = field(
        default_factory=CertsSection, metadata=_doc("The leaf certificate's source.")
    )
    admin: AdminSection = field(default_factory=AdminSection, metadata=_doc("Admin HTTP."))
    watch: WatchSection = field(
        default_factory=WatchSection, metadata=_doc("Blocking queries, retries, anti-entropy.")
    )
    shutdown: ShutdownSection = field(
        default_factory=ShutdownSection, metadata=_doc("Draining on SIGTERM.")
    )
    telemetry: TelemetrySection = field(
        default_factory=TelemetrySection, metadata=_doc("Metrics listener and access logs.")
    )
    log_level: LogLevel = field(default="info", metadata=_doc("debug, info, warning or error."))
    consul_client: ConsulConfig = field(
        default_factory=ConsulConfig, metadata={"derived": True}, compare=True
    )
    """Derived from `consul` and the environment; not a YAML key."""


# ---- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """The configuration is invalid; `problems` lists every one, each with its key path."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in problems)
            text = f"{source}: {len(problems)} problems:\n{lines}"
        super().__init__(text)


# ---- the generic parser ------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


# A value quoted back in an error is cut short: YAML aliases let a few hundred bytes stand for
# a list of billions of items (`&a [*b, *b, ...]`), and its full repr would be gigabytes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring = _SHORT.maxother = 60


def _shown(value: object) -> str:
    return _SHORT.repr(value)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _host_port_problem(text: str, *, allow_zero: bool) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        return "expected HOST:PORT"
    if not port.isdigit() or not (0 if allow_zero else 1) <= int(port) <= 65535:
        return "port must be a number from 1 to 65535"
    return ""


class _Parser:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def value(self, tp: Any, raw: Any, path: str, meta: Mapping[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if raw is None:
                return None
            return self.value(args[0], raw, path, meta)
        if dataclasses.is_dataclass(tp):
            return self.section(typing.cast(type[Any], tp), raw, path)
        if origin is Literal:
            choices = typing.get_args(tp)
            if raw not in choices:
                self.fail(path, f"expected one of {', '.join(choices)}, got {_shown(raw)}")
                return choices[0]
            return raw
        if origin is tuple:
            item = typing.get_args(tp)[0]
            if not isinstance(raw, list):
                self.fail(path, f"expected a list, got {_type_name(raw)}")
                return ()
            return tuple(self.value(item, v, _join(path, i), meta) for i, v in enumerate(raw))
        if origin is Mapping or tp is Mapping:
            if not isinstance(raw, dict):
                self.fail(path, f"expected a mapping of strings, got {_type_name(raw)}")
                return MappingProxyType({})
            out: dict[str, str] = {}
            for k, v in raw.items():
                if (
                    not isinstance(k, str)
                    or not isinstance(v, str | int | float)
                    or isinstance(v, bool)
                ):
                    self.fail(_join(path, str(k)), f"expected a string value, got {_type_name(v)}")
                    continue
                out[k] = str(v)
            return MappingProxyType(out)
        if tp is float and meta.get("duration"):
            return self.duration(raw, path)
        if tp is bool:
            if not isinstance(raw, bool):
                self.fail(path, f"expected true or false, got {_shown(raw)}")
                return False
            return raw
        if tp is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                self.fail(path, f"expected an integer, got {_shown(raw)}")
                return 0
            if meta.get("port") and not 0 <= raw <= 65535:
                self.fail(path, f"expected a port number from 1 to 65535, got {raw}")
            return raw
        if tp is str:
            if not isinstance(raw, str):
                self.fail(path, f"expected a string, got {_type_name(raw)}")
                return ""
            return raw
        if tp is float:
            if not isinstance(raw, int | float) or isinstance(raw, bool):
                self.fail(path, f"expected a number, got {_shown(raw)}")
                return 0.0
            return float(raw)
        if tp is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(path, f"expected a file path, got {_shown(raw)}")
                return Path()
            return Path(raw)
        raise TypeError(f"config model field {path} has unsupported type {tp!r}")

    def duration(self, raw: Any, path: str) -> float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            seconds = float(raw)
        elif isinstance(raw, str):
            try:
                seconds = parse_duration(raw)
            except ValueError:
                self.fail(
                    path, f'expected a duration such as "10s", "500ms" or "1m", got {_shown(raw)}'
                )
                return 0.0
        else:
            self.fail(path, f'expected a duration such as "10s", got {_type_name(raw)}')
            return 0.0
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(path, f"expected a non-negative duration, got {_shown(raw)}")
            return 0.0
        return seconds

    def section(self, cls: type[Any], raw: Any, path: str) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping, got {_type_name(raw)}")
            return cls()
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
        for key in raw:
            if key not in fields:
                known = ", ".join(fields)
                self.fail(_join(path, str(key)), f"unknown key; expected one of: {known}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name in raw:
                values[name] = self.value(hints[name], raw[name], _join(path, name), f.metadata)
            elif f.metadata.get("required"):
                self.fail(_join(path, name), "required")
        obj = cls(**values)
        check = getattr(obj, "problems", None)
        if callable(check):
            for sub, message in check():
                self.fail(_join(path, sub) if sub else path, message)
        return obj


# ---- cross-field rules -------------------------------------------------------------------------

MAX_WORKERS = 64
"""More processes than this would only multiply Consul's load (each one watches and holds a
leaf): a Python sidecar with spare cores uses a few."""


def workers_problem(workers: int) -> str:
    """Why `workers` is not a usable process count ("" when it is; 0 is the in-process mode)."""
    if not 0 <= workers <= MAX_WORKERS:
        return f"expected an integer from 0 to {MAX_WORKERS}, got {workers}"
    return ""


_CONSUL_ENV = {
    "address": "CONSUL_HTTP_ADDR",
    "token": "CONSUL_HTTP_TOKEN",
    "token_file": "CONSUL_HTTP_TOKEN_FILE",
    "ca_file": "CONSUL_CACERT",
    "ca_path": "CONSUL_CAPATH",
    "client_cert": "CONSUL_CLIENT_CERT",
    "client_key": "CONSUL_CLIENT_KEY",
    "tls_server_name": "CONSUL_TLS_SERVER_NAME",
}
_PASSTHROUGH_ENV = (*_CONSUL_ENV.values(), "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY")


def consul_client_config(
    section: ConsulSection, env: Mapping[str, str], upstreams: int
) -> ConsulConfig:
    """The client configuration: the file's values, overridden by the consul CLI's variables."""
    merged: dict[str, str] = {}
    for key, var in _CONSUL_ENV.items():
        value = getattr(section, key)
        if value:
            merged[var] = str(value)
    if section.ssl:
        merged["CONSUL_HTTP_SSL"] = "true"
    if not section.ssl_verify:
        merged["CONSUL_HTTP_SSL_VERIFY"] = "false"
    merged.update({k: v for k, v in env.items() if k in _PASSTHROUGH_ENV and v})
    base = config_from_env(merged, timeout=section.timeout)
    # Each upstream parks a blocking query; registration and checks need a few more.
    connections = section.max_connections or max(100, upstreams + 16)
    return dataclasses.replace(
        base,
        max_connections=connections,
        # A value the cross checks refuse must not fail here first, without its key.
        max_response_bytes=max(1, section.max_response_bytes),
    )


def _cross_checks(cfg: AgentConfig, p: _Parser) -> None:
    svc, side = cfg.service, cfg.sidecar
    already = {x.path for x in p.problems}

    def fail(path: str, message: str) -> None:
        # One problem per key: a value that did not parse is not also "out of range".
        if path not in already:
            p.fail(path, message)
            already.add(path)

    for key, value in (("service.name", svc.name), ("service.id", svc.id)):
        if value and ("/" in value or value.strip() != value):
            fail(key, f"must not contain '/' or surrounding spaces, got {value!r}")
    if svc.port == 0:
        fail("service.port", "expected a port number from 1 to 65535, got 0")
    if side.port == 0:
        fail("sidecar.port", "expected a port number from 1 to 65535, got 0")
    if side.check_ttl <= 0:
        fail("sidecar.check_ttl", "expected a positive duration")
    if workers_problem(side.workers):
        fail("sidecar.workers", workers_problem(side.workers))
    if side.max_connections < 1:
        fail("sidecar.max_connections", f"expected a positive integer, got {side.max_connections}")
    positive = ("max_pending_handshakes", "max_headers", "max_header_bytes", "max_pending_requests")
    for key in positive:
        if getattr(side, key) < 1:
            fail(f"sidecar.{key}", f"expected a positive integer, got {getattr(side, key)}")
    if side.retry_buffer_bytes < 0:
        fail(
            "sidecar.retry_buffer_bytes",
            f"expected 0 or a positive integer, got {side.retry_buffer_bytes}",
        )
    if cfg.consul.max_response_bytes < 1:
        fail(
            "consul.max_response_bytes",
            f"expected a positive integer, got {cfg.consul.max_response_bytes}",
        )
    binds: dict[str, str] = {}
    targets: dict[tuple[str, str, str, str], str] = {}
    for i, up in enumerate(side.upstreams):
        path = f"sidecar.upstreams[{i}]"
        if up.datacenter and up.peer:
            fail(path, "set datacenter or peer, not both (Consul: an upstream cannot specify both)")
        if up.name == "*":
            fail(f"{path}.name", "must not be a wildcard")
        if up.local_bind_port == 0:
            fail(f"{path}.local_bind_port", "expected a port number from 1 to 65535, got 0")
        try:
            ipaddress.ip_address(up.local_bind_address)
        except ValueError:
            fail(
                f"{path}.local_bind_address",
                f"expected an IP address, got {up.local_bind_address!r}",
            )
        if up.bind in binds:
            fail(f"{path}.local_bind_port", f"{up.bind} is already used by {binds[up.bind]}")
        binds.setdefault(up.bind, path)
        target = (up.name, up.datacenter, up.peer, up.filter)
        if up.name and target in targets:
            fail(path, f"same destination as {targets[target]}")
        targets.setdefault(target, path)
    if cfg.certs.source == "vault" and cfg.certs.vault is None:
        fail("certs.vault", "required when certs.source is vault")
    admin_problem = _host_port_problem(cfg.admin.address, allow_zero=True)
    if admin_problem:
        fail("admin.address", f"{admin_problem}, got {cfg.admin.address!r}")
    else:
        host = cfg.admin.address.rpartition(":")[0].strip("[]")
        try:
            if not ipaddress.ip_address(host).is_loopback:
                fail("admin.address", f"must be a loopback address (127.0.0.1 or ::1), got {host}")
        except ValueError:
            fail("admin.address", f"expected an IP address, got {host!r}")
    w = cfg.watch
    if not 0 < w.wait <= 600:
        fail("watch.wait", "expected a duration from 1s to 10m")
    if w.retry_initial <= 0 or w.retry_max < w.retry_initial:
        fail("watch.retry_max", "expected retry_initial > 0 and retry_max >= retry_initial")
    if not 0 <= w.reset_hold <= 3600:
        fail("watch.reset_hold", "expected a duration from 0s to 1h")
    if w.anti_entropy_interval <= 0:
        fail("watch.anti_entropy_interval", "expected a positive duration")
    for problem in public_listener_problems(cfg):
        fail(problem.path, problem.message)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, Consul hands it to peers as is


def public_listener_problems(cfg: AgentConfig, node_address: str = "") -> list[Problem]:
    """A sidecar whose public (mTLS) listener is bound to loopback while the service is
    registered at an address peers on other hosts dial: they could never reach it.

    The listener binds `sidecar.address`, else `service.address`, else 127.0.0.1; Consul
    registers the sidecar at `sidecar.address`, else the service's address, else the node's
    (`node_address`, when known: it is not in the file). Loopback everywhere is a one-host
    setup and fine."""
    side, svc = cfg.sidecar, cfg.service
    bind = side.address or svc.address or "127.0.0.1"
    if not _is_loopback(bind):
        return []
    if svc.address and not _is_loopback(svc.address):
        return [
            Problem(
                "sidecar.address",
                f"the sidecar's public listener is bound to loopback ({bind}) while "
                f"service.address registers the service at {svc.address}: peers on other "
                f"hosts could never reach it; set sidecar.address to this node's address as "
                f"registered in Consul (the application may stay on loopback)",
            )
        ]
    if not side.address and not svc.address and node_address and not _is_loopback(node_address):
        return [
            Problem(
                "sidecar.address",
                f"sidecar.address and service.address are empty, so the sidecar's public "
                f"listener is bound to 127.0.0.1 while Consul registers it at the node's "
                f"address {node_address}: peers on other hosts could never reach it; set "
                f"sidecar.address to {node_address}",
            )
        ]
    return []


# ---- what would pass here and fail at start -----------------------------------------------------

# A SPIFFE ID path segment (spiffe/spiffe standards/SPIFFE-ID.md §2.2): Consul's leaf URI is
# `.../svc/<service name>`. Any other character Consul either percent-encodes (space, '%',
# '?', '#', non-ASCII) or writes as is (':', '@', ';', ...); SPIFFE forbids both, and meshlet's
# identity parser would not give back the name ('%2F' decodes to '/').
_SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_NAME_RULE = "expected letters, digits, '.', '-' and '_' only (not '.' or '..')"


def identity_name_problem(name: str) -> str:
    """Why `name` cannot be a service identity in a leaf certificate ("" when it can)."""
    if not name or (_SPIFFE_SEGMENT.fullmatch(name) and name not in (".", "..")):
        return ""
    return f"{name!r} cannot be the service name in a SPIFFE ID; {_NAME_RULE}"


_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


def listen_addresses(cfg: AgentConfig) -> list[tuple[str, str, int]]:
    """(key, host, port) of every socket this file places on the host: the application's,
    which the sidecar forwards to, and those meshlet binds."""
    svc, side = cfg.service, cfg.sidecar
    out = [
        ("service.port", svc.address or "127.0.0.1", svc.port),
        ("sidecar.port", side.address or svc.address or "127.0.0.1", side.port),
    ]
    out += [
        (f"sidecar.upstreams[{i}].local_bind_port", u.local_bind_address, u.local_bind_port)
        for i, u in enumerate(side.upstreams)
    ]
    host, _, port = cfg.admin.address.rpartition(":")
    if port.isdigit() and int(port) != 0:
        out.append(("admin.address", host.strip("[]"), int(port)))
    return out


def _overlap(a: str, b: str) -> bool:
    # A wildcard bind takes the port on every address of its host.
    return a == b or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS


def _start_checks(cfg: AgentConfig, p: _Parser) -> None:
    """Rules whose violation today surfaces only once the process runs: an identity Consul's
    CA cannot put in a leaf, two listeners on one port."""
    already = {x.path for x in p.problems}

    def fail(path: str, message: str) -> None:
        if path not in already:
            p.fail(path, message)
            already.add(path)

    problem = identity_name_problem(cfg.service.name)
    if problem:
        fail("service.name", problem)
    for i, up in enumerate(cfg.sidecar.upstreams):
        problem = identity_name_problem(up.name) if up.name != "*" else ""
        if problem:
            fail(f"sidecar.upstreams[{i}].name", problem)
    seen: list[tuple[str, str, int]] = []
    for key, host, port in listen_addresses(cfg):
        if port == 0 or key in already:
            continue
        for other, other_host, other_port in seen:
            if port == other_port and _overlap(host, other_host):
                fail(
                    key,
                    f"{host}:{port} collides with {other} ({other_host}:{other_port}); "
                    "expected a port from 1 to 65535 that no other listener of this file uses",
                )
                break
        seen.append((key, host, port))


def proxy_env_problems(cfg: AgentConfig, env: Mapping[str, str]) -> list[Problem]:
    """What the sidecar proxy needs from its environment and would miss only at start: the
    Vault credentials of `certs.vault.auth`. `meshlet agent` runs no proxy and needs none."""
    vault = cfg.certs.vault
    if cfg.certs.source != "vault" or vault is None:
        return []
    wanted = ("VAULT_TOKEN",) if vault.auth == "token" else ("VAULT_ROLE_ID", "VAULT_SECRET_ID")
    missing = [var for var in wanted if not env.get(var)]
    if not missing:
        return []
    return [
        Problem(
            "certs.vault.auth",
            f"{vault.auth} needs {' and '.join(missing)} in the environment, "
            f"{'which is' if len(missing) == 1 else 'which are'} not set; "
            "expected token (VAULT_TOKEN) or approle (VAULT_ROLE_ID and VAULT_SECRET_ID)",
        )
    ]


def parse(raw: Any, env: Mapping[str, str], *, source: str = "<config>") -> AgentConfig:
    """Validate decoded YAML plus the environment into an `AgentConfig`, or raise `ConfigError`
    listing every problem found."""
    p = _Parser()
    if not isinstance(raw, dict):
        raise ConfigError(
            source, [Problem("", f"expected a mapping at the top, got {_type_name(raw)}")]
        )
    cfg: AgentConfig = p.section(AgentConfig, raw, "")
    _cross_checks(cfg, p)
    _start_checks(cfg, p)
    try:
        client = consul_client_config(cfg.consul, env, len(cfg.sidecar.upstreams))
    except ConsulConfigError as exc:
        p.fail("consul", str(exc))
        client = ConsulConfig()
    if p.problems:
        raise ConfigError(source, p.problems)
    return dataclasses.replace(cfg, consul_client=client)


def load(path: Path, env: Mapping[str, str]) -> AgentConfig:
    """Read and parse one YAML file. Every failure is a `ConfigError` naming the file."""
    return parse(read_raw(path), env, source=str(path))


def read_raw(path: Path) -> Any:
    """The decoded YAML of one file, not yet validated (`meshlet sidecar --nomad` adds the
    sections Nomad's registration gives before parsing). Failures are `ConfigError`s."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read: {exc}")]) from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        # PyYAML recurses once per level: thousands of `[` exhaust Python's stack.
        raise ConfigError(str(path), [Problem("", "not valid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [Problem("", f"not valid YAML: {where}{what}")]) from None
    return raw


def parse_consul_section(raw: Any, source: str) -> ConsulSection:
    """The `consul` section alone, validated as in a whole file: `meshlet sidecar --nomad`
    reaches Consul to learn the rest of its configuration."""
    p = _Parser()
    section: ConsulSection = p.section(ConsulSection, raw, "consul")
    if p.problems:
        raise ConfigError(source, p.problems)
    return section


def with_workers(config: AgentConfig, workers: int | None) -> AgentConfig:
    """`meshlet sidecar --workers N`: the command line wins over `sidecar.workers`. Raises
    `ConfigError` naming the flag when N is out of range; None keeps the file's value."""
    if workers is None:
        return config
    problem = workers_problem(workers)
    if problem:
        raise ConfigError("--workers", [Problem("", problem)])
    return dataclasses.replace(config, sidecar=dataclasses.replace(config.sidecar, workers=workers))


def to_raw(config: Any) -> Any:
    """The inverse of `parse` for the model's sections: `parse(to_raw(cfg), env) == cfg` for
    the same environment. Worker processes get their parent's running configuration this way
    (a file edited since, or rejected on reload, never reaches them)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {
            f.name: to_raw(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if not f.metadata.get("derived") and getattr(config, f.name) is not None
        }
    if isinstance(config, tuple):
        return [to_raw(v) for v in config]
    if isinstance(config, Mapping):
        return {str(k): to_raw(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


# ---- the reference, generated from the model ---------------------------------------------------


def _render_type(tp: Any, meta: Mapping[str, Any]) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _render_type(args[0], meta)
    if origin is Literal:
        return " \\| ".join(f"`{c}`" for c in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "list of mappings" if dataclasses.is_dataclass(item) else "list of strings"
    if origin is Mapping:
        return "mapping of strings"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is float and meta.get("duration"):
        return "duration"
    if meta.get("port"):
        return "port"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(
        tp, str(tp)
    )


def _render_default(f: dataclasses.Field[Any], meta: Mapping[str, Any]) -> str:
    if meta.get("required"):
        return "required"
    if f.default is dataclasses.MISSING:
        return ""
    value = f.default
    if value is None or value in ("", ()):
        return ""
    if meta.get("duration") and isinstance(value, float):
        from agent.consul_blocking import format_duration

        return f"`{format_duration(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _walk(cls: type[Any], prefix: str) -> Iterator[tuple[str, str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("derived"):
            continue
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        inner = tp
        if origin in (types.UnionType, typing.Union):
            inner = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(inner) is tuple and dataclasses.is_dataclass(
            typing.get_args(inner)[0]
        ):
            item = typing.get_args(inner)[0]
            key = f"{prefix}{f.name}"
            yield key, _render_type(tp, meta), "", meta.get("env", ""), meta.get("doc", "")
            yield from _walk(item, f"{key}[].")
            continue
        if dataclasses.is_dataclass(inner):
            key = f"{prefix}{f.name}"
            yield (
                key,
                "mapping",
                "required" if meta.get("required") else "",
                "",
                meta.get("doc", ""),
            )
            yield from _walk(typing.cast(type[Any], inner), f"{key}.")
            continue
        yield (
            f"{prefix}{f.name}",
            _render_type(tp, meta),
            _render_default(f, meta),
            meta.get("env", ""),
            meta.get("doc", ""),
        )


_EXAMPLE = """\
consul: {address: 127.0.0.1:8500, token_file: /etc/meshlet/web.token}
service:
  name: web
  port: 8080
  check: {http: "http://127.0.0.1:8080/healthz", interval: 10s}
sidecar:
  port: 21000
  protocol: http
  upstreams:
  - {name: api, local_bind_port: 9191}
certs: {source: consul}
admin: {address: 127.0.0.1:19000}
"""


def reference_markdown() -> str:
    """docs/configuration.md, generated from the model (`--print-config-reference`)."""
    rows = [
        "| key | type | default | env | meaning |",
        "|---|---|---|---|---|",
    ]
    for key, kind, default, env, doc in _walk(AgentConfig, ""):
        env_cell = f"`{env}`" if env else ""
        rows.append(f"| `{key}` | {kind} | {default} | {env_cell} | {doc} |")
    return "\n".join(
        [
            "# meshlet agent configuration",
            "",
            "<!-- Generated by `meshlet agent --print-config-reference` from agent/config.py; "
            "do not edit by hand. -->",
            "",
            "`meshlet agent -c agent.yaml` reads one YAML file, validated whole at start-up and on "
            "SIGHUP (`meshlet agent --check-config -c agent.yaml` validates without running). "
            "Every problem is reported with the file, the key path and what was expected; unknown "
            "keys are errors.",
            "",
            "Durations are Go-style strings (`500ms`, `10s`, `1m30s`) or numbers of seconds. "
            "Environment variables in the `env` column override the file, as they do for the "
            "consul CLI.",
            "",
            "```yaml",
            _EXAMPLE.rstrip(),
            "```",
            "",
            *rows,
            "",
        ]
    )
