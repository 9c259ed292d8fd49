"""Attacks on two `meshlet sidecar` processes on `meshlet dev`, written by hand on raw sockets.

api's app is http.server, which ignores Upgrade and reads the next request off a kept-alive
connection, as many apps do: whatever a sidecar forwards after a declined upgrade becomes a
request to it. Its answers carry the path and headers it saw (tests/integration/
test_sidecar_mesh.py's app), so every assertion is on what the app got.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mesh import Mesh, deny_prefix_intention, http_json, running, status

UPGRADE = (
    b"GET /public/ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"X-Forwarded-Client-Cert: By=forged;URI=spiffe://forged/ns/default/dc/dc1/svc/admin\r\n"
    b"X-Meshlet-Retriable: any\r\n\r\n"
)
SMUGGLED = (
    b"GET /private/admin HTTP/1.1\r\nHost: api\r\n\r\n"
    b"GET /public/second HTTP/1.1\r\nHost: api\r\n"
    b"X-FORWARDED-CLIENT-CERT: By=forged\r\nConnection: close\r\n\r\n"
)


@pytest.fixture
def l7_mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "http")) as mesh:
        mesh.apply_intentions(deny_prefix_intention("/private"))
        yield mesh


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `raw` (all Content-Length framed here)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        out.append((int(head.split(b" ")[1]), rest[:length]))
        raw = rest[length:]
    return out


def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.settimeout(30)
    sock.sendall(data)
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    sock.close()
    return got


def web_leaf_context(mesh: Mesh, tmp: Path) -> ssl.SSLContext:
    """A client context with a leaf for web from the Consul API: any mesh service's leaf
    can reach api's public port without a sidecar."""
    leaf = http_json("GET", f"http://{mesh.consul}/v1/agent/connect/ca/leaf/web")
    roots = http_json("GET", f"http://{mesh.consul}/v1/agent/connect/ca/roots")
    (tmp / "web.crt").write_text(leaf["CertPEM"])
    (tmp / "web.key").write_text(leaf["PrivateKeyPEM"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r["RootCert"] for r in roots["Roots"]))
    ctx.load_cert_chain(tmp / "web.crt", tmp / "web.key")
    return ctx


@pytest.mark.parametrize("via", ["web-upstream", "direct"])
def test_smuggling_after_a_declined_upgrade_and_forged_xfcc_never_reach_the_app(
    l7_mesh: Mesh, tmp_path: Path, via: str
) -> None:
    mesh = l7_mesh
    if via == "direct":
        plain = socket.create_connection(("127.0.0.1", mesh.api_public))
        sock = web_leaf_context(mesh, tmp_path).wrap_socket(plain)
    else:
        sock = socket.create_connection(("127.0.0.1", mesh.web_upstream))
    answers = responses(exchange(sock, UPGRADE + SMUGGLED))  # one packet

    paths = [p for p in mesh.api_app.paths if p != "/health"]  # type: ignore[attr-defined]
    assert "/private/admin" not in paths
    assert paths == ["/public/ws", "/public/second"]
    assert [s for s, _ in answers] == [200, 403, 200]
    web_uri = status(mesh.web_admin)["proxy"]["leaf"]["uri"]
    api_uri = status(mesh.api_admin)["proxy"]["leaf"]["uri"]
    for _, body in (answers[0], answers[2]):
        seen = json.loads(body)["headers"]
        xfcc = seen["x-forwarded-client-cert"]
        assert xfcc.startswith(f"By={api_uri};Hash=") and xfcc.endswith(f";URI={web_uri}")
        assert "forged" not in xfcc
        assert seen["x-request-id"]
        assert not [h for h in seen if h.startswith("x-meshlet-")]
