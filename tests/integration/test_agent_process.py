"""`meshlet agent` as a real process against `meshlet dev` as a real process: systemd
notifications, SIGTERM deregistering before exit, SIGHUP with a broken and a good file, and
devstack killed and restarted empty. Waits are on log lines, notify datagrams and Consul
blocking queries, never on sleeps."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MESHLET = shutil.which("meshlet", path=str(Path(sys.executable).parent)) or "meshlet"
ENV = {**os.environ, "PYTHONSAFEPATH": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Proc:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.p = subprocess.Popen(
            [MESHLET, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or ENV,
            # Its own process group: a sidecar's data planes are in it (`kill`).
            start_new_session=True,
        )

    def wait_for_line(self, text: str) -> str:
        assert self.p.stdout is not None
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise AssertionError(f"exited before {text!r}:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def kill(self) -> None:
        """SIGKILL the whole sidecar, as a machine or pod that dies: the agent and its data
        planes (which outlive the agent alone by design)."""
        children = _children(self.p.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, signal.SIGKILL)
        for pid in children:  # one that left the group would still hold the log pipe
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.p.wait(30)

    def stop(self) -> None:
        # Data planes outlive a SIGKILLed agent by design: the whole group is killed here,
        # or the log pipe they share never reaches EOF.
        self.kill()
        self.p.communicate(timeout=10)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def start_dev(port: int, args: tuple[str, ...] = ()) -> Proc:
    dev = Proc(["dev", "--http-addr", f"127.0.0.1:{port}", *args])
    dev.wait_for_line("HTTP API at http://")
    return dev


def _get(url: str) -> tuple[Any, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=40) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def wait_catalog(consul: str, path: str, done: Any) -> Any:
    """Blocking queries on `path` until `done(body)`; returns that body."""
    index = 0
    while True:
        body, headers = _get(f"http://{consul}{path}?index={index}&wait=20s")
        if done(body):
            return body
        index = int(headers["X-Consul-Index"])


def write_config(path: Path, consul: str, admin: str, upstreams: list[str], **extra: str) -> None:
    ups = "".join(
        f"  - {{name: {u}, local_bind_port: {9190 + i}}}\n" for i, u in enumerate(upstreams)
    )
    path.write_text(
        f"consul: {{address: '{consul}'}}\n"
        "service: {name: web, port: 8080, check: {ttl: 60s}}\n"
        f"sidecar:\n  port: 21000\n  upstreams:\n{ups or '  []'}\n"
        f"admin: {{address: '{admin}'}}\n"
        "watch: {retry_initial: 50ms, retry_max: 500ms}\n"
        f"shutdown: {{drain_period: {extra.get('drain', '60s')}}}\n"
    )


@pytest.fixture
def dev_port() -> Iterator[tuple[int, list[Proc]]]:
    port = _free_port()
    procs = [start_dev(port)]
    yield port, procs
    for p in procs:
        p.stop()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def _notes(sock: socket.socket, until: str) -> list[str]:
    seen = []
    while True:
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if until in msg:
            return seen


def test_sigterm_deregisters_before_exit(
    tmp_path: Path, dev_port: tuple[int, list[Proc]], notify_socket: tuple[socket.socket, str]
) -> None:
    port, _ = dev_port
    consul, admin = f"127.0.0.1:{port}", f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    sock, path = notify_socket
    agent = Proc(["agent", "-c", str(cfg)], env={**ENV, "NOTIFY_SOCKET": path})
    try:
        ready = _notes(sock, "READY=1")[-1]
        assert "STATUS=ready, 1 upstreams" in ready
        wait_catalog(consul, "/v1/catalog/service/web", lambda b: len(b) == 1)
        body, _ = _get(f"http://{admin}/ready")
        assert body == {"ready": True, "reasons": []}

        agent.p.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _notes(sock, "STOPPING=1")[-1]
        # Deregistered while the agent is still draining (drain_period is 60s).
        wait_catalog(consul, "/v1/catalog/service/web", lambda b: b == [])
        assert wait_catalog(consul, "/v1/catalog/connect/web", lambda b: b == []) == []
        assert agent.p.poll() is None
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(f"http://{admin}/ready")
        assert info.value.code == 503
        info.value.close()
        agent.wait_for_line("deregistered; draining for 60s")
        agent.p.send_signal(signal.SIGTERM)  # a second signal ends the drain
        assert agent.p.wait(20) == 0
        out = "".join(agent.lines) + (agent.p.stdout.read() if agent.p.stdout else "")
        assert out.index("deregistered web") < out.index("meshlet agent stopped")
    finally:
        agent.stop()


def test_sighup_with_a_broken_file_keeps_the_running_config(
    tmp_path: Path, dev_port: tuple[int, list[Proc]], notify_socket: tuple[socket.socket, str]
) -> None:
    port, _ = dev_port
    consul, admin = f"127.0.0.1:{port}", f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    sock, path = notify_socket
    agent = Proc(["agent", "-c", str(cfg)], env={**ENV, "NOTIFY_SOCKET": path})
    try:
        _notes(sock, "READY=1")
        cfg.write_text("service: {name: web, port: nope}\n")
        agent.p.send_signal(signal.SIGHUP)
        assert "RELOADING=1" in _notes(sock, "RELOADING=1")[-1]
        agent.wait_for_line("reload failed, keeping the running configuration")
        _notes(sock, "READY=1")
        status, _ = _get(f"http://{admin}/v1/status")
        assert (
            "service.port: expected an integer, got 'nope'"
            in (status["config"]["last_reload_error"])
        )
        assert [u["name"] for u in status["upstreams"]] == ["api"]
        assert status["ready"] is True
        assert len(wait_catalog(consul, "/v1/catalog/service/web", lambda b: len(b) == 1)) == 1

        # A good file is applied in place: a new upstream watched.
        write_config(cfg, consul, admin, ["api", "db"])
        agent.p.send_signal(signal.SIGHUP)
        agent.wait_for_line("reloaded")
        assert any("watching upstream db" in line for line in agent.lines)  # logged before
        status, _ = _get(f"http://{admin}/v1/status")
        assert [u["name"] for u in status["upstreams"]] == ["api", "db"]
        assert status["config"]["reloads"] == 1
    finally:
        agent.stop()


def test_devstack_restarted_empty_gets_the_registration_back(
    tmp_path: Path, dev_port: tuple[int, list[Proc]]
) -> None:
    port, procs = dev_port
    consul, admin = f"127.0.0.1:{port}", f"127.0.0.1:{_free_port()}"
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    agent = Proc(["agent", "-c", str(cfg)])
    try:
        agent.wait_for_line("ready: ready")
        procs[0].p.kill()
        procs[0].stop()
        agent.wait_for_line("Consul is unreachable")
        status, _ = _get(f"http://{admin}/v1/status")
        assert status["degraded"] is True and status["ready"] is True
        assert status["upstreams"][0]["index"] is not None  # the last snapshot is kept

        started = time.monotonic()
        procs.append(start_dev(port))
        wait_catalog(consul, "/v1/catalog/service/web", lambda b: len(b) == 1)
        elapsed = time.monotonic() - started
        print(f"\nre-registered {elapsed:.2f}s after a fresh devstack came up")
        assert len(wait_catalog(consul, "/v1/catalog/service/web", lambda b: len(b) == 1)) == 1
        agent.wait_for_line("Consul is reachable again")
    finally:
        agent.stop()


def _put(url: str, body: Any) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def test_meshlet_agent_leaves_no_sidecar_check_that_cannot_pass(
    tmp_path: Path, dev_port: tuple[int, list[Proc]]
) -> None:
    """`meshlet agent` runs no proxy: it registers the service alone, says so, and removes a
    sidecar an earlier `meshlet sidecar` of the same ID left, whose check nothing would pass."""
    port, _ = dev_port
    consul, admin = f"127.0.0.1:{port}", f"127.0.0.1:{_free_port()}"
    _put(
        f"http://{consul}/v1/agent/service/register",
        {"Name": "web", "ID": "web", "Port": 8080, "Connect": {"SidecarService": {"Port": 21000}}},
    )
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, consul, admin, ["api"])
    agent = Proc(["agent", "-c", str(cfg)])
    try:
        agent.wait_for_line("ready: ready")
        services, _ = _get(f"http://{consul}/v1/agent/services")
        checks, _ = _get(f"http://{consul}/v1/agent/checks")
        assert sorted(services) == ["web"]
        assert [c["ServiceID"] for c in checks.values()] == ["web"]
        assert _get(f"http://{consul}/v1/health/checks/web-sidecar-proxy")[0] == []
        said = "".join(agent.lines)
        assert "meshlet agent runs no proxy: web is registered without a sidecar" in said
        status, _ = _get(f"http://{admin}/v1/status")
        assert status["ready"] is True
        assert "meshlet agent runs no proxy" in status["sidecar"]["reasons"][0]
    finally:
        agent.stop()


def test_invalid_file_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("service: {name: web}\nsidecar: {protocol: udp}\n")
    for args in (["agent", "-c", str(cfg)], ["agent", "--check-config", "-c", str(cfg)]):
        done = subprocess.run(
            [MESHLET, *args], capture_output=True, text=True, env=ENV, timeout=30, check=False
        )
        assert done.returncode == 2
        assert f"{cfg}: 2 problems:" in done.stderr
        assert "service.port: required" in done.stderr
        assert "sidecar.protocol: expected one of tcp, http, http2, grpc, got 'udp'" in done.stderr


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, "127.0.0.1:8500", "127.0.0.1:19000", ["api"])
    done = subprocess.run(
        [MESHLET, "agent", "--check-config", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "valid (service web, 1 upstreams)" in done.stdout
