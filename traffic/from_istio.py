"""Istio networking (VirtualService, DestinationRule) and PeerAuthentication, as Consul config
entries: `service-router`, `service-splitter`, `service-resolver`, `service-defaults` and
`proxy-defaults`, written as the JSON bodies `PUT /v1/config` takes (CamelCase keys).

Pure: YAML text in, plain dicts out, no I/O. The rules (docs/routing.md, "From Istio"):

- Parsing is strict. A key Istio does not define is an error (a dropped, misspelt `match:`
  would send traffic somewhere its author did not mean); a field Istio defines but Consul
  cannot express is refused, naming the resource (`Kind/namespace/name`) and the field path.
- Istio features Consul has no field for, but meshlet's proxy honours (per-try timeout, fault
  injection, mirroring), go in the router's `Meta` under `meshlet.io/route.<n>.*` keys, with a
  warning that other Consul proxies ignore them; `strict` refuses them instead.
- Hosts are Consul service names: `reviews`, `reviews.<ns>.svc.<cluster domain>` and
  `reviews.service.consul`. External names, wildcards and gateways are refused.
- Weighted splits are exact: integer Istio weights summing to 100 are exact at Consul's 0.01.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml

from traffic.route_meta import (
    FAULT_ABORT_PERCENT,
    FAULT_ABORT_STATUS,
    FAULT_DELAY,
    FAULT_DELAY_PERCENT,
    META_PREFIX,
    MIRROR,
    MIRROR_PERCENT,
    PER_TRY_TIMEOUT,
)

ROUTER = "service-router"
SPLITTER = "service-splitter"
RESOLVER = "service-resolver"
SERVICE_DEFAULTS = "service-defaults"
PROXY_DEFAULTS = "proxy-defaults"
# Consul validates the service graph on each write: subsets (resolver) before the splitter and
# router that name them, protocols (service-defaults) before all of them.
WRITE_ORDER = (PROXY_DEFAULTS, SERVICE_DEFAULTS, RESOLVER, SPLITTER, ROUTER)

# Consul's limit on Meta keys per entry, less the three `meshlet routes apply` adds.
META_KEYS_FOR_ROUTES = 64 - 3

NETWORKING_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KINDS = {
    "VirtualService": NETWORKING_VERSIONS,
    "DestinationRule": NETWORKING_VERSIONS,
    "PeerAuthentication": SECURITY_VERSIONS,
}

# Consul's isValidRetryCondition (agent/structs/config_entry_discoverychain.go).
CONSUL_RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
# Istio's policy when `retries` names attempts but no retryOn
# (istio: pilot/pkg/networking/core/route/retry/retry.go, DefaultPolicy).
ISTIO_DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled")
ISTIO_DEFAULT_RETRY_CODES = (503,)

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_META_SELECTOR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_METHOD_ALTERNATION = re.compile(r"[A-Z]+(\|[A-Z]+)*")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


class RoutesError(Exception):
    """The input cannot be translated exactly; nothing was translated. One line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    namespace: str
    name: str
    spec: Mapping[str, Any]
    origin: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class TranslateOptions:
    strict: bool = False
    """Refuse the features carried in meshlet's Meta keys instead of warning about them."""
    callers: tuple[str, ...] = ()
    """The services whose service-defaults receive a DestinationRule's connection pool and
    outlier detection (Consul holds them per calling service, in UpstreamConfig.Overrides)."""
    single_namespace: str | None = None
    """Consul CE has one namespace: the Istio namespace it stands for. None: Istio namespace N
    is Consul namespace N (Enterprise namespace mirroring)."""
    root_namespace: str = "istio-system"
    cluster_domain: str = "cluster.local"
    service_label: str = "app"


@dataclass(frozen=True, slots=True)
class Scope:
    """What one resource is the authority for in one entry: apply replaces exactly this."""

    kind: str
    namespace: str
    name: str
    items: frozenset[str] | None
    """The entry's items (see traffic.istio_apply.entry_items); None: the whole entry."""
    subject: str
    """The service the input names that this belongs to (`--services` selects by it)."""
    source: str


@dataclass(frozen=True, slots=True)
class Translation:
    entries: tuple[dict[str, Any], ...]
    scopes: tuple[Scope, ...]
    warnings: tuple[str, ...] = ()


def entry_key(body: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(body["Kind"]), str(body.get("Namespace") or "default"), str(body["Name"]))


# ---- durations ------------------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """A Go/Istio duration ("1h", "1.5s", "300ms") in nanoseconds. Raises ValueError."""
    if not text:
        raise ValueError("empty duration")
    pos, total = 0, Decimal(0)
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a duration (e.g. 10s, 1.5s, 300ms, 1m)")
        try:
            total += Decimal(m.group(1)) * _UNIT_NS[m.group(2)]
        except InvalidOperation:
            raise ValueError(f"{text!r} is not a duration") from None
        pos = m.end()
    if total != total.to_integral_value():
        raise ValueError(f"{text!r} is finer than a nanosecond")
    return int(total)


def format_duration(ns: int) -> str:
    """Go's time.Duration.String(), the form Consul writes durations in."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _decimal(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _decimal(rest, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def _percent_text(value: Decimal) -> str:
    return format(value.normalize(), "f")


# ---- loading --------------------------------------------------------------------------------


def load_resources(text: str, origin: str = "") -> tuple[Resource, ...]:
    """Every document of a YAML stream (empty documents skipped). Raises RoutesError."""
    where = origin or "input"
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise RoutesError([f"{where}: not valid YAML: {' '.join(str(err).split())}"]) from None
    found: list[Resource] = []
    problems: list[str] = []
    for n, doc in enumerate(docs):
        if doc is None:
            continue
        at = f"{where}: document {n + 1}"
        if not isinstance(doc, dict):
            problems.append(f"{at}: expected a mapping, got {_type(doc)}")
            continue
        kind = doc.get("kind")
        if kind not in KINDS:
            problems.append(
                f"{at}: kind {kind!r} is not translated (expected VirtualService, "
                "DestinationRule or PeerAuthentication)"
            )
            continue
        version = doc.get("apiVersion")
        if version not in KINDS[kind]:
            problems.append(
                f"{at}: {kind} apiVersion {version!r}: expected one of {', '.join(KINDS[kind])}"
            )
            continue
        extra = sorted(str(k) for k in doc if k not in ("apiVersion", "kind", "metadata", "spec"))
        if extra and extra != ["status"]:
            problems.append(f"{at}: unknown top-level field(s) {', '.join(extra)}")
            continue
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            problems.append(f"{at}: {kind} needs metadata.name")
            continue
        name, namespace = meta["name"], meta.get("namespace", "default")
        if not _DNS_SUBDOMAIN.fullmatch(name):
            problems.append(f"{at}: metadata.name {name!r} is not a Kubernetes object name")
            continue
        if not isinstance(namespace, str) or not _DNS_LABEL.fullmatch(namespace):
            problems.append(f"{at}: metadata.namespace {namespace!r} is not a namespace name")
            continue
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            problems.append(f"{kind}/{namespace}/{name}: spec: expected a mapping")
            continue
        found.append(Resource(kind, namespace, name, spec, origin))
    if problems:
        raise RoutesError(problems)
    return tuple(found)


def _type(value: object) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


class _Reader:
    """Reads one resource's spec, recording every problem with its field path."""

    def __init__(self, resource: Resource, strict: bool) -> None:
        self.resource = resource
        self.strict = strict
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{self.resource.label}: {path}: {message}")

    def refuse(self, path: str, why: str) -> None:
        self.fail(path, f"not translated: {why}")

    def obj(self, value: Any, path: str, known: Sequence[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_type(value)}")
            return None
        out = {}
        for key, item in value.items():
            if key in known:
                if item is not None:
                    out[key] = item
                continue
            hint = (
                f" (Istio's YAML spells it {_camel(str(key))})" if _camel(str(key)) in known else ""
            )
            self.fail(f"{path}.{key}", f"unknown field{hint}")
        return out

    def str_(self, value: Any, path: str) -> str | None:
        if isinstance(value, str):
            return value
        self.fail(path, f"expected a string, got {_type(value)}")
        return None

    def int_(self, value: Any, path: str, low: int = 0, high: int = 2**32 - 1) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_type(value)}")
            return None
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range {low}..{high}")
            return None
        return value

    def bool_(self, value: Any, path: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.fail(path, f"expected true or false, got {_type(value)}")
        return None

    def list_(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, list):
            return value
        self.fail(path, f"expected a list, got {_type(value)}")
        return []

    def str_map(self, value: Any, path: str) -> dict[str, str]:
        raw = self.obj(value, path, ()) if not isinstance(value, dict) else value
        out: dict[str, str] = {}
        for key, item in (raw or {}).items():
            if not isinstance(key, str) or not isinstance(item, str):
                self.fail(f"{path}.{key}", f"expected a string, got {_type(item)}")
                continue
            out[key] = item
        return out

    def duration(self, value: Any, path: str, *, minimum_ms: bool = True) -> int | None:
        text = self.str_(value, path)
        if text is None:
            return None
        try:
            ns = parse_duration(text)
        except ValueError as err:
            self.fail(path, str(err))
            return None
        if minimum_ms and (ns < 1_000_000 or ns % 1_000_000):
            # Istio's ValidateDuration: at least 1ms, and whole milliseconds.
            self.fail(path, f"{text!r}: Istio durations are whole milliseconds, at least 1ms")
            return None
        return ns

    def percent(self, value: Any, path: str) -> Decimal | None:
        pct = self.obj(value, path, ("value",))
        if pct is None:
            return None
        raw = pct.get("value", 0)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            self.fail(f"{path}.value", f"expected a number, got {_type(raw)}")
            return None
        dec = Decimal(str(raw))
        if not 0 <= dec <= 100:
            self.fail(f"{path}.value", f"{raw} is not a percentage (0-100)")
            return None
        return dec

    def extension(self, path: str, what: str) -> bool:
        """A feature carried in meshlet Meta: allowed (with a warning) unless strict."""
        if self.strict:
            self.refuse(
                path,
                f"{what} has no Consul field; meshlet carries it in a meshlet.io/ Meta key that "
                "other Consul proxies ignore, and --strict refuses those",
            )
            return False
        return True


# ---- hosts and namespaces -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Service:
    namespace: str
    """The Consul namespace ("default" in CE)."""
    name: str


def _consul_namespace(r: _Reader, istio_ns: str, path: str, o: TranslateOptions) -> str | None:
    if o.single_namespace is None:
        return istio_ns
    if istio_ns == o.single_namespace:
        return "default"
    r.refuse(
        path,
        f"namespace {istio_ns!r} is not {o.single_namespace!r}, the one Istio namespace "
        "Consul's single namespace stands for (--single-namespace)",
    )
    return None


def _host(r: _Reader, value: Any, path: str, o: TranslateOptions) -> _Service | None:
    host = r.str_(value, path)
    if host is None:
        return None
    if "*" in host:
        r.refuse(path, f"{host!r}: a wildcard host names no single Consul service")
        return None
    labels = host.split(".")
    suffix = ["svc", *o.cluster_domain.split(".")]
    namespace = r.resource.namespace
    if len(labels) == 1:
        name = labels[0]
    elif len(labels) == 2 + len(suffix) and labels[2:] == suffix:
        name, namespace = labels[0], labels[1]
    elif len(labels) == 3 and labels[1:] == ["service", "consul"]:
        name = labels[0]
    else:
        r.refuse(
            path,
            f"{host!r} is not a mesh service: expected NAME, NAME.NAMESPACE.svc."
            f"{o.cluster_domain} or NAME.service.consul (external hosts, other cluster "
            "domains and ServiceEntry hosts have no Consul service to route)",
        )
        return None
    if not _DNS_LABEL.fullmatch(name) or not _DNS_LABEL.fullmatch(namespace):
        r.refuse(path, f"{host!r}: {name!r} is not a Consul service name (a DNS label)")
        return None
    if name.endswith("-sidecar-proxy") or name == "consul":
        r.refuse(path, f"{host!r} is a sidecar proxy or Consul itself: name the service")
        return None
    consul_ns = _consul_namespace(r, namespace, path, o)
    return None if consul_ns is None else _Service(consul_ns, name)


def _with_namespace(body: dict[str, Any], namespace: str) -> dict[str, Any]:
    if namespace != "default":
        body["Namespace"] = namespace
    return body


def _export_to(r: _Reader, spec: Mapping[str, Any]) -> None:
    if "exportTo" in spec:
        values = r.list_(spec["exportTo"], "spec.exportTo")
        if values not in (["*"], []):
            r.refuse(
                "spec.exportTo",
                "Consul config entries apply to every caller in the mesh; only exportTo: ['*'] "
                "has the same meaning",
            )


# ---- VirtualService -------------------------------------------------------------------------

_VS_FIELDS = ("hosts", "gateways", "http", "tls", "tcp", "exportTo")
_ROUTE_FIELDS = (
    "name",
    "match",
    "route",
    "redirect",
    "directResponse",
    "delegate",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirrorPercent",
    "corsPolicy",
    "headers",
)
_MATCH_FIELDS = (
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
    "statPrefix",
)
_STRING_MATCH = ("exact", "prefix", "regex")


@dataclass
class _RouteOut:
    match: dict[str, Any]
    destination: dict[str, Any]
    features: dict[str, str]
    catch_all: bool
    plain_to: _Service | None
    """Set when the destination is one service without subset (what a splitter would split)."""
    path: str


@dataclass
class _VSOut:
    routes: list[_RouteOut] = field(default_factory=list)
    splits: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    """(field path, Splits) of each weighted route."""


def _string_match(
    r: _Reader, value: Any, path: str, *, prefix_ok: bool = True
) -> tuple[str, str] | None:
    """(Exact|Prefix|Regex|Present, value) of an Istio StringMatch; {} means presence."""
    m = r.obj(value, path, _STRING_MATCH)
    if m is None:
        return None
    if not m:
        return ("Present", "")
    if len(m) > 1:
        r.fail(path, f"set exactly one of {', '.join(_STRING_MATCH)}")
        return None
    ((key, raw),) = m.items()
    text = r.str_(raw, f"{path}.{key}")
    if text is None:
        return None
    if key == "prefix" and not prefix_ok:
        r.refuse(f"{path}.prefix", "Consul matches query parameters by exact, regex or presence")
        return None
    if text == "" and key != "regex":
        r.refuse(
            f"{path}.{key}",
            "an empty value is not expressible in Consul (its empty string means unset); "
            "use {} to match presence",
        )
        return None
    return (key.capitalize(), text)


def _http_match(r: _Reader, raw: Any, path: str) -> tuple[dict[str, Any], bool] | None:
    """The Consul Match.HTTP of one Istio match block, and whether it is a catch-all."""
    m = r.obj(raw, path, _MATCH_FIELDS)
    if m is None:
        return None
    http: dict[str, Any] = {}
    for key, why in (
        ("scheme", "Consul routers do not match the scheme"),
        ("authority", "Consul routers do not match the authority (the router is per service)"),
        ("port", "a Consul service has one port"),
        ("sourceLabels", "Consul routers route every caller alike"),
        ("sourceNamespace", "Consul routers route every caller alike"),
        ("gateways", "gateways are not translated"),
    ):
        if key in m:
            r.refuse(f"{path}.{key}", why)
    if "uri" in m:
        uri = _string_match(r, m["uri"], f"{path}.uri")
        if uri is not None:
            kind, text = uri
            if kind == "Present":
                r.fail(f"{path}.uri", "set one of exact, prefix, regex")
            elif kind in ("Exact", "Prefix") and not text.startswith("/"):
                r.refuse(f"{path}.uri.{kind.lower()}", f"{text!r}: Consul paths start with /")
            else:
                http[f"Path{kind}"] = text
                if m.get("ignoreUriCase") is True and kind != "Regex":
                    http["CaseInsensitive"] = True
    if "ignoreUriCase" in m:
        r.bool_(m["ignoreUriCase"], f"{path}.ignoreUriCase")
    if "method" in m:
        method = _string_match(r, m["method"], f"{path}.method")
        if method is not None:
            kind, text = method
            if kind == "Exact" and _METHOD_ALTERNATION.fullmatch(text):
                http["Methods"] = [text]
            elif kind == "Regex" and _METHOD_ALTERNATION.fullmatch(text):
                http["Methods"] = list(dict.fromkeys(text.split("|")))
            else:
                # Istio compares methods case-sensitively; Consul upper-cases them, which would
                # make a lower-case method (that no request sends) match.
                r.refuse(
                    f"{path}.method",
                    "Consul matches a list of exact upper-case methods (exact, or a regex "
                    "like GET|HEAD)",
                )
    headers: list[dict[str, Any]] = []
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        given = (
            r.obj(m.get(key), f"{path}.{key}", ()) if not isinstance(m.get(key), dict) else m[key]
        )
        for name, value in sorted((given or {}).items(), key=lambda kv: str(kv[0])):
            where = f"{path}.{key}.{name}"
            if not isinstance(name, str) or not name or name.startswith(":"):
                r.refuse(where, "pseudo-headers and empty names are not matched by Consul")
                continue
            match = _string_match(r, value, where)
            if match is None:
                continue
            kind, text = match
            header: dict[str, Any] = {"Name": name}
            header[kind] = True if kind == "Present" else text
            if invert:
                header["Invert"] = True
            headers.append(header)
    if headers:
        http["Header"] = headers
    params = m.get("queryParams")
    given = params if isinstance(params, dict) else r.obj(params, f"{path}.queryParams", ())
    query: list[dict[str, Any]] = []
    for name, value in sorted((given or {}).items(), key=lambda kv: str(kv[0])):
        where = f"{path}.queryParams.{name}"
        match = _string_match(r, value, where, prefix_ok=False)
        if match is not None:
            kind, text = match
            query.append({"Name": str(name), kind: True if kind == "Present" else text})
    if query:
        http["QueryParam"] = query
    catch_all = not http or http == {"PathPrefix": "/"}
    if not http:
        http = {"PathPrefix": "/"}
    return http, catch_all


def _header_ops(r: _Reader, raw: Any, path: str) -> dict[str, Any]:
    """Istio Headers {request, response: {set, add, remove}} as Consul's Request/ResponseHeaders."""
    h = r.obj(raw, path, ("request", "response"))
    out: dict[str, Any] = {}
    for side, key in (("request", "RequestHeaders"), ("response", "ResponseHeaders")):
        ops = r.obj((h or {}).get(side), f"{path}.{side}", ("set", "add", "remove"))
        if not ops:
            continue
        body: dict[str, Any] = {}
        for op, consul in (("add", "Add"), ("set", "Set")):
            if op in ops:
                values = r.str_map(ops[op], f"{path}.{side}.{op}")
                if values:
                    body[consul] = dict(sorted(values.items()))
        if "remove" in ops:
            names = [
                n
                for i, v in enumerate(r.list_(ops["remove"], f"{path}.{side}.remove"))
                if (n := r.str_(v, f"{path}.{side}.remove[{i}]")) is not None
            ]
            if names:
                body["Remove"] = names
        if body:
            out[key] = body
    return out


def _merge_headers(outer: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    """Destination-level modifiers under route-level ones; the route's Set wins (as Envoy's)."""
    out = {k: {**v} for k, v in inner.items()}
    for key, ops in outer.items():
        merged = out.setdefault(key, {})
        for op, value in ops.items():
            if op == "Remove":
                merged[op] = list(dict.fromkeys([*merged.get(op, []), *value]))
            else:
                merged[op] = dict(sorted({**merged.get(op, {}), **value}.items()))
    return out


def _retries(r: _Reader, raw: Any, path: str, features: dict[str, str]) -> dict[str, Any]:
    retry = r.obj(raw, path, ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities"))
    if not retry:
        return {}
    out: dict[str, Any] = {}
    attempts = r.int_(retry.get("attempts", 0), f"{path}.attempts", 0, 2**31 - 1)
    if retry.get("retryRemoteLocalities") is not None and r.bool_(
        retry["retryRemoteLocalities"], f"{path}.retryRemoteLocalities"
    ):
        r.refuse(f"{path}.retryRemoteLocalities", "Consul has no remote-locality retry flag")
    if not attempts:
        # attempts: 0 turns Istio's retries off; Consul has none unless asked for.
        return {}
    out["NumRetries"] = attempts
    conditions: list[str] = []
    codes: list[int] = []
    if "retryOn" in retry:
        text = r.str_(retry["retryOn"], f"{path}.retryOn") or ""
        for item in filter(None, (p.strip() for p in text.split(","))):
            if item.isdigit() and 100 <= int(item) <= 599:
                codes.append(int(item))
            elif item in CONSUL_RETRY_ON:
                conditions.append(item)
            elif item == "retriable-status-codes":
                continue  # Consul adds it when RetryOnStatusCodes is set
            else:
                r.refuse(f"{path}.retryOn", f"{item!r} is not a retry condition Consul accepts")
    else:
        conditions, codes = list(ISTIO_DEFAULT_RETRY_ON), list(ISTIO_DEFAULT_RETRY_CODES)
    if conditions:
        out["RetryOn"] = list(dict.fromkeys(conditions))
    if codes:
        out["RetryOnStatusCodes"] = sorted(set(codes))
    if "perTryTimeout" in retry:
        ns = r.duration(retry["perTryTimeout"], f"{path}.perTryTimeout")
        if ns is not None and r.extension(f"{path}.perTryTimeout", "a per-try timeout"):
            features[PER_TRY_TIMEOUT] = format_duration(ns)
    return out


def _fault(r: _Reader, raw: Any, path: str, features: dict[str, str]) -> None:
    fault = r.obj(raw, path, ("delay", "abort"))
    if fault is None:
        return
    if not fault:
        r.fail(path, "a fault needs delay or abort")
        return
    if not r.extension(path, "fault injection"):
        return
    if "delay" in fault:
        where = f"{path}.delay"
        delay = r.obj(
            fault["delay"], where, ("fixedDelay", "exponentialDelay", "percent", "percentage")
        )
        if delay is not None:
            if "exponentialDelay" in delay:
                r.refuse(f"{where}.exponentialDelay", "only fixedDelay is carried")
            if "fixedDelay" not in delay:
                r.fail(f"{where}.fixedDelay", "required")
            else:
                ns = r.duration(delay["fixedDelay"], f"{where}.fixedDelay")
                if ns is not None:
                    features[FAULT_DELAY] = format_duration(ns)
            pct = _fault_percent(r, delay, where, allow_int=True)
            if pct is not None:
                features[FAULT_DELAY_PERCENT] = pct
    if "abort" in fault:
        where = f"{path}.abort"
        abort = r.obj(
            fault["abort"], where, ("httpStatus", "grpcStatus", "http2Error", "percentage")
        )
        if abort is not None:
            for key in ("grpcStatus", "http2Error"):
                if key in abort:
                    r.refuse(f"{where}.{key}", "only httpStatus aborts are carried")
            if "httpStatus" in abort:
                status = r.int_(abort["httpStatus"], f"{where}.httpStatus", 200, 599)
                if status is not None:
                    features[FAULT_ABORT_STATUS] = str(status)
            elif not any(k in abort for k in ("grpcStatus", "http2Error")):
                r.fail(f"{where}.httpStatus", "required")
            pct = _fault_percent(r, abort, where, allow_int=False)
            if pct is not None:
                features[FAULT_ABORT_PERCENT] = pct


def _fault_percent(r: _Reader, spec: Mapping[str, Any], where: str, allow_int: bool) -> str | None:
    # Istio: "If left unspecified, all request will be delayed" / "all requests are aborted".
    if "percentage" in spec:
        pct = r.percent(spec["percentage"], f"{where}.percentage")
        return None if pct is None else _percent_text(pct)
    if allow_int and "percent" in spec:
        n = r.int_(spec["percent"], f"{where}.percent", 0, 100)
        return None if n is None else str(n)
    return "100"


def _mirror(  # noqa: PLR0917
    r: _Reader,
    route: Mapping[str, Any],
    path: str,
    features: dict[str, str],
    o: TranslateOptions,
    home: _Service,
) -> None:
    # (destination, its path, percentage value, percentage path, integer percent?)
    mirrors: list[tuple[Any, str, Any, str, bool]] = []
    if "mirror" in route:
        key = next((k for k in ("mirrorPercentage", "mirrorPercent") if k in route), "")
        mirrors.append(
            (
                route["mirror"],
                f"{path}.mirror",
                route.get(key),
                f"{path}.{key}",
                key == "mirrorPercent",
            )
        )
    for i, item in enumerate(r.list_(route.get("mirrors"), f"{path}.mirrors")):
        where = f"{path}.mirrors[{i}]"
        m = r.obj(item, where, ("destination", "percentage"))
        if m is not None:
            mirrors.append(
                (
                    m.get("destination"),
                    f"{where}.destination",
                    m.get("percentage"),
                    f"{where}.percentage",
                    False,
                )
            )
    if not mirrors:
        for key in ("mirrorPercentage", "mirrorPercent"):
            if key in route:
                r.fail(f"{path}.{key}", "set without mirror")
        return
    if len(mirrors) > 1:
        r.refuse(f"{path}.mirrors", "meshlet carries one mirror per route")
        return
    dest, where, pct_raw, pct_path, integer = mirrors[0]
    if not r.extension(where, "mirroring"):
        return
    target = _destination(r, dest, where, o)
    if target is None:
        return
    service, subset = target
    if service.namespace != home.namespace:
        r.refuse(where, "meshlet's mirror key names a service in the router's own namespace")
        return
    features[MIRROR] = service.name + (f"/{subset}" if subset else "")
    pct: str | None = "100"
    if pct_raw is not None and integer:
        n = r.int_(pct_raw, pct_path, 0, 100)
        pct = None if n is None else str(n)
    elif pct_raw is not None:
        dec = r.percent(pct_raw, pct_path)
        pct = None if dec is None else _percent_text(dec)
    if pct is not None:
        features[MIRROR_PERCENT] = pct


def _destination(
    r: _Reader, raw: Any, path: str, o: TranslateOptions
) -> tuple[_Service, str] | None:
    d = r.obj(raw, path, ("host", "subset", "port"))
    if d is None:
        return None
    if "host" not in d:
        r.fail(f"{path}.host", "required")
        return None
    service = _host(r, d["host"], f"{path}.host", o)
    subset = ""
    if "subset" in d:
        subset = r.str_(d["subset"], f"{path}.subset") or ""
        if subset and not _DNS_LABEL.fullmatch(subset):
            r.refuse(f"{path}.subset", f"{subset!r}: Consul subset names are DNS labels")
    if "port" in d:
        r.obj(d["port"], f"{path}.port", ("number",))
        r.warnings.append(
            f"{r.resource.label}: {path}.port: ignored: a Consul service has one port"
        )
    return None if service is None else (service, subset)


def _target(service: _Service, subset: str, home: _Service) -> dict[str, Any]:
    out: dict[str, Any] = {"Service": service.name}
    if subset:
        out["ServiceSubset"] = subset
    if service.namespace != home.namespace:
        out["Namespace"] = service.namespace
    return out


def _http_route(  # noqa: PLR0917
    r: _Reader, raw: Any, path: str, home: _Service, o: TranslateOptions, vs: _VSOut
) -> None:
    route = r.obj(raw, path, _ROUTE_FIELDS)
    if route is None:
        return
    for key, why in (
        (
            "redirect",
            "Consul has no HTTP redirect response (its resolver Redirect is a service redirect)",
        ),
        ("directResponse", "Consul has no direct response"),
        ("delegate", "Consul has no delegated routes"),
        ("corsPolicy", "Consul has no CORS policy"),
    ):
        if key in route:
            r.refuse(f"{path}.{key}", why)
    features: dict[str, str] = {}
    dest: dict[str, Any] = {}
    if "timeout" in route:
        ns = r.duration(route["timeout"], f"{path}.timeout", minimum_ms=False)
        if ns == 0:
            r.refuse(
                f"{path}.timeout",
                "0s (no timeout) has no Consul field: RequestTimeout 0 means Consul's 15s",
            )
        elif ns is not None:
            dest["RequestTimeout"] = format_duration(ns)
    dest.update(_retries(r, route.get("retries"), f"{path}.retries", features))
    if "fault" in route:
        _fault(r, route["fault"], f"{path}.fault", features)
    _mirror(r, route, path, features, o, home)
    route_headers = _header_ops(r, route.get("headers"), f"{path}.headers")
    rewrite = r.obj(
        route.get("rewrite"), f"{path}.rewrite", ("uri", "authority", "uriRegexRewrite")
    )
    prefix_rewrite = None
    if rewrite:
        for key in ("authority", "uriRegexRewrite"):
            if key in rewrite:
                r.refuse(f"{path}.rewrite.{key}", "Consul rewrites only the matched path prefix")
        if "uri" in rewrite:
            prefix_rewrite = r.str_(rewrite["uri"], f"{path}.rewrite.uri")

    targets: list[tuple[_Service, str, int | None, dict[str, Any]]] = []
    routes = r.list_(route.get("route"), f"{path}.route")
    if not routes and not any(k in route for k in ("redirect", "directResponse", "delegate")):
        r.fail(f"{path}.route", "required")
    for i, item in enumerate(routes):
        where = f"{path}.route[{i}]"
        rd = r.obj(item, where, ("destination", "weight", "headers"))
        if rd is None:
            continue
        target = _destination(r, rd.get("destination"), f"{where}.destination", o)
        weight = None
        if "weight" in rd:
            weight = r.int_(rd["weight"], f"{where}.weight", 0, 100)
        headers = _header_ops(r, rd.get("headers"), f"{where}.headers")
        if target is not None:
            targets.append((target[0], target[1], weight, headers))
    if len(targets) != len(routes) or not targets:
        return

    plain_to: _Service | None = None
    if len(targets) == 1:
        service, subset, _weight, headers = targets[0]
        # Istio: "If there is only one destination in a rule, the weight value is assumed to
        # be 100", whatever it says.
        dest = {**_target(service, subset, home), **dest, **_merge_headers(route_headers, headers)}
        if not subset:
            plain_to = service
    else:
        if any(w is None for _, _, w, _ in targets) or sum(w or 0 for _, _, w, _ in targets) != 100:
            r.fail(
                f"{path}.route",
                "weights must be given for every destination and sum to exactly 100 (Consul "
                "splits are exact to 0.01 and must sum to 100)",
            )
            return
        splits: list[dict[str, Any]] = []
        seen: set[tuple[str, str, str]] = set()
        for service, subset, weight, headers in targets:
            target_key = (service.namespace, service.name, subset)
            if target_key in seen:
                r.refuse(f"{path}.route", "two destinations name the same service and subset")
                return
            seen.add(target_key)
            splits.append({"Weight": weight, **_target(service, subset, home), **headers})
        vs.splits.append((f"{path}.route", splits))
        dest = {"Service": home.name, **dest, **route_headers}
    matches = r.list_(route.get("match"), f"{path}.match") or [None]
    for i, raw_match in enumerate(matches):
        got = _http_match(r, raw_match, f"{path}.match[{i}]")
        if got is None:
            continue
        http, catch_all = got
        one = dict(dest)
        if prefix_rewrite is not None:
            if "PathPrefix" not in http and "PathExact" not in http:
                r.refuse(
                    f"{path}.rewrite.uri",
                    f"match[{i}] has no uri prefix or exact: Consul's PrefixRewrite needs one",
                )
            else:
                one["PrefixRewrite"] = prefix_rewrite
        vs.routes.append(_RouteOut({"HTTP": http}, one, dict(features), catch_all, plain_to, path))


def _virtual_service(r: _Reader, o: TranslateOptions, out: _Out) -> None:
    spec = r.obj(r.resource.spec, "spec", _VS_FIELDS)
    if spec is None:
        return
    _export_to(r, spec)
    gateways = r.list_(spec.get("gateways"), "spec.gateways")
    if gateways and gateways != ["mesh"]:
        r.refuse("spec.gateways", "gateways are not translated; only the mesh gateway is")
    for key in ("tcp", "tls"):
        if key in spec:
            r.refuse(
                f"spec.{key}",
                "Consul routes only HTTP (service-router); TCP and TLS routes have no Consul entry",
            )
    hosts = [
        s
        for i, h in enumerate(r.list_(spec.get("hosts"), "spec.hosts"))
        if (s := _host(r, h, f"spec.hosts[{i}]", o)) is not None
    ]
    if not spec.get("hosts"):
        r.fail("spec.hosts", "required")
    http = r.list_(spec.get("http"), "spec.http")
    if not http and "tcp" not in spec and "tls" not in spec:
        r.fail("spec.http", "no HTTP routes")
    for home in dict.fromkeys(hosts):
        vs = _VSOut()
        for i, raw in enumerate(http):
            _http_route(r, raw, f"spec.http[{i}]", home, o, vs)
        if r.problems:
            return
        _service_routes(r, home, vs, out)


def _service_routes(r: _Reader, home: _Service, vs: _VSOut, out: _Out) -> None:
    key = (home.namespace, home.name)
    if key in out.routed:
        r.refuse("spec.hosts", f"service {home.name!r} is also routed by {out.routed[key]}")
        return
    out.routed[key] = r.resource.label
    splits = None
    for where, found in vs.splits:
        if splits is None:
            splits = found
        elif found != splits:
            r.refuse(
                where,
                f"a second weighted split for {home.name!r}: Consul has one service-splitter "
                "per service, so every route that splits it must split it alike",
            )
    if splits is not None:
        for route in vs.routes:
            if route.plain_to == home:
                r.refuse(
                    f"{route.path}.route",
                    f"this route sends to {home.name!r} without a subset, but Consul would pass "
                    f"it through the service-splitter {home.name!r} the weighted route needs",
                )
    if not any(x.catch_all for x in vs.routes):
        r.warnings.append(
            f"{r.resource.label}: requests no route matches get Istio's 404, but Consul's "
            f"implicit last route sends them to {home.name!r}"
            + (" (through its service-splitter)" if splits else "")
        )
    routes = list(vs.routes)
    # Consul appends `PathPrefix /` to the router's own service; an identical last route adds
    # nothing (a split route goes to the same splitter).
    if routes and routes[-1].catch_all and not routes[-1].features:
        last = routes[-1].destination
        if last == {"Service": home.name}:
            routes.pop()
    source = r.resource.label
    out.scopes.append(Scope(ROUTER, home.namespace, home.name, None, home.name, source))
    out.scopes.append(Scope(SPLITTER, home.namespace, home.name, None, home.name, source))
    if routes:
        meta: dict[str, str] = {}
        for n, route in enumerate(routes):
            for feature, value in route.features.items():
                key_ = f"{META_PREFIX}route.{n}.{feature}"
                meta[key_] = value
                r.warnings.append(
                    f"{source}: {feature} of route {n} is carried in service-router "
                    f"{home.name} Meta {key_}={value}: meshlet's proxy honours it, other Consul "
                    "proxies (Envoy) ignore it"
                )
        if len(meta) > META_KEYS_FOR_ROUTES:
            r.refuse(
                "spec.http",
                f"{len(meta)} meshlet.io/route.* Meta keys for {home.name!r}: Consul allows 64 "
                f"Meta keys per entry and apply needs 3, so at most {META_KEYS_FOR_ROUTES}",
            )
            return
        body: dict[str, Any] = {"Kind": ROUTER, "Name": home.name}
        _with_namespace(body, home.namespace)
        if meta:
            body["Meta"] = dict(sorted(meta.items()))
        body["Routes"] = [{"Match": x.match, "Destination": x.destination} for x in routes]
        out.entries.append(body)
    if splits is not None:
        body = {"Kind": SPLITTER, "Name": home.name}
        _with_namespace(body, home.namespace)
        body["Splits"] = splits
        out.entries.append(body)
    for route in vs.routes:
        subset = route.destination.get("ServiceSubset")
        if subset:
            out.subsets_used.append(
                (
                    r.resource.label,
                    route.destination.get("Namespace", home.namespace),
                    route.destination["Service"],
                    subset,
                )
            )
    for split in splits or []:
        if split.get("ServiceSubset"):
            out.subsets_used.append(
                (
                    r.resource.label,
                    split.get("Namespace", home.namespace),
                    split["Service"],
                    split["ServiceSubset"],
                )
            )


# ---- DestinationRule ------------------------------------------------------------------------

_DR_FIELDS = ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector")
_POLICY_FIELDS = (
    "loadBalancer",
    "connectionPool",
    "outlierDetection",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
)
_SIMPLE_LB = {
    "ROUND_ROBIN": "round_robin",
    "LEAST_REQUEST": "least_request",
    "LEAST_CONN": "least_request",
    "RANDOM": "random",
}


def _load_balancer(r: _Reader, raw: Any, path: str) -> dict[str, Any]:
    lb = r.obj(
        raw, path, ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup")
    )
    if not lb:
        return {}
    for key in ("localityLbSetting", "warmupDurationSecs", "warmup"):
        if key in lb:
            r.refuse(f"{path}.{key}", "Consul CE's resolver has no such setting")
    if "simple" in lb and "consistentHash" in lb:
        r.fail(path, "set one of simple, consistentHash")
        return {}
    if "simple" in lb:
        simple = r.str_(lb["simple"], f"{path}.simple")
        if simple == "UNSPECIFIED":
            return {}
        if simple not in _SIMPLE_LB:
            r.refuse(
                f"{path}.simple",
                f"{simple!r}: Consul balances round robin, least request, "
                "random, ring hash or maglev",
            )
            return {}
        return {"Policy": _SIMPLE_LB[simple]}
    if "consistentHash" not in lb:
        return {}
    where = f"{path}.consistentHash"
    ch = r.obj(
        lb["consistentHash"],
        where,
        (
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ),
    )
    if ch is None:
        return {}
    keys = [
        k
        for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
        if k in ch
    ]
    if len(keys) != 1:
        r.fail(
            where,
            "set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
        )
        return {}
    hash_policy: dict[str, Any] = {}
    key = keys[0]
    if key == "httpHeaderName":
        hash_policy = {"Field": "header", "FieldValue": r.str_(ch[key], f"{where}.{key}")}
    elif key == "httpQueryParameterName":
        hash_policy = {"Field": "query_parameter", "FieldValue": r.str_(ch[key], f"{where}.{key}")}
    elif key == "useSourceIp":
        if r.bool_(ch[key], f"{where}.{key}") is not True:
            r.fail(f"{where}.{key}", "must be true when it is the hash key")
        hash_policy = {"SourceIP": True}
    else:
        cw = f"{where}.httpCookie"
        cookie = r.obj(ch[key], cw, ("name", "path", "ttl", "attributes"))
        if cookie is None:
            return {}
        if "attributes" in cookie:
            r.refuse(f"{cw}.attributes", "Consul's CookieConfig has no attributes")
        if "name" not in cookie:
            r.fail(f"{cw}.name", "required")
        hash_policy = {
            "Field": "cookie",
            "FieldValue": r.str_(cookie.get("name", ""), f"{cw}.name"),
        }
        config: dict[str, Any] = {}
        if "ttl" in cookie:
            ns = r.duration(cookie["ttl"], f"{cw}.ttl", minimum_ms=False)
            # Envoy (and so Istio): a zero TTL generates a session cookie.
            if ns == 0:
                config["Session"] = True
            elif ns is not None:
                config["TTL"] = format_duration(ns)
        if "path" in cookie:
            config["Path"] = r.str_(cookie["path"], f"{cw}.path")
        if config:
            hash_policy["CookieConfig"] = config
    out: dict[str, Any] = {"Policy": "ring_hash"}
    if "ringHash" in ch and "maglev" in ch:
        r.fail(where, "set one of ringHash, maglev")
    if "maglev" in ch:
        maglev = r.obj(ch["maglev"], f"{where}.maglev", ("tableSize",))
        if maglev and "tableSize" in maglev:
            r.refuse(f"{where}.maglev.tableSize", "Consul's maglev has no table size")
        out = {"Policy": "maglev"}
    ring = r.obj(ch.get("ringHash"), f"{where}.ringHash", ("minimumRingSize",)) or {}
    size = ring.get("minimumRingSize", ch.get("minimumRingSize"))
    if size is not None and out["Policy"] == "ring_hash":
        n = r.int_(size, f"{where}.ringHash.minimumRingSize", 1, 8_388_608)
        if n is not None:
            out["RingHashConfig"] = {"MinimumRingSize": n}
    out["HashPolicies"] = [hash_policy]
    return out


def _limits(r: _Reader, raw: Any, path: str) -> tuple[dict[str, Any], int | None]:
    """(Consul Limits, connect timeout in ns) of an Istio ConnectionPoolSettings."""
    pool = r.obj(raw, path, ("tcp", "http"))
    if not pool:
        return {}, None
    limits: dict[str, Any] = {}
    timeout = None
    tcp = (
        r.obj(
            pool.get("tcp"),
            f"{path}.tcp",
            (
                "maxConnections",
                "connectTimeout",
                "tcpKeepalive",
                "maxConnectionDuration",
                "idleTimeout",
            ),
        )
        or {}
    )
    for key in ("tcpKeepalive", "maxConnectionDuration", "idleTimeout"):
        if key in tcp:
            r.refuse(f"{path}.tcp.{key}", "Consul has no such upstream limit")
    if tcp.get("maxConnections"):
        limits["MaxConnections"] = r.int_(tcp["maxConnections"], f"{path}.tcp.maxConnections", 0)
    if "connectTimeout" in tcp:
        timeout = r.duration(tcp["connectTimeout"], f"{path}.tcp.connectTimeout")
    http = (
        r.obj(
            pool.get("http"),
            f"{path}.http",
            (
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "idleTimeout",
                "h2UpgradePolicy",
                "useClientProtocol",
                "maxConcurrentStreams",
            ),
        )
        or {}
    )
    if http.get("http1MaxPendingRequests"):
        limits["MaxPendingRequests"] = r.int_(
            http["http1MaxPendingRequests"], f"{path}.http.http1MaxPendingRequests"
        )
    if http.get("http2MaxRequests"):
        limits["MaxConcurrentRequests"] = r.int_(
            http["http2MaxRequests"], f"{path}.http.http2MaxRequests"
        )
    for key, default in (
        ("maxRequestsPerConnection", 0),
        ("maxRetries", 0),
        ("maxConcurrentStreams", 0),
        ("useClientProtocol", False),
        ("h2UpgradePolicy", "DEFAULT"),
    ):
        if key in http and http[key] != default:
            r.refuse(f"{path}.http.{key}", "Consul has no such upstream setting")
    if "idleTimeout" in http:
        r.refuse(
            f"{path}.http.idleTimeout",
            "Consul has no upstream connection idle timeout (the router's IdleTimeout is per "
            "request stream)",
        )
    return {k: v for k, v in limits.items() if v is not None}, timeout


def _passive_health(r: _Reader, raw: Any, path: str) -> dict[str, Any]:
    od = r.obj(
        raw,
        path,
        (
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "consecutiveErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
        ),
    )
    if not od:
        return {}
    out: dict[str, Any] = {}
    for key in (
        "consecutiveGatewayErrors",
        "consecutiveErrors",
        "splitExternalLocalOriginErrors",
        "consecutiveLocalOriginFailures",
    ):
        if key in od:
            r.refuse(f"{path}.{key}", "Consul's PassiveHealthCheck counts consecutive 5xx only")
    if od.get("minHealthPercent"):
        r.refuse(f"{path}.minHealthPercent", "Consul's PassiveHealthCheck has no such setting")
    if "interval" in od:
        ns = r.duration(od["interval"], f"{path}.interval")
        if ns is not None:
            out["Interval"] = format_duration(ns)
    if "consecutive5xxErrors" in od:
        n = r.int_(od["consecutive5xxErrors"], f"{path}.consecutive5xxErrors")
        if n == 0:
            # Istio: 0 turns 5xx ejection off; Envoy's enforcing_consecutive_5xx 0 does that.
            out["EnforcingConsecutive5xx"] = 0
        elif n is not None:
            out["MaxFailures"] = n
    if "baseEjectionTime" in od:
        ns = r.duration(od["baseEjectionTime"], f"{path}.baseEjectionTime")
        if ns is not None:
            out["BaseEjectionTime"] = format_duration(ns)
    if "maxEjectionPercent" in od:
        n = r.int_(od["maxEjectionPercent"], f"{path}.maxEjectionPercent", 0, 100)
        if n is not None:
            out["MaxEjectionPercent"] = n
    return out


def _subset_filter(r: _Reader, labels: Mapping[str, str], path: str) -> str:
    terms = []
    for key, value in sorted(labels.items()):
        if not _META_SELECTOR.fullmatch(key):
            r.refuse(f"{path}.{key}", "not addressable as Service.Meta.<key> in a Consul filter")
        elif '"' in value or "\\" in value:
            r.refuse(f"{path}.{key}", "quotes and backslashes are not carried into the filter")
        else:
            terms.append(f'Service.Meta.{key} == "{value}"')
    return " and ".join(terms)


def _destination_rule(r: _Reader, o: TranslateOptions, out: _Out) -> None:
    spec = r.obj(r.resource.spec, "spec", _DR_FIELDS)
    if spec is None:
        return
    _export_to(r, spec)
    if "workloadSelector" in spec:
        r.refuse("spec.workloadSelector", "Consul's resolver applies to every caller")
    if "host" not in spec:
        r.fail("spec.host", "required")
        return
    host = _host(r, spec["host"], "spec.host", o)
    resolver: dict[str, Any] = {}
    subsets: dict[str, Any] = {}
    for i, raw in enumerate(r.list_(spec.get("subsets"), "spec.subsets")):
        where = f"spec.subsets[{i}]"
        sub = r.obj(raw, where, ("name", "labels", "trafficPolicy"))
        if sub is None:
            continue
        name = r.str_(sub.get("name"), f"{where}.name")
        if name is None:
            continue
        if not _DNS_LABEL.fullmatch(name):
            r.refuse(f"{where}.name", f"{name!r}: Consul subset names are DNS labels")
        if name in subsets:
            r.fail(f"{where}.name", f"duplicate subset {name!r}")
        if "trafficPolicy" in sub:
            r.refuse(
                f"{where}.trafficPolicy",
                "Consul's load balancing and limits are per service, not per subset",
            )
        labels = r.str_map(sub.get("labels"), f"{where}.labels")
        filter_ = _subset_filter(r, labels, f"{where}.labels")
        subsets[name] = {"Filter": filter_} if filter_ else {}
    override: dict[str, Any] = {}
    policy = r.obj(spec.get("trafficPolicy"), "spec.trafficPolicy", _POLICY_FIELDS) or {}
    for key, why in (
        ("portLevelSettings", "a Consul service has one port"),
        ("tunnel", "Consul has no upstream tunnel setting"),
        ("proxyProtocol", "Consul has no PROXY protocol setting for upstreams"),
    ):
        if key in policy:
            r.refuse(f"spec.trafficPolicy.{key}", why)
    if "tls" in policy:
        tls = r.obj(
            policy["tls"],
            "spec.trafficPolicy.tls",
            (
                "mode",
                "clientCertificate",
                "privateKey",
                "caCertificates",
                "credentialName",
                "subjectAltNames",
                "sni",
                "insecureSkipVerify",
                "caCrl",
            ),
        )
        if tls is not None and tls.get("mode") != "ISTIO_MUTUAL":
            r.refuse(
                "spec.trafficPolicy.tls",
                "Consul's mesh always uses its own mTLS "
                "(ISTIO_MUTUAL); other modes have no Consul field",
            )
        elif tls and set(tls) != {"mode"}:
            r.refuse("spec.trafficPolicy.tls", "only mode: ISTIO_MUTUAL is translated")
    lb = _load_balancer(r, policy.get("loadBalancer"), "spec.trafficPolicy.loadBalancer")
    limits, connect_timeout = _limits(
        r, policy.get("connectionPool"), "spec.trafficPolicy.connectionPool"
    )
    passive = _passive_health(
        r, policy.get("outlierDetection"), "spec.trafficPolicy.outlierDetection"
    )
    if limits:
        override["Limits"] = limits
    if passive:
        override["PassiveHealthCheck"] = passive
    if override and not o.callers:
        r.refuse(
            "spec.trafficPolicy." + ("connectionPool" if limits else "outlierDetection"),
            "Consul holds upstream limits and outlier detection per calling service "
            "(service-defaults UpstreamConfig.Overrides of each caller): name the callers with "
            "--callers",
        )
    if host is None or r.problems:
        return
    service_key = (host.namespace, host.name)
    if service_key in out.resolved:
        r.refuse("spec.host", f"service {host.name!r} also has {out.resolved[service_key]}")
        return
    out.resolved[service_key] = r.resource.label
    out.subsets_defined[service_key] = set(subsets)
    if connect_timeout is not None:
        resolver["ConnectTimeout"] = format_duration(connect_timeout)
    if subsets:
        resolver["Subsets"] = dict(sorted(subsets.items()))
    if lb:
        resolver["LoadBalancer"] = lb
    source = r.resource.label
    out.scopes.append(Scope(RESOLVER, host.namespace, host.name, None, host.name, source))
    if resolver:
        body: dict[str, Any] = {"Kind": RESOLVER, "Name": host.name}
        _with_namespace(body, host.namespace)
        out.entries.append({**body, **resolver})
    item = override_item(host.name, host.namespace)
    for caller in o.callers:
        out.scopes.append(
            Scope(SERVICE_DEFAULTS, host.namespace, caller, frozenset({item}), host.name, source)
        )
        if override:
            body = {"Name": host.name}
            _with_namespace(body, host.namespace)
            out.defaults(host.namespace, caller)["UpstreamConfig.Overrides"].append(
                {**body, **override}
            )


def override_item(name: str, namespace: str = "default") -> str:
    """The item name of one UpstreamConfig.Overrides element (traffic.istio_apply)."""
    return f"UpstreamConfig.Overrides[{name if namespace == 'default' else namespace + '/' + name}]"


# ---- PeerAuthentication ---------------------------------------------------------------------

_MTLS_MODES = {"STRICT": "strict", "PERMISSIVE": "permissive", "UNSET": ""}


def _peer_authentication(r: _Reader, o: TranslateOptions, out: _Out) -> None:
    spec = r.obj(r.resource.spec, "spec", ("selector", "mtls", "portLevelMtls"))
    if spec is None:
        return
    if spec.get("portLevelMtls"):
        r.refuse("spec.portLevelMtls", "Consul's MutualTLSMode is per service, not per port")
    mtls = r.obj(spec.get("mtls"), "spec.mtls", ("mode",)) or {}
    mode_text = r.str_(mtls.get("mode", "UNSET"), "spec.mtls.mode")
    if mode_text == "DISABLE":
        r.refuse(
            "spec.mtls.mode",
            "DISABLE: Consul's mesh has no plaintext-only mode (permissive accepts both)",
        )
        return
    if mode_text not in _MTLS_MODES:
        if mode_text is not None:
            r.fail("spec.mtls.mode", f"{mode_text!r}: expected STRICT, PERMISSIVE or UNSET")
        return
    mode = _MTLS_MODES[mode_text]
    selector = r.obj(spec.get("selector"), "spec.selector", ("matchLabels",))
    labels = r.str_map((selector or {}).get("matchLabels"), "spec.selector.matchLabels")
    source = r.resource.label
    if labels:
        if set(labels) != {o.service_label}:
            r.refuse(
                "spec.selector.matchLabels",
                f"Consul's MutualTLSMode is per service: select with {o.service_label} only",
            )
            return
        name = labels[o.service_label]
        if not _DNS_LABEL.fullmatch(name):
            r.refuse("spec.selector.matchLabels", f"{name!r} is not a Consul service name")
            return
        if name.endswith("-sidecar-proxy") or name == "consul":
            r.refuse(
                "spec.selector.matchLabels",
                f"{name!r} is a sidecar proxy or Consul itself: select the service",
            )
            return
        namespace = _consul_namespace(r, r.resource.namespace, "metadata.namespace", o)
        if namespace is None:
            return
        kind, entry_ns, entry_name, subject = SERVICE_DEFAULTS, namespace, name, name
    elif r.resource.namespace in (o.root_namespace, o.single_namespace):
        kind, entry_ns, entry_name, subject = PROXY_DEFAULTS, "default", "global", "*"
    else:
        r.refuse(
            "spec.selector",
            f"a namespace-wide policy for {r.resource.namespace!r} has no Consul entry "
            "(MutualTLSMode is per service or mesh-wide): add selector.matchLabels."
            f"{o.service_label}, or pass --single-namespace {r.resource.namespace} if Consul's "
            "one namespace stands for it",
        )
        return
    key = (kind, entry_ns, entry_name)
    if key in out.mtls:
        r.refuse("spec", f"{out.mtls[key]} already sets MutualTLSMode of {kind} {entry_name}")
        return
    out.mtls[key] = source
    out.scopes.append(
        Scope(kind, entry_ns, entry_name, frozenset({"MutualTLSMode"}), subject, source)
    )
    if mode:
        if kind == PROXY_DEFAULTS:
            out.proxy_mode = mode
        else:
            out.defaults(entry_ns, entry_name)["MutualTLSMode"] = mode


# ---- all together ---------------------------------------------------------------------------


@dataclass
class _Out:
    entries: list[dict[str, Any]] = field(default_factory=list)
    scopes: list[Scope] = field(default_factory=list)
    routed: dict[tuple[str, str], str] = field(default_factory=dict)
    resolved: dict[tuple[str, str], str] = field(default_factory=dict)
    subsets_defined: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    subsets_used: list[tuple[str, str, str, str]] = field(default_factory=list)
    mtls: dict[tuple[str, str, str], str] = field(default_factory=dict)
    service_defaults: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    proxy_mode: str = ""

    def defaults(self, namespace: str, name: str) -> dict[str, Any]:
        return self.service_defaults.setdefault(
            (namespace, name), {"MutualTLSMode": "", "UpstreamConfig.Overrides": []}
        )


_HANDLERS = {
    "VirtualService": _virtual_service,
    "DestinationRule": _destination_rule,
    "PeerAuthentication": _peer_authentication,
}


def translate(
    resources: Iterable[Resource], options: TranslateOptions = TranslateOptions()
) -> Translation:
    """The Consul entries for `resources`, in write order. Raises RoutesError (all problems)."""
    o = options
    out = _Out()
    problems: list[str] = []
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for c in o.callers:
        if not _DNS_LABEL.fullmatch(c):
            problems.append(f"--callers: {c!r} is not a Consul service name")
    for res in resources:
        if res.label in seen:
            problems.append(f"{res.label}: defined twice ({seen[res.label]} and {res.origin})")
            continue
        seen[res.label] = res.origin
        r = _Reader(res, o.strict)
        _HANDLERS[res.kind](r, o, out)
        problems.extend(r.problems)
        warnings.extend(r.warnings)
    for label, ns, service, subset in out.subsets_used:
        defined = out.subsets_defined.get((ns, service))
        if defined is None:
            warnings.append(
                f"{label}: subset {subset!r} of {service!r}: no DestinationRule in the input "
                f"defines it; Consul refuses the entry unless service-resolver {service} does"
            )
        elif subset not in defined:
            problems.append(
                f"{label}: subset {subset!r} of {service!r} is not defined by "
                f"{out.resolved[(ns, service)]}"
            )
    if problems:
        raise RoutesError(dict.fromkeys(problems))
    for (ns, name), fields in out.service_defaults.items():
        body: dict[str, Any] = {"Kind": SERVICE_DEFAULTS, "Name": name}
        _with_namespace(body, ns)
        if fields["MutualTLSMode"]:
            body["MutualTLSMode"] = fields["MutualTLSMode"]
        overrides = sorted(
            fields["UpstreamConfig.Overrides"], key=lambda x: (x.get("Namespace", ""), x["Name"])
        )
        if overrides:
            body["UpstreamConfig"] = {"Overrides": overrides}
        if len(body) > 2:
            out.entries.append(body)
    if out.proxy_mode:
        out.entries.append(
            {"Kind": PROXY_DEFAULTS, "Name": "global", "MutualTLSMode": out.proxy_mode}
        )
    entries = sorted(out.entries, key=lambda e: (WRITE_ORDER.index(e["Kind"]), *entry_key(e)[1:]))
    scopes = sorted(
        out.scopes, key=lambda s: (WRITE_ORDER.index(s.kind), s.namespace, s.name, s.source)
    )
    return Translation(tuple(entries), tuple(scopes), tuple(dict.fromkeys(warnings)))


def translate_texts(
    texts: Iterable[tuple[str, str]], options: TranslateOptions = TranslateOptions()
) -> Translation:
    """`translate` of (origin, YAML text) pairs; problems of every file are reported together."""
    resources: list[Resource] = []
    problems: list[str] = []
    for origin, text in texts:
        try:
            resources.extend(load_resources(text, origin))
        except RoutesError as err:
            problems.extend(err.problems)
    if problems:
        raise RoutesError(problems)
    return translate(resources, options)
