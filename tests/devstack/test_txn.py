"""/v1/txn over real HTTP: Consul's verbs, result and error shapes, all-or-nothing, limits,
and ACL checks per operation. Each test failed on the original devstack (no /v1/txn: 404)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from devstack.config import DevConfig
from tests.conftest import Http


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def kv(verb: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"KV": {"Verb": verb, "Key": key, **extra}}


async def test_set_then_get_results_and_one_index(http: Http) -> None:
    status, body, _ = await http.put(
        "/v1/txn", json=[kv("set", "a", Value=b64(b"1")), kv("set", "b", Value=b64(b"2"))]
    )
    assert status == 200
    assert body["Errors"] is None
    first, second = (r["KV"] for r in body["Results"])
    # Write results carry no value, and every write of one transaction has the same index.
    assert first["Value"] is None and second["Value"] is None
    assert first["ModifyIndex"] == second["ModifyIndex"]
    status, body, _ = await http.put("/v1/txn", json=[kv("get", "a"), kv("get-tree", "")])
    assert status == 200
    values = [r["KV"]["Value"] for r in body["Results"]]
    assert values == [b64(b"1"), b64(b"1"), b64(b"2")]


async def test_failed_op_rolls_back_everything_with_409(http: Http) -> None:
    await http.put("/v1/kv/keep", data=b"old")
    status, body, _ = await http.put(
        "/v1/txn",
        json=[
            kv("set", "keep", Value=b64(b"new")),
            kv("delete-tree", ""),
            kv("cas", "fresh", Value=b64(b"x"), Index=99),
            kv("get", "missing"),
        ],
    )
    assert status == 409
    assert body == {
        "Results": None,
        "Errors": [
            {"OpIndex": 2, "What": 'failed to set key "fresh", index is stale'},
            {"OpIndex": 3, "What": 'key "missing" doesn\'t exist'},
        ],
    }
    status, entries, _ = await http.get("/v1/kv/keep")
    assert base64.b64decode(entries[0]["Value"]) == b"old"


async def test_cas_check_index_delete_cas(http: Http) -> None:
    status, body, _ = await http.put("/v1/txn", json=[kv("cas", "k", Value=b64(b"1"), Index=0)])
    assert status == 200
    index = body["Results"][0]["KV"]["ModifyIndex"]
    status, body, _ = await http.put("/v1/txn", json=[kv("check-index", "k", Index=index + 1)])
    assert status == 409
    assert body["Errors"][0]["What"] == (
        f'failed index check for key "k", current modify index {index} != {index + 1}'
    )
    status, body, _ = await http.put(
        "/v1/txn", json=[kv("check-index", "k", Index=index), kv("delete-cas", "k", Index=index)]
    )
    assert status == 200
    status, _, _ = await http.get("/v1/kv/k")
    assert status == 404


async def test_lock_unlock_and_check_session(http: Http) -> None:
    status, created, _ = await http.put("/v1/session/create", json={})
    session = created["ID"]
    status, body, _ = await http.put(
        "/v1/txn", json=[kv("lock", "l", Value=b64(b"v"), Session=session)]
    )
    assert status == 200
    assert body["Results"][0]["KV"]["LockIndex"] == 1
    assert body["Results"][0]["KV"]["Session"] == session
    status, body, _ = await http.put("/v1/txn", json=[kv("lock", "l", Session="other")])
    assert status == 409 and body["Errors"][0]["What"] == 'invalid session "other"'
    status, body, _ = await http.put("/v1/txn", json=[kv("check-session", "l", Session="")])
    assert status == 409 and "failed session check" in body["Errors"][0]["What"]
    status, body, _ = await http.put(
        "/v1/txn",
        json=[kv("check-session", "l", Session=session), kv("unlock", "l", Session=session)],
    )
    assert status == 200
    status, entries, _ = await http.get("/v1/kv/l")
    assert "Session" not in entries[0]


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ([kv("get", "x")] * 129, 413, "Transaction contains too many operations (129 > 128)"),
        ([kv("set", "x", Value="not base64!")], 400, "Failed to parse body: failed to decode"),
        ({"KV": {}}, 400, "Failed to parse body"),
        ([kv("frobnicate", "x")], 409, ""),
        ([{"Node": {"Verb": "get"}}], 400, "KV operations only, not Node operations"),
    ],
)
async def test_bad_transactions_are_refused_clearly(
    http: Http, body: Any, status: int, text: str
) -> None:
    got, answer, _ = await http.put("/v1/txn", json=body)
    assert got == status
    if status == 409:
        assert answer["Errors"] == [{"OpIndex": 0, "What": 'unknown KV verb "frobnicate"'}]
    else:
        assert text in answer
    status, _, _ = await http.get("/v1/kv/", params={"keys": ""})
    assert status == 404  # nothing was written


async def test_oversized_value_is_413(http: Http) -> None:
    big = b64(b"x" * (512 * 1024 + 1))
    status, text, _ = await http.put("/v1/txn", json=[kv("set", "big", Value=big)])
    assert status == 413
    assert "too large" in text


ROOT = "root-token"


@pytest.mark.parametrize(
    "dev_config", [DevConfig(acl_initial_management_token=ROOT, default_policy="deny")]
)
async def test_acl_checked_per_operation_and_reads_filtered(http: Http) -> None:
    root = {"X-Consul-Token": ROOT}
    await http.put(
        "/v1/acl/policy",
        json={"Name": "app", "Rules": 'key_prefix "app/" { policy = "write" }'},
        headers=root,
    )
    status, token, _ = await http.put(
        "/v1/acl/token", json={"Policies": [{"Name": "app"}]}, headers=root
    )
    me = {"X-Consul-Token": token["SecretID"]}
    await http.put("/v1/kv/other/x", data=b"1", headers=root)
    status, body, _ = await http.put(
        "/v1/txn", json=[kv("set", "app/a", Value=b64(b"1")), kv("set", "other/x")], headers=me
    )
    assert status == 409
    assert body["Errors"] == [
        {
            "OpIndex": 1,
            "What": f"Permission denied: token with AccessorID '{token['AccessorID']}' "
            "lacks permission 'key:write' on \"other/x\"",
        }
    ]
    status, _, _ = await http.get("/v1/kv/app/a", headers=root)
    assert status == 404  # the allowed op was not applied either
    await http.put("/v1/kv/app/b", data=b"2", headers=root)
    status, body, headers = await http.put("/v1/txn", json=[kv("get-tree", "")], headers=me)
    assert status == 200
    assert [r["KV"]["Key"] for r in body["Results"]] == ["app/b"]
    # Consul's Txn handler does not report the filtering in a header.
    assert "X-Consul-Results-Filtered-By-ACLs" not in headers
