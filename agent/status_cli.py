"""`meshlet status`: the agent's /v1/status as tables, for people at a terminal.

Exit codes (for scripts and probes):

    0  ready and not degraded
    1  the admin API could not be read (the agent is not running, or not at --admin-addr)
    3  not ready (the reasons are printed)
    4  ready but degraded (e.g. a destination's intentions cannot be enforced)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show a running agent's registration, Consul connectivity and upstreams",
        description="Read a running agent's /v1/status and print it as tables.",
    )
    p.add_argument(
        "--admin-addr",
        default="127.0.0.1:19000",
        help="the agent's admin.address (default %(default)s)",
    )
    p.add_argument("--upstream", default=None, help="only this upstream")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--endpoints", action="store_true", help="list every endpoint of every upstream")
    p.set_defaults(run=_run_status)


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    seconds = max(0.0, now - ts)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def _refusals(status: Mapping[str, Any]) -> Mapping[str, Mapping[str, int]]:
    """Failed dials per upstream and kind: the worker group's totals when there are workers."""
    stats = status.get("stats_total") or (status.get("proxy") or {}).get("stats") or {}
    refusals: Mapping[str, Mapping[str, int]] = stats.get("upstream_refusals") or {}
    return refusals


def _trouble(status: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Watch errors, rejected snapshots and refused handshakes: what an operator looks for
    first when traffic fails (the worker group's totals when there are workers)."""
    proxy = status.get("proxy") or {}
    intentions = proxy.get("intentions") or {}
    ups = status.get("upstreams") or []
    errors = sum(int(u.get("failures") or 0) for u in ups) + int(intentions.get("failures") or 0)
    rejected = sum(int(u.get("rejected") or 0) for u in ups) + int(
        intentions.get("broken_total") or 0
    )
    stats = (status.get("workers") or {}).get("stats_total") or proxy.get("stats") or {}
    reasons = stats.get("handshake_failures") or {}
    limits = stats.get("connections_refused_limit") or {}
    refused = int(stats.get("handshakes_failed") or 0)
    detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()) if v)
    over = sum(int(v) for v in limits.values())
    tracing = proxy.get("tracing") or {}
    rejected += int(tracing.get("rejected") or 0)
    return [
        ("watch errors", str(errors)),
        ("rejected snapshots", str(rejected)),
        (
            "refused handshakes",
            f"{refused}" + (f" ({detail})" if detail else "") + f", over the cap {over}",
        ),
        *([("tracing", _tracing(tracing))] if tracing else []),
    ]


def _tracing(t: Mapping[str, Any]) -> str:
    """Settings in force, spans dropped, and the last refused settings' error."""
    if not t.get("on"):
        shown = "off"
    else:
        spans = t.get("spans") or {}
        shown = (
            f"{t.get('sampling_percent', 0):g}% to {t.get('otlp_endpoint', '')}, "
            f"{int(spans.get('dropped') or 0)} spans dropped"
        )
    error = t.get("last_error") or ""
    return f"{shown}; refused: {error}" if error else shown


def render(status: Mapping[str, Any], now: float, *, endpoints: bool = False) -> str:
    """The status as text: a summary table, then one row per upstream (pure, for tests)."""
    reg, side, consul = status["registration"], status["sidecar"], status["consul"]
    leaf = status["leaf"]["expires_at"]
    state = "draining" if status["draining"] else ("ready" if status["ready"] else "not ready")
    if status["degraded"]:
        state += ", degraded"
    summary = [
        ("service", f"{status['service']['id']} ({status['service']['name']})"),
        ("state", state),
        *[("  why", r) for r in [*status["reasons"], *status["degraded_reasons"]]],
        (
            "registration",
            f"{reg['phase']}, synced {_age(reg['last_sync'], now)}"
            + (f", error: {reg['last_error']}" if reg["last_error"] else ""),
        ),
        ("sidecar", "ready" if side["ready"] else "not ready: " + "; ".join(side["reasons"])),
        (
            "leaf expires",
            "-" if leaf is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(leaf)),
        ),
        (
            "consul",
            f"{consul['address']} "
            + {True: "reachable", False: "UNREACHABLE", None: "not contacted yet"}[
                consul["reachable"]
            ]
            + (f" since {_age(consul['since'], now)}" if consul["since"] else "")
            + (f": {consul['last_error']}" if consul["last_error"] else ""),
        ),
    ]
    proxy = status.get("proxy") or {}
    leaf_state = proxy.get("leaf") or {}
    if leaf_state.get("trust_domain"):
        summary.append(("trust domain", leaf_state["trust_domain"]))
    if leaf_state.get("problem"):
        summary.append(("leaf problem", leaf_state["problem"]))
    summary += _trouble(status)
    workers = status.get("workers") or {}
    for w in workers.get("processes", ()):
        if w["state"] == "running":
            state = "serving" if w["ready"] else "not serving: " + "; ".join(w["problems"])
        else:
            state = w["state"]
        restarts = f", {w['restarts']} restarts, last {w['last_exit']}" if w["restarts"] else ""
        summary.append((f"worker {w['index']}", f"pid {w['pid'] or '-'}, {state}{restarts}"))
    out = [_table(("", ""), [(k, v) for k, v in summary]).split("\n", 1)[1]]
    rows = []
    for up in status["upstreams"]:
        where = up["datacenter"] or (f"peer:{up['peer']}" if up["peer"] else "local")
        health = "ok" if up["stale_since"] is None else f"stale {_age(up['stale_since'], now)}"
        if up.get("holding"):
            health = up["holding"]
        rows.append(
            (
                up["name"],
                where,
                up["local_bind"],
                str(len(up["endpoints"])),
                str(up["index"] if up["index"] is not None else "-"),
                _age(up["updated_at"], now),
                health,
            )
        )
    out.append("")
    out.append(
        _table(("UPSTREAM", "WHERE", "BIND", "ENDPOINTS", "INDEX", "UPDATED", "STATE"), rows)
        if rows
        else "no upstreams"
    )
    refused = [
        (name, kind, str(count))
        for name, kinds in sorted(_refusals(status).items())
        for kind, count in sorted(kinds.items())
    ]
    if refused:
        out.append("")
        out.append(_table(("UPSTREAM", "DIALS FAILED", "COUNT"), refused))
    chains = (proxy.get("routing") or {}).get("upstreams") or {}
    routed = [
        (
            name,
            c["protocol"] or "-",
            "chain" if c["routed"] else "own watch",
            ", ".join(c["targets"]) or "-",
            str(c["index"]),
            f"{c['rejected']}: {c['error']}" if c["error"] else str(c["rejected"]),
        )
        for name, c in sorted(chains.items())
    ]
    if routed:
        out.append("")
        out.append(
            _table(
                ("UPSTREAM", "PROTOCOL", "ROUTED BY", "TARGETS", "CHAIN INDEX", "REJECTED"), routed
            )
        )
    if endpoints:
        for up in status["upstreams"]:
            out.append("")
            out.append(f"{up['name']}:")
            eps = [
                (e["node"], e["service_id"], f"{e['address']}:{e['port']}", str(e["weight"]))
                for e in up["endpoints"]
            ]
            out.append(_table(("NODE", "ID", "ADDRESS", "WEIGHT"), eps) if eps else "  (none)")
    return "\n".join(out) + "\n"


def _run_status(args: argparse.Namespace) -> int:
    url = f"http://{args.admin_addr}/v1/status"
    if args.upstream:
        url += "?upstream=" + urllib.parse.quote(args.upstream)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"meshlet status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(body, time.time(), endpoints=args.endpoints))
    if not body.get("ready"):
        return 3
    return 4 if body.get("degraded") else 0
