"""An http mesh (tests/integration/test_sidecar_mesh.py) whose api app answers by path:
/fail is a 500, /slow answers after 300 ms, anything else a 200 at once."""

from __future__ import annotations

import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.integration.mesh import Mesh, serve


class ProfiledApp(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(0.3)
        code = 500 if self.path.startswith("/fail") else 200
        body = b"ok" if code == 200 else b"failed"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def profiled_mesh(tmp_path: Path) -> Mesh:
    """The mesh, not started, with api's app `ProfiledApp`."""
    return Mesh(tmp_path, "http", api_app=lambda _: serve(ProfiledApp))
