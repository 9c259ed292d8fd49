"""connect.authz decodes a request's fields only when a permission reads one; what it then
builds must be exactly the mapping `intentions.engine.http_request` builds (lower-case names,
repeated fields joined with `,` in order, the pseudo-headers over any field of that name), and
a decision that reads no field must not decode any."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import overload

from connect.authz import _RequestFields, intentions_authorizers
from connect.seams import Peer
from intentions.engine import Identity, compile_snapshot, http_request
from intentions.entries import load_entry

_FIELDS = [
    (b"Host", b"api"),
    (b"X-Env", b"dev"),
    (b"x-env", b"prod"),
    (b"Accept", b"*/*"),
    (b"X-LATIN", b"caf\xe9"),
    (b"x-empty", b""),
]


def test_the_fields_are_what_http_request_builds() -> None:
    merged: dict[str, list[str]] = {}
    for name, value in _FIELDS:
        merged.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    eager = http_request("GET", "/a?b", "api", merged, normalize=False)
    bare = http_request("GET", "/a?b", "api", normalize=False)
    lazy = _RequestFields(_FIELDS, bare.headers)
    assert dict(lazy) == dict(eager.headers)
    assert lazy["x-env"] == "dev,prod" and lazy[":authority"] == "api"
    assert "accept" in lazy and "Accept" not in lazy and lazy.get("nope") is None
    assert len(lazy) == len(eager.headers)


class _Counted(Sequence[tuple[bytes, bytes]]):
    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.fields = fields
        self.reads = 0

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self.reads += 1
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    @overload
    def __getitem__(self, i: int) -> tuple[bytes, bytes]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[bytes, bytes]]: ...
    def __getitem__(self, i: int | slice) -> tuple[bytes, bytes] | list[tuple[bytes, bytes]]:
        return self.fields[i]


def _decide(http: Mapping[str, object], fields: _Counted) -> bool:
    entry = load_entry(
        {
            "Kind": "service-intentions",
            "Name": "api",
            "Sources": [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": http}]}],
        }
    )
    snapshot = compile_snapshot([entry], default_allow=False)
    _, request = intentions_authorizers(lambda: snapshot, Identity("api"))
    peer = Peer("spiffe://td/ns/default/dc/dc1/svc/web", Identity("web"), "00")
    return request(peer, b"GET", b"/admin", b"api", fields).allowed


def test_fields_are_read_only_by_a_permission_on_them() -> None:
    fields = _Counted(list(_FIELDS))
    assert _decide({"PathPrefix": "/admin"}, fields)
    assert fields.reads == 0
    on_env = {"PathPrefix": "/admin", "Header": [{"Name": "X-Env", "Exact": "dev,prod"}]}
    assert _decide(on_env, fields)
    assert fields.reads == 1
    on_env["Header"] = [{"Name": "X-Env", "Exact": "dev"}]
    assert not _decide(on_env, fields)
