"""Issue 10 items 2, 3 and 9 as reported: two `meshlet sidecar`s on `meshlet dev`, an L7
intention that denies web `/admin` on api, and requests written by hand to web's upstream port.
api's sidecar runs with `sidecar.path_normalization: merge_slashes`, so this also proves the key
reaches the inbound listener."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.mesh import Mesh, running


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    with running(Mesh(tmp_path, "http"), api_sidecar="  path_normalization: merge_slashes\n") as m:
        m.apply_intentions(
            {
                "Kind": "service-intentions",
                "Name": "api",
                "Sources": [
                    {
                        "Name": "web",
                        "Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}],
                    }
                ],
            }
        )
        yield m


def send(port: int, head: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def test_targets_written_by_hand_are_decided_and_forwarded_as_one_path(mesh: Mesh) -> None:
    def paths() -> list[str]:  # what api's app received, without its health checks
        return [p for p in mesh.api_app.paths if p != "/health"]  # type: ignore[attr-defined]

    up = mesh.web_upstream
    # Absolute-form used to match no path rule at all and reach the app as sent.
    assert send(up, b"GET http://api/admin HTTP/1.1\r\nHost: api\r\n\r\n")[0] == 403
    assert send(up, b"GET http://api/admin/x?y HTTP/1.1\r\nHost: other\r\n\r\n")[0] == 403
    # merge_slashes, configured for api's sidecar.
    assert send(up, b"GET //admin HTTP/1.1\r\nHost: api\r\n\r\n")[0] == 403
    assert send(up, b"GET /public/%2e%2e/admin HTTP/1.1\r\nHost: api\r\n\r\n")[0] == 403
    assert paths() == []
    # What is allowed reaches the app as it was decided on.
    status, body = send(up, b"GET /admin/../public//x#frag HTTP/1.1\r\nHost: api\r\n\r\n")
    assert status == 200
    assert json.loads(body)["path"] == "/public/x"
    status, body = send(up, b"GET http://api:1234/public?q=/../admin HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    seen = json.loads(body)
    assert (seen["path"], seen["headers"]["host"]) == ("/public?q=/../admin", "api:1234")
    # Item 9: HTTP/1.0 without Host goes on with the upstream's name as Host.
    status, body = send(up, b"GET /hello HTTP/1.0\r\n\r\n")
    assert status == 200
    seen = json.loads(body)
    assert (seen["path"], seen["headers"]["host"]) == ("/hello", "api")
    assert paths() == ["/public/x", "/public?q=/../admin", "/hello"]
