"""The shape `make bench` promises for bench/results/latest.json (bench/report.py).

`make bench-smoke` runs the benchmark and applies the same check; these tests pin the check
itself on a synthetic run, so a figure that stops being produced fails by name.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load()


def _open_loop(p99: float, cpu: float | None) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for rate in ("1000", "2000", "5000"):
        run: dict[str, Any] = {"p50_ms": p99 / 2, "p99_ms": p99, "completed": 100, "errors": 0}
        if cpu is not None:
            run["cpu_us_per_req_per_sidecar"] = cpu
        runs[rate] = run
    return runs


def complete_run() -> dict[str, Any]:
    def pair(rps: float, p99: float, cpu: float) -> dict[str, Any]:
        return {
            "open_loop": _open_loop(p99, cpu),
            "max_rps": {"rps": rps},
            "rss_mb": [40.0, 41.0],
        }

    variants: dict[str, Any] = {
        "direct": {"open_loop": _open_loop(0.1, None), "max_rps": {"rps": 60000.0}},
        "meshlet-http": pair(9000.0, 0.6, 80.0),
        "meshlet-l4": pair(12000.0, 0.3, 50.0),
        "haproxy-http": pair(10000.0, 0.2, 55.0),
        "haproxy-tcp": pair(12500.0, 0.2, 45.0),
    }
    for name in ("meshlet-l4", "haproxy-tcp"):
        variants[name]["handshakes"] = {"full": {"rps": 300.0}, "resumed": {"rps": 500.0}}
    for name in ("direct", "meshlet-l4", "haproxy-tcp"):
        variants[name]["bulk"] = {"gbit_s": 3.0, "bytes": 1 << 30}
    for name in ("direct", "meshlet-http", "haproxy-http"):
        variants[name]["upload"] = {"gbit_s": 2.0, "bytes": 100 << 20, "status": 200}
    return {
        "date": "2026-12-06T09:00:00+00:00",
        "commit": "abc1234",
        "mode": "full",
        "env": {"cpu": "test", "cores": 2, "loadavg_at_end": (1.0, 1.0, 1.0)},
        "variants": variants,
        "telemetry": {"available": False, "note": "not available: no switch"},
        "control_plane": {
            "intentions": {
                "intentions": 10000.0,
                "compile_ms": 100.0,
                "decide_l7_us": 1.0,
                "decide_l4_us": 0.3,
            },
            "agent": {
                "rss_mb_ready": 90.0,
                "upstreams": 1001.0,
                "apply_big_p50_ms": 5.0,
                "in_process_10000_agent_p50_ms": 70.0,
                "in_process_10000_json_p50_ms": 60.0,
            },
        },
    }


def test_a_complete_run_has_every_figure_and_the_summary_objects() -> None:
    full = report.summarize(complete_run())
    assert report.check_shape(full) == []
    assert full["ratios"]["l4_rps"] == pytest.approx(12000 / 12500)
    assert full["ratios"]["handshakes_full"] == pytest.approx(1.0)
    assert full["added_p99_ms"]["http"] == pytest.approx(0.5)
    assert full["rss_mb"] == {"meshlet": 41.0, "haproxy": 41.0}
    assert set(full["cpu_us_per_req"]) == {
        "meshlet_http",
        "haproxy_http",
        "meshlet_l4",
        "haproxy_tcp",
    }
    json.dumps(full)  # JSON-ready as it stands
    table = report.render(full)
    assert "| meshlet-l4 | 12,000 | 96 % |" in table
    assert "not available: no switch" in table


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("variants", "haproxy-tcp", "max_rps"), "haproxy-tcp.max_rps.rps"),
        (("variants", "meshlet-l4", "handshakes"), "meshlet-l4.handshakes.full.rps"),
        (("variants", "direct", "open_loop", "5000"), "direct.open_loop.5000.p99_ms"),
        (("variants", "meshlet-http", "upload"), "meshlet-http.upload.gbit_s"),
        (("variants", "haproxy-tcp", "bulk"), "haproxy-tcp.bulk.gbit_s"),
        (("control_plane", "intentions", "compile_ms"), "control_plane.intentions.compile_ms"),
        (("telemetry", "note"), "telemetry"),
    ],
)
def test_a_missing_figure_is_named(path: tuple[str, ...], named: str) -> None:
    run = copy.deepcopy(complete_run())
    parent = run
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    missing = report.check_shape(report.summarize(run))
    assert any(m.startswith(named) for m in missing), missing


def test_a_failed_upload_is_not_a_figure() -> None:
    run = complete_run()
    run["variants"]["haproxy-http"]["upload"]["status"] = 502
    assert "haproxy-http.upload.status = 502.0" in report.check_shape(report.summarize(run))
