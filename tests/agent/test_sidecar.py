"""The sidecar composition's pure parts and its fail-closed state before anything is held."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import AgentConfig, parse
from agent.sidecar import Sidecar, compile_intentions, default_allow
from agent.watch import WatchSettings
from intentions.engine import Identity


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


def test_an_unenforceable_entry_denies_its_destination_never_the_previous_state() -> None:
    side = _sidecar()
    side._apply_intentions((_entry("allow"),), 10, (True, "default allow"))
    assert side.intentions.get().decide_connection(Identity("api"), Identity("web")).allowed
    assert side.degradations() == []
    jwt = _entry("allow", JWT={"Providers": [{"Name": "okta"}]})
    side._apply_intentions((jwt,), 11, (True, "default allow"))
    snap = side.intentions.get()
    for source in ("web", "other"):
        got = snap.decide_connection(Identity("api"), Identity(source))
        assert not got.allowed
        assert "JWT requirements are not enforced by meshlet" in got.reason
    assert side.intentions_index == 11
    assert side.status()["intentions"]["broken"] == {
        "api": "web => api (allow): JWT requirements are not enforced by meshlet"
    }
    assert side.intentions_broken_total == 1
    [reason] = side.degradations()
    assert reason.startswith("intentions for api cannot be enforced (index 11), denying")
    # The same broken entry at a later index (another entry changed) is not counted again.
    side._apply_intentions((jwt,), 12, (True, "default allow"))
    assert side.intentions_broken_total == 1
    side._apply_intentions((_entry("deny"),), 13, (True, "default allow"))
    snap = side.intentions.get()
    assert not snap.decide_connection(Identity("api"), Identity("web")).allowed
    assert snap.decide_connection(Identity("api"), Identity("other")).allowed
    assert side.degradations() == []
    assert side.status()["intentions"]["broken_total"] == 1


def test_a_legacy_entry_as_consul_returns_it_is_enforced() -> None:
    legacy = _entry(
        "deny",
        Hash=1234567890123,
        Sources=[
            {
                "Name": "web",
                "Action": "deny",
                "Precedence": 9,
                "Type": "consul",
                "LegacyID": "0b0e6a36-1f0b-4d3b-9a43-3f4f3c2c1a10",
                "LegacyMeta": {"owner": "ops"},
                "LegacyCreateTime": "2026-12-06T07:39:52.713662123Z",
                "LegacyUpdateTime": "2026-12-06T07:39:52.713662123Z",
            }
        ],
    )
    snap = compile_intentions((legacy,), default_allow=True, default_reason="d")
    assert snap.broken == {}
    assert not snap.decide_connection(Identity("api"), Identity("web")).allowed
    assert snap.decide_connection(Identity("api"), Identity("other")).allowed


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
