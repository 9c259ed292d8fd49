"""Consul `service-intentions` config entries: decode, normalize, validate, encode.

Decoding follows Consul's config-entry decoder (keys match case-insensitively and in snake_case,
unknown keys are rejected); `normalize` and `validate` follow `ServiceIntentionsConfigEntry`
in consul `agent/structs/config_entry_intentions.go`, with its error texts verbatim, including
the fact that validation runs after normalization, so `Sources[i]` indexes the precedence order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from intentions.errors import EntryDecodeError, InvalidEntry

KIND = "service-intentions"
WILDCARD = "*"
DEFAULT = "default"
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
_META_MAX_PAIRS = 64
_META_KEY_MAX = 128
_META_VALUE_MAX = 512

Action = Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class JWTClaim:
    path: tuple[str, ...]
    value: str


@dataclass(frozen=True, slots=True)
class JWTProvider:
    name: str
    verify_claims: tuple[JWTClaim, ...] = ()


@dataclass(frozen=True, slots=True)
class JWTRequirement:
    providers: tuple[JWTProvider, ...] = ()


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    contains: str = ""
    regex: str = ""
    ignore_case: bool = False
    invert: bool = False


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    methods: tuple[str, ...] = ()
    header: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Permission:
    action: str
    http: HTTPMatch | None = None
    jwt: JWTRequirement | None = None


@dataclass(frozen=True, slots=True)
class SourceIntention:
    name: str
    namespace: str = ""
    partition: str = ""
    peer: str = ""
    sameness_group: str = ""
    action: str = ""
    permissions: tuple[Permission, ...] = ()
    precedence: int = 0
    type: str = ""
    description: str = ""
    legacy_id: str = ""
    legacy_meta: tuple[tuple[str, str], ...] = ()
    legacy_create_time: str | None = None
    legacy_update_time: str | None = None

    @property
    def is_l7(self) -> bool:
        return bool(self.permissions)


@dataclass(frozen=True, slots=True)
class ServiceIntentions:
    """One `service-intentions` entry: every source allowed or denied to reach `name`."""

    name: str
    sources: tuple[SourceIntention, ...] = ()
    namespace: str = ""
    partition: str = ""
    meta: tuple[tuple[str, str], ...] = ()
    jwt: JWTRequirement | None = None
    create_index: int = 0
    modify_index: int = 0

    @property
    def namespace_or_default(self) -> str:
        return self.namespace or DEFAULT

    @property
    def partition_or_default(self) -> str:
        return self.partition or DEFAULT

    @property
    def has_wildcard_destination(self) -> bool:
        return WILDCARD in (self.name, self.namespace_or_default)


# --------------------------------------------------------------------------------------------
# Decoding


def _fold(key: str) -> str:
    # Consul's decoder accepts CamelCase, lower case and snake_case spellings of a key.
    return key.replace("_", "").lower()


class _Decoder:
    """Walks a JSON-like body, collecting every unknown key the way mapstructure does."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def fields(
        self, obj: object, where: str, allowed: Sequence[str], extra_ignored: Sequence[str] = ()
    ) -> dict[str, object]:
        if obj is None:
            return {}
        if not isinstance(obj, Mapping):
            self.errors.append(f"'{where}' expected a map, got '{_go_type(obj)}'")
            return {}
        canon = {_fold(a): a for a in allowed}
        ignored = {_fold(a) for a in extra_ignored}
        out: dict[str, object] = {}
        for raw_key, value in obj.items():
            key = str(raw_key)
            folded = _fold(key)
            if folded in ignored:
                continue
            name = canon.get(folded)
            if name is None:
                self.errors.append(f'invalid config key "{_join(where, key)}"')
                continue
            out[name] = value
        return out

    def string(self, obj: Mapping[str, object], key: str, where: str) -> str:
        value = obj.get(key)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        self.errors.append(
            f"'{_join(where, key)}' expected type 'string', got unconvertible type "
            f"'{_go_type(value)}'"
        )
        return ""

    def boolean(self, obj: Mapping[str, object], key: str, where: str) -> bool:
        value = obj.get(key)
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        self.errors.append(
            f"'{_join(where, key)}' expected type 'bool', got unconvertible type "
            f"'{_go_type(value)}'"
        )
        return False

    def integer(self, obj: Mapping[str, object], key: str, where: str) -> int:
        value = obj.get(key)
        if value is None:
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value)
        self.errors.append(
            f"'{_join(where, key)}' expected type 'uint64', got unconvertible type "
            f"'{_go_type(value)}'"
        )
        return 0

    def items(self, obj: Mapping[str, object], key: str, where: str) -> list[object]:
        value = obj.get(key)
        if value is None:
            return []
        if isinstance(value, list):
            return value
        self.errors.append(
            f"'{_join(where, key)}': source data must be an array or slice, got {_go_type(value)}"
        )
        return []

    def strings(self, obj: Mapping[str, object], key: str, where: str) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.items(obj, key, where)):
            if isinstance(item, str):
                out.append(item)
            else:
                self.errors.append(
                    f"'{_join(where, key)}[{i}]' expected type 'string', got unconvertible type "
                    f"'{_go_type(item)}'"
                )
        return tuple(out)

    def string_map(
        self, obj: Mapping[str, object], key: str, where: str
    ) -> tuple[tuple[str, str], ...]:
        value = obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            self.errors.append(f"'{_join(where, key)}' expected a map, got '{_go_type(value)}'")
            return ()
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            if not isinstance(v, str):
                self.errors.append(
                    f"'{_join(where, key)}[{k}]' expected type 'string', got unconvertible type "
                    f"'{_go_type(v)}'"
                )
                continue
            out.append((str(k), v))
        return tuple(sorted(out))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _go_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, Mapping):
        return "map[string]interface {}"
    return type(value).__name__


_ENTRY_KEYS = ("Kind", "Name", "Namespace", "Partition", "Meta", "JWT", "Sources")
_ENTRY_READONLY = ("CreateIndex", "ModifyIndex", "Hash")
_SOURCE_KEYS = (
    "Name",
    "Namespace",
    "Partition",
    "Peer",
    "SamenessGroup",
    "Action",
    "Permissions",
    "Precedence",
    "Type",
    "Description",
    "LegacyID",
    "LegacyMeta",
    "LegacyCreateTime",
    "LegacyUpdateTime",
)
_PERMISSION_KEYS = ("Action", "HTTP", "JWT")
_HTTP_KEYS = ("PathExact", "PathPrefix", "PathRegex", "Header", "Methods")
_HEADER_KEYS = (
    "Name",
    "Present",
    "Exact",
    "Prefix",
    "Suffix",
    "Contains",
    "Regex",
    "IgnoreCase",
    "Invert",
)


def decode_entry(body: object) -> ServiceIntentions:
    """Decode a `service-intentions` body as Consul's `PUT /v1/config` does.

    Raises EntryDecodeError with Consul's text (`Request decoding failed: ...`). The result is
    not yet normalized or validated: call `normalize` then `validate`, or `load_entry`.
    """
    d = _Decoder()
    if not isinstance(body, Mapping):
        raise EntryDecodeError("Request decode failed: body must be a JSON object")
    kind_value = next((v for k, v in body.items() if str(k).lower() == "kind"), None)
    if kind_value is None:
        raise EntryDecodeError("Payload does not contain a kind/Kind key at the top level")
    if kind_value != KIND:
        raise EntryDecodeError(f"invalid config entry kind: {kind_value}")
    top = d.fields(body, "", _ENTRY_KEYS + _ENTRY_READONLY)
    sources = tuple(
        _decode_source(d, raw, f"Sources[{i}]") for i, raw in enumerate(d.items(top, "Sources", ""))
    )
    entry = ServiceIntentions(
        name=d.string(top, "Name", ""),
        namespace=d.string(top, "Namespace", ""),
        partition=d.string(top, "Partition", ""),
        meta=d.string_map(top, "Meta", ""),
        jwt=_decode_jwt(d, top.get("JWT"), "JWT"),
        sources=sources,
        create_index=d.integer(top, "CreateIndex", ""),
        modify_index=d.integer(top, "ModifyIndex", ""),
    )
    if d.errors:
        count = len(d.errors)
        noun = "error" if count == 1 else "errors"
        listed = "".join(f"\t* {e}\n" for e in d.errors)
        raise EntryDecodeError(f"Request decoding failed: {count} {noun} occurred:\n{listed}\n")
    return entry


def _decode_source(d: _Decoder, raw: object, where: str) -> SourceIntention:
    f = d.fields(raw, where, _SOURCE_KEYS)
    create = f.get("LegacyCreateTime")
    update = f.get("LegacyUpdateTime")
    return SourceIntention(
        name=d.string(f, "Name", where),
        namespace=d.string(f, "Namespace", where),
        partition=d.string(f, "Partition", where),
        peer=d.string(f, "Peer", where),
        sameness_group=d.string(f, "SamenessGroup", where),
        action=d.string(f, "Action", where),
        permissions=tuple(
            _decode_permission(d, p, f"{where}.Permissions[{j}]")
            for j, p in enumerate(d.items(f, "Permissions", where))
        ),
        precedence=d.integer(f, "Precedence", where),
        type=d.string(f, "Type", where),
        description=d.string(f, "Description", where),
        legacy_id=d.string(f, "LegacyID", where),
        legacy_meta=d.string_map(f, "LegacyMeta", where),
        legacy_create_time=None if create is None else str(create),
        legacy_update_time=None if update is None else str(update),
    )


def _decode_permission(d: _Decoder, raw: object, where: str) -> Permission:
    f = d.fields(raw, where, _PERMISSION_KEYS)
    http: HTTPMatch | None = None
    if f.get("HTTP") is not None:
        hw = f"{where}.HTTP"
        h = d.fields(f["HTTP"], hw, _HTTP_KEYS)
        http = HTTPMatch(
            path_exact=d.string(h, "PathExact", hw),
            path_prefix=d.string(h, "PathPrefix", hw),
            path_regex=d.string(h, "PathRegex", hw),
            methods=d.strings(h, "Methods", hw),
            header=tuple(
                _decode_header(d, x, f"{hw}.Header[{k}]")
                for k, x in enumerate(d.items(h, "Header", hw))
            ),
        )
    return Permission(
        action=d.string(f, "Action", where),
        http=http,
        jwt=_decode_jwt(d, f.get("JWT"), f"{where}.JWT"),
    )


def _decode_header(d: _Decoder, raw: object, where: str) -> HeaderMatch:
    f = d.fields(raw, where, _HEADER_KEYS)
    return HeaderMatch(
        name=d.string(f, "Name", where),
        present=d.boolean(f, "Present", where),
        exact=d.string(f, "Exact", where),
        prefix=d.string(f, "Prefix", where),
        suffix=d.string(f, "Suffix", where),
        contains=d.string(f, "Contains", where),
        regex=d.string(f, "Regex", where),
        ignore_case=d.boolean(f, "IgnoreCase", where),
        invert=d.boolean(f, "Invert", where),
    )


def _decode_jwt(d: _Decoder, raw: object, where: str) -> JWTRequirement | None:
    if raw is None:
        return None
    f = d.fields(raw, where, ("Providers",))
    providers: list[JWTProvider] = []
    for i, p in enumerate(d.items(f, "Providers", where)):
        pw = f"{where}.Providers[{i}]"
        pf = d.fields(p, pw, ("Name", "VerifyClaims"))
        claims: list[JWTClaim] = []
        for j, c in enumerate(d.items(pf, "VerifyClaims", pw)):
            cw = f"{pw}.VerifyClaims[{j}]"
            cf = d.fields(c, cw, ("Path", "Value"))
            claims.append(JWTClaim(d.strings(cf, "Path", cw), d.string(cf, "Value", cw)))
        providers.append(JWTProvider(d.string(pf, "Name", pw), tuple(claims)))
    return JWTRequirement(tuple(providers))


# --------------------------------------------------------------------------------------------
# Normalization and validation


def precedence(
    dst_namespace: str, dst_name: str, src_namespace: str, src_name: str, *, peer: bool = False
) -> int:
    """Consul's intention precedence (9 = exact to exact ... 1 = `*/*` to `*/*`)."""
    dst_exact = (dst_namespace != WILDCARD) + (dst_name != WILDCARD)
    top = {2: 9, 1: 6, 0: 3}[dst_exact]
    # A peer source names one exact namespace of the peer even when spelled as default.
    src_exact = (peer or src_namespace != WILDCARD) + (src_name != WILDCARD)
    return top - (2 - src_exact)


def normalize(entry: ServiceIntentions) -> ServiceIntentions:
    """Consul's `Normalize()`: defaults, precedence, upper-cased methods, sorted sources."""
    sources: list[SourceIntention] = []
    for src in entry.sources:
        namespace = src.namespace or entry.namespace_or_default
        # Peer and sameness-group sources keep their own partition: they are not local.
        inherits = not src.peer and not src.sameness_group
        partition = src.partition or (entry.partition_or_default if inherits else "")
        perms = tuple(
            dataclasses.replace(
                p,
                http=None
                if p.http is None
                else dataclasses.replace(p.http, methods=tuple(m.upper() for m in p.http.methods)),
            )
            for p in src.permissions
        )
        sources.append(
            dataclasses.replace(
                src,
                namespace=namespace,
                partition=partition,
                type=src.type or "consul",
                permissions=perms,
                precedence=precedence(
                    entry.namespace_or_default,
                    entry.name,
                    namespace,
                    src.name,
                    peer=bool(src.peer or src.sameness_group),
                ),
            )
        )
    sources.sort(key=lambda s: -s.precedence)  # stable, like sort.SliceStable
    return dataclasses.replace(entry, sources=tuple(sources))


def drop_legacy_fields(entry: ServiceIntentions) -> ServiceIntentions:
    """What Consul's `Normalize()` for a non-legacy write (`PUT /v1/config`, the exact API)
    does to the legacy API's bookkeeping: LegacyID and both timestamps are cleared, LegacyMeta
    is kept so that `validate` refuses a write that would silently lose it."""
    return dataclasses.replace(
        entry,
        sources=tuple(
            dataclasses.replace(src, legacy_id="", legacy_create_time=None, legacy_update_time=None)
            for src in entry.sources
        ),
    )


def _wildcard_error(name: str, namespace: str, partition: str, peer: str) -> str | None:
    wild_ns = namespace == WILDCARD
    wild_name = name == WILDCARD
    if WILDCARD in name and not wild_name:
        return "Name: wildcard character '*' cannot be used with partial values"
    if WILDCARD in namespace and not wild_ns:
        return "Namespace: wildcard character '*' cannot be used with partial values"
    if wild_ns and not wild_name:
        return "Name: exact value cannot follow wildcard namespace"
    if WILDCARD in partition:
        return "Partition: cannot use wildcard '*' in partition"
    if WILDCARD in peer:
        return "Peer: cannot use wildcard '*' in peer"
    return None


def _meta_error(meta: Sequence[tuple[str, str]]) -> str | None:
    if len(meta) > _META_MAX_PAIRS:
        return f"Meta exceeds maximum element count {_META_MAX_PAIRS}"
    for key, value in meta:
        if len(key) > _META_KEY_MAX:
            return f'Meta key "{key}" exceeds maximum length {_META_KEY_MAX}'
        if len(value) > _META_VALUE_MAX:
            return f'Meta value for key "{key}" exceeds maximum length {_META_VALUE_MAX}'
    return None


def source_key(src: SourceIntention) -> tuple[str, str, str, str, str]:
    """Identity of a source inside one entry: (peer, sameness group, partition, namespace, name)."""
    return (
        src.peer,
        src.sameness_group,
        src.partition or DEFAULT,
        src.namespace or DEFAULT,
        src.name,
    )


def validate(entry: ServiceIntentions, *, legacy_write: bool = False, read: bool = False) -> None:
    """Consul's `validate`: raises InvalidEntry with the first failure, in Consul's order.

    Expects a normalized entry (as Consul does); `Sources[i]` refers to the normalized order.
    `legacy_write`: the rules of a write through the legacy `/v1/connect/intentions` API.
    `read`: an entry as Consul returns it, whichever API wrote it: the Legacy* fields are the
    legacy API's bookkeeping (a read returns them, a config-entry write must omit them), so
    none of the write-side rules about them apply; every rule about what an intention means
    still does.
    """
    err = _validate(entry, legacy_write=legacy_write, read=read)
    if err is not None:
        raise InvalidEntry(err)


def _validate(entry: ServiceIntentions, *, legacy_write: bool, read: bool = False) -> str | None:
    if not entry.name:
        return "Name is required"
    err = _wildcard_error(entry.name, entry.namespace_or_default, entry.partition_or_default, "")
    if err is not None:
        return err
    err = _meta_error(entry.meta)
    if err is not None:
        return err
    if not entry.sources:
        return "At least one source is required"
    if entry.jwt is not None:
        for provider in entry.jwt.providers:
            if not provider.name:
                return "JWT provider name is required"
    seen: set[tuple[str, str, str, str, str]] = set()
    for i, src in enumerate(entry.sources):
        err = _validate_source(entry, i, src, legacy_write=legacy_write, read=read)
        if err is not None:
            return err
        key = source_key(src)
        if key in seen:
            if src.peer:
                shown = f'peer("{src.peer}") "{_service_string(src)}"'
                return f"Sources[{i}] defines {shown} more than once"
            return f'Sources[{i}] defines "{_service_string(src)}" more than once'
        seen.add(key)
    return None


def _service_string(src: SourceIntention) -> str:
    return f"{src.partition or DEFAULT}/{src.namespace or DEFAULT}/{src.name}"


def _validate_source(
    entry: ServiceIntentions, i: int, src: SourceIntention, *, legacy_write: bool, read: bool
) -> str | None:
    if not src.name:
        return f"Sources[{i}].Name is required"
    err = _wildcard_error(src.name, src.namespace or DEFAULT, src.partition, src.peer)
    if err is not None:
        return f"Sources[{i}].{err}"
    if src.peer and src.partition:
        return f"Sources[{i}].Peer: cannot set Peer and Partition at the same time."
    if src.sameness_group and src.partition:
        return (
            f"Sources[{i}].SamenessGroup: cannot set SamenessGroup and Partition at the same time"
        )
    if src.sameness_group and src.peer:
        return f"Sources[{i}].SamenessGroup: cannot set SamenessGroup and Peer at the same time"
    if len(src.description) > _META_VALUE_MAX:
        return f"Sources[{i}].Description exceeds maximum length {_META_VALUE_MAX}"
    if legacy_write:
        if src.permissions:
            return f"Sources[{i}].Permissions must be omitted for legacy intentions"
        if src.peer:
            return f"Sources[{i}].Peer cannot be set by legacy intentions"
        if src.sameness_group:
            return f"Sources[{i}].SamenessGroup cannot be set by legacy intentions"
    elif not read:
        if src.legacy_meta:
            return f"Sources[{i}].LegacyMeta must be omitted"
        if src.legacy_create_time is not None:
            return f"Sources[{i}].LegacyCreateTime must be omitted"
        if src.legacy_update_time is not None:
            return f"Sources[{i}].LegacyUpdateTime must be omitted"
        if src.legacy_id:
            return f"Sources[{i}].LegacyID must be omitted"
    if not src.permissions:
        if src.action not in ("allow", "deny"):
            return f"Sources[{i}].Action must be set to 'allow' or 'deny'"
    elif src.action:
        return f"Sources[{i}].Action must be omitted if Permissions are specified"
    if entry.has_wildcard_destination and src.permissions:
        return (
            f"Sources[{i}].Permissions cannot be specified on intentions with wildcarded "
            "destinations"
        )
    if src.type != "consul":
        return f"Sources[{i}].Type must be set to 'consul'"
    for j, perm in enumerate(src.permissions):
        err = _validate_permission(f"Sources[{i}].Permissions[{j}]", perm)
        if err is not None:
            return err
    return None


def _validate_permission(where: str, perm: Permission) -> str | None:
    if perm.action not in ("allow", "deny"):
        return f"{where}.Action must be set to 'allow' or 'deny'"
    if perm.http is None:
        return f"{where}.HTTP is required"
    http = perm.http
    prefix = f"{where}.HTTP"
    path_parts = 0
    if http.path_exact:
        path_parts += 1
        if not http.path_exact.startswith("/"):
            return f"{prefix}.PathExact doesn't start with '/': \"{http.path_exact}\""
    if http.path_prefix:
        path_parts += 1
        if not http.path_prefix.startswith("/"):
            return f"{prefix}.PathPrefix doesn't start with '/': \"{http.path_prefix}\""
    if http.path_regex:
        path_parts += 1
    if path_parts > 1:
        return f"{prefix} should only contain at most one of PathExact, PathPrefix, or PathRegex"
    parts = path_parts
    for k, hdr in enumerate(http.header):
        if not hdr.name:
            return f"{prefix}.Header[{k}] missing required Name field"
        set_count = sum(
            (
                hdr.present,
                bool(hdr.exact),
                bool(hdr.prefix),
                bool(hdr.suffix),
                bool(hdr.contains),
                bool(hdr.regex),
            )
        )
        if set_count != 1:
            return (
                f"{prefix}.Header[{k}] should only contain one of Present, Exact, Prefix, "
                "Suffix, Contains, or Regex"
            )
        parts += 1
    if http.methods:
        found: set[str] = set()
        for method in http.methods:
            if method not in HTTP_METHODS:
                return f'{prefix}.Methods contains an invalid method "{method}"'
            if method in found:
                return f'{prefix}.Methods contains "{method}" more than once'
            found.add(method)
        parts += 1
    if parts == 0:
        return f"{prefix} should not be empty"
    if perm.jwt is not None:
        for provider in perm.jwt.providers:
            if not provider.name:
                return "JWT provider name is required"
    return None


def load_entry(body: object, *, legacy_write: bool = False) -> ServiceIntentions:
    """Decode, normalize and validate one body; what `PUT /v1/config` does before storing."""
    entry = normalize(decode_entry(body))
    if not legacy_write:
        entry = drop_legacy_fields(entry)
    validate(entry, legacy_write=legacy_write)
    return entry


def read_entry(body: object) -> ServiceIntentions:
    """Decode, normalize and validate one entry as Consul returns it on a read
    (`GET /v1/config/service-intentions[/name]`): with `Hash`, the indexes, `Precedence`
    and, for intentions written through the legacy API, `LegacyID`, `LegacyMeta`,
    `LegacyCreateTime` and `LegacyUpdateTime`. Unknown keys and invalid content still raise
    EntryError: what cannot be read exactly cannot be enforced exactly."""
    entry = normalize(decode_entry(body))
    validate(entry, read=True)
    return entry


# --------------------------------------------------------------------------------------------
# Encoding

_T = TypeVar("_T")


def _put(out: dict[str, Any], key: str, value: _T, keep: Callable[[_T], bool] = bool) -> None:
    if keep(value):
        out[key] = value


def entry_to_json(
    entry: ServiceIntentions, *, with_indexes: bool = True, for_write: bool = False
) -> dict[str, Any]:
    """The entry as Consul returns it (`omitempty` fields left out, CE-style defaults elided).

    `for_write` leaves out what Consul computes (Precedence, indexes): the body to PUT.
    """
    out: dict[str, Any] = {"Kind": KIND, "Name": entry.name}
    if entry.namespace and entry.namespace != DEFAULT:
        out["Namespace"] = entry.namespace
    if entry.partition and entry.partition != DEFAULT:
        out["Partition"] = entry.partition
    if entry.jwt is not None:
        out["JWT"] = _jwt_to_json(entry.jwt)
    out["Sources"] = [_source_to_json(s, for_write=for_write) for s in entry.sources]
    _put(out, "Meta", dict(entry.meta))
    if with_indexes and not for_write:
        out["CreateIndex"] = entry.create_index
        out["ModifyIndex"] = entry.modify_index
    return out


def _source_to_json(src: SourceIntention, *, for_write: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": src.name}
    if src.namespace and src.namespace != DEFAULT:
        out["Namespace"] = src.namespace
    if src.partition and src.partition != DEFAULT:
        out["Partition"] = src.partition
    _put(out, "Peer", src.peer)
    _put(out, "SamenessGroup", src.sameness_group)
    _put(out, "Action", src.action)
    if src.permissions:
        out["Permissions"] = [permission_to_json(p) for p in src.permissions]
    if not for_write:
        _put(out, "Precedence", src.precedence)
    _put(out, "Type", src.type)
    _put(out, "Description", src.description)
    _put(out, "LegacyID", src.legacy_id)
    _put(out, "LegacyMeta", dict(src.legacy_meta))
    _put(out, "LegacyCreateTime", src.legacy_create_time, lambda v: v is not None)
    _put(out, "LegacyUpdateTime", src.legacy_update_time, lambda v: v is not None)
    return out


def permission_to_json(perm: Permission) -> dict[str, Any]:
    out: dict[str, Any] = {"Action": perm.action}
    if perm.http is not None:
        h = perm.http
        http: dict[str, Any] = {}
        _put(http, "PathExact", h.path_exact)
        _put(http, "PathPrefix", h.path_prefix)
        _put(http, "PathRegex", h.path_regex)
        _put(http, "Methods", list(h.methods))
        if h.header:
            http["Header"] = [_header_to_json(x) for x in h.header]
        out["HTTP"] = http
    if perm.jwt is not None:
        out["JWT"] = _jwt_to_json(perm.jwt)
    return out


def _header_to_json(h: HeaderMatch) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": h.name}
    _put(out, "Present", h.present)
    _put(out, "Exact", h.exact)
    _put(out, "Prefix", h.prefix)
    _put(out, "Suffix", h.suffix)
    _put(out, "Contains", h.contains)
    _put(out, "Regex", h.regex)
    _put(out, "IgnoreCase", h.ignore_case)
    _put(out, "Invert", h.invert)
    return out


def _jwt_to_json(jwt: JWTRequirement) -> dict[str, Any]:
    providers: list[dict[str, Any]] = []
    for p in jwt.providers:
        item: dict[str, Any] = {"Name": p.name}
        if p.verify_claims:
            item["VerifyClaims"] = [
                {"Path": list(c.path), "Value": c.value} for c in p.verify_claims
            ]
        providers.append(item)
    return {"Providers": providers}


def has_l7_permissions(entry: ServiceIntentions) -> bool:
    return any(src.permissions for src in entry.sources)


def l7_protocol_error(service: str, protocol: str) -> str | None:
    """Consul's service-graph check: L7 permissions need an HTTP-family destination.

    Run it when a `service-intentions` entry with permissions is written (protocol of its
    destination from service-defaults > proxy-defaults `Config.protocol` > "tcp"), and when
    service-defaults/proxy-defaults change the protocol of a service that has such an entry.
    """
    if protocol.lower() in ("http", "http2", "grpc"):
        return None
    return (
        f'service "{service}" has protocol "{protocol}", which is incompatible with L7 '
        "intentions permissions"
    )


def source_display(src: SourceIntention) -> str:
    """`api.Intention` string form of a source: the default namespace and partition elided."""
    parts = []
    if src.peer:
        parts.append(f"peer:{src.peer}")
    elif src.partition and src.partition != DEFAULT:
        parts.append(src.partition)
    if src.namespace and src.namespace != DEFAULT:
        parts.append(src.namespace)
    parts.append(src.name)
    return "/".join(parts)


def destination_display(entry: ServiceIntentions) -> str:
    if entry.namespace and entry.namespace != DEFAULT:
        return f"{entry.namespace}/{entry.name}"
    return entry.name


def intention_display(entry: ServiceIntentions, src: SourceIntention) -> str:
    """`"<src> => <dst> (<detail>)"` as in consul `api.Intention.String()`."""
    n = len(src.permissions)
    detail = src.action if n == 0 else ("1 permission" if n == 1 else f"{n} permissions")
    return f"{source_display(src)} => {destination_display(entry)} ({detail})"


__all__ = [
    "HTTP_METHODS",
    "KIND",
    "WILDCARD",
    "HTTPMatch",
    "HeaderMatch",
    "JWTClaim",
    "JWTProvider",
    "JWTRequirement",
    "Permission",
    "ServiceIntentions",
    "SourceIntention",
    "decode_entry",
    "drop_legacy_fields",
    "entry_to_json",
    "intention_display",
    "load_entry",
    "normalize",
    "permission_to_json",
    "precedence",
    "read_entry",
    "source_key",
    "validate",
]
