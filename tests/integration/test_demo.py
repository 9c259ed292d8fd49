"""`make demo` runs `meshlet demo`: it must show each step working, end by itself, exit 0, and
leave nothing behind (no process of its session, no listening port, no temp directory).

The demo runs in a session of its own, so every process it started, whatever it did with its
process group, is found afterwards by its session ID in /proc.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"


def _built(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# What this build's demo must show. A step whose feature is not built is SKIPped ("not
# available in this build"); once the feature is built its step must PASS. Whether it is
# built is judged here from the code, independently of the demo's own capability checks
# (agent/demo/capabilities.py reads the sidecar's /v1/status and /metrics), so a check that
# fails to see a feature fails this test instead of silently skipping the step.
ROUTING = "PASS" if _built("agent.routing") else "SKIP"  # proxy applies the discovery chain
METRICS = "PASS" if _built("agent.metrics") else "SKIP"  # /metrics with the istio_* names
EXPECTED = {
    "mtls": "PASS",
    "authorization": "PASS",
    "canary": ROUTING,
    "retry": ROUTING,
    "metrics": METRICS,
}
SIDECAR_LINE = re.compile(r"^    (\S+)\s+pid (\d+)\s+app :(\d+)\s+mTLS :(\d+)\s+admin \S+:(\d+)")
UPSTREAM_PORT = re.compile(r" at :(\d+)")
RESULT_LINE = re.compile(r"^    (\S+)\s+(PASS|FAIL|SKIP)  (.*)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [MESHLET, "demo", "--http-addr", f"127.0.0.1:{port}", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _session_members(sid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after ')'.
        fields = text.rpartition(")")[2].split()
        # A zombie runs nothing (whoever adopted an orphan may reap it late).
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(text[:80])
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR: connections left in TIME_WAIT do not count, only a listener would.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _assert_nothing_left(sid: int, stdout: str, devstack_port: int) -> None:
    lines = stdout.splitlines()
    ports = [devstack_port]
    pids = []
    for line in lines:
        m = SIDECAR_LINE.match(line)
        if m:
            pids.append(int(m.group(2)))
            ports += [int(p) for p in m.group(3, 4, 5)]
            ports += [int(p) for p in UPSTREAM_PORT.findall(line)]
    assert len(pids) == 5, stdout
    assert _session_members(sid) == [], "processes of the demo's session still run"
    assert [p for p in ports if _listening(p)] == [], "ports still listening"
    (tmp,) = re.findall(r"configs and logs in (\S+),", stdout)
    assert not Path(tmp).exists()


@pytest.mark.timeout(200)
def test_demo_shows_each_step_ends_by_itself_and_leaves_nothing() -> None:
    port = _free_port()
    proc = _start(port)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout + stderr
    lines = stdout.splitlines()
    summary = lines.index("==> summary")
    results = {}
    for line in lines[summary + 1 :]:
        m = RESULT_LINE.match(line)
        if m:
            results[m.group(1)] = (m.group(2), m.group(3))
    assert {step: outcome for step, (outcome, _) in results.items()} == EXPECTED, stdout
    for step, (outcome, detail) in results.items():
        if outcome == "SKIP":
            assert detail.startswith("not available in this build: "), (step, detail)
    assert lines[-1].startswith("==> demo stopped: every step shown behaved"), stdout
    # The examples went through meshlet's translators.
    assert "$ meshlet intentions apply --single-namespace production" in stdout
    assert "wrote default/payment-service" in stdout
    assert "service-splitter/api" in stdout and "service-router/payment-service" in stdout
    # What the apps really received, as the live tables show it.
    assert re.search(r"web -> order-service\s+200\s+spiffe://[^ ]+/svc/web$", stdout, re.M)
    assert re.search(
        r"order-service -> payment-service\s+200\s+spiffe://[^ ]+/svc/order-service$", stdout, re.M
    )
    assert re.search(
        r"no certificate -> payment-service\s+none\s+\(nothing reached the app\)", stdout
    )
    # The live table is a row a second, not a line per request.
    auth = lines[lines.index(next(x for x in lines if x.startswith("==> 2."))) :]
    rows = [x for x in auth[: auth.index("")] if re.match(r"^    [\d.]+s ", x)]
    assert 3 <= len(rows) <= 5, rows
    _assert_nothing_left(proc.pid, stdout, port)


@pytest.mark.timeout(200)
def test_ctrl_c_stops_the_demo_and_leaves_nothing() -> None:
    port = _free_port()
    proc = _start(port)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("==> 2. authorization"):
            break
    else:
        pytest.fail("the demo ended before its second step: " + "".join(seen))
    # As the terminal does on Ctrl-C, to the foreground process group (the demo's own;
    # its sidecars are in another, which is why the demo must stop them itself).
    os.killpg(proc.pid, signal.SIGINT)
    rest, stderr = proc.communicate(timeout=60)
    stdout = "".join(seen) + rest
    assert proc.returncode == 130, stdout + stderr
    assert "==> interrupted: stopping the sidecars and devstack" in stdout
    assert "==> summary" not in stdout
    _assert_nothing_left(proc.pid, stdout, port)


@pytest.mark.timeout(200)
def test_a_killed_demo_takes_its_sidecars_with_it() -> None:
    """SIGKILL leaves the demo no chance to clean up: the sidecars still go (the kernel sends
    them SIGTERM when their parent dies), though the temp directory stays."""
    port = _free_port()
    proc = _start(port)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("    all ready"):
            break
    else:
        pytest.fail("the demo ended before its sidecars were ready: " + "".join(seen))
    pids = [int(m.group(2)) for line in seen if (m := SIDECAR_LINE.match(line))]
    assert len(pids) == 5
    proc.kill()
    proc.communicate(timeout=30)
    (tmp,) = re.findall(r"configs and logs in (\S+),", "".join(seen))
    shutil.rmtree(tmp, ignore_errors=True)
    deadline = time.monotonic() + 60
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_members(proc.pid) == [], "sidecars outlived the killed demo"
