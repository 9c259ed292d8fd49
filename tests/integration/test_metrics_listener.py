"""`telemetry.metrics_address`: a listener that serves /metrics and nothing else, so the admin
API stays on loopback while a Prometheus elsewhere scrapes (a `meshlet agent` process against
`meshlet dev`)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev, write_config


@pytest.fixture
def consul() -> Iterator[str]:
    port = _free_port()
    dev = start_dev(port)
    yield f"127.0.0.1:{port}"
    dev.stop()


def test_the_metrics_listener_serves_metrics_only(tmp_path: Path, consul: str) -> None:
    admin = f"127.0.0.1:{_free_port()}"
    metrics = f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    with cfg.open("a") as f:
        f.write(f"telemetry: {{metrics_address: '{metrics}'}}\n")
    agent = Proc(["agent", "-c", str(cfg)], env=ENV)
    try:
        agent.wait_for_line(f"metrics at http://{metrics}/metrics")
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        assert 'meshlet_consul_watch_errors{watch="health:api"}' in text
        assert "meshlet_upstream_endpoints" in text
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{metrics}/v1/status", timeout=10)
        assert info.value.code == 404
        info.value.close()
        # The admin listener has /metrics too.
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
            assert "meshlet_upstream_endpoints" in resp.read().decode()
    finally:
        agent.stop()
