"""The /v1/status `proxy` section of a sidecar whose listeners run in data-plane processes
(pure): the agent's own view (leaf, intentions, routing, as `agent.sidecar.Sidecar.status`
builds it) with what the data planes serve put in.

The agent knows what it pushed; a caller of /v1/status wants what is served. So the parts a
snapshot carries say what the data planes applied, not what the agent holds: a test (or an
operator) that waits for `intentions.index`, `leaf.generation`, an upstream's endpoints or a
route's `applied` index may then send traffic and see it enforced. With several data planes,
each such part is the oldest of theirs (every one serves it), the counters and connections
are their sums, and a listener runs when any of them runs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.supervisor import sum_counters

Report = tuple[int, Mapping[str, Any], Mapping[str, Any]]
"""(applied snapshot version, its `serving` report, its counters): one data plane's."""


def merge_proxy_status(
    agent: Mapping[str, Any],
    reports: Sequence[Report],
    leaves: Mapping[int, Mapping[str, Any]],
    stats: Mapping[str, Any],
) -> dict[str, Any]:
    """`agent` (the agent's `proxy` section) with the data planes' `reports` put in;
    `leaves`: the leaf each published snapshot version carried (`generation`, `uri`,
    `trust_domain`); `stats`: the counters of every process summed (`proxy.stats`)."""
    serving = [r[1] for r in reports]
    oldest = min((r[0] for r in reports), default=None)
    out = dict(agent)
    out["listeners"] = {
        label: any(bool(s.get("listeners", {}).get(label)) for s in serving)
        for label in agent.get("listeners", {})
    }
    out["connections"] = sum_counters(s.get("connections", {}) for s in serving)
    upstreams: dict[str, Any] = {}
    for _, report, _ in sorted(reports, key=lambda r: r[0]):
        for name, up in report.get("upstreams", {}).items():
            upstreams.setdefault(name, up)  # the oldest snapshot's: every data plane has it
    out["upstreams"] = upstreams
    out["heap_trims"] = sum(int(s.get("heap_trims", 0)) for s in serving)
    intentions = dict(agent.get("intentions", {}))
    intentions["index"] = min((int(s.get("intentions_index", 0)) for s in serving), default=0)
    intentions["loaded"] = bool(intentions.get("loaded")) and bool(serving)
    out["intentions"] = intentions
    by_age = [s for _, s, _ in sorted(reports, key=lambda r: r[0])]
    if by_age and by_age[0].get("mutual_tls_mode"):
        out["mutual_tls"] = {**agent.get("mutual_tls", {}), "mode": by_age[0]["mutual_tls_mode"]}
    served = leaves.get(oldest, {}) if oldest is not None else {}
    out["leaf"] = {**agent.get("leaf", {}), "generation": 0, "uri": "", **served}
    routing = dict(agent.get("routing", {}))
    if "upstreams" in routing:
        routed = [s.get("routing", {}) for s in by_age]
        routing["upstreams"] = {
            name: {
                **up,
                "applied": min((int(r.get(name, {}).get("applied", 0)) for r in routed), default=0),
                "targets": routed[0].get(name, {}).get("targets", []) if routed else [],
            }
            for name, up in routing["upstreams"].items()
        }
    out["routing"] = routing
    tracing = dict(agent.get("tracing", {}))
    # The agent's own (zero: it sends no request) keep every key there while none reported.
    tracing["spans"] = sum_counters(
        [tracing.get("spans", {}), *(r[2].get("tracing", {}) for r in reports)]
    )
    out["tracing"] = tracing
    out["stats"] = dict(stats)
    return out


__all__ = ["Report", "merge_proxy_status"]
