"""The sidecar composition's pure parts and its fail-closed state before anything is held."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import AgentConfig, parse
from agent.sidecar import Sidecar, compile_intentions, default_allow
from agent.watch import WatchSettings
from intentions.engine import Identity
from intentions.errors import EntryError


def _config(**sidecar: Any) -> AgentConfig:
    raw = {
        "service": {"name": "api", "port": 8080},
        "sidecar": {"port": 21000, "protocol": "http", **sidecar},
    }
    return parse(raw, {})


def _sidecar() -> Sidecar:
    return Sidecar(_config(upstreams=[{"name": "db", "local_bind_port": 9191}]), {}, WatchSettings)


@pytest.mark.parametrize(
    ("debug", "allowed"),
    [
        ({}, True),
        ({"ACLsEnabled": False, "DefaultIntentionPolicy": ""}, True),
        ({"ACLsEnabled": True, "ACLResolverSettings": {"ACLDefaultPolicy": "deny"}}, False),
        ({"ACLsEnabled": True, "ACLResolverSettings": {"ACLDefaultPolicy": "allow"}}, True),
        ({"ACLsEnabled": True}, False),  # unreadable ACL default: fail closed
        ({"ACLsEnabled": True, "DefaultIntentionPolicy": "allow"}, True),
        ({"ACLsEnabled": False, "DefaultIntentionPolicy": "deny"}, False),
    ],
)
def test_default_intention_policy_follows_consul(debug: dict[str, Any], allowed: bool) -> None:
    assert default_allow({"DebugConfig": debug})[0] is allowed


def _entry(action: str, **extra: Any) -> dict[str, Any]:
    return {
        "Kind": "service-intentions",
        "Name": "api",
        "Sources": [{"Name": "web", "Action": action}],
        "CreateIndex": 5,
        "ModifyIndex": 7,
        **extra,
    }


def test_stored_entries_compile() -> None:
    snap = compile_intentions((_entry("deny"),), default_allow=True, default_reason="d")
    assert not snap.decide_connection(Identity("api"), Identity("web")).allowed
    assert snap.decide_connection(Identity("api"), Identity("other")).allowed


def test_an_unenforceable_entry_keeps_the_previous_snapshot() -> None:
    side = _sidecar()
    side._apply_intentions((_entry("allow"),), 10, (False, "default deny"))
    before = side.intentions.get()
    assert before.decide_connection(Identity("api"), Identity("web")).allowed
    jwt = _entry("deny", JWT={"Providers": [{"Name": "okta"}]})
    with pytest.raises(EntryError):
        compile_intentions((jwt,), default_allow=False, default_reason="d")
    side._apply_intentions((jwt,), 11, (False, "default deny"))
    assert side.intentions.get() is before
    assert side.intentions_index == 10
    assert "kept the previous snapshot" in side.intentions_error


def test_entries_of_other_services_do_not_hold_back_ours() -> None:
    side = _sidecar()
    other = {**_entry("deny", JWT={"Providers": [{"Name": "okta"}]}), "Name": "billing"}
    wildcard = {**_entry("allow"), "Name": "*"}
    assert side._relevant((other, _entry("deny"), wildcard)) == (_entry("deny"), wildcard)


async def test_before_a_leaf_and_intentions_nothing_is_ready() -> None:
    side = _sidecar()
    assert not side.intentions.get().decide_connection(Identity("api"), Identity("web")).allowed
    got = await side.check()
    assert not got.ready
    assert got.leaf_expires_at is None
    assert any("intentions not loaded yet" in r for r in got.reasons)
    assert "listener inbound :21000: not started" in got.reasons
    assert "listener upstream db 127.0.0.1:9191: not started" in got.reasons
    assert any("no leaf certificate yet from the 'consul' source" in r for r in got.reasons)
