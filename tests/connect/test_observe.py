"""The observers over real sockets and mTLS: a relayed connection is counted in the Istio TCP
series of both sides of the L4 pair and logged as one access-log line per side; a request the
outbound proxy answers itself carries Envoy's flag (UH, UF) in its series and its line."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from connect.access_log import AccessLog, AccessLogSettings
from connect.balancer import BalancerConfig, Target, compile_balancer
from connect.cluster import fixed_endpoints
from connect.dial import Upstream
from connect.http1 import OutboundHTTP
from connect.observe import HTTP_LABELS, SEP, Telemetry
from connect.seams import PeerCache
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
        # The relays end on the client's EOF or, at the latest, with the listeners.
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


async def _answer(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nhost: api\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


@pytest.mark.parametrize(
    ("targets", "code", "flags"),
    [
        ((), 503, "UH"),  # no endpoint at all
        ((Target("n1/api", "127.0.0.1", 1),), 503, "UF"),  # nobody listens: the dial fails
    ],
)
async def test_a_request_the_proxy_answers_itself_carries_envoys_flag(
    ca: ProxyTestCA, targets: tuple[Target, ...], code: int, flags: str
) -> None:
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(compile_balancer(list(targets), BalancerConfig())),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream)
    web = Telemetry("web", spiffe("web"))
    log = AccessLog(AccessLogSettings(enabled=True))
    web.access_log = log
    outbound.observer = web.http(web.upstream("api", "http"))
    await outbound.start()
    try:
        head = await _answer(outbound.port)
    finally:
        await outbound.close(grace=0)
    assert head.startswith(b"HTTP/1.1 %d" % code)
    ((labels, series),) = web.metrics.export()["http"].items()
    values = dict(zip(HTTP_LABELS, labels.split(SEP), strict=True))
    assert values["reporter"] == "source"
    assert values["destination_service"] == "api"
    assert values["destination_principal"] == spiffe("api")
    assert values["response_code"] == str(code)
    assert values["response_flags"] == flags
    assert series["count"] == 1
    (line,) = log.drain().splitlines()
    record = json.loads(line)
    assert (record["response_code"], record["response_flags"]) == (code, flags)
    assert record["path"] == "/x"
    assert record["request_id"]  # the one the proxy added


def test_a_full_queue_drops_and_counts_instead_of_waiting() -> None:
    web = Telemetry("web", spiffe("web"))
    log = AccessLog(AccessLogSettings(enabled=True), limit=2)
    side = web.upstream("api", "tcp")
    for _ in range(3):
        log.tcp(side, None, received=1, sent=2, flags="-", start=0.0, upstream="h:1")
    assert log.dropped == 1
    assert len(log.drain().splitlines()) == 2
    assert log.written == 2


async def _grpc_app() -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """An app answering every request as a gRPC server's trailers-only error does over
    HTTP/1.1: status 200, content-type application/grpc, grpc-status in the head."""

    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            status = b"7" if b"/Denied" in head.split(b"\r\n", 1)[0] else b"0"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc+proto\r\n"
                b"Grpc-Status: " + status + b"\r\ncontent-length: 0\r\n\r\n"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], writers


async def test_grpc_status_label_comes_from_the_response_head(ca: ProxyTestCA) -> None:
    from connect.authz import intentions_authorizers
    from connect.http1 import InboundHTTP
    from connect.inbound import InboundGate
    from connect.stats import ProxyStats
    from tests.connect.test_http_proxy import INTENTIONS, Identity

    app, port, app_conns = await _grpc_app()
    _, authorize = intentions_authorizers(lambda: INTENTIONS, Identity("api"))
    gate = InboundGate(ca.server_context(ca.leaf("api")), PeerCache(ca.verifier()), ProxyStats())
    inbound = InboundHTTP(gate, "127.0.0.1", port, authorize=authorize, local_uri=spiffe("api"))
    await inbound.start()
    client_ctx = ca.client_context(ca.leaf("web"))
    upstream = Upstream(
        name="api",
        endpoints=fixed_endpoints(
            compile_balancer([Target("n1/api", "127.0.0.1", inbound.port)], BalancerConfig())
        ),
        client_ssl=lambda: client_ctx,
        verify_peer=PeerCache(ca.verifier()),
        expected_service="api",
        rng=random.Random(1),
    )
    outbound = OutboundHTTP(upstream)
    web, api = Telemetry("web", spiffe("web")), Telemetry("api", spiffe("api"))
    outbound.observer = web.http(web.upstream("api", "http"))
    inbound.observer = api.http(api.inbound("http"))
    await outbound.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", outbound.port)
        for path in (b"/pkg.Svc/Denied", b"/pkg.Svc/Ok", b"/pkg.Svc/Ok"):
            writer.write(b"POST " + path + b" HTTP/1.1\r\nhost: api\r\ncontent-length: 0\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await writer.wait_closed()
    finally:
        await outbound.close(grace=0)
        await inbound.close(grace=0)
        app.close()
        for conn in app_conns:
            conn.close()
        await app.wait_closed()
    for telemetry in (web, api):
        counts = {}
        for labels, series in telemetry.metrics.export()["http"].items():
            values = dict(zip(HTTP_LABELS, labels.split(SEP), strict=True))
            counts[values["grpc_response_status"]] = series["count"]
        assert counts == {"7": 1, "0": 2}
