"""Tracing through two `meshlet sidecar` processes, configured as the issue asks: the
proxy-defaults entry's `Config.tracing`, read by the sidecars' watch and applied without a
restart, spans exported over OTLP/HTTP to a receiver on 127.0.0.1 that decodes them with
opentelemetry-proto. The api app records the headers it receives, so what the sidecars
propagate is checked where it lands.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.status_cli import render
from tests.integration.mesh import (
    DEADLINE,
    Mesh,
    http_json,
    running,
    serve,
    status,
    wait_applied,
    wait_line,
    write_entry,
)
from tests.integration.otlp_receiver import OTLPReceiver, Span
from tests.integration.profiled_mesh import ProfiledApp

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
RECEIVED: dict[str, dict[str, str]] = {}
"""x-request-id -> the headers the api app received (lower-case names)."""


class RecordingApp(ProfiledApp):
    """ProfiledApp that keeps the headers of each request in RECEIVED."""

    # Head and body are two writes: without this, Nagle and the peer's delayed ACK hold
    # each response ~40 ms, and 2,000 requests take minutes.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        RECEIVED[headers.get("x-request-id", "")] = headers
        super().do_GET()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    RECEIVED.clear()
    with running(Mesh(tmp_path, "http", api_app=lambda _: serve(RecordingApp))) as m:
        yield m


class Client:
    """One keep-alive connection to web's upstream listener, as an app would hold."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str, request_id: str, **headers: str) -> int:
        self.conn.request("GET", path, headers={"x-request-id": request_id, **headers})
        resp = self.conn.getresponse()
        resp.read()
        return resp.status

    def close(self) -> None:
        self.conn.close()


def _put_tracing(consul: str, tracing: dict[str, Any]) -> None:
    entry = {
        "Kind": "proxy-defaults",
        "Name": "global",
        "Config": {"tracing": tracing},
        "AccessLogs": {"Enabled": True, "Type": "stdout"},
    }
    write_entry(consul, entry)


def _by_request(spans: list[Span], request_id: str) -> list[Span]:
    return [
        s for s in spans if s.attributes.get("http.request.header.x-request-id") == [request_id]
    ]


def _pair(receiver: OTLPReceiver, request_id: str) -> tuple[Span, Span]:
    """The client span (web) and the server span (api) of one request."""
    spans = receiver.wait(
        lambda got: {s.kind for s in _by_request(got, request_id)} == {"client", "server"},
        f"client and server spans of {request_id}",
    )
    mine = _by_request(spans, request_id)
    assert len(mine) == 2, mine
    client = next(s for s in mine if s.kind == "client")
    server = next(s for s in mine if s.kind == "server")
    return client, server


def _marker(client: Client, receiver: OTLPReceiver, request_id: str) -> None:
    """A request the app says is sampled, traced whatever the rate: once its spans are in,
    every span queued before them is too (each sidecar exports its queue in order)."""
    tp = f"00-{TRACE}-{APP_SPAN}-01"
    assert client.get("/marker", request_id, traceparent=tp) == 200
    _pair(receiver, request_id)


def _traced_share(client: Client, receiver: OTLPReceiver, n: int, tag: str) -> tuple[int, int]:
    """Send `n` requests without trace context; the number of traces web started (client
    spans) and of server spans api made for them."""
    receiver.clear()
    for i in range(n):
        assert client.get("/ok", f"{tag}-{i}") == 200
    _marker(client, receiver, f"{tag}-marker")
    spans = [s for s in receiver.snapshot() if s.trace_id != TRACE]
    clients = {s.trace_id for s in spans if s.kind == "client"}
    servers = {s.trace_id for s in spans if s.kind == "server"}
    return len(clients), len(servers)


def _metrics(admin: str) -> str:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
        return text


@pytest.mark.timeout(300)
def test_spans_through_two_sidecars_follow_proxy_defaults(
    mesh: Mesh, receiver: OTLPReceiver
) -> None:
    web, api = mesh.sidecars["web"], mesh.sidecars["api"]
    client = Client(mesh.web_upstream)
    try:
        _put_tracing(mesh.consul, {"otlp_endpoint": receiver.endpoint, "sampling_percent": 100})
        wait_line(web, "tracing: on, 100% of new traces")
        wait_applied(mesh.web_admin)
        wait_line(api, "tracing: on, 100% of new traces")
        wait_applied(mesh.api_admin)

        # One request without trace context: web starts the trace (client span), api
        # continues it (server span, child of web's), the app sees api's span as parent.
        assert client.get("/ok?x=1", "req-one") == 200
        c, s = _pair(receiver, "req-one")
        assert c.trace_id == s.trace_id
        assert c.parent_id == ""
        assert s.parent_id == c.span_id
        assert c.service == "web" and s.service == "api"
        assert c.name == s.name == "GET"
        assert c.attributes["http.request.method"] == "GET"
        assert c.attributes["http.response.status_code"] == 200
        assert str(c.attributes["url.full"]).endswith("/ok?x=1")
        assert str(c.attributes["meshlet.source.principal"]).endswith("/svc/web")
        assert c.attributes["meshlet.destination.service"] == "api"
        assert s.attributes["url.path"] == "/ok"
        assert s.attributes["url.query"] == "x=1"
        assert str(s.attributes["meshlet.source.principal"]).endswith("/svc/web")
        assert str(s.attributes["meshlet.destination.principal"]).endswith("/svc/api")
        assert s.attributes["meshlet.intention"] == "allow"
        got = RECEIVED["req-one"]
        assert got["traceparent"] == f"00-{s.trace_id}-{s.span_id}-01"
        assert got["x-b3-traceid"] == s.trace_id
        assert got["x-b3-spanid"] == s.span_id
        assert got["x-b3-sampled"] == "1"
        assert got["x-request-id"] == "req-one"  # kept end to end
        # The access logs name the trace web started (the app sent no traceparent).
        for proc in (web, api):
            line = wait_line(proc, '"request_id":"req-one"')
            assert json.loads(line)["trace_id"] == c.trace_id

        # A 5xx is an error on both spans.
        assert client.get("/fail", "req-fail") == 500
        c, s = _pair(receiver, "req-fail")
        assert c.error and s.error
        assert s.attributes["http.response.status_code"] == 500

        # The app's own context is continued, sampled=1 and tracestate included.
        tp = f"00-{TRACE}-{APP_SPAN}-01"
        assert client.get("/ok", "req-app", traceparent=tp, tracestate="vendor=x") == 200
        c, s = _pair(receiver, "req-app")
        assert c.trace_id == s.trace_id == TRACE
        assert c.parent_id == APP_SPAN
        assert s.parent_id == c.span_id
        assert RECEIVED["req-app"]["tracestate"] == "vendor=x"

        # B3 from the app (single header) is continued too.
        b3 = f"{TRACE}-{APP_SPAN}-1"
        assert client.get("/ok", "req-b3", b3=b3) == 200
        c, s = _pair(receiver, "req-b3")
        assert c.trace_id == TRACE and c.parent_id == APP_SPAN

        # sampled=0 from the app is respected by both sidecars: no span, and the app
        # behind api is told not to sample, in the same trace.
        tp0 = f"00-{TRACE}-{APP_SPAN}-00"
        assert client.get("/ok", "req-unsampled", traceparent=tp0) == 200
        _marker(client, receiver, "req-after-unsampled")
        assert _by_request(receiver.snapshot(), "req-unsampled") == []
        got = RECEIVED["req-unsampled"]
        assert got["traceparent"].startswith(f"00-{TRACE}-")
        assert got["traceparent"].endswith("-00")
        assert got["x-b3-sampled"] == "0"

        # A forged or malformed context neither breaks the request nor poisons the trace:
        # a new trace starts and the app never sees the bad value.
        for i, bad in enumerate(
            [
                f"00-{'0' * 32}-{APP_SPAN}-01",
                f"00-{TRACE}-{APP_SPAN}-01-trailing",
                "00-" + "Z" * 32 + f"-{APP_SPAN}-01",
                "00-xyz",
                "x" * 4000,
            ]
        ):
            rid = f"req-bad-{i}"
            assert client.get("/ok", rid, traceparent=bad, tracestate="evil=1") == 200
            c, s = _pair(receiver, rid)
            assert c.trace_id not in (TRACE, "0" * 32)
            assert c.parent_id == "" and s.parent_id == c.span_id
            assert RECEIVED[rid]["traceparent"] == f"00-{s.trace_id}-{s.span_id}-01"
            assert "tracestate" not in RECEIVED[rid]

        # 10 %: 10 % ± 3 % of 2,000 requests are traced, decided once at the edge (web):
        # api traces exactly the traces web sampled.
        _put_tracing(mesh.consul, {"otlp_endpoint": receiver.endpoint, "sampling_percent": 10})
        wait_line(web, "tracing: on, 10% of new traces")
        wait_applied(mesh.web_admin)
        wait_line(api, "tracing: on, 10% of new traces")
        wait_applied(mesh.api_admin)
        clients, servers = _traced_share(client, receiver, 2000, "ten")
        assert 140 <= clients <= 260, clients
        assert servers == clients

        # Bad settings are refused naming the field; the 10 % stays; the refusal is counted
        # and shown in the status.
        before = status(mesh.web_admin)["proxy"]["tracing"]["rejected"]
        _put_tracing(mesh.consul, {"otlp_endpoint": receiver.endpoint, "sampling_percent": 150})
        deadline = time.monotonic() + DEADLINE
        while True:
            st = status(mesh.web_admin)["proxy"]["tracing"]
            if st["rejected"] > before:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        assert "sampling_percent" in st["last_error"]
        assert st["sampling_percent"] == 10.0 and st["on"]
        table = render(status(mesh.web_admin), time.time())
        assert "tracing" in table and "sampling_percent" in table and "10% to http" in table
        assert "meshlet_config_snapshots_rejected_total" in _metrics(mesh.web_admin)

        # Changed again without a restart: no new trace is sampled (the marker, sampled=1
        # by its app, still is: the parent's decision is respected at any rate).
        _put_tracing(mesh.consul, {"otlp_endpoint": receiver.endpoint, "sampling_percent": 0})
        wait_line(web, "tracing: on, 0% of new traces")
        wait_applied(mesh.web_admin)
        wait_line(api, "tracing: on, 0% of new traces")
        wait_applied(mesh.api_admin)
        clients, servers = _traced_share(client, receiver, 200, "zero")
        assert (clients, servers) == (0, 0)

        metrics = _metrics(mesh.web_admin)
        assert "meshlet_tracing_spans_dropped_total 0.0" in metrics
        assert "meshlet_tracing_spans_exported_total" in metrics

        # Off: the headers pass untouched.
        _put_tracing(mesh.consul, {})
        wait_line(web, "tracing: off")
        wait_applied(mesh.web_admin)
        wait_line(api, "tracing: off")
        wait_applied(mesh.api_admin)
        assert client.get("/ok", "req-off", traceparent=tp0) == 200
        assert RECEIVED["req-off"]["traceparent"] == tp0
        assert "x-b3-traceid" not in RECEIVED["req-off"]
    finally:
        client.close()


def test_the_sdk_is_not_loaded_while_tracing_is_off() -> None:
    """Whatever a sidecar imports to run, OpenTelemetry comes only with tracing on."""
    code = (
        "import sys\n"
        "import agent.cli, agent.sidecar, connect.sidecar, connect.observe\n"
        "from connect.observe import Telemetry\n"
        "t = Telemetry('web')\n"
        "t.set_tracing(None)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
        "from connect.tracing_settings import TracingSettings\n"
        "t.set_tracing(TracingSettings('http://127.0.0.1:9/v1/traces'))\n"
        "assert 'opentelemetry.sdk.trace' in sys.modules\n"
        "t.set_tracing(None)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def override_mesh(tmp_path: Path) -> Iterator[Mesh]:
    """Both sidecars' agent.yaml give their own tracing: registered as the sidecars'
    Proxy.Config.tracing, and read back from Consul by the sidecars."""
    m = Mesh(tmp_path, "http")
    m.certs = "telemetry: {tracing: {sampling_percent: 100, propagation: [w3c]}}\n"
    with running(m):
        yield m


@pytest.mark.timeout(120)
def test_a_service_s_own_tracing_overrides_proxy_defaults(
    override_mesh: Mesh, receiver: OTLPReceiver
) -> None:
    mesh = override_mesh
    web = mesh.sidecars["web"]
    registered = http_json("GET", f"http://{mesh.consul}/v1/catalog/service/web-sidecar-proxy")
    assert registered[0]["ServiceProxy"]["Config"]["tracing"] == {
        "sampling_percent": 100.0,
        "propagation": ["w3c"],
    }
    # The mesh-wide entry says 0 %; web's own 100 % wins, the endpoint comes from the mesh.
    _put_tracing(mesh.consul, {"otlp_endpoint": receiver.endpoint, "sampling_percent": 0})
    wait_line(web, "tracing: on, 100% of new traces")
    wait_applied(mesh.web_admin)
    wait_line(web, "(propagation w3c)")
    client = Client(mesh.web_upstream)
    try:
        clients, servers = _traced_share(client, receiver, 50, "own")
        assert (clients, servers) == (50, 50)
        st = status(mesh.web_admin)["proxy"]["tracing"]
        assert st["sampling_percent"] == 100.0 and st["propagation"] == ["w3c"]
    finally:
        client.close()
