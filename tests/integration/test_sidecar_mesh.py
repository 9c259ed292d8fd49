"""Two `meshlet sidecar` processes against `meshlet dev`, with real upstream HTTP apps.

web's app (this test) calls api through web's local upstream port; web's sidecar carries it
over mTLS (leaves from devstack's Connect CA) to api's sidecar, which enforces intentions and
forwards to api's app with X-Forwarded-Client-Cert. A deny intention written to Consul turns
the next requests into 403s (L7, api speaks http) or refused connections (L4, api speaks tcp).
Waits are on log lines, the sidecars' /v1/status and Consul blocking queries; never sleeps.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mesh import (
    DEADLINE,
    Mesh,
    drain_log,
    get,
    http_json,
    put_intentions,
    running,
    start_app,
    status,
    tcp_exchange,
    wait_line,
    wait_status,
    write_sidecar_config,
)
from tests.integration.test_agent_process import ENV, Proc, wait_catalog

# Where these lived before tests/integration/mesh.py: faults/, test_sidecar_workers.py and
# test_sidecar_reload.py still import them from here.
_json = http_json
_drain = drain_log
__all__ = [
    "DEADLINE",
    "Mesh",
    "_drain",
    "_json",
    "put_intentions",
    "start_app",
    "status",
    "wait_line",
    "wait_status",
    "write_sidecar_config",
]


@pytest.fixture
def http_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "http")) as mesh:
        yield mesh


@pytest.fixture
def tcp_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "tcp")) as mesh:
        yield mesh


def test_http_through_two_sidecars_then_denied_by_intention(http_mesh: Mesh) -> None:
    mesh = http_mesh
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)

    status_code, _, body = get(mesh.web_upstream, "/hello?x=1")
    assert status_code == 200
    seen = json.loads(body)
    assert seen["app"] == "api"
    assert seen["path"] == "/hello?x=1"
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    web_uri = status(mesh.web_admin)["proxy"]["leaf"]["uri"]
    api_uri = status(mesh.api_admin)["proxy"]["leaf"]["uri"]
    assert web_uri.endswith("/svc/web") and api_uri.endswith("/svc/api")
    assert xfcc.startswith(f"By={api_uri};Hash=")
    assert xfcc.endswith(f";URI={web_uri}")
    assert seen["headers"]["x-request-id"]

    # Plaintext to api's public port never reaches the app; it is counted as plaintext and
    # logged once with the peer and the reason.
    plain_before = status(mesh.api_admin)["proxy"]["stats"]["handshake_failures"]["plaintext"]
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        get(mesh.api_public, "/plaintext")
    assert "/plaintext" not in mesh.api_app.paths  # type: ignore[attr-defined]
    wait_status(
        mesh.api_admin,
        lambda s: s["proxy"]["stats"]["handshake_failures"]["plaintext"] > plain_before,
        "the plaintext handshake counted",
    )
    wait_line(mesh.sidecars["api"], "refused (plaintext)")

    index = put_intentions(mesh.consul, "api", "deny")
    mesh.wait_intentions(index)
    status_code, _, body = get(mesh.web_upstream, "/hello")
    assert status_code == 403
    assert body == b"RBAC: access denied"
    # Counted by the data plane, which reports to the agent about once a second.
    wait_status(
        mesh.api_admin, lambda s: s["proxy"]["stats"]["requests_denied"] >= 1, "the denial counted"
    )

    # And back: allowed again once the allow is applied.
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)
    assert get(mesh.web_upstream, "/again")[0] == 200


def test_an_endpoint_with_the_wrong_identity_is_refused_and_failed_over(http_mesh: Mesh) -> None:
    """An instance registered as api's proxy whose port is web's sidecar: web's outbound
    side refuses its certificate (it names web, not api) and the request goes to api."""
    mesh = http_mesh
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "allow"))
    impostor = {
        "Name": "api-sidecar-proxy",
        "ID": "impostor-sidecar-proxy",
        "Kind": "connect-proxy",
        "Address": "127.0.0.1",
        "Port": mesh.web_public,
        "Proxy": {"DestinationServiceName": "api"},
    }
    req = urllib.request.Request(
        f"http://{mesh.consul}/v1/agent/service/register",
        data=json.dumps(impostor).encode(),
        method="PUT",
    )
    urllib.request.urlopen(req, timeout=30).close()
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["upstreams"]["api"]["endpoints"] == 2,
        "both api endpoints at web",
    )
    web = mesh.sidecars["web"]
    deadline = time.monotonic() + DEADLINE
    served = 0
    # Each request picks an endpoint; go on until the impostor has been picked and refused.
    while not any("refused: server is" in line for line in web.lines):
        assert time.monotonic() < deadline, "the impostor endpoint was never picked"
        code, _, body = get(mesh.web_upstream, f"/n{served}")
        assert code == 200, body
        assert json.loads(body)["app"] == "api"
        served += 1
    refusal = next(line for line in web.lines if "refused: server is" in line)
    assert "/svc/web, not api" in refusal
    wait_status(
        mesh.web_admin,
        lambda s: s["proxy"]["stats"]["upstream_failures"] >= 1,
        "the refused dial counted",
    )
    assert get(mesh.web_upstream, "/after")[0] == 200


@pytest.fixture
def vault_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "http", certs="vault")) as mesh:
        yield mesh


def test_http_with_leaves_from_vault(vault_mesh: Mesh) -> None:
    mesh = vault_mesh
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "allow"))
    code, _, body = get(mesh.web_upstream, "/vault")
    assert code == 200
    web_leaf = status(mesh.web_admin)["proxy"]["leaf"]
    assert web_leaf["source"] == "vault"
    assert web_leaf["uri"] in json.loads(body)["headers"]["x-forwarded-client-cert"]
    mesh.wait_intentions(put_intentions(mesh.consul, "api", "deny"))
    assert get(mesh.web_upstream, "/vault")[0] == 403


def test_sigterm_stops_the_sidecar_cleanly(http_mesh: Mesh) -> None:
    """SIGTERM deregisters, closes the listeners and exits 0."""
    mesh = http_mesh
    api = mesh.sidecars["api"]
    api.p.send_signal(signal.SIGTERM)
    assert api.p.wait(30) == 0
    mesh.drains["api"].join(30)  # the whole log, up to EOF
    wait_catalog(mesh.consul, "/v1/catalog/service/api-sidecar-proxy", lambda b: b == [])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mesh.api_public), timeout=10).close()
    assert any("meshlet agent stopped" in line for line in api.lines)


def test_tcp_through_two_sidecars_then_denied_by_intention(tcp_mesh: Mesh) -> None:
    mesh = tcp_mesh
    index = put_intentions(mesh.consul, "api", "allow")
    mesh.wait_intentions(index)
    reply = tcp_exchange(mesh.web_upstream)
    assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200")
    assert b'"app": "api"' in reply
    # At L4 nothing is added to the bytes: no XFCC reaches the app.
    assert b"x-forwarded-client-cert" not in reply

    index = put_intentions(mesh.consul, "api", "deny")
    mesh.wait_intentions(index)
    assert tcp_exchange(mesh.web_upstream) == b""
    wait_status(
        mesh.api_admin,
        lambda s: s["proxy"]["stats"]["connections_denied"] >= 1,
        "the denied connection counted",
    )


def test_meshlet_sidecar_requires_a_config(tmp_path: Path) -> None:
    proc = Proc(["sidecar"], env=ENV)
    try:
        assert proc.p.wait(30) == 2
        assert proc.p.stdout is not None
        assert "meshlet sidecar: -c FILE is required" in proc.p.stdout.read()
    finally:
        proc.stop()
