"""`meshlet dev` as a real process: readiness, signals, leave, bad flags."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"


@pytest.fixture
def dev_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [MESHLET, "dev", "--http-addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONSAFEPATH": "1"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the banner is printed once the listener is up
    assert "HTTP API at http://" in line, line
    url = line.rsplit(" ", 1)[1].strip()
    yield proc, url
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)  # reaps the process and closes its pipes


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_ready_then_stops_cleanly_on_sigterm(
    dev_process: tuple[subprocess.Popen[str], str],
) -> None:
    proc, url = dev_process
    leader = _get(url + "/v1/status/leader")
    assert isinstance(leader, str) and leader
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_sigint_stops_it_too(dev_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = dev_process
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0


def test_agent_leave_ends_the_process(dev_process: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = dev_process
    req = urllib.request.Request(url + "/v1/agent/leave", method="PUT")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert proc.wait(10) == 0


def test_bad_address_is_a_clear_error() -> None:
    done = subprocess.run(
        [MESHLET, "dev", "--http-addr", "nowhere"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "expected HOST:PORT" in done.stderr


def test_busy_port_is_a_clear_error(dev_process: tuple[subprocess.Popen[str], str]) -> None:
    _, url = dev_process
    addr = url.removeprefix("http://")
    done = subprocess.run(
        [MESHLET, "dev", "--http-addr", addr],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert f"cannot listen on {addr}" in done.stderr
