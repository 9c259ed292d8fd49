"""MutualTLSMode permissive through real `meshlet sidecar` processes against `meshlet dev`:
api's sidecar follows its service-defaults entry without a restart, takes plaintext on its
public port only while permissive, authorizes it as a caller with no identity (only an
intention whose source is `*` lets it through) and closes open plaintext connections when the
mode goes back to strict. Asserts are on what api's app received.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mesh import (
    Mesh,
    get,
    http_json,
    running,
    status,
    wait_line,
    wait_status,
)


@pytest.fixture(params=["http", "tcp"])
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """api speaks `http` (authorized per request) or `tcp` (per connection)."""
    with running(Mesh(tmp_path, request.param)) as mesh:
        yield mesh


def put(mesh: Mesh, entry: dict[str, Any]) -> int:
    assert http_json("PUT", f"http://{mesh.consul}/v1/config", entry) is True
    got = http_json(
        "GET", f"http://{mesh.consul}/v1/config/{entry['Kind']}/{entry.get('Name', 'mesh')}"
    )
    return int(got["ModifyIndex"])


def intentions(mesh: Mesh, *sources: dict[str, Any]) -> None:
    index = put(mesh, {"Kind": "service-intentions", "Name": "api", "Sources": list(sources)})
    mesh.wait_intentions(index)


def mode(mesh: Mesh, value: str) -> None:
    put(
        mesh,
        {
            "Kind": "service-defaults",
            "Name": "api",
            "Protocol": mesh.protocol,
            "MutualTLSMode": value,
        },
    )
    wait_status(
        mesh.api_admin,
        lambda s: s["proxy"]["mutual_tls"]["mode"] == (value or "strict"),
        f"api's sidecar in MutualTLSMode {value}",
    )


def plaintext_refused(port: int, path: str) -> bool:
    try:
        get(port, path)
    except (http.client.HTTPException, ConnectionError):
        return True
    return False


def test_permissive_mode_through_real_sidecars(mesh: Mesh) -> None:
    app_paths: list[str] = mesh.api_app.paths  # type: ignore[attr-defined]
    intentions(mesh, {"Name": "web", "Action": "allow"})
    assert get(mesh.web_upstream, "/mesh1")[0] == 200
    assert plaintext_refused(mesh.api_public, "/strict1")

    # Consul's gate: permissive needs the mesh entry's flag.
    refused = raw_put(
        mesh, {"Kind": "service-defaults", "Name": "api", "MutualTLSMode": "permissive"}
    )
    assert refused.startswith("500 cannot set MutualTLSMode=permissive"), refused
    put(mesh, {"Kind": "mesh", "AllowEnablingPermissiveMutualTLS": True})
    mode(mesh, "permissive")

    # Only web is allowed by name: plaintext (no identity), forging web's XFCC, is denied.
    web_uri = status(mesh.web_admin)["proxy"]["leaf"]["uri"]
    conn = http.client.HTTPConnection("127.0.0.1", mesh.api_public, timeout=30)
    conn.request("GET", "/forged", headers={"X-Forwarded-Client-Cert": f"URI={web_uri}"})
    if mesh.protocol == "http":
        denied = conn.getresponse()
        assert denied.status == 403
        denied.read()
    else:  # decided at the connection: closed before a byte reaches the app
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.getresponse()
    conn.close()

    # `*` allowed: plaintext reaches the app, without any XFCC; web over mTLS still has one.
    intentions(mesh, {"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "allow"})
    keep = http.client.HTTPConnection("127.0.0.1", mesh.api_public, timeout=30)
    keep.request("GET", "/plain1", headers={"X-Forwarded-Client-Cert": f"URI={web_uri}"})
    answer = keep.getresponse()
    assert answer.status == 200
    seen = json.loads(answer.read())
    assert seen["path"] == "/plain1"
    if mesh.protocol == "http":
        assert "x-forwarded-client-cert" not in seen["headers"]
    # (tcp relays bytes as they are, for plaintext and mTLS callers alike: an L4 service's
    # app is never told an identity, so it has none to believe.)
    code, _, body = get(mesh.web_upstream, "/mesh2")
    assert code == 200
    if mesh.protocol == "http":
        assert json.loads(body)["headers"]["x-forwarded-client-cert"]
    wait_status(  # counted by the data plane, which reports about once a second
        mesh.api_admin,
        lambda s: s["proxy"]["stats"]["plaintext_connections"] >= 1,
        "the plaintext connection counted",
    )

    # Back to strict, without a restart: the open plaintext connection is closed, new
    # plaintext refused, web's traffic unaffected.
    mode(mesh, "strict")
    wait_line(mesh.sidecars["api"], "MutualTLSMode strict (1 plaintext connection(s) closed)")
    sock = keep.sock
    assert isinstance(sock, socket.socket)
    assert sock.recv(1) == b""
    keep.close()
    assert plaintext_refused(mesh.api_public, "/strict2")
    assert get(mesh.web_upstream, "/mesh3")[0] == 200
    # (The agent's own health check reaches the app directly, not through the sidecar.)
    assert [p for p in app_paths if p != "/health"] == ["/mesh1", "/plain1", "/mesh2", "/mesh3"]


def raw_put(mesh: Mesh, entry: dict[str, Any]) -> str:
    """A write Consul may refuse: '<status> <body>'."""
    host, port = mesh.consul.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("PUT", "/v1/config", body=json.dumps(entry))
        resp = conn.getresponse()
        return f"{resp.status} {resp.read().decode()}"
    finally:
        conn.close()
