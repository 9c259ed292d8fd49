"""The L4 pair's observers over real sockets and mTLS: a relayed connection is counted in the
Istio TCP series of both sides and logged as one access-log line per side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connect.access_log import AccessLog, AccessLogSettings
from connect.observe import SEP, Telemetry
from tests.connect.proxy_test_ca import ProxyTestCA, spiffe
from tests.connect.test_l4_relay import build_pair, close_all


@pytest.fixture
def ca(tmp_path: Path) -> ProxyTestCA:
    return ProxyTestCA(tmp_path)


async def test_a_relayed_connection_is_counted_and_logged_on_both_sides(
    ca: ProxyTestCA,
) -> None:
    p, servers = await build_pair(ca)
    web, api = Telemetry("web", spiffe("web")), Telemetry("api", spiffe("api"))
    web_log = AccessLog(AccessLogSettings(enabled=True))
    api_log = AccessLog(AccessLogSettings(enabled=True))
    web.access_log, api.access_log = web_log, api_log
    p.outbound.observer = web.tcp(web.upstream("api", "tcp"))
    p.inbound.observer = api.tcp(api.inbound("tcp"))
    try:
        reader, writer = await p.connect()
        writer.write(b"x" * 1000)
        assert await reader.readexactly(1000) == b"x" * 1000  # the test app echoes
        writer.close()
        await writer.wait_closed()
    finally:
        # An EOF cannot cross the TLS leg (connect/l4.py): the relays end with the listeners.
        await close_all(p, servers)
    (web_line,) = web_log.drain().splitlines()
    (api_line,) = api_log.drain().splitlines()

    sent = json.loads(web_line)
    assert sent["protocol"] == "TCP"
    assert sent["reporter"] == "source"
    assert sent["bytes_received"] == 1000
    assert sent["bytes_sent"] == 1000
    assert sent["upstream_host"] == f"127.0.0.1:{p.inbound.port}"
    assert sent["upstream_cluster"] == "api"
    got = json.loads(api_line)
    assert got["reporter"] == "destination"
    assert got["peer"] == spiffe("web")
    assert got["intention"] == "allow"
    assert got["bytes_received"] == 1000

    ((labels, series),) = web.metrics.export()["tcp"].items()
    assert labels.split(SEP)[:4] == ["source", "web", spiffe("web"), "api"]
    assert series == {"opened": 1, "closed": 1, "received": 1000, "sent": 1000}
    ((labels, series),) = api.metrics.export()["tcp"].items()
    assert labels.split(SEP)[:4] == ["destination", "web", spiffe("web"), "api"]
    assert series["closed"] == 1
