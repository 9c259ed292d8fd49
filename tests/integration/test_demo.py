"""`make demo` runs `meshlet demo`: the README's first command must show the mesh working."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"


@pytest.mark.timeout(180)
def test_demo_shows_mtls_traffic_then_a_deny_then_traffic_again() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [MESHLET, "demo", "--http-addr", f"127.0.0.1:{port}", "--once"],
        capture_output=True,
        text=True,
        check=False,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    deny = next(i for i, line in enumerate(lines) if "web -> api DENY" in line)
    allow = next(i for i, line in enumerate(lines) if "web -> api ALLOW" in line)
    before, during, after = lines[:deny], lines[deny:allow], lines[allow:]
    assert any("200 hello from api; mTLS caller (XFCC): web" in line for line in before)
    assert any("403 RBAC: access denied" in line for line in during)
    assert any("200 hello from api" in line for line in after)
    assert lines[-1] == "==> demo stopped"
