"""systemd units for meshlet on a VM, rendered for one service (`meshlet install systemd`).

The units ship inside the wheel (agent/units/, package data); systemd/ at the top of the
repository holds identical copies for reading. They run `/opt/meshlet/venv/bin/meshlet`;
rendering replaces that path with the console script actually installed. Everything here is
pure: text in, text out. agent/install_cli.py does the file system work.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.config import AdminSection, AgentConfig, SidecarSection

SIDECAR_UNIT = "meshlet-sidecar@.service"
AGENT_UNIT = "meshlet-agent.service"
APP_DROP_IN = "app-after-sidecar.conf"
UNIT_FILES = (SIDECAR_UNIT, AGENT_UNIT, APP_DROP_IN)
"""The files of agent/units/ (and of systemd/)."""

REFERENCE_EXEC = "/opt/meshlet/venv/bin/meshlet"
"""The console script the shipped units name; replaced when rendered."""

DEFAULT_SIDECAR_PORT = SidecarSection().port
DEFAULT_ADMIN = AdminSection().address

_SERVICE_PLACEHOLDER = "SERVICE"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# systemd would split or expand these in ExecStart= ('%' is escaped instead).
_UNSAFE_PATH = re.compile(r"[\s\"'\\$;]")

LOW_PORTS_DROP_IN = """\
# Written by `meshlet install systemd`: the configuration listens on a port below 1024
# ({keys}), which needs CAP_NET_BIND_SERVICE. The unit's empty capability sets are
# extended with just that one.
[Service]
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
"""


class UnitError(ValueError):
    """A value that cannot go into a unit file; the message names the flag."""


def shipped(name: str) -> str:
    """The text of one of `UNIT_FILES` as the installed distribution holds it."""
    if name not in UNIT_FILES:
        raise KeyError(name)
    return importlib.resources.files("agent").joinpath("units", name).read_text(encoding="utf-8")


def service_name_problem(name: str) -> str:
    """Why `name` cannot be a unit instance, file name and Consul service name ("" if it can)."""
    if not _NAME.fullmatch(name):
        return (
            f"expected 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or "
            f"digit, got {name!r}"
        )
    return ""


def exec_path_problem(path: str) -> str:
    if not path.startswith("/"):
        return f"expected an absolute path, got {path!r}"
    if _UNSAFE_PATH.search(path):
        return f"a path with spaces, quotes, '\\', '$' or ';' cannot go into ExecStart=: {path!r}"
    return ""


def render_unit(text: str, meshlet: str) -> str:
    """A shipped unit whose ExecStart= runs `meshlet` (an absolute path to the console script)."""
    problem = exec_path_problem(meshlet)
    if problem:
        raise UnitError(f"--meshlet: {problem}")
    escaped = meshlet.replace("%", "%%")
    shipped_exec = "ExecStart=" + REFERENCE_EXEC + " "
    return "".join(
        "ExecStart=" + escaped + " " + line[len(shipped_exec) :]
        if line.startswith(shipped_exec)
        else line
        for line in text.splitlines(keepends=True)
    )


def app_drop_in(service: str) -> str:
    """The drop-in that orders an application's unit after `meshlet-sidecar@<service>`."""
    text = shipped(APP_DROP_IN)
    return text.replace(f"@{_SERVICE_PLACEHOLDER}.service", f"@{service}.service")


def low_ports(config: AgentConfig, *, sidecar: bool) -> list[str]:
    """The keys of `config` that listen on a port below 1024 (the proxy's only when `sidecar`)."""
    keys = []
    admin_port = config.admin.address.rpartition(":")[2]
    if admin_port.isdigit() and 0 < int(admin_port) < 1024:
        keys.append("admin.address")
    if sidecar:
        if 0 < config.sidecar.port < 1024:
            keys.append("sidecar.port")
        keys.extend(
            f"sidecar.upstreams[{i}].local_bind_port"
            for i, up in enumerate(config.sidecar.upstreams)
            if 0 < up.local_bind_port < 1024
        )
    return keys


@dataclass(frozen=True, slots=True)
class Skeleton:
    service: str
    app_port: int
    node_address: str
    sidecar_port: int
    admin_port: int
    consul_address: str
    token_path: str
    unit: str
    command: str
    """`sidecar` or `agent`: what the unit runs."""


def config_skeleton(s: Skeleton) -> str:
    """The YAML file `meshlet install systemd` writes: the VM recipe (the application on
    loopback, the sidecar's public listener on the node's address), a valid start."""
    return f"""\
# meshlet for the service {s.service} ({s.unit}); every key is in docs/configuration.md.
# Validate after editing: meshlet {s.command} --check-config -c <this file>
#
# The Consul ACL token is not in this file: systemd passes {s.token_path}
# to the process as a credential and CONSUL_HTTP_TOKEN_FILE points at it.
consul:
  address: {s.consul_address}
service:
  name: {s.service}
  # The application listens on loopback only: nothing reaches it except through the sidecar.
  address: 127.0.0.1
  port: {s.app_port}
  # check: {{http: "http://127.0.0.1:{s.app_port}/health", interval: 10s}}
sidecar:
  # The sidecar's public (mTLS) listener, on this node's address as Consul knows it: peers on
  # other hosts dial the address registered here.
  address: {s.node_address}
  port: {s.sidecar_port}
  protocol: tcp
  upstreams: []
  # - {{name: api, local_bind_port: 9191}}
admin:
  address: 127.0.0.1:{s.admin_port}
shutdown:
  # Keep TimeoutStopSec= in the unit above this plus 10s (the data planes stop after it).
  drain_period: 10s
"""


def first_free(start: int, used: Iterable[int]) -> int:
    taken = set(used)
    port = start
    while port in taken:
        port += 1
    return port


def ports_in_use(configs: Iterable[Mapping[str, object]]) -> tuple[set[int], set[int]]:
    """Sidecar and admin ports named by other services' files (decoded YAML, unvalidated):
    several sidecars share one host, so each gets its own."""
    sidecar_ports: set[int] = set()
    admin_ports: set[int] = set()
    for raw in configs:
        side = raw.get("sidecar") or {}
        port = side.get("port", DEFAULT_SIDECAR_PORT) if isinstance(side, dict) else None
        if isinstance(port, int):
            sidecar_ports.add(port)
        admin = raw.get("admin") or {}
        address = admin.get("address", DEFAULT_ADMIN) if isinstance(admin, dict) else None
        if isinstance(address, str) and address.rpartition(":")[2].isdigit():
            admin_ports.add(int(address.rpartition(":")[2]))
    return sidecar_ports, admin_ports
