"""Sidecar injection into Kubernetes manifests: pure, manifest in -> manifest out.

    text = inject_stream(open("deploy.yaml").read(), InjectOptions(image="meshlet:0.1.0"))
    ops = pod_patch(pod, InjectOptions(...))      # the admission webhook's JSONPatch

A pod template gets the containers and volumes of agent/inject_template.py ahead of its own.

Annotations read (on the pod or the pod template):

    meshlet.io/inject: "false"             opt out ("true" opts in; anything else is an error)
    meshlet.io/service: web                Consul service name (default: the app label)
    meshlet.io/service-port: "8080"        application port, number or containerPort name
                                           (default: the first containerPort)
    meshlet.io/protocol: http              tcp (default), http, http2 or grpc
    meshlet.io/upstreams: "api:9191,db:9192"   NAME:LOCAL_PORT, comma separated

`meshlet.io/injected: "true"` marks an injected pod, so injecting twice changes nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from agent.inject_template import (
    ADMIN_ADDRESS,
    OUR_NAMES,
    OUR_VOLUMES,
    PROTOCOLS,
    SIDECAR,
    SIDECAR_PORT,
    InjectOptions,
    Protocol,
    Settings,
    Upstream,
    init_container,
    sidecar_container,
    volumes,
)

INJECT = "meshlet.io/inject"
SERVICE = "meshlet.io/service"
SERVICE_PORT = "meshlet.io/service-port"
PROTOCOL = "meshlet.io/protocol"
UPSTREAMS = "meshlet.io/upstreams"
INJECTED = "meshlet.io/injected"


# Consul service names that are also DNS labels: no '/', no spaces, and no '$(' that the
# kubelet would expand in the init container's arguments.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

# apiVersion, kind -> where the pod template is. Other documents pass through untouched.
_WORKLOADS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("v1", "Pod"): (),
    ("apps/v1", "Deployment"): ("spec", "template"),
    ("apps/v1", "StatefulSet"): ("spec", "template"),
    ("apps/v1", "DaemonSet"): ("spec", "template"),
    ("apps/v1", "ReplicaSet"): ("spec", "template"),
    ("batch/v1", "Job"): ("spec", "template"),
    ("batch/v1", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """The input cannot be injected; the message names the document and the field."""


# ---- reading the pod ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else "a mapping"
    )


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectError(f"{path}: expected a mapping, got {_type_name(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(f"{path}: expected a list, got {_type_name(value)}")
    return value


def _string_map(value: Any, path: str) -> dict[str, str]:
    m = _mapping(value, path)
    for key, v in m.items():
        if not isinstance(v, str):
            raise InjectError(
                f"{path}.{key}: expected a string (quote it), got {_type_name(v)} {v!r}"
            )
    return m


def parse_port(raw: str, path: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise InjectError(f"{path}: expected a port number from 1 to 65535, got {raw!r}")
    return int(raw)


def parse_service_name(raw: str, path: str) -> str:
    if not _NAME.match(raw):
        raise InjectError(
            f"{path}: expected a service name of lower-case letters, digits and '-' "
            f"(a DNS label), got {raw!r}"
        )
    return raw


def parse_protocol(raw: str, path: str) -> Protocol:
    for p in PROTOCOLS:
        if raw == p:
            return p
    raise InjectError(f"{path}: expected one of {', '.join(PROTOCOLS)}, got {raw!r}")


def parse_upstreams(raw: str, path: str) -> tuple[Upstream, ...]:
    """`api:9191,db:9192` -> upstreams; empty means none."""
    out: list[Upstream] = []
    names: set[str] = set()
    ports: set[int] = set()
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        name, sep, port = item.partition(":")
        if not sep:
            raise InjectError(f"{path}: expected NAME:LOCAL_PORT, got {item!r}")
        up = Upstream(parse_service_name(name, path), parse_port(port, path))
        if up.name in names:
            raise InjectError(f"{path}: upstream {up.name!r} is listed twice")
        if up.port in ports:
            raise InjectError(f"{path}: local port {up.port} is used by two upstreams")
        names.add(up.name)
        ports.add(up.port)
        out.append(up)
    return tuple(out)


def _containers(spec: dict[str, Any], key: str, path: str) -> list[dict[str, Any]]:
    items = _list(spec.get(key), f"{path}.{key}")
    for i, c in enumerate(items):
        if not isinstance(c, dict):
            raise InjectError(f"{path}.{key}[{i}]: expected a container, got {_type_name(c)}")
        if not isinstance(c.get("name"), str) or not c["name"]:
            raise InjectError(f"{path}.{key}[{i}].name: expected a container name")
    return items


def _container_ports(containers: Sequence[dict[str, Any]], path: str) -> list[tuple[str, int, str]]:
    """(name, containerPort, where) of every declared port, in order."""
    out: list[tuple[str, int, str]] = []
    for i, c in enumerate(containers):
        for j, raw in enumerate(_list(c.get("ports"), f"{path}.containers[{i}].ports")):
            where = f"{path}.containers[{i}].ports[{j}]"
            p = _mapping(raw, where)
            number = p.get("containerPort")
            if not isinstance(number, int) or isinstance(number, bool):
                raise InjectError(f"{where}.containerPort: expected a port number")
            out.append((str(p.get("name") or ""), number, f"{where}.containerPort"))
    return out


def _settings(
    meta: dict[str, Any], spec: dict[str, Any], mpath: str, spath: str
) -> Settings | None:
    """The sidecar's settings, or None when the pod opts out or is already injected."""
    annotations = _string_map(meta.get("annotations"), f"{mpath}.annotations")
    labels = _string_map(meta.get("labels"), f"{mpath}.labels")
    apath = f"{mpath}.annotations"
    flag = annotations.get(INJECT, "true")
    if flag not in ("true", "false"):
        raise InjectError(f'{apath}.{INJECT}: expected "true" or "false", got {flag!r}')
    if flag == "false":
        return None
    containers = _containers(spec, "containers", spath)
    inits = _containers(spec, "initContainers", spath)
    if not containers:
        raise InjectError(f"{spath}.containers: expected at least one container")
    if annotations.get(INJECTED) == "true":
        if not any(c["name"] == SIDECAR for c in inits):
            raise InjectError(
                f"{apath}.{INJECTED}: marked as injected but {spath}.initContainers has no "
                f"{SIDECAR}; remove the annotation to inject again"
            )
        return None
    if spec.get("hostNetwork") is True:
        # The node's network: ports 19000 and 21000 and the loopback upstream listeners would
        # be shared with every other such pod on the node, and the pod IP is the node's.
        raise InjectError(
            f"{spath}.hostNetwork: meshlet does not inject pods on the node's network (its "
            f'fixed ports would clash); annotate the pod {INJECT}: "false"'
        )
    for key, items in (("initContainers", inits), ("containers", containers)):
        for i, c in enumerate(items):
            if c["name"] in OUR_NAMES:
                raise InjectError(
                    f"{spath}.{key}[{i}].name: {c['name']!r} is the name of meshlet's injected "
                    "container; rename it"
                )
    for i, c in enumerate(_containers(spec, "ephemeralContainers", spath)):
        if c["name"] in OUR_NAMES:
            raise InjectError(
                f"{spath}.ephemeralContainers[{i}].name: {c['name']!r} is the name of meshlet's "
                "injected container; rename it"
            )
    for i, v in enumerate(_list(spec.get("volumes"), f"{spath}.volumes")):
        name = _mapping(v, f"{spath}.volumes[{i}]").get("name")
        if name in OUR_VOLUMES:
            raise InjectError(
                f"{spath}.volumes[{i}].name: {name!r} is the name of a volume meshlet injects; "
                "rename it"
            )

    if SERVICE in annotations:
        service = parse_service_name(annotations[SERVICE], f"{apath}.{SERVICE}")
    elif "app" in labels:
        service = parse_service_name(labels["app"], f"{mpath}.labels.app")
    elif "app.kubernetes.io/name" in labels:
        service = parse_service_name(
            labels["app.kubernetes.io/name"], f"{mpath}.labels.app.kubernetes.io/name"
        )
    else:
        raise InjectError(
            f"{apath}.{SERVICE}: no service name: set the {SERVICE} annotation or an app label"
        )

    ports = _container_ports(containers, spath)
    if SERVICE_PORT in annotations:
        raw = annotations[SERVICE_PORT]
        named = [n for name, n, _ in ports if name and name == raw]
        port = named[0] if named else parse_port(raw, f"{apath}.{SERVICE_PORT}")
    elif ports:
        port = ports[0][1]
    else:
        raise InjectError(
            f"{apath}.{SERVICE_PORT}: no application port: set the {SERVICE_PORT} annotation "
            f"or declare a containerPort in {spath}.containers"
        )
    protocol = parse_protocol(annotations.get(PROTOCOL, "tcp"), f"{apath}.{PROTOCOL}")
    upstreams = parse_upstreams(annotations.get(UPSTREAMS, ""), f"{apath}.{UPSTREAMS}")

    admin_port = int(ADMIN_ADDRESS.rpartition(":")[2])
    reserved = {SIDECAR_PORT: "the sidecar's inbound port", admin_port: "the sidecar's admin port"}
    if port in reserved:
        raise InjectError(f"{apath}.{SERVICE_PORT}: {port} is {reserved[port]}")
    for _, n, where in ports:
        if n in reserved:
            raise InjectError(f"{where}: {n} is {reserved[n]}; the pod shares one network")
    in_use = {n: f"declared at {where}" for _, n, where in ports}
    in_use.update(reserved)
    in_use[port] = "the application port"
    for up in upstreams:
        if up.port in in_use:
            raise InjectError(
                f"{apath}.{UPSTREAMS}: local port {up.port} of {up.name} is {in_use[up.port]}"
            )
    return Settings(service, port, protocol, upstreams)


# ---- what is added -----------------------------------------------------------------------------


def inject_pod(
    meta: Any, spec: Any, options: InjectOptions, *, mpath: str = "metadata", spath: str = "spec"
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The injected (metadata, spec) of one pod or pod template, new objects; None when it is
    left as it is (opted out, or already injected). Raises InjectError naming the field."""
    meta = _mapping(meta, mpath)
    if not isinstance(spec, dict):
        raise InjectError(f"{spath}: expected a pod spec mapping, got {_type_name(spec)}")
    s = _settings(meta, spec, mpath, spath)
    if s is None:
        return None
    meta, spec = copy.deepcopy(meta), copy.deepcopy(spec)
    meta["annotations"] = {**(meta.get("annotations") or {}), INJECTED: "true"}
    spec["initContainers"] = [
        init_container(s, options),
        sidecar_container(s, options),
        *(spec.get("initContainers") or []),
    ]
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes(options)]
    return meta, spec


# ---- documents and streams ---------------------------------------------------------------------


def _label(doc: Any) -> str:
    """' (Deployment web)': what a document is, for error messages."""
    if not isinstance(doc, dict):
        return ""
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    kind = doc.get("kind")
    parts = [str(p) for p in (kind, name) if isinstance(p, str) and p]
    return f" ({' '.join(parts)})" if parts else ""


def inject_document(doc: Any, options: InjectOptions, *, where: str = "document") -> Any:
    """The injected document, or the same object when there is nothing to inject."""
    if not isinstance(doc, dict):
        return doc
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == ("v1", "List"):
        items = _list(doc.get("items"), f"{where}: items")
        new = [
            inject_document(item, options, where=f"{where}: items[{i}]{_label(item)}")
            for i, item in enumerate(items)
        ]
        if all(a is b for a, b in zip(new, items, strict=True)):
            return doc
        return {**doc, "items": new}
    path = _WORKLOADS.get((str(key[0]), str(key[1])))
    if path is None:
        return doc
    holder: Any = doc
    walked: list[str] = []
    for part in path:
        walked.append(part)
        holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            raise InjectError(f"{where}: {'.'.join(walked)}: expected a mapping")
    prefix = ".".join(path)
    mpath = f"{prefix}.metadata" if prefix else "metadata"
    spath = f"{prefix}.spec" if prefix else "spec"
    try:
        done = inject_pod(
            holder.get("metadata"), holder.get("spec"), options, mpath=mpath, spath=spath
        )
    except InjectError as exc:
        raise InjectError(f"{where}: {exc}") from None
    if done is None:
        return doc
    out = copy.deepcopy(doc)
    target = out
    for part in path:
        target = target[part]
    target["metadata"], target["spec"] = done
    return out


def _chunks(text: str) -> list[str]:
    """The stream's text cut at each document start, so an untouched document is copied out
    byte for byte (comments and layout included)."""
    starts = [
        e.start_mark.index
        for e in yaml.parse(text, Loader=yaml.SafeLoader)
        if isinstance(e, yaml.DocumentStartEvent) and e.start_mark is not None
    ]
    if not starts:
        return []
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def inject_stream(text: str, options: InjectOptions) -> str:
    """Inject every workload of a multi-document YAML stream. Raises InjectError naming each
    document and field that could not be injected (the whole stream is refused)."""
    problems = list(options.problems())
    if problems:
        raise InjectError("; ".join(problems))
    try:
        docs = list(yaml.safe_load_all(text))
        chunks = _chunks(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise InjectError(
            f"not valid YAML: {where}{getattr(exc, 'problem', None) or exc}"
        ) from None
    if len(chunks) != len(docs):
        raise InjectError("cannot split the YAML stream into documents (a %YAML directive?)")
    out: list[str] = []
    errors: list[str] = []
    for i, (doc, chunk) in enumerate(zip(docs, chunks, strict=True), start=1):
        where = f"document {i}{_label(doc)}"
        try:
            new = inject_document(doc, options, where=where)
        except InjectError as exc:
            errors.append(str(exc))
            continue
        if new is doc:
            out.append(chunk)
            continue
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        head = "---\n" if i > 1 or chunk.lstrip().startswith("---") else ""
        out.append(head + yaml.safe_dump(new, sort_keys=False, default_flow_style=False))
    if errors:
        raise InjectError("\n".join(errors))
    return "".join(out)


# ---- the webhook's patch -----------------------------------------------------------------------


def _pointer(*parts: str) -> str:
    # RFC 6901: '~' and '/' in a member name are escaped ('meshlet.io/injected').
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def pod_patch(pod: Mapping[str, Any], options: InjectOptions) -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `pod` into its injected form; [] when nothing changes.

    `add` on an existing member replaces it (RFC 6902 §4.1), so whole lists are written: the
    admission request holds the complete object, and the result equals `inject_pod`'s."""
    done = inject_pod(pod.get("metadata"), pod.get("spec"), options)
    if done is None:
        return []
    meta, spec = done
    ops: list[dict[str, Any]] = []
    if not isinstance(pod.get("metadata"), dict):
        ops.append({"op": "add", "path": "/metadata", "value": meta})
    elif not isinstance(pod["metadata"].get("annotations"), dict):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": meta["annotations"]})
    else:
        ops.append(
            {"op": "add", "path": _pointer("metadata", "annotations", INJECTED), "value": "true"}
        )
    for key in ("initContainers", "volumes"):
        ops.append({"op": "add", "path": _pointer("spec", key), "value": spec[key]})
    return ops
