"""Consul's ACL rule language: parse a policy's `Rules` (HCL or JSON) and decide a permission.

Pure: text in, `Rules` out; `Rules.decide(permission, resource)` answers allow, deny or no
opinion (the caller falls back to the default policy). Semantics follow consul
`acl/policy.go` (which rule kinds exist, which values each accepts, `takesPrecedenceOver` when
merging policies) and `acl/policy_authorizer.go` (`enforce`; an exact rule wins over any
prefix rule, otherwise the longest matching prefix; an intentions level defaults to `read`
for a service rule of `read`/`write` and to `deny` otherwise; `mesh` and `peering` fall back
to `operator`).

Consul decodes rules with HCL1 (`hcl.Decode`), which also reads JSON. python-hcl2 is not used
here: it is only a test dependency, it rejects HCL1's comma-separated attributes and JSON
input, and it returns strings with their quotes. The subset policies use is small: blocks
`kind "name" { attr = "value" ... }`, top-level `attr = "value"`, comments, and the same
shapes as JSON objects, so `_Lexer`/`_Parser` below read exactly that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DENY, READ, LIST, WRITE = "deny", "read", "list", "write"

# Rule kinds keyed by a name (exact) or a name prefix, as in acl.PolicyRules.
NAMED_KINDS = ("agent", "event", "key", "node", "query", "service", "session")
# Single-valued rule kinds.
SCALAR_KINDS = ("acl", "keyring", "mesh", "operator", "peering")
# Permission prefixes whose resource lives in another kind's table.
_TABLE_OF = {"intentions": "intentions"}

_RANK = {READ: 1, LIST: 2, WRITE: 3, DENY: 4}  # takesPrecedenceOver: deny > write > list > read


class RulesError(ValueError):
    """The rules do not parse or name an invalid policy; the text is Consul's."""


@dataclass(frozen=True)
class Rules:
    """A compiled rule set: kind -> name -> access, for exact and prefix rules."""

    exact: dict[str, dict[str, str]] = field(default_factory=dict)
    prefix: dict[str, dict[str, str]] = field(default_factory=dict)
    scalar: dict[str, str] = field(default_factory=dict)

    def decide(self, permission: str, resource: str | None) -> bool | None:
        """True (allow), False (deny) or None (no rule: the default policy decides)."""
        kind, _, level = permission.partition(":")
        if kind in SCALAR_KINDS:
            access = self.scalar.get(kind)
            if access is None and kind in ("mesh", "peering"):
                access = self.scalar.get("operator")
            return _enforce(access, level)
        return _enforce(self.lookup(_TABLE_OF.get(kind, kind), resource or ""), level)

    def lookup(self, kind: str, name: str) -> str | None:
        exact = self.exact.get(kind, {})
        if name in exact:
            return exact[name]
        best: str | None = None
        for prefix in self.prefix.get(kind, {}):
            if name.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return None if best is None else self.prefix[kind][best]


def _enforce(access: str | None, level: str) -> bool | None:
    if access is None:
        return None
    if access == WRITE:
        return True
    if access == LIST:
        return level in (LIST, READ)
    if access == READ:
        return level == READ
    return False


def merge(rule_sets: Iterable[Rules]) -> Rules:
    """One rule set from several policies: per rule, the value that takes precedence."""
    out = Rules()
    for rules in rule_sets:
        for src, dst in ((rules.exact, out.exact), (rules.prefix, out.prefix)):
            for kind, table in src.items():
                merged = dst.setdefault(kind, {})
                for name, access in table.items():
                    merged[name] = _stronger(merged.get(name), access)
        for kind, access in rules.scalar.items():
            out.scalar[kind] = _stronger(out.scalar.get(kind), access)
    return out


def _stronger(old: str | None, new: str) -> str:
    return new if old is None or _RANK[new] > _RANK[old] else old


# ---- identities -------------------------------------------------------------------------


def service_identity_rules(service: str) -> Rules:
    """What a ServiceIdentity grants (consul agent/structs/acl.go, aclServiceIdentityRules)."""
    return parse_rules(
        f'service "{service}" {{ policy = "write" }}\n'
        f'service "{service}-sidecar-proxy" {{ policy = "write" }}\n'
        'service_prefix "" { policy = "read" }\n'
        'node_prefix "" { policy = "read" }\n'
    )


def node_identity_rules(node: str) -> Rules:
    """What a NodeIdentity grants (consul agent/structs/acl.go, aclNodeIdentityRules)."""
    return parse_rules(
        f'node "{node}" {{ policy = "write" }}\nservice_prefix "" {{ policy = "read" }}\n'
    )


# ---- parsing ----------------------------------------------------------------------------


def parse_rules(text: str) -> Rules:
    """Compile a policy's Rules text; RulesError names the offending rule."""
    if not text.strip():
        return Rules()
    try:
        tree = _parse_json(text) if text.lstrip().startswith("{") else _Parser(text).document()
    except RecursionError:
        # Both parsers recurse once per level: thousands of `{` exhaust Python's stack.
        raise RulesError("Failed to parse ACL rules: nested too deeply") from None
    return _compile(tree)


def _parse_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RulesError(f"Failed to parse ACL rules: {err}") from None
    if not isinstance(data, dict):
        raise RulesError("Failed to parse ACL rules: the rules must be an object")
    return data


def _compile(tree: dict[str, Any]) -> Rules:
    rules = Rules()
    for key, value in tree.items():
        if key in SCALAR_KINDS:
            if not isinstance(value, str) or value not in (DENY, READ, WRITE):
                raise RulesError(f"Invalid {key} policy: {json.dumps(value)}")
            rules.scalar[key] = value
            continue
        is_prefix = key.endswith("_prefix")
        base = key.removesuffix("_prefix")
        if base not in NAMED_KINDS:
            raise RulesError(f"Failed to parse ACL rules: invalid key {key!r}")
        for name, body in _named_blocks(key, value):
            _add_named(rules, key, is_prefix, name, body)
    return rules


def _named_blocks(key: str, value: Any) -> list[tuple[str, dict[str, Any]]]:
    # HCL repeats a block kind as a list of {name: body}; JSON gives one {name: body, ...}.
    items = value if isinstance(value, list) else [value]
    out: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if not isinstance(item, dict):
            raise RulesError(f"Failed to parse ACL rules: {key} must be a block with a name")
        for name, body in item.items():
            if not isinstance(body, dict):
                raise RulesError(f'Failed to parse ACL rules: {key} "{name}" must be a block')
            out.append((name, body))
    return out


def _add_named(rules: Rules, key: str, is_prefix: bool, name: str, body: dict[str, Any]) -> None:
    base = key.removesuffix("_prefix")
    allowed = {"policy"} | ({"intentions"} if base == "service" else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RulesError(f'Failed to parse ACL rules: {key} "{name}": unknown field {unknown[0]!r}')
    policy = body.get("policy", "")
    values = (DENY, READ, WRITE, LIST) if base == "key" else (DENY, READ, WRITE)
    if policy not in values:
        raise RulesError(f"Invalid {key} policy: {_describe(name, body)}")
    intentions = body.get("intentions", "")
    if intentions and intentions not in (DENY, READ, WRITE):
        raise RulesError(f"Invalid {key} intentions policy: {_describe(name, body)}")
    table = rules.prefix if is_prefix else rules.exact
    table.setdefault(base, {})[name] = _stronger(table.get(base, {}).get(name), policy)
    if base == "service":
        implied = intentions or (READ if policy in (READ, WRITE) else DENY)
        table.setdefault("intentions", {})[name] = _stronger(
            table.get("intentions", {}).get(name), implied
        )


def _describe(name: str, body: dict[str, Any]) -> str:
    fields = ", ".join(f"{k}={json.dumps(v)}" for k, v in body.items())
    return f'"{name}" {{{fields}}}'


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-.]*)
  | (?P<punct>[{}=,\[\]:])
    """,
    re.VERBOSE | re.DOTALL,
)


class _Parser:
    """HCL1's object grammar, restricted to strings: `key ["name"...] { ... }` and `k = "v"`."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        line = 1
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise RulesError(
                    f"Failed to parse ACL rules: At {line}:{pos - text.rfind(chr(10), 0, pos)}: "
                    f"illegal char {text[pos]!r}"
                )
            kind = m.lastgroup or ""
            if kind != "ws":
                self.tokens.append((kind, m.group(), line))
            line += m.group().count("\n")
            pos = m.end()
        self.i = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _fail(self, what: str) -> RulesError:
        tok = self._peek()
        where = f"line {tok[2]}: unexpected {tok[1]!r}" if tok else "unexpected end of rules"
        return RulesError(f"Failed to parse ACL rules: {where}, expected {what}")

    def _take(self, kind: str, value: str | None = None) -> str:
        tok = self._peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            raise self._fail(value or kind)
        self.i += 1
        return tok[1]

    def document(self) -> dict[str, Any]:
        return self._members(end=None)

    def _members(self, end: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self._peek()
            if tok is None:
                if end is not None:
                    raise self._fail(end)
                return out
            if end is not None and tok[1] == end and tok[0] == "punct":
                self.i += 1
                return out
            if tok[0] == "punct" and tok[1] == ",":
                self.i += 1
                continue
            key = self._key()
            nxt = self._peek()
            if nxt is not None and nxt[0] == "punct" and nxt[1] in ("=", ":"):
                self.i += 1
                value = self._value()
                if isinstance(value, dict):
                    out.setdefault(key, []).append(value)
                else:
                    out[key] = value
                continue
            labels: list[str] = []
            while (p := self._peek()) is not None and p[0] == "string":
                labels.append(self._string())
            self._take("punct", "{")
            body: Any = self._members(end="}")
            for label in reversed(labels):
                body = {label: body}
            out.setdefault(key, []).append(body)

    def _key(self) -> str:
        tok = self._peek()
        if tok is not None and tok[0] == "string":
            return self._string()
        return self._take("ident")

    def _string(self) -> str:
        raw = self._take("string")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise RulesError(f"Failed to parse ACL rules: invalid string {raw}") from None
        assert isinstance(value, str)
        return value

    def _value(self) -> Any:
        tok = self._peek()
        if tok is not None and tok[0] == "string":
            return self._string()
        if tok is not None and tok[0] == "punct" and tok[1] == "{":
            self.i += 1
            return self._members(end="}")
        raise self._fail("a string or a block")
