"""Batch evaluation for `meshlet intentions check` (pure: the CLI reads files and stdin).

Two modes, both ending in the same engine the sidecar uses:
- policies + a workload: translate the policies for the workload's service, compile the entries,
  evaluate requests (Istio's view: the result must match what Istio would decide);
- Consul entries + a destination + the default policy: evaluate the entries directly.

A request line has the fields of authz-cases-sample.yaml: `source_principal` (SPIFFE URI or
null) or `source` ({name, namespace, peer}), `source_ip`, `method`, `path`, `host`, `port`,
`headers` (values a string or a list for a repeated header). Unknown fields are ignored so that
case files can carry their expectations (`expect`, `istio_only`, ...) on the same line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from intentions.engine import (
    Decision,
    Identity,
    Snapshot,
    compile_snapshot,
    http_request,
    identity_from_consul_uri,
)
from intentions.entries import DEFAULT, ServiceIntentions, read_entry
from intentions.errors import BadRequest, EntryError, IntentionsError, PolicyError, Problem
from intentions.policy import AuthorizationPolicy
from intentions.translate import (
    HTTP_PROTOCOLS,
    ServiceRef,
    TranslateOptions,
    Translation,
    translate,
)


class CheckInputError(IntentionsError):
    """A workload, destination or request line is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Workload:
    namespace: str
    consul_service: str
    protocol: str = "http"
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class CheckRequest:
    source_principal: str | None = None
    source: Identity | None = None
    method: str | None = None
    path: str | None = None
    host: str | None = None
    port: int | None = None
    headers: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)


def _str(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise CheckInputError(f"{where}.{key} is required")
        return None
    if not isinstance(value, str):
        raise CheckInputError(f"{where}.{key} must be a string, got {value!r}")
    return value


def parse_workload(obj: object) -> Workload:
    """`--workload` JSON: keys namespace, labels, service_account, consul_service, protocol."""
    if not isinstance(obj, Mapping):
        raise CheckInputError("workload must be a JSON object")
    labels = obj.get("labels") or {}
    if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
        raise CheckInputError("workload.labels must be an object of strings")
    namespace = _str(obj, "namespace", "workload", required=True)
    service = _str(obj, "consul_service", "workload") or labels.get("app")
    if not service:
        raise CheckInputError("workload.consul_service (or labels.app) is required")
    assert namespace is not None
    return Workload(
        namespace=namespace,
        consul_service=service,
        protocol=(_str(obj, "protocol", "workload") or "http").lower(),
        labels=dict(labels),
        service_account=_str(obj, "service_account", "workload") or "",
    )


def parse_destination(obj: object) -> tuple[Identity, str]:
    """`--destination` JSON: {name, namespace?, partition?, protocol?} -> (identity, protocol)."""
    if not isinstance(obj, Mapping):
        raise CheckInputError("destination must be a JSON object")
    name = _str(obj, "name", "destination", required=True)
    assert name is not None
    identity = Identity(
        name=name,
        namespace=_str(obj, "namespace", "destination") or DEFAULT,
        partition=_str(obj, "partition", "destination") or DEFAULT,
    )
    return identity, (_str(obj, "protocol", "destination") or "tcp").lower()


def parse_request(obj: object, where: str = "request") -> CheckRequest:
    if not isinstance(obj, Mapping):
        raise CheckInputError(f"{where} must be a JSON object")
    source: Identity | None = None
    raw_source = obj.get("source")
    if isinstance(raw_source, Mapping):
        name = _str(raw_source, "name", f"{where}.source", required=True)
        assert name is not None
        source = Identity(
            name=name,
            namespace=_str(raw_source, "namespace", f"{where}.source") or DEFAULT,
            partition=_str(raw_source, "partition", f"{where}.source") or DEFAULT,
            peer=_str(raw_source, "peer", f"{where}.source") or "",
        )
    elif isinstance(raw_source, str) and raw_source:
        namespace, _, name = raw_source.rpartition("/")
        source = Identity(name=name, namespace=namespace or DEFAULT)
    elif raw_source is not None:
        raise CheckInputError(
            f"{where}.source must be an object {{name, namespace, peer}} or 'namespace/name'"
        )
    headers: dict[str, str | tuple[str, ...]] = {}
    raw_headers = obj.get("headers") or {}
    if not isinstance(raw_headers, Mapping):
        raise CheckInputError(f"{where}.headers must be an object")
    for name, value in raw_headers.items():
        if isinstance(value, str):
            headers[str(name)] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            headers[str(name)] = tuple(value)
        else:
            raise CheckInputError(f"{where}.headers[{name}] must be a string or a list of strings")
    port = obj.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
        raise CheckInputError(f"{where}.port must be an integer")
    return CheckRequest(
        source_principal=_str(obj, "source_principal", where),
        source=source,
        method=_str(obj, "method", where),
        path=_str(obj, "path", where),
        host=_str(obj, "host", where),
        port=port,
        headers=headers,
    )


_NO_IDENTITY = Decision(
    False,
    "no trusted mTLS identity (plaintext or foreign trust domain): Consul's mesh refuses the "
    "connection before authorization",
)


def _evaluate(
    snapshot: Snapshot,
    destination: Identity,
    is_http: bool,
    source: Identity | None,
    r: CheckRequest,
) -> Decision:
    if source is None:
        return _NO_IDENTITY
    if not is_http or r.method is None:
        return snapshot.decide_connection(destination, source)
    try:
        request = http_request(r.method, r.path or "/", r.host, r.headers)
    except BadRequest as exc:
        return Decision(False, f"rejected before authorization: {exc}")
    return snapshot.decide_request(destination, source, request)


@dataclass(frozen=True, slots=True)
class PolicyChecker:
    """Istio policies translated for one workload, ready to answer requests."""

    workload: Workload
    translation: Translation
    snapshot: Snapshot
    options: TranslateOptions

    @classmethod
    def build(
        cls,
        policies: Iterable[AuthorizationPolicy],
        workload: Workload,
        options: TranslateOptions | None = None,
    ) -> PolicyChecker:
        """Raises PolicyError when the set cannot be translated safely."""
        o = dataclasses.replace(options or TranslateOptions(), inventory_is_complete=True)
        labels = dict(workload.labels)
        # The harness convention: the service label names the Consul service.
        labels.setdefault(o.service_label, workload.consul_service)
        svc = ServiceRef(
            workload.consul_service,
            workload.namespace,
            workload.protocol,
            tuple(sorted(labels.items())),
        )
        translation = translate(policies, [svc], o)
        snapshot = compile_snapshot(translation.entries, default_allow=False)
        return cls(workload, translation, snapshot, o)

    def identity(self, r: CheckRequest) -> Identity | None:
        """The Consul identity of the request's peer under the harness identity mapping."""
        if r.source is not None:
            return r.source
        if r.source_principal is None:
            return None
        consul = identity_from_consul_uri(r.source_principal)
        if consul is not None:
            return consul
        prefix = "spiffe://"
        if not r.source_principal.startswith(prefix):
            return None
        parts = r.source_principal[len(prefix) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            return None
        if parts[0] not in self.options.local_trust_domains:
            return None
        single = self.options.single_namespace
        if single is not None:
            return Identity(parts[4]) if parts[2] == single else None
        return Identity(parts[4], parts[2])

    def check(self, r: CheckRequest) -> Decision:
        single = self.options.single_namespace
        destination = Identity(
            self.workload.consul_service,
            DEFAULT if single is not None else self.workload.namespace,
        )
        is_http = self.workload.protocol in HTTP_PROTOCOLS
        return _evaluate(self.snapshot, destination, is_http, self.identity(r), r)

    def explain(self, r: CheckRequest) -> tuple[Decision, str]:
        """The decision and the Istio rule (or catch-all) that produced it."""
        decision = self.check(r)
        if decision.source is None:
            return decision, "no intention matched: " + decision.reason
        single = self.options.single_namespace
        key = (
            DEFAULT if single is not None else self.workload.namespace,
            self.workload.consul_service,
            *decision.source,
        )
        origins = self.translation.origins.get(key, ())
        if decision.permission is not None and decision.permission < len(origins):
            return decision, origins[decision.permission]
        if len(origins) == 1:
            return decision, origins[0]
        # Translated L7 lists always end in a catch-all, so only an L4 question gets here.
        return decision, "an L7 intention answers a connection-level check with deny"


@dataclass(frozen=True, slots=True)
class EntryChecker:
    """Consul entries evaluated directly, with the cluster's default intention policy."""

    destination: Identity
    protocol: str
    snapshot: Snapshot

    @classmethod
    def build(
        cls,
        entries: Sequence[object],
        destination: Identity,
        protocol: str,
        *,
        default_allow: bool,
    ) -> EntryChecker:
        """Entries as JSON objects, as Consul returns them (`consul config read`, or
        `GET /v1/config/service-intentions`: Legacy* fields and indexes included); raises
        PolicyError naming the entry and Consul's message, or what meshlet cannot enforce."""
        loaded: list[ServiceIntentions] = []
        problems: list[Problem] = []
        for i, body in enumerate(entries):
            try:
                loaded.append(read_entry(body))
            except EntryError as exc:
                problems.append(Problem(f"entries[{i}]", "", str(exc)))
        if problems:
            raise PolicyError(problems)
        snapshot = compile_snapshot(loaded, default_allow=default_allow)
        if snapshot.broken:
            # The sidecar would deny everything to these destinations; a check that answers
            # with that would hide the reason, so refuse instead.
            raise PolicyError(
                [
                    Problem("entries", b.display, b.reason, "unsupported")
                    for b in snapshot.broken.values()
                ]
            )
        return cls(destination, protocol, snapshot)

    def check(self, r: CheckRequest) -> Decision:
        source = r.source
        if source is None and r.source_principal is not None:
            source = identity_from_consul_uri(r.source_principal)
        is_http = self.protocol in HTTP_PROTOCOLS
        return _evaluate(self.snapshot, self.destination, is_http, source, r)


def format_decision(decision: Decision, *, with_reason: bool = False) -> str:
    """One stdout line of `meshlet intentions check`."""
    return f"{decision.action}\t{decision.reason}" if with_reason else decision.action
