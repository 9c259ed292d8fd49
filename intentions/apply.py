"""What `meshlet intentions apply` writes, decided without I/O.

`plan_apply(policies, catalog, protocols, current, options)` answers which entries change and
how, from what the CLI read from Consul. The rules that make apply safe to run against a live
mesh:

- Only services that an enforced policy selects are touched. Selectors are resolved against
  the catalog's typical services; proxies (`connect-proxy`, `*-sidecar-proxy`), gateways and
  `consul` itself are never planned, and a selector that names one is refused. A service no
  enforced policy selects keeps its entry as it is: the translator's "no policy, so Istio's
  allow-all" entry would otherwise widen a service the policy file never mentions.
- Sources meshlet wrote carry `MANAGED_DESCRIPTION` (Consul has no per-source Meta: sources
  only have `Description`, and `LegacyMeta` must be omitted on writes); entries carry
  `MANAGED_KEY`/`POLICIES_KEY` in their Meta. Meshlet replaces and removes its own sources;
  any other source is kept, with a warning naming it, unless `prune` is set. A source the
  policies define that is already there, hand-written and different, cannot be kept beside
  the policy's (one source per identity), so it is refused without `prune`.
- An ALLOW rule the translator would ignore because the service is not HTTP is refused unless
  `allow_drop` is set: it leaves the service denying what its author meant to allow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from intentions.entries import (
    WILDCARD,
    HeaderMatch,
    Permission,
    ServiceIntentions,
    SourceIntention,
    decode_entry,
    entry_to_json,
    normalize,
    source_display,
    source_key,
    validate,
)
from intentions.errors import IntentionsError, InvalidEntry
from intentions.policy import AuthorizationPolicy
from intentions.translate import ServiceRef, TranslateOptions, translate

MANAGED_KEY = "meshlet.io/managed"
POLICIES_KEY = "meshlet.io/policies"
MANAGED_PREFIX = "meshlet-managed"
MANAGED_DESCRIPTION = (
    f"{MANAGED_PREFIX}: written by `meshlet intentions apply` from AuthorizationPolicy "
    "(see the entry's Meta); edits are replaced by the next apply"
)
_META_VALUE_MAX = 512
PROXY_SUFFIX = "-sidecar-proxy"


class PlanRefused(IntentionsError):
    """Apply would do something it needs a flag for, or cannot do; nothing is written."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class CatalogService:
    name: str
    kind: str = ""
    """Consul's ServiceKind: "" for a typical service, else connect-proxy, mesh-gateway, ..."""

    @property
    def protectable(self) -> bool:
        """Whether a policy may select it: a typical service, not a proxy or Consul itself."""
        return is_protectable(self.name) and not self.kind


def is_protectable(name: str) -> bool:
    # The name test also catches a proxy registered as a typical service.
    return not name.endswith(PROXY_SUFFIX) and name != "consul"


@dataclass(frozen=True, slots=True)
class Protocols:
    """The protocols Consul holds: service-defaults `Protocol`, proxy-defaults `protocol`."""

    services: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    mesh_default: str = ""

    def of(self, name: str) -> tuple[str, str]:
        """(protocol, where it comes from), with Consul's own fallback to tcp."""
        if self.services.get(name):
            return self.services[name], "service-defaults"
        if self.mesh_default:
            return self.mesh_default, "proxy-defaults"
        return "tcp", "no service-defaults or proxy-defaults protocol"


@dataclass(frozen=True, slots=True)
class ApplyOptions:
    translate: TranslateOptions = field(default_factory=TranslateOptions)
    namespace: str = "default"
    """The Istio namespace the catalog's services are in."""
    only: Mapping[tuple[str, str], str] | None = None
    """`--services`: (namespace, name) -> protocol ("" to ask Consul); None for no filter."""
    prune: bool = False
    allow_drop: bool = False


SourceStatus = Literal["add", "change", "same", "remove", "adopt", "keep", "prune"]


@dataclass(frozen=True, slots=True)
class SourceChange:
    status: SourceStatus
    old: SourceIntention | None
    new: SourceIntention | None

    @property
    def label(self) -> str:
        return source_display(_shown(self))


@dataclass(frozen=True, slots=True)
class EntryChange:
    namespace: str
    name: str
    action: Literal["create", "update", "unchanged"]
    cas: int
    """`?cas=` for the write: 0 creates only if absent, else the ModifyIndex read."""
    entry: ServiceIntentions
    sources: tuple[SourceChange, ...]
    meta_before: tuple[tuple[str, str], ...] = ()
    jwt_removed: bool = False

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def body(self) -> dict[str, Any]:
        return entry_to_json(self.entry, for_write=True)


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    changes: tuple[EntryChange, ...]
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    """Services asked about and left alone, and why."""


def plan_apply(
    policies: Sequence[AuthorizationPolicy],
    catalog: Iterable[CatalogService],
    protocols: Protocols,
    current: Iterable[ServiceIntentions],
    options: ApplyOptions = ApplyOptions(),
) -> ApplyPlan:
    """The entries to write. Raises PolicyError (translation) or PlanRefused."""
    o = options
    label = o.translate.service_label
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []

    known: dict[str, CatalogService] = {}
    for svc in catalog:
        # A name with any proxy or gateway instance is not a service a policy may select.
        if svc.name not in known or known[svc.name].protectable:
            known[svc.name] = svc

    def refuse_target(name: str, why: str) -> bool:
        svc = known.get(name)
        if (svc is not None and not svc.protectable) or not is_protectable(name):
            what = f"a {svc.kind}" if svc is not None and svc.kind else "a proxy or Consul itself"
            problems.append(
                f"{why} {name!r}, which is {what}: sidecar intentions protect the service "
                "behind a proxy, so select the service (app: <service>) instead"
            )
            return True
        return False

    def protocol(namespace: str, name: str) -> tuple[str, str]:
        given = (o.only or {}).get((namespace, name), "")
        return (given, "--services") if given else protocols.of(name)

    def consul_key(namespace: str, name: str) -> tuple[str, str]:
        return ("default" if o.translate.single_namespace is not None else namespace, name)

    inventory: dict[tuple[str, str], ServiceRef] = {}
    protocol_of: dict[tuple[str, str], tuple[str, str]] = {}

    def add(namespace: str, name: str) -> None:
        if (namespace, name) not in inventory:
            protocol_of[consul_key(namespace, name)] = found = protocol(namespace, name)
            inventory[(namespace, name)] = ServiceRef(name, namespace, found[0])

    for svc in known.values():
        if svc.protectable:
            add(o.namespace, svc.name)
    for policy in policies:
        app = dict(policy.match_labels or ()).get(label)
        if app is None or refuse_target(app, f"{policy.label}: spec.selector selects"):
            continue
        namespace = o.namespace if policy.namespace == o.translate.root_namespace else None
        add(namespace or policy.namespace, app)
        if app not in known:
            notes.append(f"{policy.ref} selects {app!r}, which is not in the catalog (yet)")
    for namespace, name in o.only or {}:
        if not refuse_target(name, "--services lists"):
            add(namespace, name)
    if problems:
        raise PlanRefused(problems)

    translation = translate(policies, inventory.values(), o.translate)
    listed = None if o.only is None else {consul_key(*k) for k in o.only}
    planned: list[ServiceIntentions] = []
    for entry in translation.entries:
        key = (entry.namespace_or_default, entry.name)
        refs = translation.applied.get(key, ())
        if not refs:
            if listed is not None and key in listed:
                notes.append(f"{key[0]}/{key[1]}: left alone: no enforced policy selects it")
            continue
        if listed is not None and key not in listed:
            notes.append(
                f"{key[0]}/{key[1]}: left alone: selected by {', '.join(refs)} but not in "
                "--services"
            )
            continue
        for drop in translation.dropped.get(key, ()):
            proto, source = protocol_of[key]
            text = f"{drop} (protocol {proto}: {source})"
            if o.allow_drop:
                warnings.append(text)
            else:
                problems.append(
                    f"{text}; what it allows would be denied. Set the service's protocol "
                    "(service-defaults Protocol = http), or pass --allow-drop to apply Istio's "
                    "TCP semantics"
                )
        if any(src.name == WILDCARD and src.action == "allow" for src in entry.sources):
            # Istio's meaning, but a surprise on a default-deny Consul: say it before writing.
            warnings.append(
                f"{key[0]}/{key[1]}: no ALLOW policy selects it, so callers the policies do not "
                "deny are allowed (Istio's default), whatever Consul's default intention policy"
            )
        planned.append(_marked(entry, refs))
    # Drops were reported above with where the protocol came from; warnings about services
    # left alone would only be noise.
    drops = {d for found in translation.dropped.values() for d in found}
    planned_keys = {(e.namespace_or_default, e.name) for e in planned}
    left_alone = {
        f"service {ns}/{name}" for ns, name in inventory if consul_key(ns, name) not in planned_keys
    }
    warnings.extend(
        str(w) for w in translation.warnings if w not in drops and w.document not in left_alone
    )

    held = {(e.namespace_or_default, e.name): e for e in current}
    changes: list[EntryChange] = []
    for entry in planned:
        key = (entry.namespace_or_default, entry.name)
        changes.append(_merge(held.get(key), entry, o.prune, problems, warnings))
    if problems:
        raise PlanRefused(problems)
    return ApplyPlan(tuple(changes), tuple(dict.fromkeys(warnings)), tuple(dict.fromkeys(notes)))


def held_entry(body: object) -> ServiceIntentions:
    """An entry as Consul returns it: decoded and normalized, not held to the write-side rules
    (Consul returns the Legacy* fields of intentions made through the legacy API, which it
    refuses on writes). Raises EntryDecodeError."""
    return normalize(decode_entry(body))


def _clip(text: str, limit: int = _META_VALUE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _marked(entry: ServiceIntentions, refs: Sequence[str]) -> ServiceIntentions:
    meta = ((MANAGED_KEY, "true"), (POLICIES_KEY, _clip(",".join(refs))))
    sources = tuple(dataclasses.replace(s, description=MANAGED_DESCRIPTION) for s in entry.sources)
    return dataclasses.replace(entry, meta=meta, sources=sources)


def is_managed(src: SourceIntention) -> bool:
    return src.description.startswith(MANAGED_PREFIX)


def _content(src: SourceIntention) -> tuple[Any, ...]:
    """What decides access: a hand-written source equal in this is adopted, not replaced."""
    return (source_key(src), src.action, src.permissions)


def _writable(src: SourceIntention) -> SourceIntention:
    # Consul refuses Legacy* fields on config-entry writes; it clears them itself.
    return dataclasses.replace(
        src,
        legacy_id="",
        legacy_meta=(),
        legacy_create_time=None,
        legacy_update_time=None,
    )


def _merge(
    old: ServiceIntentions | None,
    desired: ServiceIntentions,
    prune: bool,
    problems: list[str],
    warnings: list[str],
) -> EntryChange:
    where = f"{desired.namespace_or_default}/{desired.name}"
    if old is None:
        return EntryChange(
            desired.namespace_or_default,
            desired.name,
            "create",
            0,
            desired,
            tuple(SourceChange("add", None, s) for s in desired.sources),
        )
    wanted = {source_key(s): s for s in desired.sources}
    seen: set[tuple[str, str, str, str, str]] = set()
    changes: list[SourceChange] = []
    kept: list[SourceIntention] = []
    for src in old.sources:
        key = source_key(src)
        new = wanted.get(key)
        if new is not None:
            seen.add(key)
        if is_managed(src):
            if new is None:
                changes.append(SourceChange("remove", src, None))
            elif _content(src) == _content(new) and src.description == new.description:
                changes.append(SourceChange("same", src, new))
            else:
                changes.append(SourceChange("change", src, new))
        elif new is not None:
            if _content(src) == _content(new):
                changes.append(SourceChange("adopt", src, new))
            elif prune:
                changes.append(SourceChange("change", src, new))
            else:
                problems.append(
                    f"{where}: source {source_display(src)} was not written by meshlet and the "
                    "policies define it differently; rerun with --prune to replace it"
                )
        elif prune:
            changes.append(SourceChange("prune", src, None))
        else:
            kept.append(_writable(src))
            changes.append(SourceChange("keep", src, src))
            warnings.append(
                f"{where}: source {source_display(src)} was not written by meshlet: kept, and it "
                "decides for the callers it names instead of the policies; --prune removes it"
            )
    changes.extend(SourceChange("add", None, s) for k, s in wanted.items() if k not in seen)
    jwt_removed = old.jwt is not None
    if jwt_removed and not prune:
        problems.append(
            f"{where}: the entry has a JWT requirement meshlet did not write; rerun with --prune "
            "to remove it"
        )
    # Meta keys of others are kept; meshlet's are rewritten.
    others = tuple((k, v) for k, v in old.meta if not k.startswith("meshlet.io/"))
    entry = normalize(
        dataclasses.replace(
            desired,
            meta=others + desired.meta,
            sources=desired.sources + tuple(kept),
        )
    )
    try:
        validate(entry)
    except InvalidEntry as err:  # e.g. a kept source Consul itself would now refuse
        problems.append(f"{where}: the merged entry is not valid: {err}")
    before = dataclasses.replace(old, sources=tuple(_writable(s) for s in old.sources))
    same = _canonical(entry) == _canonical(before)
    changes.sort(key=lambda c: (-_shown(c).precedence, c.label))
    return EntryChange(
        desired.namespace_or_default,
        desired.name,
        "unchanged" if same else "update",
        old.modify_index,
        entry,
        tuple(changes),
        old.meta,
        jwt_removed,
    )


def _canonical(entry: ServiceIntentions) -> Any:
    # Consul keeps the written order among sources of equal precedence: not a change.
    body = entry_to_json(normalize(entry), for_write=True)
    body["Sources"] = sorted(repr(s) for s in body["Sources"])
    return body


def _shown(change: SourceChange) -> SourceIntention:
    src = change.new or change.old
    assert src is not None
    return src


# --------------------------------------------------------------------------------------------
# The diff apply prints: one block per entry, a line per source, its permissions below it.


def _header(h: HeaderMatch) -> str:
    parts = [h.name]
    for name, value in (
        ("Exact", h.exact),
        ("Prefix", h.prefix),
        ("Suffix", h.suffix),
        ("Contains", h.contains),
        ("Regex", h.regex),
    ):
        if value:
            parts.append(f"{name}={value}")
    if h.present:
        parts.append("Present")
    if h.ignore_case:
        parts.append("IgnoreCase")
    if h.invert:
        parts.append("Invert")
    return f"Header({' '.join(parts)})"


def permission_text(perm: Permission) -> str:
    parts = [f"{perm.action:<5}"]
    if perm.http is not None:
        h = perm.http
        if h.methods:
            parts.append(f"Methods={','.join(h.methods)}")
        for name, value in (
            ("PathExact", h.path_exact),
            ("PathPrefix", h.path_prefix),
            ("PathRegex", h.path_regex),
        ):
            if value:
                parts.append(f"{name}={value}")
        parts.extend(_header(x) for x in h.header)
    if perm.jwt is not None:
        parts.append(f"JWT({','.join(p.name for p in perm.jwt.providers)})")
    return " ".join(parts)


def source_lines(mark: str, src: SourceIntention, note: str = "") -> list[str]:
    suffix = f"  ({note})" if note else ""
    if not src.permissions:
        return [f"  {mark} {source_display(src)}: {src.action}{suffix}"]
    return [f"  {mark} {source_display(src)}{suffix}"] + [
        f"  {mark}     {permission_text(p)}" for p in src.permissions
    ]


def format_change(change: EntryChange) -> list[str]:
    lines = [f"{change.label}: {change.action}"]
    for sc in change.sources:
        if sc.status == "add" and sc.new is not None:
            lines += source_lines("+", sc.new)
        elif sc.status == "remove" and sc.old is not None:
            lines += source_lines("-", sc.old)
        elif sc.status == "prune" and sc.old is not None:
            lines += source_lines("-", sc.old, "not written by meshlet; --prune")
        elif sc.status == "change" and sc.old is not None and sc.new is not None:
            hand = "" if is_managed(sc.old) else "not written by meshlet; --prune"
            lines += source_lines("-", sc.old, hand) + source_lines("+", sc.new)
        elif sc.status == "keep" and sc.old is not None:
            lines += source_lines("!", sc.old, "not written by meshlet: kept; --prune removes it")
        elif sc.status == "adopt":
            lines.append(
                f"  = {sc.label}  (not written by meshlet, identical: marked as meshlet's)"
            )
        else:
            lines.append(f"  = {sc.label}")
    if change.action == "update":
        before, after = dict(change.meta_before), dict(change.entry.meta)
        for key in sorted(before.keys() | after.keys()):
            if key not in after:
                lines.append(f"  - Meta {key}: {before[key]}")
            elif key not in before:
                lines.append(f"  + Meta {key}: {after[key]}")
            elif before[key] != after[key]:
                lines.append(f"  ~ Meta {key}: {before[key]} -> {after[key]}")
    if change.jwt_removed:
        lines.append("  - JWT requirement  (not written by meshlet; --prune)")
    return lines


def format_plan(plan: ApplyPlan) -> str:
    lines: list[str] = []
    for change in plan.changes:
        if change.action != "unchanged":
            lines += format_change(change)
    unchanged = [c.label for c in plan.changes if c.action == "unchanged"]
    if unchanged:
        lines.append(f"unchanged: {', '.join(unchanged)}")
    lines += plan.notes
    return "".join(line + "\n" for line in lines)
