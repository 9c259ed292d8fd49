"""A real Prometheus (Debian's `prometheus`, installed by .ci/run) scrapes the admin `/metrics`
of two `meshlet sidecar` processes (web calls api) while known traffic goes through them, and
the queries users already have (../shared/examples/mesh-queries.promql, copied below) answer
what was sent: the request rate, the error rate and the p99 latency, within what `rate()`'s
extrapolation and the histogram's buckets allow.

Traffic: 20 requests a second for 10 s on a fixed schedule (so `rate()` sees a steady
counter; the queries' 5-minute windows hold the whole run, so the request rate is what was
sent over 300 s): 1 in 10 answered 500 by api's app, 1 in 10 denied (403) by an L7 intention, and
1 in 20 answered by the app after 300 ms (the rest at once). So 10 % of requests are 5xx and
the slowest 5 % are in the (250, 500] ms bucket: p99 lies in it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import Mesh, deny_prefix_intention, get, running, wait_status
from tests.integration.profiled_mesh import profiled_mesh
from tests.integration.test_agent_process import MESHLET, _free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary (Debian package `prometheus`; .ci/run installs it)",
)

REQUEST_RATE = 'sum(rate(istio_requests_total{reporter="source"}[5m])) by (destination_service)'
ERROR_RATE = (
    'sum(rate(istio_requests_total{response_code=~"5.*"}[5m])) by (destination_service)'
    " / sum(rate(istio_requests_total[5m])) by (destination_service)"
)
P99 = (
    "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket[5m]))"
    " by (le, destination_service))"
)

RATE = 20.0
SECONDS = 10.0


def _path(i: int) -> str:
    if i % 10 == 3:
        return "/fail"
    if i % 10 == 7:
        return "/deny"
    if i % 20 == 5:
        return "/slow"
    return "/ok"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(profiled_mesh(tmp_path)) as m:
        yield m


def _query(prom: str, q: str) -> list[dict[str, Any]]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _value(prom: str, q: str) -> float:
    result = _query(prom, q)
    assert len(result) == 1, result
    assert result[0]["metric"].get("destination_service") == "api", result
    return float(result[0]["value"][1])


def test_prometheus_answers_the_mesh_queries_from_known_traffic(mesh: Mesh, tmp_path: Path) -> None:
    mesh.apply_intentions(deny_prefix_intention("/deny"))
    assert get(mesh.web_upstream, "/deny")[0] == 403
    assert get(mesh.web_upstream, "/ok")[0] == 200

    prom = f"127.0.0.1:{_free_port()}"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: meshlet\n"
        "    static_configs:\n"
        f"      - targets: ['{mesh.web_admin}', '{mesh.api_admin}']\n"
    )
    server = subprocess.Popen(
        [
            str(PROMETHEUS),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={prom}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Both targets up before the traffic starts: the counters' first samples are then
        # the warm-up's, and rate() sees the whole run.
        deadline = time.monotonic() + 30
        while True:
            try:
                up = _query(prom, "up == 1")
            except OSError:
                up = []
            if len(up) == 2:
                break
            assert time.monotonic() < deadline, "prometheus did not scrape both sidecars"
            time.sleep(0.2)
        time.sleep(2.0)  # two scrapes of the warm-up values

        total = int(RATE * SECONDS)
        start = time.monotonic()
        codes: list[int] = []

        def send(i: int) -> None:
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            codes.append(get(mesh.web_upstream, _path(i))[0])

        # `meshlet top` over 5 s of the run, alongside.
        top = subprocess.Popen(
            [MESHLET, "top", "--once", "--interval", "5", "--admin-addr", mesh.web_admin],
            stdout=subprocess.PIPE,
            text=True,
        )
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(send, range(total)))
        shown, _ = top.communicate(timeout=30)
        assert top.returncode == 0
        row = next(line.split() for line in shown.splitlines() if line.startswith("upstream"))
        assert row[1] == "api"
        assert 14.0 <= float(row[2]) <= 26.0, shown  # requests per second
        assert 80.0 <= float(row[3].rstrip("%")) <= 100.0, shown  # 10 % are 500s
        assert 250.0 <= float(row[5]) <= 500.0, shown  # p99 inside the slow bucket
        assert codes.count(500) == total // 10
        assert codes.count(403) == total // 10
        assert codes.count(200) == total - 2 * (total // 10)
        time.sleep(2.5)  # the last values scraped

        # rate(x[5m]) is the increase over the window divided by its 300 s, the increase
        # being extrapolated past the first and last samples by at most ~1.1 scrape
        # intervals each: so every request sent (the run and the two warm-ups) over 300 s,
        # from that to what a 10 s run stretched by a few intervals would give.
        sent = total + 2
        rate = _value(prom, REQUEST_RATE)
        assert sent / 300 * 0.95 <= rate <= sent / 300 * 1.35, rate
        # Errors are 10 % of requests on both reporters (403s are not 5xx).
        errors = _value(prom, ERROR_RATE)
        assert 0.06 <= errors <= 0.14, errors
        # 5 % of requests took 300 ms: p99 is interpolated inside the (250, 500] bucket.
        p99 = _value(prom, P99)
        assert 250.0 <= p99 <= 500.0, p99

        # The denial is a 403 on api's sidecar, with the intention as its reason.
        denied = _query(
            prom, 'sum(istio_requests_total{reporter="destination",response_code="403"})'
        )
        assert float(denied[0]["value"][1]) == total // 10 + 1
        reasons = _query(prom, "meshlet_intention_denials_total")
        assert {r["metric"]["reason"] for r in reasons} == {"intention"}
        # The Grafana dashboard in docs/ queries the same names: every panel's query runs,
        # and the request, error and latency panels have data.
        dashboard = json.loads((ROOT / "docs" / "grafana" / "meshlet-mesh.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                result = _query(prom, target["expr"].replace("$service", ".*"))
                if panel["id"] in (1, 2, 3, 4):
                    assert result, (panel["title"], target["expr"])
        status = wait_status(mesh.web_admin, lambda s: True, "status")
        assert "mesh" not in status["proxy"]["stats"]
    finally:
        server.terminate()
        server.wait(10)
