"""The local app's timeouts through two `meshlet sidecar` processes, from Consul's entries as
an operator writes them: api's service-defaults `LocalRequestTimeoutMs`, read by api's
sidecar's watch and applied without a restart (the data plane takes it in place); a bad
value in proxy-defaults' Config is refused, counted, and the one in force stays.

api's app holds /stall for 3 s before answering: without a local request timeout under that
it answers 200, with one the caller gets api's sidecar's 504."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    Mesh,
    get,
    running,
    serve,
    status,
    wait_applied,
    wait_line,
    wait_status,
)


class StallingApp(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/stall"):
            time.sleep(3.0)  # bounded: the test's own server thread ends by itself
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "http", api_app=lambda _: serve(StallingApp))) as m:
        yield m


@pytest.mark.timeout(240)
def test_service_defaults_local_request_timeout_reaches_the_running_inbound(
    mesh: Mesh,
) -> None:
    api = mesh.sidecars["api"]
    local = status(mesh.api_admin)["proxy"]["local_app"]
    assert (local["connect_timeout"], local["request_timeout"]) == (5.0, 15.0)

    mesh.write_entry(
        {
            "Kind": "service-defaults",
            "Name": "api",
            "Protocol": "http",
            "LocalRequestTimeoutMs": 500,
        }
    )
    wait_line(api, "local app timeouts: connect 5s, request 0.5s")
    wait_applied(mesh.api_admin)
    code, _, body = get(mesh.web_upstream, "/stall")
    assert (code, body) == (504, b"upstream request timeout")
    assert get(mesh.web_upstream, "/ok")[0] == 200

    # A bad value: refused with the field named, counted; 500 ms stays in force.
    before = status(mesh.api_admin)["proxy"]["local_app"]["rejected"]
    mesh.write_entry(
        {"Kind": "proxy-defaults", "Name": "global", "Config": {"local_request_timeout_ms": "2s"}}
    )
    st = wait_status(
        mesh.api_admin,
        lambda s: s["proxy"]["local_app"]["rejected"] > before,
        "the bad proxy-defaults answer refused",
    )
    assert "local_request_timeout_ms" in st["proxy"]["local_app"]["last_error"]
    assert st["proxy"]["local_app"]["request_timeout"] == 0.5
    code, _, body = get(mesh.web_upstream, "/stall")
    assert (code, body) == (504, b"upstream request timeout")
