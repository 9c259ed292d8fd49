"""What `meshlet routes apply` writes, decided without I/O.

`plan_apply(translation, current, facts, options)` compares what a translation wants with the
entries Consul holds and answers which to create, update or delete, with CAS indexes. The rules
that keep it safe on a live mesh (the same as `meshlet intentions apply`):

- Only what the input is the authority for is touched: the `Scope`s of the translation. A
  VirtualService owns its host's service-router and service-splitter, a DestinationRule its
  host's service-resolver and, in each `--callers` service-defaults, the one
  `UpstreamConfig.Overrides` element for that host; a PeerAuthentication owns one
  `MutualTLSMode`. Nothing else in those entries (a service-defaults `Protocol`, another
  override) is read as a change, and no other entry is written.
- An entry is split into items: its top-level fields, with service-defaults'
  `UpstreamConfig.Defaults` and each `UpstreamConfig.Overrides[<name>]` as items of their own.
  What meshlet wrote is listed in the entry's Meta `meshlet.io/managed-fields`. An item in
  scope that meshlet did not write is kept, with a warning, unless `prune`; one the input
  defines differently is refused without `prune` (identical ones are adopted).
- A managed item the input no longer defines is removed; an entry left with no item is deleted
  (so a VirtualService that stops splitting also stops the splitter).
- Routers and splitters need an HTTP protocol (Consul refuses them otherwise), and
  `MutualTLSMode = "permissive"` needs the mesh entry's `AllowEnablingPermissiveMutualTLS`:
  both are checked here, from what the CLI read, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from traffic.from_istio import (
    PROXY_DEFAULTS,
    RESOLVER,
    ROUTER,
    SERVICE_DEFAULTS,
    SPLITTER,
    WRITE_ORDER,
    Scope,
    Translation,
    entry_key,
    format_duration,
    override_item,
    parse_duration,
)
from traffic.route_meta import META_PREFIX

MANAGED_KEY = "meshlet.io/managed"
FIELDS_KEY = "meshlet.io/managed-fields"
SOURCES_KEY = "meshlet.io/sources"
_HEAD = ("Kind", "Name", "Namespace", "Partition")
_SERVER_FIELDS = ("CreateIndex", "ModifyIndex", "Hash")
_META_VALUE_MAX = 512
HTTP_PROTOCOLS = ("http", "http2", "grpc")
# Consul returns durations of some kinds as nanoseconds, and takes them as strings.
_DURATION_KEYS = frozenset(
    {"RequestTimeout", "IdleTimeout", "ConnectTimeout", "Interval", "BaseEjectionTime", "TTL"}
)

Key = tuple[str, str, str]
"""(kind, namespace, name)"""


class PlanRefused(Exception):
    """Apply would do something it needs a flag for, or cannot do; nothing is written."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Facts:
    """What the CLI read from Consul besides the entries in scope."""

    protocols: Mapping[str, str] = field(default_factory=dict)
    """service -> service-defaults Protocol (services without one are absent)."""
    mesh_protocol: str = ""
    """proxy-defaults Config.protocol."""
    permissive_allowed: bool | None = None
    """The mesh entry's AllowEnablingPermissiveMutualTLS; None when it was not read."""

    def protocol(self, service: str) -> tuple[str, str]:
        if self.protocols.get(service):
            return self.protocols[service], "service-defaults"
        if self.mesh_protocol:
            return self.mesh_protocol, "proxy-defaults"
        return "tcp", "no service-defaults or proxy-defaults protocol"


@dataclass(frozen=True, slots=True)
class ApplyOptions:
    services: frozenset[str] | None = None
    """`--services`: apply only what belongs to these services; None for everything."""
    prune: bool = False


ItemStatus = Literal["add", "change", "same", "remove", "adopt", "keep", "prune"]


@dataclass(frozen=True, slots=True)
class ItemChange:
    status: ItemStatus
    item: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class EntryChange:
    kind: str
    namespace: str
    name: str
    action: Literal["create", "update", "delete", "unchanged"]
    cas: int
    """`?cas=`: 0 creates only if absent, else the ModifyIndex read."""
    body: Mapping[str, Any]
    """What to write (for delete: the entry as read)."""
    items: tuple[ItemChange, ...]
    meta_before: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        where = self.name if self.namespace == "default" else f"{self.namespace}/{self.name}"
        return f"{self.kind}/{where}"


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    changes: tuple[EntryChange, ...]
    """Writes in Consul's graph order (defaults, resolvers, splitters, routers), then deletes
    in the reverse order."""
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


# ---- items ----------------------------------------------------------------------------------


def entry_items(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """An entry's items: what apply owns, keeps or replaces one at a time."""
    items: dict[str, Any] = {}
    for key, value in body.items():
        if key in _HEAD or key in _SERVER_FIELDS or key == "Meta" or _empty(value):
            continue
        if kind == SERVICE_DEFAULTS and key == "UpstreamConfig" and isinstance(value, Mapping):
            for sub, inner in value.items():
                if sub == "Overrides" and isinstance(inner, list):
                    for override in inner:
                        if isinstance(override, Mapping):
                            name = str(override.get("Name", ""))
                            ns = str(override.get("Namespace") or "default")
                            items[override_item(name, ns)] = dict(override)
                elif not _empty(inner):
                    items[f"UpstreamConfig.{sub}"] = inner
            continue
        items[key] = value
    return items


def _assemble(
    head: Mapping[str, Any], items: Mapping[str, Any], meta: Mapping[str, str]
) -> dict[str, Any]:
    body: dict[str, Any] = {k: head[k] for k in _HEAD if head.get(k)}
    upstream: dict[str, Any] = {}
    overrides: list[tuple[str, Any]] = []
    for item, value in items.items():
        if item.startswith("UpstreamConfig.Overrides["):
            overrides.append((item, value))
        elif item.startswith("UpstreamConfig."):
            upstream[item.removeprefix("UpstreamConfig.")] = value
        else:
            body[item] = value
    if overrides:
        upstream["Overrides"] = [v for _, v in sorted(overrides)]
    if upstream:
        body["UpstreamConfig"] = upstream
    if meta:
        body["Meta"] = dict(sorted(meta.items()))
    return body


def _empty(value: Any) -> bool:
    return value is None or value in ("", [], {})


def canonical(value: Any, key: str = "") -> Any:
    """A value as compared: durations in nanoseconds, empty fields and zero values dropped
    (Consul returns the zero values of fields the writer left out)."""
    if key in _DURATION_KEYS:
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError:
                return value
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in sorted(value.items()):
            c = canonical(v, k)
            if k in _SERVER_FIELDS or _empty(c):
                continue
            if c in (0, False) and k != "EnforcingConsecutive5xx":
                continue
            out[k] = c
        return out
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def _same(a: Any, b: Any, key: str = "") -> bool:
    return bool(canonical(a, key) == canonical(b, key))


# ---- planning -------------------------------------------------------------------------------


def plan_apply(
    translation: Translation,
    current: Mapping[Key, Mapping[str, Any]],
    facts: Facts = Facts(),
    options: ApplyOptions = ApplyOptions(),
) -> ApplyPlan:
    """The writes and deletes. `current`: every entry in scope that Consul holds, as read.
    Raises PlanRefused."""
    o = options
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []

    scopes: dict[Key, list[Scope]] = {}
    for scope in translation.scopes:
        if o.services is not None and scope.subject not in o.services:
            notes.append(
                f"{scope.kind}/{scope.name}: left alone: {scope.source} is about "
                f"{scope.subject!r}, not in --services"
            )
            continue
        scopes.setdefault((scope.kind, scope.namespace, scope.name), []).append(scope)
    if o.services is not None:
        subjects = {s.subject for s in translation.scopes}
        for name in sorted(o.services - subjects):
            notes.append(f"--services lists {name!r}, which the input does not name")
    desired = {entry_key(e): e for e in translation.entries}

    for (kind, _ns, name), body in desired.items():
        if kind in (ROUTER, SPLITTER) and (kind, _ns, name) in scopes:
            services = {name} | _destinations(body)
            for service in sorted(services):
                protocol, source = facts.protocol(service)
                if protocol not in HTTP_PROTOCOLS:
                    problems.append(
                        f"{kind}/{name}: {service!r} has protocol {protocol} ({source}); Consul "
                        f"refuses routers and splitters unless it is HTTP: set service-defaults "
                        f'{service} Protocol = "http" first'
                    )
        permissive = body.get("MutualTLSMode") == "permissive"
        if permissive and (kind, _ns, name) in scopes and facts.permissive_allowed is not True:
            problems.append(
                f"{kind}/{name}: MutualTLSMode permissive: Consul refuses it unless the mesh "
                "config entry sets AllowEnablingPermissiveMutualTLS = true"
                + (" (the mesh entry was not read)" if facts.permissive_allowed is None else "")
            )

    changes: list[EntryChange] = []
    for key in sorted(scopes, key=lambda k: (WRITE_ORDER.index(k[0]), k[1], k[2])):
        change = _merge(
            key, scopes[key], current.get(key), desired.get(key), o.prune, problems, warnings
        )
        if change is not None:
            changes.append(change)
    if problems:
        raise PlanRefused(dict.fromkeys(problems))
    writes = [c for c in changes if c.action != "delete"]
    deletes = [c for c in changes if c.action == "delete"]
    deletes.sort(key=lambda c: -WRITE_ORDER.index(c.kind))
    return ApplyPlan(
        tuple(writes + deletes), tuple(dict.fromkeys(warnings)), tuple(dict.fromkeys(notes))
    )


def _destinations(body: Mapping[str, Any]) -> set[str]:
    found = set()
    for route in body.get("Routes") or []:
        service = (route.get("Destination") or {}).get("Service")
        if service:
            found.add(service)
    for split in body.get("Splits") or []:
        if split.get("Service"):
            found.add(split["Service"])
    return found


def _managed(old: Mapping[str, Any] | None) -> set[str]:
    meta = (old or {}).get("Meta") or {}
    if meta.get(MANAGED_KEY) != "true":
        return set()
    return {f for f in str(meta.get(FIELDS_KEY, "")).split(",") if f}


def _merge(  # noqa: PLR0917
    key: Key,
    scopes: list[Scope],
    old: Mapping[str, Any] | None,
    desired: Mapping[str, Any] | None,
    prune: bool,
    problems: list[str],
    warnings: list[str],
) -> EntryChange | None:
    kind, namespace, name = key
    label = f"{kind}/{name}" if namespace == "default" else f"{kind}/{namespace}/{name}"
    whole = any(s.items is None for s in scopes)
    scope_items = set().union(*(s.items or set() for s in scopes))

    def in_scope(item: str) -> bool:
        return whole or item in scope_items

    old_items = entry_items(kind, old) if old is not None else {}
    new_items = entry_items(kind, desired) if desired is not None else {}
    managed = _managed(old)
    result: dict[str, Any] = {}
    changes: list[ItemChange] = []
    for item in sorted(old_items.keys() | new_items.keys(), key=lambda i: _item_order(kind, i)):
        before, after = old_items.get(item), new_items.get(item)
        if not in_scope(item):
            if before is not None:
                result[item] = before
            continue
        mine = item in managed
        if after is not None:
            if before is None:
                changes.append(ItemChange("add", item, None, after))
            elif mine:
                status: ItemStatus = "same" if _same(before, after, item) else "change"
                changes.append(ItemChange(status, item, before, after))
            elif _same(before, after, item):
                changes.append(ItemChange("adopt", item, before, after))
            elif prune:
                changes.append(ItemChange("change", item, before, after))
            else:
                problems.append(
                    f"{label}: {item} was not written by meshlet and the input defines it "
                    "differently; rerun with --prune to replace it"
                )
            result[item] = after
        elif before is not None:
            if mine:
                changes.append(ItemChange("remove", item, before, None))
            elif prune:
                changes.append(ItemChange("prune", item, before, None))
            else:
                changes.append(ItemChange("keep", item, before, before))
                warnings.append(
                    f"{label}: {item} was not written by meshlet: kept; --prune removes it"
                )
                result[item] = before
    if old is None and not new_items:
        return None
    new_managed = (managed - {i for i in managed if in_scope(i)}) | set(new_items)
    new_managed &= set(result)
    old_meta = dict((old or {}).get("Meta") or {})
    meta = {k: v for k, v in old_meta.items() if not k.startswith(META_PREFIX)}
    if not whole or "Routes" not in new_items:
        # meshlet.io/ keys this apply does not rewrite stay: another source's in a shared entry
        # (a service-defaults), or the route keys of a router whose Routes are kept.
        meta.update(
            {
                k: v
                for k, v in old_meta.items()
                if k.startswith(META_PREFIX) and k not in (MANAGED_KEY, FIELDS_KEY, SOURCES_KEY)
            }
        )
    meta.update({k: v for k, v in ((desired or {}).get("Meta") or {}).items()})
    if new_managed:
        sources = {s.source for s in scopes}
        if new_managed - set(new_items):
            sources |= {s for s in str(old_meta.get(SOURCES_KEY, "")).split(",") if s}
        meta[MANAGED_KEY] = "true"
        meta[FIELDS_KEY] = _clip(",".join(sorted(new_managed)))
        meta[SOURCES_KEY] = _clip(",".join(sorted(sources)))
    head = {"Kind": kind, "Name": name, "Namespace": "" if namespace == "default" else namespace}
    body = _assemble(head, result, meta)
    if old is None:
        return EntryChange(kind, namespace, name, "create", 0, body, tuple(changes))
    index = int(old.get("ModifyIndex") or 0)
    if not result:
        return EntryChange(kind, namespace, name, "delete", index, old, tuple(changes), old_meta)
    same = _same(_assemble(head, old_items, old_meta), body)
    action: Literal["update", "unchanged"] = "unchanged" if same else "update"
    return EntryChange(kind, namespace, name, action, index, body, tuple(changes), old_meta)


def _item_order(kind: str, item: str) -> tuple[int, str]:
    order = {
        ROUTER: ("Routes",),
        SPLITTER: ("Splits",),
        RESOLVER: ("ConnectTimeout", "Subsets", "LoadBalancer"),
        SERVICE_DEFAULTS: ("MutualTLSMode",),
        PROXY_DEFAULTS: ("MutualTLSMode",),
    }[kind]
    return (order.index(item) if item in order else len(order), item)


def _clip(text: str) -> str:
    return text if len(text) <= _META_VALUE_MAX else text[: _META_VALUE_MAX - 3] + "..."


# ---- the diff apply prints ------------------------------------------------------------------


def _show(item: str, value: Any) -> str:
    if item in _DURATION_KEYS and isinstance(value, int):
        value = format_duration(value)
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=False)
    return f"{item}: {text}"


def format_change(change: EntryChange) -> list[str]:
    lines = [f"{change.label}: {change.action}"]
    for ic in change.items:
        if ic.status == "add":
            lines.append(f"  + {_show(ic.item, ic.new)}")
        elif ic.status == "remove":
            lines.append(f"  - {_show(ic.item, ic.old)}")
        elif ic.status == "prune":
            lines.append(f"  - {_show(ic.item, ic.old)}  (not written by meshlet; --prune)")
        elif ic.status == "change":
            lines.append(f"  - {_show(ic.item, ic.old)}")
            lines.append(f"  + {_show(ic.item, ic.new)}")
        elif ic.status == "keep":
            lines.append(f"  ! {ic.item}  (not written by meshlet: kept; --prune removes it)")
        elif ic.status == "adopt":
            lines.append(f"  = {ic.item}  (not written by meshlet, identical: marked as meshlet's)")
        else:
            lines.append(f"  = {ic.item}")
    if change.action in ("update", "create"):
        before = dict(change.meta_before)
        after = dict(change.body.get("Meta") or {})
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                lines.append(f"  - Meta {key}: {before[key]}")
            elif key not in before:
                lines.append(f"  + Meta {key}: {after[key]}")
            elif before[key] != after[key]:
                lines.append(f"  ~ Meta {key}: {before[key]} -> {after[key]}")
    return lines


def format_plan(plan: ApplyPlan) -> str:
    lines: list[str] = []
    for change in plan.changes:
        if change.action != "unchanged":
            lines += format_change(change)
    unchanged = [c.label for c in plan.changes if c.action == "unchanged"]
    if unchanged:
        lines.append(f"unchanged: {', '.join(unchanged)}")
    if not plan.changes:
        lines.append("nothing to write")
    lines += plan.notes
    return "".join(line + "\n" for line in lines)
