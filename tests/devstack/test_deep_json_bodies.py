"""A request body nested deeper than devstack can decode is a 400 naming the problem, never
`500 devstack internal error: RecursionError` with a traceback in the log. Consul's Go decoder
refuses JSON nested past 10,000 levels with `exceeded max depth`; Python's stops near 1,000, so
devstack refuses from there with Consul's words. Found while fuzzing the config-entry decoders
(tests/fuzz): json.loads raises RecursionError, which no endpoint caught, and a Meta value
nested 900 levels (decodable) overflowed the routing-entry decoder's error rendering."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Http

DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/agent/service/register"),
        ("PUT", "/v1/catalog/register"),
        ("PUT", "/v1/config"),
        ("POST", "/v1/discovery-chain/web"),
        ("POST", "/v1/connect/intentions"),
    ],
)
async def test_a_body_nested_too_deeply_is_a_bad_request(
    http: Http, method: str, path: str
) -> None:
    status, body, _ = await http.call(method, path, data=DEEP)
    assert "RecursionError" not in str(body)
    assert "exceeded max depth" in str(body), body
    # The legacy intentions endpoint reports decode failures as server errors, as Consul does.
    assert status == (500 if path == "/v1/connect/intentions" else 400), body


async def test_a_deep_value_where_a_string_belongs_is_named(http: Http) -> None:
    meta = "1"
    for _ in range(900):
        meta = '{"a": ' + meta + "}"
    body = '{"Kind": "service-router", "Name": "web", "Meta": {"k": ' + meta + "}}"
    json.loads(body)  # decodable: the decoder itself must cope
    status, text, _ = await http.put("/v1/config", data=body)
    assert status == 400, text
    assert "Meta[k]" in text and "RecursionError" not in text, text
