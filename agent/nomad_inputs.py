"""What Nomad hands a Connect sidecar task, turned into meshlet's configuration.

    meshlet sidecar --nomad        # the task of a group's `connect { sidecar_task { ... } }`

Nomad registers the group's proxy itself (ID `_nomad-task-<alloc>-group-<group>-<service>-
<port label>-sidecar-proxy`, its upstreams in the registration's `Proxy` block), then runs
`consul connect envoy -bootstrap` and writes `${NOMAD_SECRETS_DIR}/envoy_bootstrap.json`
before it starts the task. meshlet takes exactly those inputs:

- the proxy ID: `--proxy-id`, else the bootstrap's `node.id`;
- the Consul token: CONSUL_HTTP_TOKEN(_FILE) when the job sets one, else Nomad's service
  identity token `${NOMAD_SECRETS_DIR}/si_token`, else the bootstrap's `x-consul-token`;
- Consul's HTTP API: CONSUL_HTTP_ADDR (the bootstrap only names Consul's gRPC port, which
  meshlet does not speak);
- everything else from the proxy's registration, `GET /v1/agent/service/<proxy ID>`: the
  service and so the identity (`DestinationServiceName`), the application
  (`LocalServiceAddress`/`LocalServicePort`), the public listener (`Config.bind_address` and
  `bind_port`, the port inside the group's network namespace), the upstreams;
- the admin listener: `--admin-addr`, else NOMAD_ENVOY_ADMIN_ADDR_<service>, the address
  Nomad gives Envoy's admin API.

A `-c FILE` given with `--nomad` holds the settings Nomad has no word for (certs, watch,
shutdown, log_level, ...); the registration's sections must not be in it.

Every input crosses a trust boundary (a file another process wrote, an answer from Consul), so
each is checked before use and a bad one stops start-up with a `ConfigError` naming it.
`parse_bootstrap` and `config_raw` are pure; `gather`, `fetch_registration` and `resolve` read.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.config import (
    AgentConfig,
    ConfigError,
    ConsulSection,
    Problem,
    consul_client_config,
    parse,
    parse_consul_section,
    read_raw,
)
from agent.consul import ConsulClient
from agent.consul_errors import ConsulConfigError, ConsulError, ConsulNotFound, ConsulUnavailable
from agent.consul_results import AgentService
from agent.registration import ExternalRegistration

OWNER = "nomad"
BOOTSTRAP_NAME = "envoy_bootstrap.json"
SI_TOKEN_NAME = "si_token"

# Consul's bootstrap for one proxy is a few KiB; a token is a UUID. Anything far larger is not
# what Nomad writes, and is not read into memory whole.
MAX_BOOTSTRAP_BYTES = 1 << 20
MAX_TOKEN_BYTES = 4096

# Nomad's proxy IDs are `_nomad-task-<uuid>-group-<group>-<service>-<label>-sidecar-proxy`.
# The ID becomes a path segment of Consul's API: '/' is quoted, but '.' and '..' would be
# resolved as path steps, and control characters have no place in an ID.
_PROXY_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,256}")
# ACL tokens are UUIDs; printable ASCII without spaces is what may travel in X-Consul-Token.
_TOKEN = re.compile(r"[\x21-\x7e]{1,512}")

# Keys of the registration's sections: set by Nomad, not by the file.
_FROM_REGISTRATION = {"service": None, "sidecar": ("port", "address", "protocol", "upstreams")}


def proxy_id_problem(proxy_id: str) -> str:
    """Why `proxy_id` cannot be a Consul service ID to ask for ("" when it can)."""
    if _PROXY_ID.fullmatch(proxy_id) and proxy_id not in (".", ".."):
        return ""
    return (
        f"expected a Consul service ID of letters, digits and '_.:@-' (at most 256), "
        f"got {proxy_id[:80]!r}"
    )


def token_problem(token: str) -> str:
    if _TOKEN.fullmatch(token):
        return ""
    return "expected an ACL token of printable characters without spaces (at most 512)"


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What meshlet uses of the Envoy bootstrap Nomad writes: the identity and the token."""

    proxy_id: str
    token: str
    """`x-consul-token` of the ADS stream; "" when Consul has no ACLs."""


def _token_from(boot: Mapping[str, Any]) -> tuple[str, str]:
    """(token, problem): the `x-consul-token` metadata of `dynamic_resources.ads_config`."""
    dynamic = boot.get("dynamic_resources")
    if dynamic is None:
        return "", ""
    ads = dynamic.get("ads_config") if isinstance(dynamic, dict) else None
    services = ads.get("grpc_services") if isinstance(ads, dict) else None
    # Consul writes one object; Envoy's schema also allows a list of them.
    entries = services if isinstance(services, list) else [services]
    tokens: list[object] = []
    for entry in entries:
        metadata = entry.get("initial_metadata") if isinstance(entry, dict) else None
        if metadata is None:
            continue
        if not isinstance(metadata, list):
            return "", "ads_config.grpc_services.initial_metadata: expected a list"
        tokens += [
            m.get("value")
            for m in metadata
            if isinstance(m, dict) and m.get("key") == "x-consul-token"
        ]
    if not tokens:
        return "", ""
    if len(tokens) > 1:
        return "", "x-consul-token: given more than once"
    token = tokens[0]
    if not isinstance(token, str):
        return "", "x-consul-token: expected a string"
    if token and token_problem(token):
        return "", f"x-consul-token: {token_problem(token)}"
    return token, ""


def parse_bootstrap(data: bytes, source: str) -> Bootstrap:
    """The proxy ID and token of an Envoy bootstrap document, or a `ConfigError`."""

    def fail(path: str, message: str) -> ConfigError:
        return ConfigError(source, [Problem(path, message)])

    if len(data) > MAX_BOOTSTRAP_BYTES:
        raise fail("", f"larger than {MAX_BOOTSTRAP_BYTES} bytes; not a bootstrap Nomad writes")
    try:
        boot = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail("", f"not JSON: {exc}") from None
    if not isinstance(boot, dict):
        raise fail("", "expected a JSON object (Envoy's bootstrap)")
    node = boot.get("node")
    if not isinstance(node, dict):
        raise fail("node", "expected an object with the proxy's id")
    proxy_id = node.get("id")
    if not isinstance(proxy_id, str) or not proxy_id:
        raise fail("node.id", "expected the proxy's service ID, a non-empty string")
    if proxy_id_problem(proxy_id):
        raise fail("node.id", proxy_id_problem(proxy_id))
    token, problem = _token_from(boot)
    if problem:
        raise fail("dynamic_resources", problem)
    return Bootstrap(proxy_id, token)


def _read_bounded(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        return f.read(limit + 1)


def read_bootstrap(path: Path) -> Bootstrap:
    try:
        data = _read_bounded(path, MAX_BOOTSTRAP_BYTES)
    except OSError as exc:
        raise ConfigError(
            str(path), [Problem("", f"cannot read Nomad's Envoy bootstrap: {exc.strerror}")]
        ) from None
    return parse_bootstrap(data, str(path))


def read_si_token(path: Path) -> str:
    """Nomad's service identity token for the sidecar's service; "" when absent or empty."""
    try:
        data = _read_bounded(path, MAX_TOKEN_BYTES)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ConfigError(str(path), [Problem("", f"cannot read: {exc.strerror}")]) from None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = "\x00"
    if len(data) > MAX_TOKEN_BYTES or (token and token_problem(token)):
        raise ConfigError(str(path), [Problem("", token_problem("\x00"))])
    return token


@dataclass(frozen=True, slots=True)
class NomadInputs:
    """The task's inputs before Consul is asked: which proxy, and how to reach Consul."""

    proxy_id: str
    token: str = ""
    """From si_token or the bootstrap; CONSUL_HTTP_TOKEN(_FILE) still wins (config.py)."""
    token_source: str = ""
    admin_address: str = ""
    """`--admin-addr`; empty: NOMAD_ENVOY_ADMIN_ADDR_<service>, known once the service is."""


def gather(
    env: Mapping[str, str],
    *,
    proxy_id: str = "",
    bootstrap: Path | None = None,
    admin_address: str = "",
) -> NomadInputs:
    """Read the bootstrap and the si_token Nomad wrote into the task's secrets directory."""
    secrets = env.get("NOMAD_SECRETS_DIR", "")
    if bootstrap is None and secrets:
        bootstrap = Path(secrets) / BOOTSTRAP_NAME
    boot: Bootstrap | None = None
    if bootstrap is not None and (not proxy_id or bootstrap.exists()):
        boot = read_bootstrap(bootstrap)
    from_flag = bool(proxy_id)
    if proxy_id:
        if proxy_id_problem(proxy_id):
            raise ConfigError("--proxy-id", [Problem("", proxy_id_problem(proxy_id))])
    elif boot is not None:
        proxy_id = boot.proxy_id
    else:
        raise ConfigError(
            "--nomad",
            [
                Problem(
                    "",
                    "no proxy ID: pass --proxy-id, or --bootstrap FILE, or run as a Nomad task "
                    f"(NOMAD_SECRETS_DIR/{BOOTSTRAP_NAME})",
                )
            ],
        )
    alloc = env.get("NOMAD_ALLOC_ID", "")
    prefix = "_nomad-task-"  # nomad client/serviceregistration/id.go
    if alloc and proxy_id.startswith(prefix) and not proxy_id.startswith(f"{prefix}{alloc}-"):
        # A stale bootstrap or a copied --proxy-id: serving another allocation's registration
        # would listen on ports and upstreams this allocation was never given.
        where = "--proxy-id" if from_flag else str(bootstrap)
        raise ConfigError(
            where,
            [
                Problem(
                    "" if where == "--proxy-id" else "node.id",
                    f"{proxy_id} is the proxy of another allocation, not of this one "
                    f"(NOMAD_ALLOC_ID={alloc})",
                )
            ],
        )
    token, source = "", ""
    if secrets:
        si_path = Path(secrets) / SI_TOKEN_NAME
        token = read_si_token(si_path)
        source = str(si_path) if token else ""
    if not token and boot is not None and boot.token:
        token, source = boot.token, f"{bootstrap} (x-consul-token)"
    return NomadInputs(proxy_id, token, source, admin_address)


def consul_section(raw_file: Mapping[str, Any], inputs: NomadInputs, source: str) -> ConsulSection:
    """How to reach Consul before the registration is read: the file's `consul` section with
    Nomad's token; the environment still wins (consul_client_config)."""
    section = parse_consul_section(raw_file.get("consul"), source)
    return replace(section, token=inputs.token, token_file=None) if inputs.token else section


def _port(value: object) -> int | None:
    """A port as Consul hands back an opaque `Proxy.Config` value: a JSON number or a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 < value <= 65535 else None


def admin_env(env: Mapping[str, str], service: str) -> str:
    """NOMAD_ENVOY_ADMIN_ADDR_<service>, as Nomad names it or with '-' made '_'."""
    for name in (service, service.replace("-", "_")):
        value = env.get(f"NOMAD_ENVOY_ADMIN_ADDR_{name}", "")
        if value:
            return value
    return ""


def port_env(env: Mapping[str, str], service: str) -> tuple[str, str] | None:
    """(name, value) of NOMAD_PORT_connect_proxy_<service>, the port Nomad allocated for the
    sidecar (label `connect-proxy-<service>`, '-' made '_'), when the task has it."""
    name = "NOMAD_PORT_connect_proxy_" + service.replace("-", "_")
    value = env.get(name)
    return (name, value) if value is not None else None


def config_raw(
    reg: AgentService,
    inputs: NomadInputs,
    env: Mapping[str, str],
    raw_file: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The YAML-shaped configuration of the sidecar Nomad registered as `reg`, on top of the
    `-c FILE` settings in `raw_file`. Raises `ConfigError` naming each field that cannot be."""
    source = f"proxy registration {inputs.proxy_id}"
    problems: list[Problem] = []
    base = dict(raw_file or {})
    for section, keys in _FROM_REGISTRATION.items():
        held = base.get(section)
        clash = (
            [section]
            if keys is None and held is not None
            else [f"{section}.{k}" for k in keys or () if isinstance(held, dict) and k in held]
        )
        for key in clash:
            problems.append(
                Problem(key, "set by Nomad's registration with --nomad; remove it from -c FILE")
            )
    if problems:
        raise ConfigError("-c FILE", problems)

    proxy = reg.proxy
    if reg.kind != "connect-proxy" or proxy is None:
        kind = reg.kind or "typical"
        raise ConfigError(source, [Problem("Kind", f"expected connect-proxy, got {kind}")])
    if proxy.mode == "transparent":
        problems.append(Problem("Proxy.Mode", "transparent proxying is not supported by meshlet"))
    if not proxy.destination_service_name:
        problems.append(Problem("Proxy.DestinationServiceName", "required"))
    if not proxy.local_service_port:
        problems.append(Problem("Proxy.LocalServicePort", "required: the application's port"))
    opaque = proxy.config
    bind_port = reg.port if "bind_port" not in opaque else _port(opaque["bind_port"])
    if bind_port is None or bind_port == 0:
        problems.append(
            Problem("Proxy.Config.bind_port", f"expected a port, got {opaque.get('bind_port')!r}")
        )
    bind_address = opaque.get("bind_address", reg.address)
    if not isinstance(bind_address, str):
        problems.append(Problem("Proxy.Config.bind_address", "expected an IP address"))
    protocol = opaque.get("protocol", "tcp")
    upstreams: list[dict[str, Any]] = []
    for i, up in enumerate(proxy.upstreams):
        path = f"Proxy.Upstreams[{i}]"
        if up.destination_type not in ("", "service"):
            problems.append(
                Problem(f"{path}.DestinationType", f"{up.destination_type} is not supported")
            )
        if up.local_bind_socket_path:
            problems.append(
                Problem(f"{path}.LocalBindSocketPath", "meshlet listens on TCP ports only")
            )
        item: dict[str, Any] = {
            "name": up.destination_name,
            "local_bind_port": up.local_bind_port,
            "local_bind_address": up.local_bind_address or "127.0.0.1",
            "datacenter": up.datacenter,
            "peer": up.destination_peer,
        }
        if "protocol" in up.config:
            item["protocol"] = up.config["protocol"]
        upstreams.append(item)
    if problems:
        raise ConfigError(source, problems)

    service = proxy.destination_service_name
    label = port_env(env, service)
    if label is not None and label[1] != str(bind_port):
        # Nomad gives the task the same port it registered; a mismatch means the registration
        # is not this task's.
        raise ConfigError(
            source,
            [
                Problem(
                    "Proxy.Config.bind_port",
                    f"{bind_port} is not this task's port ({label[0]}={label[1]})",
                )
            ],
        )
    sidecar = dict(base.get("sidecar") or {})
    sidecar.update(port=bind_port, address=bind_address, protocol=protocol, upstreams=upstreams)
    consul = dict(base.get("consul") or {})
    if inputs.token:
        # The task's own token beats a node-wide one in the file (a token file would win
        # over `token`, as in Consul, so it goes).
        consul["token"] = inputs.token
        consul.pop("token_file", None)
    raw: dict[str, Any] = {
        **base,
        "service": {
            "name": service,
            "id": proxy.destination_service_id,
            "address": proxy.local_service_address or "127.0.0.1",
            "port": proxy.local_service_port,
        },
        "sidecar": sidecar,
        "consul": consul,
    }
    admin = inputs.admin_address or admin_env(env, service)
    if admin:
        raw["admin"] = {**(base.get("admin") or {}), "address": admin}
    # Nomad signals a sidecar after the group's main tasks have stopped: nothing is left to
    # drain for, unless the file asks.
    raw.setdefault("shutdown", {"drain_period": 0})
    return raw


async def fetch_registration(
    consul: ConsulClient, proxy_id: str, *, timeout: float, clock: Any = time.monotonic
) -> AgentService:
    """The proxy's registration from the local Consul agent. Nomad registers it before the
    task starts; a late one (Consul restarted, a retried start) is waited for up to
    `timeout`. A refusal (ACLs) is not retried: it will not change by itself."""
    deadline = clock() + timeout
    delay = 0.2
    source = f"proxy registration {proxy_id}"
    while True:
        try:
            return (await consul.agent.service(proxy_id)).value
        except ConsulNotFound:
            last = "not registered with the Consul agent"
        except ConsulUnavailable as exc:
            last = f"Consul unreachable: {exc}"
        except ConsulError as exc:
            raise ConfigError(source, [Problem("", f"Consul refused to show it: {exc}")]) from None
        if clock() + delay > deadline:
            raise ConfigError(
                source,
                [Problem("", f"{last} (gave up after {timeout:g}s; Nomad registers it first)")],
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


@dataclass(frozen=True, slots=True)
class Resolved:
    config: AgentConfig
    external: ExternalRegistration
    token_source: str


async def resolve(
    env: Mapping[str, str],
    *,
    config_file: Path | None = None,
    proxy_id: str = "",
    bootstrap: Path | None = None,
    admin_address: str = "",
    timeout: float = 60.0,
) -> Resolved:
    """Nomad's inputs plus the proxy's registration: the sidecar's whole configuration."""
    inputs = gather(env, proxy_id=proxy_id, bootstrap=bootstrap, admin_address=admin_address)
    raw_file: Any = read_raw(config_file) if config_file is not None else {}
    if raw_file is None:
        raw_file = {}
    if not isinstance(raw_file, dict):
        raise ConfigError(str(config_file), [Problem("", "expected a mapping at the top")])
    try:
        section = consul_section(raw_file, inputs, str(config_file or "--nomad"))
        client_config = consul_client_config(section, env, 0)
    except ConsulConfigError as exc:
        raise ConfigError("consul", [Problem("", str(exc))]) from None
    try:
        async with ConsulClient(client_config) as consul:
            reg = await fetch_registration(consul, inputs.proxy_id, timeout=timeout)
    except ConsulConfigError as exc:
        raise ConfigError("consul", [Problem("", str(exc))]) from None
    raw = config_raw(reg, inputs, env, raw_file)
    source = f"proxy registration {inputs.proxy_id}"
    config = parse(raw, env, source=f"{source} with {config_file}" if config_file else source)
    token_source = inputs.token_source
    if env.get("CONSUL_HTTP_TOKEN") or env.get("CONSUL_HTTP_TOKEN_FILE"):
        token_source = "the environment (CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE)"
    return Resolved(config, ExternalRegistration(inputs.proxy_id, OWNER), token_source)


def summary(resolved: Resolved) -> str:
    cfg = resolved.config
    ups = ", ".join(f"{u.name} on {u.bind}" for u in cfg.sidecar.upstreams) or "none"
    return (
        f"{resolved.external.proxy_id}: service {cfg.service.name}, app at "
        f"{cfg.service.address}:{cfg.service.port}, public listener "
        f"{cfg.sidecar.address or cfg.service.address}:{cfg.sidecar.port}, upstreams {ups}; "
        f"Consul token from {resolved.token_source or 'nowhere (none sent)'}"
    )
