"""What the tests need to stand in for a Kubernetes cluster: the API's schemas
(kubernetes-validate, bundled, offline) and the kubelet's $(VAR) expansion of command lines."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import kubernetes_validate

# Native sidecars (initContainers[].restartPolicy: Always) are on by default from 1.29, and
# webhook matchConditions from 1.28: the oldest version the artefacts target.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")


def validate(doc: Mapping[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError when `doc` is not a valid object for every
    version in KUBERNETES_VERSIONS (strict: unknown fields are errors, as with
    `kubectl apply --validate=strict`)."""
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(dict(doc), version, strict=True)


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """The kubelet's expansion of command, args and env values: $(VAR) becomes the
    container's variable when it is defined and stays as written when not; $$ is a $."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _REF.sub(one, value)


def container_env(container: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: downward-API fields from `fields`
    (fieldPath -> value), later values expanding earlier ones."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    return [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]


def pod_template(doc: Mapping[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "Pod":
        return dict(doc)
    if kind == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"])
    return dict(doc["spec"]["template"])
