"""agent.mutual_tls: the local service's MutualTLSMode from Consul's entries (pure)."""

from __future__ import annotations

import pytest

from agent.mutual_tls import ResolvedMode, entry_mode, resolve


def test_the_service_entry_wins_then_proxy_defaults_then_strict() -> None:
    assert resolve("api", "", "") == ResolvedMode("strict", "default")
    assert resolve("api", "", "permissive") == ResolvedMode("permissive", "proxy-defaults/global")
    assert resolve("api", "strict", "permissive") == ResolvedMode("strict", "service-defaults/api")
    assert resolve("api", "permissive", "strict") == ResolvedMode(
        "permissive", "service-defaults/api"
    )


@pytest.mark.parametrize("bad", ["PERMISSIVE", "loose", 1, ["permissive"], {"x": 1}])
def test_a_value_meshlet_does_not_know_is_strict_and_says_so(bad: object) -> None:
    got = resolve("api", bad, "permissive")
    assert got.mode == "strict"
    assert got.source == "service-defaults/api"
    assert "is not one of" in got.problem and "strict is applied" in got.problem


def test_entry_mode_reads_the_named_entry_only() -> None:
    entries = [
        {"Kind": "service-defaults", "Name": "web", "MutualTLSMode": "permissive"},
        {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
    ]
    assert entry_mode(entries, "api") == ""
    assert entry_mode(entries, "web") == "permissive"
    assert entry_mode(entries, "db") == ""
