"""Opt-in: the rendered units under a real systemd in private namespaces
(tests/deploy/systemd_in_namespace.sh says what it checks and needs). It boots a service
manager, so it runs only when asked: MESHLET_REAL_SYSTEMD=/path/to/meshlet, whose interpreter
the unit's ProtectHome=/PrivateTmp= must not hide."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("systemd_in_namespace.sh")


@pytest.mark.timeout(240)
def test_units_under_a_real_systemd(tmp_path: Path) -> None:
    meshlet = os.environ.get("MESHLET_REAL_SYSTEMD")
    if not meshlet:
        pytest.skip("opt-in: set MESHLET_REAL_SYSTEMD to a meshlet console script (needs root)")
    done = subprocess.run(
        [str(SCRIPT), meshlet, str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("OK: meshlet-sidecar@web.service under systemd")
