"""connect.dataplane.codec: the values the agent pushes to a data-plane process survive the
trip through JSON unchanged, and a value that does not fit its type is refused naming where."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from connect.balancer import Target
from connect.chain_routes import RoutingSnapshot
from connect.dataplane.codec import from_wire, to_wire
from connect.listener import ConnectionLimits
from connect.local_app import LocalAppTimeouts
from connect.sidecar import InboundSpec, SidecarSpec, UpstreamSpec
from tests.connect.test_chain_routes import SUBSETS, _http, _router, _routing, _to


def _trip(tp: Any, value: Any) -> Any:
    return from_wire(tp, json.loads(json.dumps(to_wire(value))))


SPEC = SidecarSpec(
    inbound=InboundSpec(
        "http", "127.0.0.1", 21000, "127.0.0.1", 8080, "spiffe://td/x", "merge_slashes"
    ),
    upstreams=(
        UpstreamSpec("api", "http", "127.0.0.1", 9191),
        UpstreamSpec("db", "tcp", "127.0.0.1", 9192, datacenter="dc2", filter="x"),
    ),
    drain_grace=3.5,
    limits=ConnectionLimits(max_connections=10, max_pending_handshakes=2),
    local_app=LocalAppTimeouts(connect_timeout=0.25, request_timeout=None, idle_timeout=30.0),
)


def test_a_sidecar_spec_round_trips() -> None:
    assert _trip(SidecarSpec, SPEC) == SPEC
    assert _trip(SidecarSpec, SidecarSpec()) == SidecarSpec()


def test_a_routing_snapshot_with_every_matcher_round_trips() -> None:
    routing = _routing(
        "api",
        _http("api"),
        SUBSETS,
        _router(
            {
                "Match": {
                    "HTTP": {
                        "PathRegex": "/a/[0-9]+",
                        "Header": [{"Name": "x-v", "Regex": "[0-9]+"}],
                        "QueryParam": [{"Name": "q", "Regex": "a+"}],
                        "Methods": ["POST", "PUT"],
                    }
                },
                "Destination": _to(
                    "v2", RequestTimeout="3s", NumRetries=2, RetryOnStatusCodes=[503]
                ),
            }
        ),
    )
    snap = RoutingSnapshot(
        routing, {t: (Target("n/a", "10.0.0.1", 80, 2),) for t in routing.targets}, 42
    )
    back = _trip(RoutingSnapshot, snap)
    assert back == snap
    # Computed fields (init=False) are computed again, and the regexes still match.
    assert back.routing.table.fixed == snap.routing.table.fixed
    route = back.routing.table.routes[0]
    assert route.match.path_regex is not None and route.match.path_regex.fullmatch(b"/a/12")


@dataclass(frozen=True)
class _Later:
    """A spec type that grew a field: it travels without the codec knowing it."""

    name: str
    added: tuple[str, ...] = ()
    extra: dict[str, int] = field(default_factory=dict)


def test_new_fields_ride_along_and_defaults_fill_in() -> None:
    value = _Later("a", ("x", "y"), {"k": 1})
    assert _trip(_Later, value) == value
    assert from_wire(_Later, {"name": "b"}) == _Later("b")


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"inbound": None, "upstreams": [{"name": "api"}]}, "upstreams[0]: missing field"),
        ({"upstreams": "api"}, "upstreams: expected a list"),
        ({"drain_grace": True}, "drain_grace: expected a number"),
        ({"surprise": 1}, "unknown field 'surprise'"),
        ({"limits": {"max_connections": "many"}}, "limits.max_connections: expected an integer"),
        (
            {"inbound": {**to_wire(SPEC.inbound), "path_normalization": "weird"}},
            "path_normalization: 'weird' is not one of",
        ),
    ],
)
def test_a_value_that_does_not_fit_is_refused_naming_where(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        from_wire(SidecarSpec, raw)
