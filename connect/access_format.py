"""An access-log line format compiled once per settings change (connect.access_log).

`TextFormat` and the values of `JSONFormat` are strings of Envoy command operators
(`%START_TIME%`, `%REQ(:PATH)%`, ...): reading one per record (json.loads of the JSONFormat,
a regex substitution per template) was per-request work on the proxy's event loop. Here a
template becomes literal text and field look-ups once, and rendering a record only walks
them. The default line (no format set) is the record itself as compact JSON, written
field by field exactly as `json.dumps(record, separators=(",", ":"))` would.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

__all__ = ["OPERATORS", "LineFormat", "compile_format", "json_value"]

OPERATORS = {
    "START_TIME": "start_time",
    "DURATION": "duration_ms",
    "PROTOCOL": "protocol",
    "RESPONSE_CODE": "response_code",
    "RESPONSE_FLAGS": "response_flags",
    "BYTES_RECEIVED": "bytes_received",
    "BYTES_SENT": "bytes_sent",
    "UPSTREAM_HOST": "upstream_host",
    "UPSTREAM_CLUSTER": "upstream_cluster",
    "DOWNSTREAM_PEER_URI_SAN": "peer",
    "DOWNSTREAM_REMOTE_ADDRESS": "downstream_remote_address",
}
"""Envoy command operators this log knows -> the record field each one is."""
_HEADER_FIELDS = {
    ":method": "method",
    ":authority": "authority",
    ":path": "path",
    "x-request-id": "request_id",
}
"""Request headers a record carries as fields of its own (as sent on, not as received)."""
_OPERATOR = re.compile(r"%([A-Z_]+)(?:\(([^)]*)\))?%")

HEADERS_KEY = "_headers"
"""The record's entry holding the request headers a format reads (`:name` -> value); never
written itself."""
RECORD_HEADERS = frozenset({b"host", b"traceparent"})
"""Request headers every HTTP record reads (its `authority`, its `trace_id` when the sidecar
sent no traceparent of its own)."""


def _check_template(template: str) -> None:
    """Raises ValueError naming an operator this log does not know."""
    for m in _OPERATOR.finditer(template):
        name = m.group(1)
        if name == "REQ":
            if not m.group(2):
                raise ValueError("%REQ()% needs a header name, e.g. %REQ(:PATH)%")
        elif name not in OPERATORS:
            raise ValueError(
                f"unknown access-log operator %{name}%; known: "
                + ", ".join(sorted([*OPERATORS, "REQ(header)"]))
            )


@dataclass(frozen=True, slots=True)
class _Template:
    """A template as (literal text before an operator, record field or "", header key or "")
    per operator, and the literal text after the last one."""

    parts: tuple[tuple[str, str, str], ...]
    tail: str

    def render(self, record: Mapping[str, Any], headers: Mapping[str, str]) -> str:
        out: list[str] = []
        for literal, field, header in self.parts:
            value = record.get(field) if field else headers.get(header)
            out.append(literal)
            # Envoy writes "-" for a value it does not have.
            out.append("-" if value is None or value == "" else str(value))
        out.append(self.tail)
        return "".join(out)


def _compile_template(template: str) -> tuple[_Template, frozenset[bytes]]:
    """The template and the request headers (lower-case) its %REQ(...)% operators read."""
    _check_template(template)
    parts: list[tuple[str, str, str]] = []
    headers: set[bytes] = set()
    at = 0
    for m in _OPERATOR.finditer(template):
        literal = template[at : m.start()]
        at = m.end()
        if m.group(1) == "REQ":
            name = (m.group(2) or "").lower()
            field = _HEADER_FIELDS.get(name, "")
            if not field:
                headers.add(name.encode("latin-1", "replace"))
            parts.append((literal, field, "" if field else ":" + name))
        else:
            parts.append((literal, OPERATORS[m.group(1)], ""))
    return _Template(tuple(parts), template[at:]), frozenset(headers)


_RECORD_FIELDS = (
    "start_time duration_ms protocol method authority path response_code response_flags "
    "bytes_received bytes_sent upstream_host upstream_cluster reporter peer intention rule "
    "request_id trace_id downstream_remote_address listener listener_refusal"
)
_KEYS = {k: encode_basestring_ascii(k) + ":" for k in _RECORD_FIELDS.split()}
"""The record's own field names, quoted once."""


def json_value(value: object) -> str:
    """`value` as json.dumps writes it (ASCII-only strings, floats by repr)."""
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return int.__repr__(value)
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


@dataclass(frozen=True, slots=True)
class LineFormat:
    """One line per record. `text`: a TextFormat; `fields`: a JSONFormat's (quoted key, value
    template) pairs; neither: the record as JSON."""

    text: _Template | None = None
    fields: tuple[tuple[str, _Template], ...] | None = None
    headers: frozenset[bytes] = RECORD_HEADERS
    """The request headers (lower-case) an HTTP record must carry for this format."""

    @property
    def plain(self) -> bool:
        """The default line: the record as JSON."""
        return self.text is None and self.fields is None

    def line(self, record: Mapping[str, Any]) -> str:
        """The record's line, newline-terminated."""
        if self.text is not None:
            line = self.text.render(record, record.get(HEADERS_KEY) or {})
            return line if line.endswith("\n") else line + "\n"
        if self.fields is not None:
            headers = record.get(HEADERS_KEY) or {}
            values = [
                key + encode_basestring_ascii(t.render(record, headers)) for key, t in self.fields
            ]
            return "{" + ",".join(values) + "}\n"
        keys = _KEYS
        values = [
            (keys.get(k) or encode_basestring_ascii(k) + ":") + json_value(v)
            for k, v in record.items()
            if k != HEADERS_KEY
        ]
        return "{" + ",".join(values) + "}\n"


def compile_format(json_format: str = "", text_format: str = "") -> LineFormat:
    """The line format of the AccessLogs settings (the default: both empty). Raises
    ValueError naming what is wrong (not JSON, not an object of strings, an unknown
    operator)."""
    if text_format:
        template, headers = _compile_template(text_format)
        return LineFormat(text=template, headers=RECORD_HEADERS | headers)
    if json_format:
        try:
            shape = json.loads(json_format)
        except ValueError as exc:
            raise ValueError(f"AccessLogs.JSONFormat: not JSON: {exc}") from None
        if not isinstance(shape, dict) or not all(isinstance(v, str) for v in shape.values()):
            raise ValueError("AccessLogs.JSONFormat: expected an object of string values")
        fields = []
        wanted = set(RECORD_HEADERS)
        for key, value in shape.items():
            template, headers = _compile_template(value)
            fields.append((encode_basestring_ascii(key) + ":", template))
            wanted |= headers
        return LineFormat(fields=tuple(fields), headers=frozenset(wanted))
    return LineFormat()
