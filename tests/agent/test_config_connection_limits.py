"""`sidecar.max_connections` and `sidecar.max_pending_handshakes`: defaults, and every bad
value refused with its key path (and the state it would leave: no config at all)."""

from __future__ import annotations

from typing import Any

from agent.config import parse
from tests.agent.test_agent_config import _problems


def _sidecar(**values: Any) -> dict[str, Any]:
    return {"service": {"name": "web", "port": 8080}, "sidecar": values}


def test_defaults_and_values() -> None:
    side = parse(_sidecar(), {}).sidecar
    assert (side.max_connections, side.max_pending_handshakes) == (4096, 512)
    side = parse(_sidecar(max_connections=100, max_pending_handshakes=100), {}).sidecar
    assert (side.max_connections, side.max_pending_handshakes) == (100, 100)


def test_bad_values_name_the_key() -> None:
    assert _problems(_sidecar(max_connections=0)) == {
        "sidecar.max_connections": "expected a positive integer, got 0"
    }
    assert _problems(_sidecar(max_pending_handshakes=-1)) == {
        "sidecar.max_pending_handshakes": "expected a positive integer, got -1"
    }
    # Above max_connections is allowed: that cap then bites first (max_connections: 100
    # alone must not be an error about the default 512).
    assert parse(_sidecar(max_connections=100), {}).sidecar.max_pending_handshakes == 512
    problems = _problems(_sidecar(max_connections="many"))
    assert list(problems) == ["sidecar.max_connections"]
    assert "integer" in problems["sidecar.max_connections"]
