"""The sidecar configuration an injected pod's `meshlet-init` container writes.

The injected arguments carry what the annotations said (validated at injection time); the
kubelet adds the pod's name, namespace and IP. The result is validated by agent/config.py
before it is written, so a bad value stops the pod at init with the key that was wrong.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from agent.config import ConfigError, parse
from agent.inject import (
    InjectError,
    parse_port,
    parse_protocol,
    parse_service_name,
    parse_upstreams,
)
from agent.inject_template import ADMIN_ADDRESS, SIDECAR_PORT, Upstream


def sidecar_config(
    *,
    service: str,
    service_port: str,
    protocol: str,
    upstreams: str,
    pod_name: str,
    pod_namespace: str,
    pod_ip: str,
) -> dict[str, Any]:
    """The YAML mapping for `meshlet sidecar -c`. Raises InjectError naming the flag."""
    name = parse_service_name(service, "--service")
    port = parse_port(service_port, "--service-port")
    proto = parse_protocol(protocol, "--protocol")
    ups: tuple[Upstream, ...] = parse_upstreams(upstreams, "--upstreams")
    for flag, value in (("--pod-name", pod_name), ("--pod-namespace", pod_namespace)):
        # An unexpanded $(VAR) means the downward API env is missing.
        if not value or "/" in value or "$(" in value or value.strip() != value:
            raise InjectError(f"{flag}: expected the pod's {flag[6:]}, got {value!r}")
    try:
        ipaddress.ip_address(pod_ip)
    except ValueError:
        raise InjectError(f"--pod-ip: expected the pod's IP address, got {pod_ip!r}") from None
    return {
        "service": {
            "name": name,
            # Unique on the node: the Consul client agent holds services of every pod on it.
            "id": f"{pod_name}.{pod_namespace}",
            "port": port,
            # Registered at the pod IP; the sidecar listens there too and reaches the app there.
            "address": pod_ip,
            "meta": {"k8s-namespace": pod_namespace, "k8s-pod": pod_name},
        },
        "sidecar": {
            "port": SIDECAR_PORT,
            "protocol": proto,
            "upstreams": [{"name": u.name, "local_bind_port": u.port} for u in ups],
        },
        "admin": {"address": ADMIN_ADDRESS},
    }


def write_config(path: Path, raw: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Validate with the agent's own parser, then write atomically (the sidecar may be
    restarting and reading it)."""
    try:
        parse(dict(raw), env, source=str(path))
    except ConfigError as exc:
        raise InjectError(str(exc)) from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dict(raw), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
