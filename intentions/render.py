"""Text forms of translated entries for the CLI: JSON bodies, HCL, and a plan against Consul."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from intentions.entries import ServiceIntentions, entry_to_json


def entries_json(entries: Iterable[ServiceIntentions]) -> str:
    """The `translate` output: a JSON list of bodies ready for `PUT /v1/config`."""
    bodies = [entry_to_json(e, for_write=True) for e in entries]
    return json.dumps(bodies, indent=2) + "\n"


def _hcl_string(value: str) -> str:
    # HCL strings use JSON escapes, plus template sequences that must stay literal.
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def _hcl_value(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return _hcl_string(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        inner = "".join(f"{pad}  {k} = {_hcl_value(v, indent + 1)}\n" for k, v in value.items())
        return "{\n" + inner + pad + "}"
    if isinstance(value, Sequence):
        if not value:
            return "[]"
        if all(isinstance(v, str | int | float | bool) for v in value):
            return "[" + ", ".join(_hcl_value(v, indent) for v in value) + "]"
        inner = "".join(f"{pad}  {_hcl_value(v, indent + 1)},\n" for v in value)
        return "[\n" + inner + pad + "]"
    raise TypeError(f"cannot render {type(value).__name__} as HCL")


def entry_hcl(entry: ServiceIntentions) -> str:
    """One entry in Consul's HCL config-entry form (as `consul config write` accepts)."""
    body = entry_to_json(entry, for_write=True)
    return "".join(f"{k} = {_hcl_value(v, 0)}\n" for k, v in body.items())


def entries_hcl(entries: Iterable[ServiceIntentions]) -> str:
    return "\n".join(entry_hcl(e) for e in entries)


@dataclass(frozen=True, slots=True)
class Change:
    action: Literal["create", "update", "unchanged"]
    name: str
    namespace: str
    cas: int
    """`?cas=` for the write: 0 creates only if absent, else the ModifyIndex read."""
    body: Mapping[str, Any]
    diff: str


def plan(
    current: Iterable[ServiceIntentions], desired: Iterable[ServiceIntentions]
) -> tuple[Change, ...]:
    """What `apply` writes: one change per desired entry, compared with what Consul holds.

    Entries Consul holds for services outside the translation are left alone on purpose: a
    policy set describes its services, not the whole mesh.
    """
    held = {(e.namespace_or_default, e.name): e for e in current}
    changes = []
    for entry in desired:
        key = (entry.namespace_or_default, entry.name)
        body = entry_to_json(entry, for_write=True)
        new_text = json.dumps(body, indent=2, sort_keys=True).splitlines(keepends=True)
        old = held.get(key)
        label = f"{key[0]}/{key[1]}"
        if old is None:
            diff = "".join(difflib.unified_diff([], new_text, "/dev/null", label))
            changes.append(Change("create", entry.name, key[0], 0, body, diff))
            continue
        old_body = entry_to_json(old, for_write=True)
        old_text = json.dumps(old_body, indent=2, sort_keys=True).splitlines(keepends=True)
        diff = "".join(difflib.unified_diff(old_text, new_text, label, label))
        action: Literal["update", "unchanged"] = "update" if diff else "unchanged"
        changes.append(Change(action, entry.name, key[0], old.modify_index, body, diff))
    return tuple(changes)
