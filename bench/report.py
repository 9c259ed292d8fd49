"""The figures of `make bench`: summary objects, the markdown table, the shape check.

Pure functions over the JSON-ready dict bench/run.py builds, so the shape check can be
tested without running the benchmark (tests/bench/test_report_shape.py).
"""

from __future__ import annotations

import math
from typing import Any

RATES = ("1000", "2000", "5000")
VARIANTS = ("direct", "meshlet-http", "meshlet-l4", "haproxy-http", "haproxy-tcp")
PAIRS = VARIANTS[1:]
L4_PAIRS = ("meshlet-l4", "haproxy-tcp")
HTTP_PAIRS = ("meshlet-http", "haproxy-http")
SUMMARY_KEYS = {
    "ratios": ("l4_rps", "http_rps", "l4_bulk", "handshakes_full", "handshakes_resumed"),
    "added_p99_ms": ("l4", "http"),
    "rss_mb": ("meshlet", "haproxy"),
    "cpu_us_per_req": ("meshlet_http", "haproxy_http", "meshlet_l4", "haproxy_tcp"),
}
CONTROL_KEYS = {
    "intentions": ("compile_ms", "decide_l7_us", "decide_l4_us"),
    "agent": ("rss_mb_ready", "apply_big_p50_ms"),
}
# Issue 15's targets: (summary object, key, comparison, bound).
TARGETS = (
    ("ratios", "l4_rps", ">=", 0.95),
    ("ratios", "http_rps", ">=", 0.90),
    ("ratios", "l4_bulk", ">=", 0.90),
    ("ratios", "handshakes_full", ">=", 0.85),
    ("ratios", "handshakes_resumed", ">=", 1.0),
    ("added_p99_ms", "l4", "<=", 0.3),
    ("added_p99_ms", "http", "<=", 0.5),
    ("cpu_us_per_req", "meshlet_http", "<=", 50.0),  # 0.05 vCPU per 1,000 RPS
    ("cpu_us_per_req", "meshlet_l4", "<=", 50.0),
    ("rss_mb", "meshlet", "<=", 30.0),
)


def _get(obj: Any, *path: str) -> float:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return math.nan
        obj = obj[key]
    try:
        return float(obj)
    except (TypeError, ValueError):
        return math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` plus the summary objects issue 15 names (meshlet / haproxy from this run)."""
    v = raw["variants"]

    def rps(name: str) -> float:
        return _get(v, name, "max_rps", "rps")

    def shakes(name: str, kind: str) -> float:
        return _get(v, name, "handshakes", kind, "rps")

    def p99(name: str) -> float:
        return _get(v, name, "open_loop", "2000", "p99_ms")

    def cpu(name: str) -> float:
        return _get(v, name, "open_loop", "2000", "cpu_us_per_req_per_sidecar")

    def rss(*names: str) -> float:
        sizes = [float(x) for n in names for x in (v.get(n, {}).get("rss_mb") or [])]
        return max(sizes) if sizes else math.nan

    direct = p99("direct")
    out = dict(raw)
    out["ratios"] = {
        "l4_rps": _ratio(rps("meshlet-l4"), rps("haproxy-tcp")),
        "http_rps": _ratio(rps("meshlet-http"), rps("haproxy-http")),
        "l4_bulk": _ratio(
            _get(v, "meshlet-l4", "bulk", "gbit_s"), _get(v, "haproxy-tcp", "bulk", "gbit_s")
        ),
        "handshakes_full": _ratio(shakes("meshlet-l4", "full"), shakes("haproxy-tcp", "full")),
        "handshakes_resumed": _ratio(
            shakes("meshlet-l4", "resumed"), shakes("haproxy-tcp", "resumed")
        ),
    }
    out["added_p99_ms"] = {
        "l4": p99("meshlet-l4") - direct,
        "http": p99("meshlet-http") - direct,
        "haproxy_tcp": p99("haproxy-tcp") - direct,
        "haproxy_http": p99("haproxy-http") - direct,
    }
    out["rss_mb"] = {
        "meshlet": rss("meshlet-http", "meshlet-l4"),
        "haproxy": rss("haproxy-http", "haproxy-tcp"),
    }
    out["cpu_us_per_req"] = {
        "meshlet_http": cpu("meshlet-http"),
        "haproxy_http": cpu("haproxy-http"),
        "meshlet_l4": cpu("meshlet-l4"),
        "haproxy_tcp": cpu("haproxy-tcp"),
    }
    tel = raw.get("telemetry", {})
    if tel.get("available"):
        tel["cpu_us_per_req_added"] = cpu("meshlet-http-telemetry") - cpu("meshlet-http")
        tel["rps_ratio"] = _ratio(rps("meshlet-http-telemetry"), rps("meshlet-http"))
    out["targets"] = {
        f"{obj}.{key}": {
            "bound": f"{op} {bound}",
            "value": out[obj][key],
            "met": (out[obj][key] >= bound) if op == ">=" else (out[obj][key] <= bound),
        }
        for obj, key, op, bound in TARGETS
    }
    return out


def _finite(x: float) -> bool:
    return not math.isnan(x) and not math.isinf(x)


def check_shape(rep: dict[str, Any]) -> list[str]:
    """Every figure `make bench` promises, as a list of what is missing (empty: all there)."""
    missing: list[str] = []
    v = rep.get("variants", {})

    def need(what: str, x: float, positive: bool = True) -> None:
        if not _finite(x) or (positive and x <= 0):
            missing.append(f"{what} = {x}")

    for name in VARIANTS:
        for rate in RATES:
            for key in ("p50_ms", "p99_ms", "completed"):
                need(f"{name}.open_loop.{rate}.{key}", _get(v, name, "open_loop", rate, key))
        need(f"{name}.max_rps.rps", _get(v, name, "max_rps", "rps"))
    for name in PAIRS:
        for rate in RATES:
            need(
                f"{name}.open_loop.{rate}.cpu_us_per_req_per_sidecar",
                _get(v, name, "open_loop", rate, "cpu_us_per_req_per_sidecar"),
            )
        sizes = v.get(name, {}).get("rss_mb") or []
        if len(sizes) != 2 or not all(_finite(float(s)) and s > 0 for s in sizes):
            missing.append(f"{name}.rss_mb = {sizes}")
    for name in L4_PAIRS:
        for kind in ("full", "resumed"):
            need(f"{name}.handshakes.{kind}.rps", _get(v, name, "handshakes", kind, "rps"))
    for name in ("direct", *L4_PAIRS):
        need(f"{name}.bulk.gbit_s", _get(v, name, "bulk", "gbit_s"))
    for name in ("direct", *HTTP_PAIRS):
        need(f"{name}.upload.gbit_s", _get(v, name, "upload", "gbit_s"))
        if _get(v, name, "upload", "status") != 200:
            missing.append(f"{name}.upload.status = {_get(v, name, 'upload', 'status')}")
    for obj, keys in SUMMARY_KEYS.items():
        for key in keys:
            need(f"{obj}.{key}", _get(rep, obj, key), positive=obj != "added_p99_ms")
    for part, keys in CONTROL_KEYS.items():
        for key in keys:
            need(f"control_plane.{part}.{key}", _get(rep, "control_plane", part, key))
    agent = rep.get("control_plane", {}).get("agent", {})
    if not any(k.startswith("in_process_") and k.endswith("_agent_p50_ms") for k in agent):
        missing.append("control_plane.agent.in_process_<n>_agent_p50_ms")
    tel = rep.get("telemetry", {})
    if tel.get("available"):
        need("telemetry.cpu_us_per_req_added", _get(tel, "cpu_us_per_req_added"), False)
    elif not tel.get("note"):
        missing.append("telemetry: neither figures nor a 'not available' note")
    return missing


def _f(x: float, fmt: str = ",.0f") -> str:
    return "-" if not _finite(x) else format(x, fmt)


def _pct(x: float) -> str:
    return "-" if not _finite(x) else f"{100 * x:.0f} %"


def render(rep: dict[str, Any]) -> str:
    """The markdown tables of one run."""
    v = rep["variants"]
    rows = [
        f"`make bench` ({rep['mode']}) at {rep['commit']}, {rep['date']}; "
        f"{rep['env']['cpu']}, {rep['env']['cores']} cores, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in rep['env']['loadavg_at_end'])}; meshlet sidecars "
        f"{rep['env'].get('sidecar_build', 'pure')} (mypyc: compiled hot modules, setup.py)",
        "",
        "| variant | max RPS (wrk -c32) | vs haproxy | p50 / p99 ms at 1k | at 2k | at 5k "
        "| added p99 at 2k (ms) | CPU µs/req/sidecar at 2k | RSS MB per sidecar |",
        "|---|---:|---:|---|---|---|---:|---:|---|",
    ]
    peers = {"meshlet-http": "haproxy-http", "meshlet-l4": "haproxy-tcp"}
    direct99 = _get(v, "direct", "open_loop", "2000", "p99_ms")
    for name in [*VARIANTS, *(n for n in v if n not in VARIANTS)]:
        rps = _get(v, name, "max_rps", "rps")
        ratio = _pct(_ratio(rps, _get(v, peers[name], "max_rps", "rps"))) if name in peers else ""
        lat = [
            f"{_f(_get(v, name, 'open_loop', r, 'p50_ms'), '.3f')} / "
            f"{_f(_get(v, name, 'open_loop', r, 'p99_ms'), '.3f')}"
            for r in RATES
        ]
        added = (
            "-"
            if name == "direct"
            else f"{_get(v, name, 'open_loop', '2000', 'p99_ms') - direct99:+.3f}"
        )
        cpu = _f(_get(v, name, "open_loop", "2000", "cpu_us_per_req_per_sidecar"), ".1f")
        rss = " / ".join(f"{x:.1f}" for x in v[name].get("rss_mb") or []) or "-"
        rows.append(
            f"| {name} | {_f(rps)} | {ratio} | {' | '.join(lat)} | {added} | {cpu} | {rss} |"
        )
    rows += [
        "",
        "| new mTLS connections/s (wrk -c16, Connection: close) | meshlet-l4 | haproxy-tcp "
        "| ratio |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("full", "full handshakes"), ("resumed", "with resumption")):
        ours = _get(v, "meshlet-l4", "handshakes", kind, "rps")
        theirs = _get(v, "haproxy-tcp", "handshakes", kind, "rps")
        rows.append(f"| {label} | {_f(ours)} | {_f(theirs)} | {_pct(_ratio(ours, theirs))} |")
    size = _get(v, "direct", "bulk", "bytes") / 2**20
    up = _get(v, "direct", "upload", "bytes") / 2**20
    rows += [
        "",
        "| transfer (Gbit/s) | direct | meshlet | haproxy | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for what, label, ours, theirs in (
        ("bulk", f"download {size:,.0f} MiB through the L4 pair", "meshlet-l4", "haproxy-tcp"),
        ("upload", f"upload {up:,.0f} MiB through the HTTP pair", "meshlet-http", "haproxy-http"),
    ):
        a, b = _get(v, ours, what, "gbit_s"), _get(v, theirs, what, "gbit_s")
        rows.append(
            f"| {label} | {_f(_get(v, 'direct', what, 'gbit_s'), '.2f')} | {_f(a, '.2f')} "
            f"| {_f(b, '.2f')} | {_pct(_ratio(a, b))} |"
        )
    tel = rep.get("telemetry", {})
    rows.append("")
    if tel.get("available"):
        rows.append(
            f"Metrics + access logs on (meshlet-http): "
            f"{_f(tel['cpu_us_per_req_added'], '+.1f')} µs CPU per request per sidecar at 2k, "
            f"max RPS {_pct(tel['rps_ratio'])} of metrics off."
        )
    else:
        rows.append(f"Metrics + access logs on: {tel.get('note', 'not available')}.")
    cp = rep["control_plane"]
    ag, it = cp["agent"], cp["intentions"]
    rows += [
        "",
        "| control plane | figure |",
        "|---|---:|",
        f"| compile {_f(it.get('intentions', math.nan))} intentions | "
        f"{_f(it['compile_ms'], '.1f')} ms |",
        f"| L7 / L4 decision | {_f(it['decide_l7_us'], '.2f')} / "
        f"{_f(it['decide_l4_us'], '.2f')} µs |",
        f"| agent RSS with {_f(ag.get('upstreams', math.nan))} upstreams (ready / after updates) "
        f"| {_f(ag['rss_mb_ready'], '.1f')} / {_f(ag.get('rss_mb_after_updates', math.nan), '.1f')}"
        " MB |",
    ]
    for n in sorted({k.split("_")[2] for k in ag if k.startswith("in_process_")}, key=int):
        rows.append(
            f"| one update of a {int(n):,}-instance answer incl. JSON decode, agent path "
            f"(json.loads alone) | {_f(ag.get(f'in_process_{n}_agent_p50_ms', math.nan), '.2f')} "
            f"({_f(ag.get(f'in_process_{n}_json_p50_ms', math.nan), '.2f')}) ms |"
        )
    rows.append(
        f"| agent's own apply, big upstream p50 / p99 | {_f(ag['apply_big_p50_ms'], '.2f')} / "
        f"{_f(ag.get('apply_big_p99_ms', math.nan), '.2f')} ms |"
    )
    rows += ["", "| issue 15 target | value | bound | met |", "|---|---:|---|---|"]
    for key, t in rep["targets"].items():
        rows.append(
            f"| {key} | {_f(t['value'], '.3f')} | {t['bound']} | {'yes' if t['met'] else 'no'} |"
        )
    return "\n".join(rows)
