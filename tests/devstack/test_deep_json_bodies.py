"""A request body nested deeper than devstack can decode is a 400 naming the problem, never
`500 devstack internal error: RecursionError` with a traceback in the log. Consul's Go decoder
refuses JSON nested past 10,000 levels with `exceeded max depth`; Python's stops near 1,000, so
devstack refuses from there with Consul's words. Found while fuzzing the config-entry decoders
(tests/fuzz): json.loads raises RecursionError, which no endpoint caught, and a Meta value
nested 900 levels (decodable) overflowed the routing-entry decoder's error rendering."""

from __future__ import annotations

import json

import pytest

from devstack.config import DevConfig
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


async def test_a_txn_body_nested_too_deeply_is_a_bad_request(http: Http) -> None:
    status, body, _ = await http.put("/v1/txn", data=DEEP)
    assert (status, body) == (400, "Failed to parse body: exceeded max depth")


ROOT = "3b2c7e6a-0d55-4f0f-9f6e-7a2e8f0c1d11"


@pytest.mark.parametrize(
    "dev_config", [DevConfig(acl_initial_management_token=ROOT, default_policy="deny")]
)
@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (DEEP, 400, "Policy decoding failed: exceeded max depth"),
        (
            json.dumps({"Name": "deep", "Rules": '{"a":' * 5000 + "1" + "}" * 5000}).encode(),
            500,
            "Failed to parse ACL rules: nested too deeply",
        ),
        (
            json.dumps({"Name": "deep", "Rules": 'key_prefix "" { ' * 3000 + "}" * 3000}).encode(),
            500,
            "Failed to parse ACL rules: nested too deeply",
        ),
    ],
)
async def test_acl_policies_nested_too_deeply_are_refused(
    http: Http, body: bytes, status: int, error: str
) -> None:
    """ACL rules in JSON or HCL nested thousands deep: the rules parser recursed to a
    RecursionError (500 'devstack internal error') before."""
    got, text, _ = await http.put("/v1/acl/policy", data=body, headers={"X-Consul-Token": ROOT})
    assert (got, text) == (status, error)
