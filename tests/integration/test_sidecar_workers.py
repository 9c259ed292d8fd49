"""`meshlet sidecar --workers 2` as real processes against `meshlet dev`.

web (an http service) runs `meshlet sidecar --workers 2` with one http upstream, api, whose
sidecar is a single process. Checked from outside, through /proc: both of web's processes
hold listening sockets on every port; new connections through the upstream port are accepted
by both (the kernel's SO_REUSEPORT hash spreads them) and all reach api's app; a worker
SIGKILLed is restarted while the parent keeps serving; SIGTERM to the parent stops every
process (exit 0, nothing left); SIGKILL to the parent takes its worker with it.

Waits are on log lines, the parent's /v1/status and Consul blocking queries; the only polls
are of /proc and of status, bounded by a deadline that only catches a hang. No timing is
asserted.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_agent_process import wait_catalog
from tests.integration.test_sidecar_mesh import (
    Mesh,
    put_intentions,
    status,
    wait_line,
    wait_status,
)

DEADLINE = 60.0

pytestmark = pytest.mark.timeout(180)


# ---- who holds which socket, from /proc -------------------------------------------------------


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every TCP socket in our network namespace."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
            out.append(
                (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode)
            )
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(fd_dir / fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    return inodes


_LISTEN = "0A"


def listens(pid: int, port: int) -> bool:
    """Does process `pid` hold a listening socket on `port`?"""
    wanted = {i for lp, _, st, i in _tcp_sockets() if lp == port and st == _LISTEN}
    return bool(wanted & _socket_inodes(pid))


def accepted_by(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of the connection from `client_port` to `port`."""
    inodes = {i for lp, rp, st, i in _tcp_sockets() if lp == port and rp == client_port}
    for pid in pids:
        if inodes & _socket_inodes(pid):
            return pid
    return None


def gone(pid: int) -> bool:
    """No such process any more (or a zombie: it has exited, its sockets are closed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_until(done: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling /proc; the deadline only catches a hang


# ---- the mesh -----------------------------------------------------------------------------------


class WorkersMesh(Mesh):
    """test_sidecar_mesh's Mesh (api and web speak http) with web's sidecar on two workers."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "http")
        try:
            put_intentions(self.consul, "api", "allow")
            self.start(web_args=("--workers", "2"))
            st = wait_status(
                self.web_admin,
                lambda s: s["workers"]["processes"][0]["ready"],
                "web's worker serving",
            )
        except BaseException:
            self.stop()
            raise
        self.api, self.web = self.sidecars["api"], self.sidecars["web"]
        self.threads = self.drains
        self.parent = self.web.p.pid
        self.worker = int(st["workers"]["processes"][0]["pid"])


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[WorkersMesh]:
    m = WorkersMesh(tmp_path)
    try:
        yield m
    finally:
        m.stop()


def _through_upstream(port: int, path: str, pids: tuple[int, ...] = ()) -> int | None:
    """One request on a new connection, answered by api's app; which of `pids` accepted it
    (asked while the connection is open: the serving process holds its socket meanwhile)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body)
        assert json.loads(body)["app"] == "api"
        assert conn.sock is not None
        return accepted_by(port, conn.sock.getsockname()[1], pids)
    finally:
        conn.close()


# ---- tests ---------------------------------------------------------------------------------------


def test_both_processes_serve_and_a_killed_worker_comes_back(mesh: WorkersMesh) -> None:
    parent, worker = mesh.parent, mesh.worker
    assert parent != worker
    for port in (mesh.web_public, mesh.web_upstream):
        assert listens(parent, port), f"the parent does not listen on {port}"
        assert listens(worker, port), f"the worker does not listen on {port}"

    # New connections are spread by the kernel's hash of each connection's addresses: with
    # 60 of them, one socket getting them all has a chance of 2**-59.
    before = status(mesh.web_admin)["workers"]["stats_total"]["requests"]
    owners = [_through_upstream(mesh.web_upstream, f"/n{i}", (parent, worker)) for i in range(60)]
    assert set(owners) == {parent, worker}, owners
    # The parent's status counts every process's requests (workers report once a second).
    wait_status(
        mesh.web_admin,
        lambda s: s["workers"]["stats_total"]["requests"] >= before + 60,
        "all 60 requests counted across the processes",
    )
    st = status(mesh.web_admin)
    assert st["proxy"]["stats"]["requests"] < st["workers"]["stats_total"]["requests"]

    os.kill(worker, signal.SIGKILL)
    line = wait_line(mesh.web, f"worker 1 (pid {worker}) exited unexpectedly")
    assert "(killed by SIGKILL)" in line
    # The worker is dead and reaped (its sockets closed): every new connection is served,
    # by the parent or by the restarted worker once that one has bound.
    for i in range(20):
        _through_upstream(mesh.web_upstream, f"/down{i}")

    st = wait_status(
        mesh.web_admin,
        lambda s: (
            s["workers"]["processes"][0]["restarts"] == 1 and s["workers"]["processes"][0]["ready"]
        ),
        "the worker restarted and serving",
    )
    proc = st["workers"]["processes"][0]
    assert proc["last_exit"] == "killed by SIGKILL"
    assert proc["state"] == "running"
    restarted = int(proc["pid"])
    assert restarted != worker and gone(worker)
    assert listens(restarted, mesh.web_upstream) and listens(restarted, mesh.web_public)
    assert st["ready"] is True  # a worker down never made the instance unready
    assert st["degraded"] is False
    _through_upstream(mesh.web_upstream, "/after")


def test_sigterm_stops_every_process(mesh: WorkersMesh) -> None:
    worker = mesh.worker
    mesh.web.p.send_signal(signal.SIGTERM)
    assert mesh.web.p.wait(30) == 0
    mesh.threads["web"].join(30)  # the whole log (the worker's too), up to EOF
    text = "".join(mesh.web.lines)
    assert f"worker 1 (pid {worker}) stopped (exit code 0)" in text
    assert f"worker 1 (pid {worker}) meshlet.agent.worker: worker stopped" in text
    assert "exited unexpectedly" not in text
    assert text.index("worker stopped") < text.index("meshlet agent stopped")
    assert gone(worker)
    for port in (mesh.web_upstream, mesh.web_public):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    wait_catalog(mesh.consul, "/v1/catalog/service/web-sidecar-proxy", lambda b: b == [])


def test_a_worker_dies_with_its_parent(mesh: WorkersMesh) -> None:
    worker = mesh.worker
    mesh.web.p.kill()
    mesh.web.p.wait(30)
    wait_until(lambda: gone(worker), f"worker pid {worker} gone after its parent")
    mesh.threads["web"].join(30)  # EOF: no process is left holding the log pipe
    wait_until(lambda: not listens_any(mesh.web_upstream), "the upstream port released")
    assert status(mesh.api_admin)["ready"] is True  # the rest of the mesh is untouched


def listens_any(port: int) -> bool:
    return any(lp == port and st == _LISTEN for lp, _, st, _ in _tcp_sockets())


def _scraped_requests(admin: str) -> float:
    """istio_requests_total of the source reporter, summed over its series, from /metrics."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_requests_total{") and 'reporter="source"' in line
    )


def test_one_scrape_counts_the_requests_of_every_process(mesh: WorkersMesh) -> None:
    parent, worker = mesh.parent, mesh.worker
    owners = [_through_upstream(mesh.web_upstream, f"/m{i}", (parent, worker)) for i in range(60)]
    assert set(owners) == {parent, worker}, owners
    # Workers report their counters at most once a second: wait for the total.
    deadline = time.monotonic() + 30
    while _scraped_requests(mesh.web_admin) < 60:
        assert time.monotonic() < deadline, _scraped_requests(mesh.web_admin)
        time.sleep(0.1)
    assert _scraped_requests(mesh.web_admin) == 60
    # The parent's own share is less than what one scrape returns.
    own = status(mesh.web_admin)["proxy"]["stats"]["requests"]
    assert own < 60
