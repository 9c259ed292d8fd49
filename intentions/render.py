"""Text forms of translated entries for the CLI: JSON bodies and HCL (`apply`'s plan and diff
are in `intentions.apply`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from intentions.entries import ServiceIntentions, entry_to_json

_HCL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def entries_json(entries: Iterable[ServiceIntentions]) -> str:
    """The `translate` output: a JSON list of bodies ready for `PUT /v1/config`."""
    bodies = [entry_to_json(e, for_write=True) for e in entries]
    return json.dumps(bodies, indent=2) + "\n"


def _hcl_string(value: str) -> str:
    # HCL strings use JSON escapes, plus template sequences that must stay literal.
    return json.dumps(value).replace("${", "$${").replace("%{", "%%{")


def _hcl_key(key: str) -> str:
    # An HCL identifier stays bare; any other key (a Meta key like meshlet.io/managed) is quoted.
    return key if _HCL_IDENTIFIER.fullmatch(key) else _hcl_string(key)


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
        inner = "".join(
            f"{pad}  {_hcl_key(str(k))} = {_hcl_value(v, indent + 1)}\n" for k, v in value.items()
        )
        return "{\n" + inner + pad + "}"
    if isinstance(value, Sequence):
        if not value:
            return "[]"
        if all(isinstance(v, str | int | float | bool) for v in value):
            return "[" + ", ".join(_hcl_value(v, indent) for v in value) + "]"
        inner = "".join(f"{pad}  {_hcl_value(v, indent + 1)},\n" for v in value)
        return "[\n" + inner + pad + "]"
    raise TypeError(f"cannot render {type(value).__name__} as HCL")


def body_hcl(body: Mapping[str, Any]) -> str:
    """Any config entry's JSON body in Consul's HCL form (as `consul config write` accepts)."""
    return "".join(f"{k} = {_hcl_value(v, 0)}\n" for k, v in body.items())


def entry_hcl(entry: ServiceIntentions) -> str:
    """One entry in Consul's HCL config-entry form (as `consul config write` accepts)."""
    return body_hcl(entry_to_json(entry, for_write=True))


def entries_hcl(entries: Iterable[ServiceIntentions]) -> str:
    return "\n".join(entry_hcl(e) for e in entries)
