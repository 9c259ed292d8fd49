"""The legacy `/v1/connect/intentions` view over `service-intentions` entries (pure).

Since Consul 1.9 intentions are stored only as config entries; each source of an entry for
destination D is one legacy intention `source => D`. These functions derive that view, and the
per-pair edits the `exact` endpoint makes, so the devstack stores entries only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from intentions.entries import (
    DEFAULT,
    WILDCARD,
    Permission,
    ServiceIntentions,
    SourceIntention,
    decode_entry,
    normalize,
    permission_to_json,
    source_key,
)
from intentions.errors import EntryDecodeError

ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(frozen=True, slots=True)
class LegacyIntention:
    entry: ServiceIntentions
    source: SourceIntention

    @property
    def sort_key(self) -> tuple[int, str, str, str, str]:
        # Consul's IntentionPrecedenceSorter: precedence desc, then names ascending.
        return (
            -self.source.precedence,
            self.source.namespace or DEFAULT,
            self.source.name,
            self.entry.namespace_or_default,
            self.entry.name,
        )

    def to_json(self) -> dict[str, Any]:
        src, entry = self.source, self.entry
        out: dict[str, Any] = {"ID": src.legacy_id, "Description": src.description}
        if src.peer:
            out["SourcePeer"] = src.peer
        if src.sameness_group:
            out["SourceSamenessGroup"] = src.sameness_group
        out.update(
            SourceNS=src.namespace or DEFAULT,
            SourceName=src.name,
            DestinationNS=entry.namespace_or_default,
            DestinationName=entry.name,
            SourceType=src.type or "consul",
        )
        if src.permissions:
            out["Permissions"] = [permission_to_json(p) for p in src.permissions]
        else:
            out["Action"] = src.action
        out.update(
            Meta=dict(src.legacy_meta),
            Precedence=src.precedence,
            CreatedAt=src.legacy_create_time or ZERO_TIME,
            UpdatedAt=src.legacy_update_time or ZERO_TIME,
            CreateIndex=entry.create_index,
            ModifyIndex=entry.modify_index,
        )
        return out


def legacy_intentions(entries: Iterable[ServiceIntentions]) -> list[LegacyIntention]:
    """Every source of every entry as a legacy intention, in Consul's list order."""
    found = [LegacyIntention(e, s) for e in entries for s in e.sources]
    return sorted(found, key=lambda i: i.sort_key)


def parse_service_ref(text: str) -> tuple[str, str]:
    """`name` or `ns/name` (the `source`/`destination`/`name` query forms) -> (ns, name).

    Raises ValueError with Consul's wording for the forms it rejects.
    """
    if text.startswith("peer:"):
        raise ValueError("cannot specify a peer here")
    parts = text.split("/")
    if len(parts) > 3:
        raise ValueError("input can contain at most two '/'")
    if len(parts) == 1:
        return DEFAULT, parts[0]
    return parts[-2], parts[-1]


def _matches(pattern_ns: str, pattern_name: str, ns: str, name: str) -> bool:
    return pattern_ns in (WILDCARD, ns) and pattern_name in (WILDCARD, name)


def match(
    entries: Iterable[ServiceIntentions], by: Literal["source", "destination"], name: str
) -> list[LegacyIntention]:
    """`GET /v1/connect/intentions/match`: intentions that apply to `name`, wildcards included."""
    ns, svc = parse_service_ref(name)
    out = []
    for intention in legacy_intentions(entries):
        if by == "destination":
            e = intention.entry
            if _matches(e.namespace_or_default, e.name, ns, svc):
                out.append(intention)
        else:
            s = intention.source
            if not s.peer and _matches(s.namespace or DEFAULT, s.name, ns, svc):
                out.append(intention)
    return out


def exact(
    entries: Iterable[ServiceIntentions], source: str, destination: str
) -> LegacyIntention | None:
    """`GET /v1/connect/intentions/exact`: the intention for exactly this pair, if any."""
    src_ns, src_name = parse_service_ref(source)
    dst_ns, dst_name = parse_service_ref(destination)
    for e in entries:
        if (e.namespace_or_default, e.name) != (dst_ns, dst_name):
            continue
        for s in e.sources:
            if not s.peer and (s.namespace or DEFAULT, s.name) == (src_ns, src_name):
                return LegacyIntention(e, s)
    return None


def upsert_source(
    entry: ServiceIntentions | None, destination: str, source: SourceIntention
) -> ServiceIntentions:
    """`PUT /v1/connect/intentions/exact`: replace or add one source (the entry is created
    when absent). The result is normalized; validate it before storing."""
    dst_ns, dst_name = parse_service_ref(destination)
    if entry is None:
        entry = ServiceIntentions(name=dst_name, namespace="" if dst_ns == DEFAULT else dst_ns)
    key = source_key(normalize(dataclasses.replace(entry, sources=(source,))).sources[0])
    kept = tuple(s for s in entry.sources if source_key(s) != key)
    return normalize(dataclasses.replace(entry, sources=(*kept, source)))


def remove_source(entry: ServiceIntentions, source: str) -> ServiceIntentions | None:
    """`DELETE /v1/connect/intentions/exact`: drop one source; None when none is left (Consul
    then deletes the whole entry)."""
    src_ns, src_name = parse_service_ref(source)
    kept = tuple(
        s for s in entry.sources if s.peer or (s.namespace or DEFAULT, s.name) != (src_ns, src_name)
    )
    return dataclasses.replace(entry, sources=kept) if kept else None


_INTENTION_KEYS = {
    k.lower(): k
    for k in (
        "ID",
        "Description",
        "SourcePeer",
        "SourceSamenessGroup",
        "SourcePartition",
        "DestinationPartition",
        "SourceNS",
        "SourceName",
        "DestinationNS",
        "DestinationName",
        "SourceType",
        "Action",
        "Permissions",
        "Meta",
        "Precedence",
        "CreatedAt",
        "UpdatedAt",
        "Hash",
        "CreateIndex",
        "ModifyIndex",
    )
}


def source_from_intention_body(body: object, source: str) -> SourceIntention:
    """The source a `PUT /v1/connect/intentions/exact?source=...` body describes.

    Names come from the URL, not the body (Consul clears them); `ID` is ignored. Unknown keys
    raise EntryDecodeError with Consul's `Request decode failed: ...` text (a 400).
    """
    if not isinstance(body, Mapping):
        raise EntryDecodeError("Request decode failed: body must be a JSON object")
    fields: dict[str, Any] = {}
    for key, value in body.items():
        canon = _INTENTION_KEYS.get(str(key).lower())
        if canon is None:
            raise EntryDecodeError(f'Request decode failed: json: unknown field "{key}"')
        fields[canon] = value
    ns, name = parse_service_ref(source)
    permissions: tuple[Permission, ...] = ()
    if fields.get("Permissions"):
        # Reuse the config-entry decoder so permissions get the same checks and messages.
        probe = decode_entry(
            {
                "Kind": "service-intentions",
                "Name": "probe",
                "Sources": [{"Name": name, "Permissions": fields["Permissions"]}],
            }
        )
        permissions = probe.sources[0].permissions
    action, description, kind = (
        fields.get("Action") or "",
        fields.get("Description") or "",
        fields.get("SourceType") or "",
    )
    for label, value in (("Action", action), ("Description", description), ("SourceType", kind)):
        if not isinstance(value, str):
            raise EntryDecodeError(
                f"Request decode failed: json: cannot unmarshal {type(value).__name__} into "
                f"Go struct field Intention.{label} of type string"
            )
    return SourceIntention(
        name=name,
        namespace="" if ns == DEFAULT else ns,
        action=action,
        permissions=permissions,
        type=kind,
        description=description,
    )
