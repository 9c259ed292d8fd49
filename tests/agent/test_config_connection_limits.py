"""The limits of agent.yaml (`sidecar.max_connections`, `max_pending_handshakes`,
`max_headers`, `max_header_bytes`, `retry_buffer_bytes`, `max_pending_requests`,
`consul.max_response_bytes`): defaults, values reaching what the proxy and the Consul client
are built with, and every bad value refused with its key path (and the state it would leave:
no config at all)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import parse
from agent.sidecar import sidecar_spec
from connect.cluster import Limits
from connect.http1 import HTTPLimits
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


def test_request_limits_defaults_and_where_they_go() -> None:
    cfg = parse(_sidecar(), {})
    side = cfg.sidecar
    assert (side.max_headers, side.max_header_bytes, side.retry_buffer_bytes) == (
        100,
        64 * 1024,
        64 * 1024,
    )
    assert side.max_pending_requests == 1024
    assert cfg.consul.max_response_bytes == cfg.consul_client.max_response_bytes == 64 << 20
    cfg = parse(
        {
            **_sidecar(
                max_headers=20, max_header_bytes=4096, retry_buffer_bytes=0, max_pending_requests=8
            ),
            "consul": {"max_response_bytes": 1 << 20},
        },
        {},
    )
    spec = sidecar_spec(cfg, "spiffe://td/ns/default/dc/dc1/svc/web")
    assert spec.http_limits == HTTPLimits(max_headers=20, max_header_bytes=4096, retry_body_bytes=0)
    assert spec.max_pending_requests == 8
    assert cfg.consul_client.max_response_bytes == 1 << 20
    # Consul's upstream Limits win where they set MaxPendingRequests; unset takes the file's.
    assert spec.cluster_limits(Limits()) == Limits(max_pending_requests=8)
    assert spec.cluster_limits(Limits(max_pending_requests=3)) == Limits(max_pending_requests=3)
    assert spec.cluster_limits(Limits(max_connections=5)) == Limits(
        max_connections=5, max_pending_requests=8
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_headers", 0, "expected a positive integer, got 0"),
        ("max_header_bytes", -1, "expected a positive integer, got -1"),
        ("max_pending_requests", 0, "expected a positive integer, got 0"),
        ("retry_buffer_bytes", -1, "expected 0 or a positive integer, got -1"),
    ],
)
def test_bad_request_limits_name_the_key(key: str, value: int, message: str) -> None:
    assert _problems(_sidecar(**{key: value})) == {f"sidecar.{key}": message}


def test_a_bad_answer_limit_names_the_key() -> None:
    raw = {**_sidecar(), "consul": {"max_response_bytes": 0}}
    assert _problems(raw) == {"consul.max_response_bytes": "expected a positive integer, got 0"}
