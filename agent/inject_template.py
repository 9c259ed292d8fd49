"""The injection template: what `meshlet inject` adds to a pod, and its parameters.

- `meshlet-init` (runs once) writes the sidecar's YAML configuration into a memory-backed
  emptyDir. It runs in the pod because the configuration needs what only the pod knows: its
  name, namespace and IP (the service is registered at the pod IP, under an ID unique per
  node). What came from annotations was validated at injection time (agent/inject.py).
- `meshlet-sidecar`, a native sidecar (`restartPolicy: Always`, Kubernetes >= 1.29): started
  before the application containers (its startup probe waits for /ready, so the upstream
  listeners are up when the application starts) and stopped after them.

The admin listener is loopback-only (agent/config.py), and the kubelet probes the pod IP, so
the probes exec `meshlet-probe` (agent/probe.py) inside the container instead of an httpGet.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

SIDECAR = "meshlet-sidecar"
INIT = "meshlet-init"
CONFIG_VOLUME = "meshlet-config"
TMP_VOLUME = "meshlet-tmp"
TOKEN_VOLUME = "meshlet-consul-token"
OUR_NAMES = frozenset({SIDECAR, INIT})
OUR_VOLUMES = frozenset({CONFIG_VOLUME, TMP_VOLUME, TOKEN_VOLUME})

SIDECAR_PORT = 21000
ADMIN_ADDRESS = "127.0.0.1:19000"
CONFIG_DIR = "/etc/meshlet"
CONFIG_FILE = f"{CONFIG_DIR}/sidecar.yaml"
TOKEN_DIR = "/var/run/secrets/meshlet/consul"
TOKEN_KEY = "token"
# A fixed non-root uid, so the kubelet can check runAsNonRoot whatever the image declares.
RUN_AS = 65532

Protocol = Literal["tcp", "http", "http2", "grpc"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "http", "http2", "grpc")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str = "meshlet:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # Expanded by the kubelet from the HOST_IP variable the sidecar gets (downward API): the
    # Consul client agent of the node, as a DaemonSet with a hostPort.
    consul_http_addr: str = "$(HOST_IP):8500"
    token_secret: str = "meshlet-consul-token"

    def problems(self) -> Iterator[str]:
        if not self.image or any(c.isspace() for c in self.image):
            yield f"--image: expected an image reference, got {self.image!r}"
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            yield (
                "--image-pull-policy: expected Always, IfNotPresent or Never, got "
                f"{self.image_pull_policy!r}"
            )
        if not self.consul_http_addr or any(c.isspace() for c in self.consul_http_addr):
            yield f"--consul-http-addr: expected HOST:PORT, got {self.consul_http_addr!r}"
        if not _DNS_SUBDOMAIN.match(self.token_secret):
            yield f"--token-secret: expected a Secret name, got {self.token_secret!r}"


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class Settings:
    """What the annotations and the pod say the sidecar serves."""

    service: str
    port: int
    protocol: Protocol
    upstreams: tuple[Upstream, ...]


def _security_context() -> dict[str, Any]:
    # Meets the "restricted" Pod Security Standard, so injection never demotes a namespace.
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def init_args(s: Settings) -> list[str]:
    """`meshlet inject --write-config ...`: the kubelet expands $(POD_*) from the env."""
    args = [
        "inject",
        "--write-config",
        CONFIG_FILE,
        "--service",
        s.service,
        "--service-port",
        str(s.port),
        "--protocol",
        s.protocol,
        "--pod-name",
        "$(POD_NAME)",
        "--pod-namespace",
        "$(POD_NAMESPACE)",
        "--pod-ip",
        "$(POD_IP)",
    ]
    if s.upstreams:
        args += ["--upstreams", ",".join(f"{u.name}:{u.port}" for u in s.upstreams)]
    return args


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _probe(what: str, **timing: int) -> dict[str, Any]:
    return {
        "exec": {"command": ["meshlet-probe", what, "--admin-addr", ADMIN_ADDRESS]},
        **timing,
    }


def init_container(s: Settings, o: InjectOptions) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": o.image,
        "imagePullPolicy": o.image_pull_policy,
        "command": ["meshlet"],
        "args": init_args(s),
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_IP", "status.podIP"),
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        "securityContext": _security_context(),
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR}],
    }


def sidecar_container(s: Settings, o: InjectOptions) -> dict[str, Any]:
    return {
        "name": SIDECAR,
        "image": o.image,
        "imagePullPolicy": o.image_pull_policy,
        # A native sidecar: starts before the app containers, stops after them.
        "restartPolicy": "Always",
        "command": ["meshlet"],
        "args": ["sidecar", "-c", CONFIG_FILE],
        "env": [
            _field_env("HOST_IP", "status.hostIP"),
            {"name": "CONSUL_HTTP_ADDR", "value": o.consul_http_addr},
            {"name": "CONSUL_HTTP_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
        ],
        "ports": [{"name": "meshlet-mtls", "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        # The kubelet starts the app containers once this passes: upstream listeners are up.
        "startupProbe": _probe("ready", periodSeconds=1, timeoutSeconds=2, failureThreshold=300),
        "readinessProbe": _probe("ready", periodSeconds=5, timeoutSeconds=2, failureThreshold=2),
        "livenessProbe": _probe("live", periodSeconds=10, timeoutSeconds=5, failureThreshold=6),
        "resources": {
            # No CPU limit: throttling a proxy adds latency to every request it carries.
            "requests": {"cpu": "50m", "memory": "96Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": _security_context(),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            # connect/tls.py hands the leaf to OpenSSL through files in a temporary directory.
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }


def volumes(o: InjectOptions) -> list[dict[str, Any]]:
    return [
        {"name": CONFIG_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        # Leaf keys live here: memory-backed, never on the node's disk.
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        # Not optional: a missing Secret holds the pod at ContainerCreating with an event that
        # names it (an optional one would leave no token file, and the sidecar would
        # crash-loop on it). A cluster without ACLs creates the Secret with an empty token.
        {
            "name": TOKEN_VOLUME,
            "secret": {
                "secretName": o.token_secret,
                "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
            },
        },
    ]
